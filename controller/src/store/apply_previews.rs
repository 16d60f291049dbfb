//! Applying the preview commands. A preview is identified by its project and key (`pr-<n>`, or
//! a branch's slug); one live preview per key, destroyed ones stay as history.

use rusqlite::{params, OptionalExtension, Transaction};

use super::apply::{column, exec, scalar};
use super::state_machine::StateEvent;
use crate::command::{Command, CommandResponse, Rejection};

pub(super) fn apply(
    tx: &Transaction<'_>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> rusqlite::Result<CommandResponse> {
    match command {
        Command::PutPreview { id, project_id, key, origin, number, branch, commit, expires_at, deployments, at } => {
            let enabled: Option<bool> =
                scalar(tx, "SELECT previews_enabled != 0 FROM projects WHERE id = ?", [&project_id])?;
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
            let live: Option<String> = scalar(
                tx,
                "UPDATE previews SET branch = ?1, commit_sha = ?2, expires_at = ?3, updated_at = ?4 \
                 WHERE project_id = ?5 AND key = ?6 AND status = 'active' RETURNING id",
                params![branch, commit, expires_at, at, project_id, key],
            )?;
            if live.is_none() {
                let tearing: Option<String> = scalar(
                    tx,
                    "SELECT id FROM previews WHERE project_id = ? AND key = ? AND status = 'destroying'",
                    [&project_id, &key],
                )?;
                if tearing.is_some() {
                    return Ok(CommandResponse::rejected(
                        Rejection::Conflict,
                        format!("preview {key} is still being torn down; try again in a moment"),
                    ));
                }
                // Each of the project's services gets a host `<service>-<project>-<key>`, which a
                // service of another project (`web` in `shop-pr-1`) may already have.
                let hosts: Vec<String> = column(
                    tx,
                    "SELECT s.name || '-' || p.name || '-' || ?1 FROM services s JOIN projects p ON p.id = s.project_id \
                     WHERE s.project_id = ?2",
                    [&key, &project_id],
                )?;
                if let Some(taken) = host_taken(tx, &hosts, HostOwner::Preview)? {
                    return Ok(CommandResponse::rejected(
                        Rejection::Conflict,
                        format!("preview {key} cannot be created: {taken}"),
                    ));
                }
                exec(
                    tx,
                    "INSERT INTO previews (id, project_id, key, origin, number, branch, commit_sha, status, expires_at, \
                     created_at, updated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'active', ?8, ?9, ?9)",
                    params![id, project_id, key, origin, number.map(|n| n as i64), branch, commit, expires_at, at],
                )?;
            }
            for command in deployments {
                match command {
                    Command::CreateDeployment { preview, .. } if preview != key => {}
                    command @ Command::CreateDeployment { .. } => {
                        super::apply_deploy::apply(tx, command, events)?;
                    }
                    _ => {}
                }
            }
            events.push(StateEvent::PreviewsChanged);
            Ok(CommandResponse::Applied)
        }
        Command::DestroyPreview { project_id, key, reason, at } => {
            let done = exec(
                tx,
                "UPDATE previews SET status = 'destroying', teardown_error = NULL, updated_at = ?1 \
                 WHERE project_id = ?2 AND key = ?3 AND status = 'active'",
                params![at, project_id, key],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(
                    Rejection::NotFound,
                    format!("no live preview {key} in this project"),
                ));
            }
            // Its releases end now: their hosts stop answering at once, and none is started again.
            let ended: Vec<String> = column(
                tx,
                "UPDATE deployments SET status = 'cancelled', error = ?1, finished_at = COALESCE(finished_at, ?2), \
                 updated_at = ?2 WHERE project_id = ?3 AND preview = ?4 \
                 AND status IN ('queued', 'building', 'deploying', 'running') RETURNING id",
                params![format!("the preview was destroyed: {reason}"), at, project_id, key],
            )?;
            for id in ended {
                events.push(StateEvent::DeploymentChanged { id, project_id: project_id.clone() });
            }
            events.push(StateEvent::PreviewsChanged);
            Ok(CommandResponse::Applied)
        }
        Command::PreviewTeardown { project_id, key, error, at } => {
            let done = match &error {
                None => exec(
                    tx,
                    "UPDATE previews SET status = 'destroyed', teardown_error = NULL, destroyed_at = ?1, \
                     updated_at = ?1, teardown_tries = teardown_tries + 1 \
                     WHERE project_id = ?2 AND key = ?3 AND status = 'destroying'",
                    params![at, project_id, key],
                )?,
                Some(error) => exec(
                    tx,
                    "UPDATE previews SET teardown_error = ?1, updated_at = ?2, teardown_tries = teardown_tries + 1 \
                     WHERE project_id = ?3 AND key = ?4 AND status = 'destroying'",
                    params![error, at, project_id, key],
                )?,
            };
            if done == 0 {
                return Ok(CommandResponse::rejected(
                    Rejection::NotFound,
                    format!("preview {key} is not being torn down"),
                ));
            }
            events.push(StateEvent::PreviewsChanged);
            Ok(CommandResponse::Applied)
        }
        Command::SetPreviewsEnabled { project_id, enabled } => {
            let done = exec(tx, "UPDATE projects SET previews_enabled = ? WHERE id = ?", params![enabled, project_id])?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no project with id {project_id}")));
            }
            Ok(CommandResponse::Applied)
        }
        other => Ok(CommandResponse::rejected(Rejection::Invalid, format!("not a preview command: {}", other.kind()))),
    }
}

