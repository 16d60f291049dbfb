//! Applying the deployment commands: the queue, attempts, status changes and log lines.
//!
//! Every rule is checked here, on every node alike: a report for an attempt that is no longer
//! the current one, or for a deployment that already ended, changes nothing, so a late or
//! repeated message from an agent can never move a deployment backwards or run it twice.

use rusqlite::{params, OptionalExtension, Transaction};

use super::apply::{column, exec, scalar};
use super::state_machine::StateEvent;
use crate::command::{Command, CommandResponse, DeploymentStatus, Rejection};

pub(super) fn apply(
    tx: &Transaction<'_>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> rusqlite::Result<CommandResponse> {
    match command {
        Command::CreateDeployment {
            id,
            project_id,
            service_id,
            source,
            reference,
            created_by,
            preview,
            notify,
            at,
        } => {
            let service: Option<String> = scalar(tx, "SELECT project_id FROM services WHERE id = ?", [&service_id])?;
            if service.as_deref() != Some(project_id.as_str()) {
                return Ok(CommandResponse::rejected(
                    Rejection::NotFound,
                    format!("service {service_id} does not exist"),
                ));
            }
            // Older deployments of the service still waiting are replaced by this one.
            let superseded: Vec<String> = column(
                tx,
                "UPDATE deployments SET status = 'superseded', finished_at = ?1, updated_at = ?1, \
                 error = 'superseded by deployment ' || ?2 \
                 WHERE service_id = ?3 AND preview = ?4 AND status = 'queued' RETURNING id",
                params![at, id, service_id, preview],
            )?;
            let done = exec(
                tx,
                "INSERT INTO deployments (id, seq, project_id, service_id, status, source, ref, created_by, \
                 created_at, updated_at, preview, notify) \
                 VALUES (?1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM deployments), ?2, ?3, 'queued', ?4, ?5, ?6, ?7, ?7, ?8, ?9) \
                 ON CONFLICT DO NOTHING",
                params![id, project_id, service_id, source.to_string(), reference, created_by, at, preview, notify],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(Rejection::Conflict, format!("deployment {id} exists")));
            }
            for old in superseded {
                events.push(StateEvent::DeploymentChanged { id: old, project_id: project_id.clone() });
            }
            events.push(StateEvent::DeploymentChanged { id, project_id });
        }
        Command::PutUploadChunk { upload_id, chunk, data_hex } => {
            let data = hex::decode(&data_hex).unwrap_or_default();
            exec(
                tx,
                "INSERT OR REPLACE INTO uploads (id, chunk, data) VALUES (?, ?, ?)",
                params![upload_id, chunk, data],
            )?;
        }
        Command::DropUploads { ids } => {
            for id in ids {
                exec(tx, "DELETE FROM uploads WHERE id = ?", [id])?;
            }
        }
        Command::AssignDeployment { id, attempt, agent_id, at } => {
            let row: Option<(String, i64, String)> = tx
                .prepare_cached("SELECT status, attempt, project_id FROM deployments WHERE id = ?")?
                .query_row([&id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
                .optional()?;
            let Some((status, current, project_id)) = row else {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("deployment {id} does not exist")));
            };
            if status != "queued" || i64::from(attempt) != current + 1 {
                return Ok(CommandResponse::rejected(
                    Rejection::Conflict,
                    format!("deployment {id} is {status} at attempt {current}: it cannot start attempt {attempt}"),
                ));
            }
            exec(
                tx,
                "UPDATE deployments SET status = 'building', attempt = ?1, agent_id = ?2, error = NULL, \
                 started_at = COALESCE(started_at, ?3), updated_at = ?3 WHERE id = ?4",
                params![attempt, agent_id, at, id],
            )?;
            events.push(StateEvent::DeploymentChanged { id, project_id });
        }
        Command::UpdateDeployment { id, attempt, status, image, commit, url, error, not_before, exclude_agent, at } => {
            let row: Option<(String, i64, String, String, String)> = tx
                .prepare_cached(
                    "SELECT status, attempt, project_id, service_id, excluded FROM deployments WHERE id = ?",
                )?
                .query_row([&id], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)))
                .optional()?;
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
            exec(
                tx,
                "UPDATE deployments SET status = ?1, image = COALESCE(?2, image), commit_sha = COALESCE(?3, commit_sha), \
                 url = COALESCE(?4, url), error = COALESCE(?5, error), not_before = COALESCE(?6, not_before), \
                 excluded = ?7, requeues = requeues + ?8, \
                 agent_id = CASE WHEN ?1 = 'queued' THEN NULL ELSE agent_id END, \
                 healthy_at = CASE WHEN ?1 = 'running' THEN ?9 ELSE healthy_at END, \
                 finished_at = CASE WHEN ?10 THEN ?9 ELSE finished_at END, updated_at = ?9 WHERE id = ?11",
                params![
                    status.as_str(),
                    image,
                    commit,
                    url,
                    error,
                    not_before,
                    serde_json::to_string(&excluded).unwrap_or_else(|_| "[]".into()),
                    i64::from(requeue),
                    at,
                    ended,
                    id
                ],
            )?;
            if status == DeploymentStatus::Running {
                // The release it replaced stops being the service's current one.
                let replaced: Vec<String> = column(
                    tx,
                    "UPDATE deployments SET status = 'superseded', updated_at = ?1 \
                     WHERE service_id = ?2 AND status = 'running' AND id != ?3 \
                     AND preview = (SELECT preview FROM deployments WHERE id = ?3) RETURNING id",
                    params![at, service_id, id],
                )?;
                for old in replaced {
                    events.push(StateEvent::DeploymentChanged { id: old, project_id: project_id.clone() });
                }
            }
            events.push(StateEvent::DeploymentChanged { id, project_id });
        }
        Command::AppendDeploymentLogs { id, attempt, lines } => {
            let exists: Option<(String, i64)> = tx
                .prepare_cached(
                    "SELECT project_id, COALESCE((SELECT MAX(n) FROM deployment_logs WHERE deployment_id = ?1), 0) \
                     FROM deployments WHERE id = ?1",
                )?
                .query_row([&id], |row| Ok((row.get(0)?, row.get(1)?)))
                .optional()?;
            let Some((project_id, mut n)) = exists else {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("deployment {id} does not exist")));
            };
            let before = n;
            let mut insert = tx.prepare_cached(
                "INSERT INTO deployment_logs (deployment_id, n, attempt, agent_seq, level, message, at, phase, step) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            )?;
            for line in lines {
                let done = insert.execute(params![
                    id,
                    n + 1,
                    attempt,
                    line.agent_seq.map(|s| s as i64),
                    line.level,
                    line.message,
                    line.at,
                    line.phase,
                    line.step
                ])?;
                // A line the agent sent again is already there: it keeps its number.
                n += done as i64;
            }
            if n > before {
                events.push(StateEvent::DeploymentLogs { id, project_id, upto: n });
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

#[cfg(test)]
mod tests {
    use super::super::state_machine::StateEvent;
    use crate::command::{Command, CommandResponse, DeploymentStatus, LogLine};

    use super::super::{test_apply as run, test_state as state};

    async fn applied(pool: &sqlx::SqlitePool, command: Command) {
        let (response, _) = run(pool, command).await;
        assert!(matches!(response, CommandResponse::Applied), "{response:?}");
    }

    async fn status(pool: &sqlx::SqlitePool, id: &str) -> (String, i64) {
        sqlx::query_as("SELECT status, attempt FROM deployments WHERE id = ?").bind(id).fetch_one(pool).await.unwrap()
    }

    fn create(id: &str, at: i64) -> Command {
        Command::CreateDeployment {
            id: id.into(),
            project_id: "p".into(),
            service_id: "s".into(),
            source: serde_json::json!({"image": "x"}),
            reference: None,
            created_by: "test".into(),
            preview: String::new(),
            notify: String::new(),
            at,
        }
    }

    fn update(id: &str, attempt: u32, status: DeploymentStatus) -> Command {
        Command::UpdateDeployment {
            id: id.into(),
            attempt,
            status,
            image: None,
            commit: None,
            url: None,
            error: None,
            not_before: None,
            exclude_agent: None,
            at: 10,
        }
    }

    fn assign(id: &str, attempt: u32) -> Command {
        Command::AssignDeployment { id: id.into(), attempt, agent_id: "a1".into(), at: 5 }
    }

    async fn with_service(pool: &sqlx::SqlitePool) {
        applied(pool, Command::CreateProject { id: "p".into(), name: "p".into(), created_at: 1, owner: None }).await;
        sqlx::query(
            "INSERT INTO services (id, project_id, name, spec, created_at, updated_at) VALUES ('s', 'p', 'web', '{}', 1, 1)",
        )
        .execute(pool)
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_newer_deployment_supersedes_a_queued_one_and_a_running_one_once_it_runs() {
        let (_dir, pool) = state().await;
        with_service(&pool).await;
        applied(&pool, create("d1", 1)).await;
        applied(&pool, assign("d1", 1)).await;
        applied(&pool, update("d1", 1, DeploymentStatus::Running)).await;
        applied(&pool, create("d2", 2)).await;
        let (_, events) = run(&pool, create("d3", 3)).await;
        assert_eq!(status(&pool, "d2").await.0, "superseded");
        assert!(events.contains(&StateEvent::DeploymentChanged { id: "d2".into(), project_id: "p".into() }));
        assert_eq!(status(&pool, "d1").await.0, "running", "a running release stays until the next one runs");
        applied(&pool, assign("d3", 1)).await;
        applied(&pool, update("d3", 1, DeploymentStatus::Running)).await;
        assert_eq!(status(&pool, "d1").await.0, "superseded");
        let seqs: Vec<i64> =
            sqlx::query_scalar("SELECT seq FROM deployments ORDER BY id").fetch_all(&pool).await.unwrap();
        assert_eq!(seqs, [1, 2, 3]);
    }

    #[tokio::test]
    async fn late_or_out_of_order_reports_change_nothing() {
        let (_dir, pool) = state().await;
        with_service(&pool).await;
        applied(&pool, create("d", 1)).await;
        // An attempt must follow the last one, from the queue.
        assert!(matches!(run(&pool, assign("d", 2)).await.0, CommandResponse::Rejected { .. }));
        applied(&pool, assign("d", 1)).await;
        assert!(matches!(run(&pool, assign("d", 2)).await.0, CommandResponse::Rejected { .. }));
        applied(&pool, update("d", 1, DeploymentStatus::Deploying)).await;
        // Never back from deploying to building.
        assert!(matches!(
            run(&pool, update("d", 1, DeploymentStatus::Building)).await.0,
            CommandResponse::Rejected { .. }
        ));
        // Requeued after its agent went down: attempt 1's late report is refused.
        let mut requeue = update("d", 1, DeploymentStatus::Queued);
        if let Command::UpdateDeployment { exclude_agent, .. } = &mut requeue {
            *exclude_agent = Some("a1".into());
        }
        applied(&pool, requeue).await;
        assert!(matches!(
            run(&pool, update("d", 1, DeploymentStatus::Running)).await.0,
            CommandResponse::Rejected { .. }
        ));
        let (excluded, requeues): (String, i64) =
            sqlx::query_as("SELECT excluded, requeues FROM deployments WHERE id = 'd'").fetch_one(&pool).await.unwrap();
        assert_eq!((excluded.as_str(), requeues), ("[\"a1\"]", 1));
        applied(&pool, assign("d", 2)).await;
        applied(&pool, update("d", 2, DeploymentStatus::Failed)).await;
        // An ended deployment stays ended.
        assert!(matches!(
            run(&pool, update("d", 2, DeploymentStatus::Running)).await.0,
            CommandResponse::Rejected { .. }
        ));
        assert_eq!(status(&pool, "d").await, ("failed".into(), 2));
        // A queued one fails when nothing can take it.
        applied(&pool, create("e", 9)).await;
        applied(&pool, update("e", 0, DeploymentStatus::Failed)).await;
    }

    #[tokio::test]
    async fn log_lines_sent_again_are_kept_once_and_numbered_in_order() {
        let (_dir, pool) = state().await;
        with_service(&pool).await;
        applied(&pool, create("d", 1)).await;
        let line = |seq: Option<u64>, message: &str| LogLine {
            agent_seq: seq,
            level: "info".into(),
            message: message.into(),
            at: 1,
            phase: "build".into(),
            step: None,
        };
        let append = |lines| Command::AppendDeploymentLogs { id: "d".into(), attempt: 1, lines };
        applied(&pool, append(vec![line(Some(1), "one"), line(Some(2), "two")])).await;
        // The agent reconnected and sent them again, with one more; the controller adds its own.
        let (_, events) =
            run(&pool, append(vec![line(Some(1), "one"), line(Some(2), "two"), line(Some(3), "three")])).await;
        assert_eq!(events, [StateEvent::DeploymentLogs { id: "d".into(), project_id: "p".into(), upto: 3 }]);
        applied(&pool, append(vec![line(None, "controller")])).await;
        let (_, events) = run(&pool, append(vec![line(Some(3), "three")])).await;
        assert!(events.is_empty(), "nothing new: no event");
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT n, message FROM deployment_logs ORDER BY n").fetch_all(&pool).await.unwrap();
        let expected: Vec<(i64, String)> =
            [(1, "one"), (2, "two"), (3, "three"), (4, "controller")].map(|(n, m)| (n, m.to_string())).into();
        assert_eq!(rows, expected);
        assert!(matches!(
            run(&pool, Command::AppendDeploymentLogs { id: "nope".into(), attempt: 1, lines: vec![] }).await.0,
            CommandResponse::Rejected { .. }
        ));
    }
}
