//! Applying the webhook commands: deliveries (exactly once), project webhook secrets and
//! service deploy hooks, with the secret they replace kept for a grace period.

use rusqlite::{params, Transaction};

use super::apply::{exec, scalar};
use super::state_machine::StateEvent;
use crate::command::{Command, CommandResponse, Rejection};

pub(super) fn apply(
    tx: &Transaction<'_>,
    command: Command,
    events: &mut Vec<StateEvent>,
) -> rusqlite::Result<CommandResponse> {
    match command {
        Command::WebhookDelivery { provider, delivery_id, deployments, at } => {
            let done = exec(
                tx,
                "INSERT INTO webhook_deliveries (provider, delivery_id, received_at, deployments) VALUES (?, ?, ?, ?) \
                 ON CONFLICT DO NOTHING",
                params![provider, delivery_id, at, deployments.len() as i64],
            )?;
            if done == 0 {
                return Ok(CommandResponse::rejected(
                    Rejection::Conflict,
                    format!("{provider} delivery {delivery_id} was handled already"),
                ));
            }
            let mut responses = Vec::with_capacity(deployments.len());
            for command in deployments {
                let response = match command {
                    command @ Command::CreateDeployment { .. } => super::apply_deploy::apply(tx, command, events)?,
                    command @ (Command::PutPreview { .. } | Command::DestroyPreview { .. }) => {
                        super::apply_previews::apply(tx, command, events)?
                    }
                    other => CommandResponse::rejected(
                        Rejection::Invalid,
                        format!("a webhook delivery creates deployments and previews only, not {}", other.kind()),
                    ),
                };
                responses.push(response);
            }
            Ok(CommandResponse::Batch { responses })
        }
        Command::SetWebhookSecret { project_id, sealed_hex, previous_until, at } => {
            let exists: Option<String> = scalar(tx, "SELECT id FROM projects WHERE id = ?", [&project_id])?;
            if exists.is_none() {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no project with id {project_id}")));
            }
            let Some(sealed_hex) = sealed_hex else {
                exec(tx, "DELETE FROM project_webhook_secrets WHERE project_id = ?", [&project_id])?;
                return Ok(CommandResponse::Applied);
            };
            let Ok(sealed) = hex::decode(sealed_hex) else {
                return Ok(CommandResponse::rejected(Rejection::Invalid, "the sealed secret is not hex"));
            };
            rotate(tx, "project_webhook_secrets", "project_id", &project_id, sealed, previous_until, at)?;
            Ok(CommandResponse::Applied)
        }
        Command::SetDeployHook { project_id, service_id, sealed_hex, previous_until, at } => {
            let owner: Option<String> = scalar(tx, "SELECT project_id FROM services WHERE id = ?", [&service_id])?;
            if owner.as_deref() != Some(project_id.as_str()) {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no service with id {service_id}")));
            }
            let Ok(sealed) = hex::decode(sealed_hex) else {
                return Ok(CommandResponse::rejected(Rejection::Invalid, "the sealed secret is not hex"));
            };
            rotate(tx, "service_deploy_hooks", "service_id", &service_id, sealed, previous_until, at)?;
            Ok(CommandResponse::Applied)
        }
        Command::PruneWebhookDeliveries { before } => {
            exec(tx, "DELETE FROM webhook_deliveries WHERE received_at < ?", [before])?;
            Ok(CommandResponse::Applied)
        }
        other => Ok(CommandResponse::rejected(Rejection::Invalid, format!("not a webhook command: {}", other.kind()))),
    }
}