/// Who asks for new default hosts.
pub(super) enum HostOwner<'a> {
    /// A service being created or changed (by id): its own hosts and its previews' are no clash.
    Service(&'a str),
    /// A new preview.
    Preview,
}

/// Says who already has one of `hosts`, default host labels written out in full
/// (`<service>-<project>`, `<service>-<project>-<preview>`), among every service and live
/// preview but `owner`'s own. Labels are compared before they are shortened to 63 characters:
/// a shortened label ends in a hash of the whole, so two are equal when the whole ones are.
pub(super) fn host_taken(
    tx: &Transaction<'_>,
    hosts: &[String],
    owner: HostOwner<'_>,
) -> rusqlite::Result<Option<String>> {
    if hosts.is_empty() {
        return Ok(None);
    }
    let own = match owner {
        HostOwner::Service(id) => id,
        HostOwner::Preview => "",
    };
    let wanted = serde_json::to_string(hosts).unwrap_or_default();
    let holder: Option<(String, String, String)> = tx
        .prepare_cached(
            "SELECT s.name, p.name, '' FROM services s JOIN projects p ON p.id = s.project_id \
             WHERE s.id != ?1 AND s.name || '-' || p.name IN (SELECT value FROM json_each(?2)) \
             UNION ALL \
             SELECT s.name, p.name, v.key FROM previews v JOIN services s ON s.project_id = v.project_id \
             JOIN projects p ON p.id = v.project_id WHERE v.status != 'destroyed' AND s.id != ?1 \
             AND s.name || '-' || p.name || '-' || v.key IN (SELECT value FROM json_each(?2)) LIMIT 1",
        )?
        .query_row(params![own, wanted], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .optional()?;
    Ok(holder.map(|(service, project, preview)| {
        let label = crate::ingress::host_label(&service, &project, &preview);
        if preview.is_empty() {
            format!("the host name {label}.<base domain> is taken by service \"{service}\" of project \"{project}\"")
        } else {
            format!(
                "the host name {label}.<base domain> is taken by preview {preview} of service \"{service}\" in \
                 project \"{project}\""
            )
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::super::test_state as state;
    use crate::command::{Command, CommandResponse, Rejection};

    async fn run(pool: &sqlx::SqlitePool, command: Command) -> CommandResponse {
        super::super::test_apply(pool, command).await.0
    }

    async fn project(pool: &sqlx::SqlitePool, name: &str) {
        let created =
            run(pool, Command::CreateProject { id: name.into(), name: name.into(), created_at: 1, owner: None }).await;
        assert!(matches!(created, CommandResponse::Applied), "{created:?}");
    }

    fn service(project: &str, name: &str) -> Command {
        Command::PutService {
            id: format!("{project}/{name}"),
            project_id: project.into(),
            name: name.into(),
            create: true,
            spec: serde_json::json!({}),
            depends_on: Vec::new(),
            domains: Vec::new(),
            set_secrets: Vec::new(),
            unset_secrets: Vec::new(),
            at: 1,
        }
    }

    fn preview(project: &str, key: &str) -> Command {
        Command::PutPreview {
            id: format!("{project}/{key}"),
            project_id: project.into(),
            key: key.into(),
            origin: "api".into(),
            number: None,
            branch: "feature".into(),
            commit: String::new(),
            expires_at: 10,
            deployments: Vec::new(),
            at: 1,
        }
    }

    fn conflict(response: &CommandResponse) -> String {
        match response {
            CommandResponse::Rejected { reason: Rejection::Conflict, message } => message.clone(),
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_preview_whose_host_another_service_has_is_refused() {
        let (_dir, pool) = state().await;
        project(&pool, "shop").await;
        assert!(matches!(run(&pool, service("shop", "web")).await, CommandResponse::Applied));
        // `web` in `shop-pr-1` is web-shop-pr-1, which is also preview pr-1 of `web` in `shop`.
        project(&pool, "shop-pr-1").await;
        assert!(matches!(run(&pool, service("shop-pr-1", "web")).await, CommandResponse::Applied));

        let message = conflict(&run(&pool, preview("shop", "pr-1")).await);
        assert!(message.contains("web-shop-pr-1"), "{message}");
        assert!(message.contains("service \"web\" of project \"shop-pr-1\""), "{message}");
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM previews").fetch_one(&pool).await.unwrap();
        assert_eq!(stored, 0, "a refused preview leaves nothing behind");
        // Another key has hosts of its own.
        assert!(matches!(run(&pool, preview("shop", "pr-2")).await, CommandResponse::Applied));
    }

    #[tokio::test]
    async fn a_service_whose_host_a_live_preview_has_is_refused() {
        let (_dir, pool) = state().await;
        project(&pool, "shop").await;
        assert!(matches!(run(&pool, service("shop", "web")).await, CommandResponse::Applied));
        assert!(matches!(run(&pool, preview("shop", "feature")).await, CommandResponse::Applied));

        project(&pool, "shop-feature").await;
        let message = conflict(&run(&pool, service("shop-feature", "web")).await);
        assert!(message.contains("preview feature of service \"web\" in project \"shop\""), "{message}");
        assert!(message.contains("choose another service name"), "{message}");

        // A service added to a project with a live preview gets a preview host too: `api` in
        // `shop` would be api-shop-feature, and `api` in `shop-feature` has it.
        assert!(matches!(run(&pool, service("shop-feature", "api")).await, CommandResponse::Applied));
        let message = conflict(&run(&pool, service("shop", "api")).await);
        assert!(message.contains("service \"api\" of project \"shop-feature\""), "{message}");

        // Once the preview is destroyed its hosts are free.
        let destroyed = run(
            &pool,
            Command::DestroyPreview { project_id: "shop".into(), key: "feature".into(), reason: "test".into(), at: 2 },
        )
        .await;
        assert!(matches!(destroyed, CommandResponse::Applied));
        sqlx::query("UPDATE previews SET status = 'destroyed'").execute(&pool).await.unwrap();
        assert!(matches!(run(&pool, service("shop", "api")).await, CommandResponse::Applied));
    }
}
