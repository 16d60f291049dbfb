//! Applying one command to the state database, inside the batch's transaction.

use sqlx::{Sqlite, Transaction};

use crate::command::{Command, CommandResponse, Rejection};

pub(crate) async fn apply(tx: &mut Transaction<'_, Sqlite>, command: Command) -> Result<CommandResponse, sqlx::Error> {
    if let Command::Batch { commands } = command {
        let mut responses = Vec::with_capacity(commands.len());
        for command in commands {
            // Batches are flat: the proposer never nests them.
            let response = match command {
                Command::Batch { .. } => CommandResponse::rejected(Rejection::Conflict, "nested batch"),
                command => apply_one(tx, command).await?,
            };
            responses.push(response);
        }
        return Ok(CommandResponse::Batch { responses });
    }
    apply_one(tx, command).await
}

async fn apply_one(tx: &mut Transaction<'_, Sqlite>, command: Command) -> Result<CommandResponse, sqlx::Error> {
    match command {
        Command::Batch { .. } => return Ok(CommandResponse::rejected(Rejection::Conflict, "nested batch")),
        Command::InitCluster { ca_cert_pem, ca_key_sealed_hex, at } => {
            let exists: Option<i64> =
                sqlx::query_scalar("SELECT id FROM cluster WHERE id = 1").fetch_optional(&mut **tx).await?;
            if exists.is_some() {
                return Ok(CommandResponse::rejected(Rejection::Conflict, "the cluster is already initialized"));
            }
            let sealed = hex::decode(&ca_key_sealed_hex).unwrap_or_default();
            sqlx::query("INSERT INTO cluster (id, ca_cert_pem, ca_key_sealed, created_at) VALUES (1, ?, ?, ?)")
                .bind(ca_cert_pem)
                .bind(sealed)
                .bind(at)
                .execute(&mut **tx)
                .await?;
        }
        Command::CreateJoinToken { id, kind, secret_hash, created_at, expires_at } => {
            sqlx::query(
                "INSERT INTO join_tokens (id, kind, secret_hash, created_at, expires_at) VALUES (?, ?, ?, ?, ?) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(kind.as_str())
            .bind(secret_hash)
            .bind(created_at)
            .bind(expires_at)
            .execute(&mut **tx)
            .await?;
        }
        Command::RevokeJoinToken { id, at } => {
            let done = sqlx::query("UPDATE join_tokens SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?")
                .bind(at)
                .bind(&id)
                .execute(&mut **tx)
                .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no join token with id {id}")));
            }
        }
        Command::CreateApiToken { id, name, token_hash, scopes, created_at, expires_at } => {
            sqlx::query(
                "INSERT INTO api_tokens (id, name, token_hash, scopes, created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(id)
            .bind(name)
            .bind(token_hash)
            .bind(serde_json::to_string(&scopes).unwrap_or_else(|_| "[]".into()))
            .bind(created_at)
            .bind(expires_at)
            .execute(&mut **tx)
            .await?;
        }
        Command::CreateProject { id, name, created_at } => {
            // One statement: the unique id and name make a taken one a no-op.
            let done =
                sqlx::query("INSERT INTO projects (id, name, created_at) VALUES (?, ?, ?) ON CONFLICT DO NOTHING")
                    .bind(id)
                    .bind(&name)
                    .bind(created_at)
                    .execute(&mut **tx)
                    .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(
                    Rejection::Conflict,
                    format!("a project named \"{name}\" already exists"),
                ));
            }
        }
        Command::DeleteProject { id } => {
            let done = sqlx::query("DELETE FROM projects WHERE id = ?").bind(&id).execute(&mut **tx).await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no project with id {id}")));
            }
        }
    }
    Ok(CommandResponse::Applied)
}