/// Stores `owner`'s new sealed secret in `table`; the one it replaces stays valid until
/// `previous_until`. `table` and `column` are this module's constants, never input.
fn rotate(
    tx: &Transaction<'_>,
    table: &'static str,
    column: &'static str,
    owner: &str,
    sealed: Vec<u8>,
    previous_until: i64,
    at: i64,
) -> rusqlite::Result<()> {
    let sql = format!(
        "INSERT INTO {table} ({column}, sealed, previous_sealed, previous_until, updated_at) \
         VALUES (?1, ?2, NULL, 0, ?4) \
         ON CONFLICT ({column}) DO UPDATE SET previous_sealed = sealed, previous_until = ?3, sealed = ?2, updated_at = ?4"
    );
    exec(tx, &sql, params![owner, sealed, previous_until, at])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_state as state;
    use crate::command::{Command, CommandResponse, Rejection};

    async fn run(pool: &sqlx::SqlitePool, command: Command) -> CommandResponse {
        super::super::test_apply(pool, command).await.0
    }

    fn deployment(id: &str) -> Command {
        Command::CreateDeployment {
            id: id.into(),
            project_id: "p".into(),
            service_id: "s".into(),
            source: serde_json::json!({"image": "x"}),
            reference: None,
            created_by: "webhook".into(),
            preview: String::new(),
            notify: String::new(),
            at: 1,
        }
    }

    fn delivery(provider: &str, id: &str, deployment_id: &str) -> Command {
        Command::WebhookDelivery {
            provider: provider.into(),
            delivery_id: id.into(),
            deployments: vec![deployment(deployment_id)],
            at: 10,
        }
    }

    async fn exists(pool: &sqlx::SqlitePool, id: &str) -> bool {
        sqlx::query_scalar::<_, String>("SELECT id FROM deployments WHERE id = ?")
            .bind(id)
            .fetch_optional(pool)
            .await
            .unwrap()
            .is_some()
    }

    async fn with_service(pool: &sqlx::SqlitePool) {
        run(pool, Command::CreateProject { id: "p".into(), name: "p".into(), created_at: 1, owner: None }).await;
        sqlx::query(
            "INSERT INTO services (id, project_id, name, spec, created_at, updated_at) VALUES ('s', 'p', 'web', '{}', 1, 1)",
        )
        .execute(pool)
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn a_delivery_creates_its_deployments_once() {
        let (_dir, pool) = state().await;
        with_service(&pool).await;
        let response = run(&pool, delivery("github", "d-1", "dep-1")).await;
        assert!(
            matches!(&response, CommandResponse::Batch { responses } if matches!(responses[..], [CommandResponse::Applied])),
            "{response:?}"
        );
        let again = run(&pool, delivery("github", "d-1", "dep-2")).await;
        assert!(matches!(again, CommandResponse::Rejected { reason: Rejection::Conflict, .. }), "{again:?}");
        assert!(exists(&pool, "dep-1").await);
        assert!(!exists(&pool, "dep-2").await, "a redelivery deploys nothing");
        // The same id from another provider is another delivery.
        assert!(matches!(run(&pool, delivery("gitlab", "d-1", "dep-3")).await, CommandResponse::Batch { .. }));
        assert!(exists(&pool, "dep-3").await);
        // Pruned deliveries are forgotten.
        run(&pool, Command::PruneWebhookDeliveries { before: 11 }).await;
        assert!(matches!(run(&pool, delivery("github", "d-1", "dep-4")).await, CommandResponse::Batch { .. }));
    }

    #[tokio::test]
    async fn a_new_secret_keeps_the_one_it_replaces_until_its_grace_ends() {
        let (_dir, pool) = state().await;
        with_service(&pool).await;
        let set = |hex: &str, until| Command::SetWebhookSecret {
            project_id: "p".into(),
            sealed_hex: Some(hex.into()),
            previous_until: until,
            at: 5,
        };
        assert!(matches!(run(&pool, set("01", 0)).await, CommandResponse::Applied));
        assert!(matches!(run(&pool, set("02", 99)).await, CommandResponse::Applied));
        let row: (Vec<u8>, Option<Vec<u8>>, i64) = sqlx::query_as(
            "SELECT sealed, previous_sealed, previous_until FROM project_webhook_secrets WHERE project_id = 'p'",
        )
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(row, (vec![2], Some(vec![1]), 99));
        let missing =
            Command::SetWebhookSecret { project_id: "nope".into(), sealed_hex: None, previous_until: 0, at: 5 };
        assert!(matches!(run(&pool, missing).await, CommandResponse::Rejected { reason: Rejection::NotFound, .. }));
        let hook = Command::SetDeployHook {
            project_id: "other".into(),
            service_id: "s".into(),
            sealed_hex: "01".into(),
            previous_until: 0,
            at: 5,
        };
        assert!(
            matches!(run(&pool, hook).await, CommandResponse::Rejected { reason: Rejection::NotFound, .. }),
            "a service of another project"
        );
    }
}
