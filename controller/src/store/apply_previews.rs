//! Applying the preview commands. A preview is identified by its project and key (`pr-<n>`, or
//! a branch's slug); one live preview per key, destroyed ones stay as history.

use sqlx::{Sqlite, Transaction};

use super::state_machine::StateEvent;
use crate::command::{Command, CommandResponse, Rejection};

pub(super) async fn apply(
    tx: &mut Transaction<'_, Sqlite>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> Result<CommandResponse, sqlx::Error> {
    match command {
        Command::PutPreview { id, project_id, key, origin, number, branch, commit, expires_at, deployments, at } => {
            let enabled: Option<bool> = sqlx::query_scalar("SELECT previews_enabled != 0 FROM projects WHERE id = ?")
                .bind(&project_id)
                .fetch_optional(&mut **tx)
                .await?;
            match enabled {
                None => {
                    return Ok(CommandResponse::rejected(
                        Rejection::NotFound,
                        format!("no project with id {project_id}"),
                    ))
                }
                Some(false) => {
                    return Ok(CommandResponse::rejected(
                        Rejection::Invalid,
                        "previews are turned off for this project",
                    ))
                }
                Some(true) => {}
            }
            let live: Option<String> = sqlx::query_scalar(
                "UPDATE previews SET branch = ?1, commit_sha = ?2, expires_at = ?3, updated_at = ?4 \
                 WHERE project_id = ?5 AND key = ?6 AND status = 'active' RETURNING id",
            )
            .bind(&branch)
            .bind(&commit)
            .bind(expires_at)
            .bind(at)
            .bind(&project_id)
            .bind(&key)
            .fetch_optional(&mut **tx)
            .await?;
            if live.is_none() {
                let tearing: Option<String> = sqlx::query_scalar(
                    "SELECT id FROM previews WHERE project_id = ? AND key = ? AND status = 'destroying'",
                )
                .bind(&project_id)
                .bind(&key)
                .fetch_optional(&mut **tx)
                .await?;
                if tearing.is_some() {
                    return Ok(CommandResponse::rejected(
                        Rejection::Conflict,
                        format!("preview {key} is still being torn down; try again in a moment"),
                    ));
                }
                sqlx::query(
                    "INSERT INTO previews (id, project_id, key, origin, number, branch, commit_sha, status, expires_at, \
                     created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?)",
                )
                .bind(&id)
                .bind(&project_id)
                .bind(&key)
                .bind(&origin)
                .bind(number.map(|n| n as i64))
                .bind(&branch)
                .bind(&commit)
                .bind(expires_at)
                .bind(at)
                .bind(at)
                .execute(&mut **tx)
                .await?;
            }
            for command in deployments {
                match command {
                    Command::CreateDeployment { preview, .. } if preview != key => {}
                    command @ Command::CreateDeployment { .. } => {
                        super::apply_deploy::apply(tx, command, events).await?;
                    }
                    _ => {}
                }
            }
            events.push(StateEvent::PreviewsChanged);
            Ok(CommandResponse::Applied)
        }
        Command::DestroyPreview { project_id, key, reason, at } => {
            let done = sqlx::query(
                "UPDATE previews SET status = 'destroying', teardown_error = NULL, updated_at = ?1 \
                 WHERE project_id = ?2 AND key = ?3 AND status = 'active'",
            )
            .bind(at)
            .bind(&project_id)
            .bind(&key)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(
                    Rejection::NotFound,
                    format!("no live preview {key} in this project"),
                ));
            }
            // Its releases end now: their hosts stop answering at once, and none is started again.
            let ended: Vec<String> = sqlx::query_scalar(
                "UPDATE deployments SET status = 'cancelled', error = ?1, finished_at = COALESCE(finished_at, ?2), \
                 updated_at = ?2 WHERE project_id = ?3 AND preview = ?4 \
                 AND status IN ('queued', 'building', 'deploying', 'running') RETURNING id",
            )
            .bind(format!("the preview was destroyed: {reason}"))
            .bind(at)
            .bind(&project_id)
            .bind(&key)
            .fetch_all(&mut **tx)
            .await?;
            for id in ended {
                events.push(StateEvent::DeploymentChanged { id, project_id: project_id.clone() });
            }
            events.push(StateEvent::PreviewsChanged);
            Ok(CommandResponse::Applied)
        }
        Command::PreviewTeardown { project_id, key, error, at } => {
            let done = match &error {
                None => {
                    sqlx::query(
                        "UPDATE previews SET status = 'destroyed', teardown_error = NULL, destroyed_at = ?1, \
                         updated_at = ?1, teardown_tries = teardown_tries + 1 \
                         WHERE project_id = ?2 AND key = ?3 AND status = 'destroying'",
                    )
                    .bind(at)
                    .bind(&project_id)
                    .bind(&key)
                    .execute(&mut **tx)
                    .await?
                }
                Some(error) => sqlx::query(
                    "UPDATE previews SET teardown_error = ?1, updated_at = ?2, teardown_tries = teardown_tries + 1 \
                         WHERE project_id = ?3 AND key = ?4 AND status = 'destroying'",
                )
                .bind(error)
                .bind(at)
                .bind(&project_id)
                .bind(&key)
                .execute(&mut **tx)
                .await?,
            };
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(
                    Rejection::NotFound,
                    format!("preview {key} is not being torn down"),
                ));
            }
            events.push(StateEvent::PreviewsChanged);
            Ok(CommandResponse::Applied)
        }
        Command::SetPreviewsEnabled { project_id, enabled } => {
            let done = sqlx::query("UPDATE projects SET previews_enabled = ? WHERE id = ?")
                .bind(enabled)
                .bind(&project_id)
                .execute(&mut **tx)
                .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no project with id {project_id}")));
            }
            Ok(CommandResponse::Applied)
        }
        other => Ok(CommandResponse::rejected(Rejection::Invalid, format!("not a preview command: {}", other.kind()))),
    }
}
