//! Applying the deployment commands: the queue, attempts, status changes and log lines.
//!
//! Every rule is checked here, on every node alike: a report for an attempt that is no longer
//! the current one, or for a deployment that already ended, changes nothing, so a late or
//! repeated message from an agent can never move a deployment backwards or run it twice.

use sqlx::{Sqlite, Transaction};

use super::state_machine::StateEvent;
use crate::command::{Command, CommandResponse, DeploymentStatus, Rejection};

pub(super) async fn apply(
    tx: &mut Transaction<'_, Sqlite>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> Result<CommandResponse, sqlx::Error> {
    match command {
        Command::CreateDeployment { id, project_id, service_id, source, reference, created_by, at } => {
            let service: Option<String> = sqlx::query_scalar("SELECT project_id FROM services WHERE id = ?")
                .bind(&service_id)
                .fetch_optional(&mut **tx)
                .await?;
            if service.as_deref() != Some(project_id.as_str()) {
                return Ok(CommandResponse::rejected(
                    Rejection::NotFound,
                    format!("service {service_id} does not exist"),
                ));
            }
            // Older deployments of the service still waiting are replaced by this one.
            let superseded: Vec<String> = sqlx::query_scalar(
                "UPDATE deployments SET status = 'superseded', finished_at = ?1, updated_at = ?1, \
                 error = 'superseded by deployment ' || ?2 \
                 WHERE service_id = ?3 AND status = 'queued' RETURNING id",
            )
            .bind(at)
            .bind(&id)
            .bind(&service_id)
            .fetch_all(&mut **tx)
            .await?;
            let done = sqlx::query(
                "INSERT INTO deployments (id, seq, project_id, service_id, status, source, ref, created_by, \
                 created_at, updated_at) \
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM deployments), ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?7) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(&id)
            .bind(&project_id)
            .bind(&service_id)
            .bind(source.to_string())
            .bind(reference)
            .bind(created_by)
            .bind(at)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::Conflict, format!("deployment {id} exists")));
            }
            for old in superseded {
                events.push(StateEvent::DeploymentChanged { id: old, project_id: project_id.clone() });
            }
            events.push(StateEvent::DeploymentChanged { id, project_id });
        }
        Command::PutUploadChunk { upload_id, chunk, data_hex } => {
            let data = hex::decode(&data_hex).unwrap_or_default();
            sqlx::query("INSERT OR REPLACE INTO uploads (id, chunk, data) VALUES (?, ?, ?)")
                .bind(upload_id)
                .bind(chunk)
                .bind(data)
                .execute(&mut **tx)
                .await?;
        }
        Command::DropUploads { ids } => {
            for id in ids {
                sqlx::query("DELETE FROM uploads WHERE id = ?").bind(id).execute(&mut **tx).await?;
            }
        }
        Command::AssignDeployment { id, attempt, agent_id, at } => {
            let row: Option<(String, i64, String)> =
                sqlx::query_as("SELECT status, attempt, project_id FROM deployments WHERE id = ?")
                    .bind(&id)
                    .fetch_optional(&mut **tx)
                    .await?;
            let Some((status, current, project_id)) = row else {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("deployment {id} does not exist")));
            };
            if status != "queued" || i64::from(attempt) != current + 1 {
                return Ok(CommandResponse::rejected(
                    Rejection::Conflict,
                    format!("deployment {id} is {status} at attempt {current}: it cannot start attempt {attempt}"),
                ));
            }
            sqlx::query(
                "UPDATE deployments SET status = 'building', attempt = ?1, agent_id = ?2, error = NULL, \
                 started_at = COALESCE(started_at, ?3), updated_at = ?3 WHERE id = ?4",
            )
            .bind(attempt)
            .bind(agent_id)
            .bind(at)
            .bind(&id)
            .execute(&mut **tx)
            .await?;
            events.push(StateEvent::DeploymentChanged { id, project_id });
        }
        Command::UpdateDeployment { id, attempt, status, image, commit, url, error, not_before, exclude_agent, at } => {
            let row: Option<(String, i64, String, String, String)> = sqlx::query_as(
                "SELECT status, attempt, project_id, service_id, excluded FROM deployments WHERE id = ?",
            )
            .bind(&id)
            .fetch_optional(&mut **tx)
            .await?;
            let Some((current_status, current_attempt, project_id, service_id, excluded)) = row else {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("deployment {id} does not exist")));
            };
            let current = DeploymentStatus::parse(&current_status).unwrap_or(DeploymentStatus::Failed);
            let allowed = i64::from(attempt) == current_attempt
                && match status {
                    // Cancelling a queued one needs no attempt of its own.
                    DeploymentStatus::Cancelled => current == DeploymentStatus::Queued || current.in_progress(),
                    DeploymentStatus::Building | DeploymentStatus::Deploying => {
                        current.in_progress() && status_rank(status) >= status_rank(current)
                    }
                    DeploymentStatus::Queued | DeploymentStatus::Running => current.in_progress(),
                    // A queued one fails when no agent can take it.
                    DeploymentStatus::Failed => current.in_progress() || current == DeploymentStatus::Queued,
                    DeploymentStatus::Superseded => false,
                };
            if !allowed {
                return Ok(CommandResponse::rejected(
                    Rejection::Conflict,
                    format!(
                        "deployment {id} is {current_status} at attempt {current_attempt}: \
                         attempt {attempt} cannot move it to {}",
                        status.as_str()
                    ),
                ));
            }
            let ended =
                matches!(status, DeploymentStatus::Running | DeploymentStatus::Failed | DeploymentStatus::Cancelled);
            let mut excluded: Vec<String> = serde_json::from_str(&excluded).unwrap_or_default();
            let requeue = exclude_agent.is_some();
            if let Some(agent) = exclude_agent {
                if !excluded.contains(&agent) {
                    excluded.push(agent);
                }
            }
            sqlx::query(
                "UPDATE deployments SET status = ?1, image = COALESCE(?2, image), commit_sha = COALESCE(?3, commit_sha), \
                 url = COALESCE(?4, url), error = COALESCE(?5, error), not_before = COALESCE(?6, not_before), \
                 excluded = ?7, requeues = requeues + ?8, \
                 agent_id = CASE WHEN ?1 = 'queued' THEN NULL ELSE agent_id END, \
                 healthy_at = CASE WHEN ?1 = 'running' THEN ?9 ELSE healthy_at END, \
                 finished_at = CASE WHEN ?10 THEN ?9 ELSE finished_at END, updated_at = ?9 WHERE id = ?11",
            )
            .bind(status.as_str())
            .bind(image)
            .bind(commit)
            .bind(url)
            .bind(error)
            .bind(not_before)
            .bind(serde_json::to_string(&excluded).unwrap_or_else(|_| "[]".into()))
            .bind(i64::from(requeue))
            .bind(at)
            .bind(ended)
            .bind(&id)
            .execute(&mut **tx)
            .await?;
            if status == DeploymentStatus::Running {
                // The release it replaced stops being the service's current one.
                let replaced: Vec<String> = sqlx::query_scalar(
                    "UPDATE deployments SET status = 'superseded', updated_at = ?1 \
                     WHERE service_id = ?2 AND status = 'running' AND id != ?3 RETURNING id",
                )
                .bind(at)
                .bind(&service_id)
                .bind(&id)
                .fetch_all(&mut **tx)
                .await?;
                for old in replaced {
                    events.push(StateEvent::DeploymentChanged { id: old, project_id: project_id.clone() });
                }
            }
            events.push(StateEvent::DeploymentChanged { id, project_id });
        }
        Command::AppendDeploymentLogs { id, attempt, lines } => {
            let exists: Option<i64> = sqlx::query_scalar("SELECT COALESCE((SELECT MAX(n) FROM deployment_logs WHERE deployment_id = ?1), 0) FROM deployments WHERE id = ?1")
                .bind(&id)
                .fetch_optional(&mut **tx)
                .await?;
            let Some(mut n) = exists else {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("deployment {id} does not exist")));
            };
            let before = n;
            for line in lines {
                let done = sqlx::query(
                    "INSERT INTO deployment_logs (deployment_id, n, attempt, agent_seq, level, message, at, phase, step) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                )
                .bind(&id)
                .bind(n + 1)
                .bind(attempt)
                .bind(line.agent_seq.map(|s| s as i64))
                .bind(line.level)
                .bind(line.message)
                .bind(line.at)
                .bind(line.phase)
                .bind(line.step)
                .execute(&mut **tx)
                .await?;
                // A line the agent sent again is already there: it keeps its number.
                n += done.rows_affected() as i64;
            }
            if n > before {
                events.push(StateEvent::DeploymentLogs { id, upto: n });
            }
        }
        other => {
            return Ok(CommandResponse::rejected(
                Rejection::Invalid,
                format!("{} is not a deployment command", other.kind()),
            ))
        }
    }
    Ok(CommandResponse::Applied)
}

/// Order of the in-progress states: an attempt never goes back from deploying to building.
fn status_rank(status: DeploymentStatus) -> u8 {
    match status {
        DeploymentStatus::Building => 1,
        DeploymentStatus::Deploying => 2,
        _ => 0,
    }
}
