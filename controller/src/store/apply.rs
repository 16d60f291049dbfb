//! Applying one command to the state database, inside the batch's transaction.

use sqlx::{Sqlite, Transaction};

use crate::command::{Command, CommandResponse, Rejection};

pub(crate) async fn apply(tx: &mut Transaction<'_, Sqlite>, command: Command) -> Result<CommandResponse, sqlx::Error> {
    let Command::Batch { commands } = command else {
        return apply_one(tx, command).await;
    };
    let mut responses = Vec::with_capacity(commands.len());
    let mut commands = commands.into_iter().peekable();
    while let Some(command) = commands.next() {
        match command {
            // A run of project creations is one statement: one round trip to SQLite, whatever
            // its length.
            Command::CreateProject { id, name, created_at } => {
                let mut run = vec![(id, name, created_at)];
                while run.len() < CREATE_RUN_MAX {
                    match commands.next_if(|c| matches!(c, Command::CreateProject { .. })) {
                        Some(Command::CreateProject { id, name, created_at }) => run.push((id, name, created_at)),
                        _ => break,
                    }
                }
                responses.extend(create_projects(tx, run).await?);
            }
            // Batches are flat: the proposer never nests them.
            Command::Batch { .. } => responses.push(CommandResponse::rejected(Rejection::Conflict, "nested batch")),
            command => responses.push(apply_one(tx, command).await?),
        }
    }
    Ok(CommandResponse::Batch { responses })
}

/// Most rows in one INSERT (three bound values each).
const CREATE_RUN_MAX: usize = 256;

/// Inserts projects in order with one statement; a project whose id or name is taken (also by
/// an earlier one of the same run) is skipped and answered with a conflict.
async fn create_projects(
    tx: &mut Transaction<'_, Sqlite>,
    run: Vec<(String, String, i64)>,
) -> Result<Vec<CommandResponse>, sqlx::Error> {
    let mut sql = String::from("INSERT INTO projects (id, name, created_at) VALUES (?, ?, ?)");
    for _ in 1..run.len() {
        sql.push_str(", (?, ?, ?)");
    }
    sql.push_str(" ON CONFLICT DO NOTHING RETURNING id");
    let mut query = sqlx::query_scalar::<_, String>(&sql);
    for (id, name, created_at) in &run {
        query = query.bind(id).bind(name).bind(created_at);
    }
    let mut inserted: std::collections::HashSet<String> = query.fetch_all(&mut **tx).await?.into_iter().collect();
    Ok(run
        .into_iter()
        .map(|(id, name, _)| {
            // `remove`: a second command with the same id was the one skipped.
            if inserted.remove(&id) {
                CommandResponse::Applied
            } else {
                CommandResponse::rejected(Rejection::Conflict, format!("a project named \"{name}\" already exists"))
            }
        })
        .collect())
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
        Command::RegisterAgent { id, hostname, labels, token_id, created_at } => {
            let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
            let done = sqlx::query(
                "INSERT INTO agents (id, hostname, labels, status, last_seen, token_id, created_at) \
                 VALUES (?, ?, ?, 'down', ?, ?, ?) ON CONFLICT DO NOTHING",
            )
            .bind(&id)
            .bind(hostname)
            .bind(labels)
            .bind(created_at)
            .bind(token_id)
            .bind(created_at)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::Conflict, format!("agent {id} already exists")));
            }
        }
        Command::AgentUp { id, hostname, labels, version, cpu_millis, memory_bytes, at } => {
            let labels = serde_json::to_string(&labels).unwrap_or_else(|_| "{}".into());
            let done = sqlx::query(
                "UPDATE agents SET hostname = ?, labels = ?, version = ?, cpu_millis = ?, memory_bytes = ?, \
                 status = 'ready', last_seen = MAX(last_seen, ?) WHERE id = ? AND revoked_at IS NULL",
            )
            .bind(hostname)
            .bind(labels)
            .bind(version)
            .bind(i64::try_from(cpu_millis).unwrap_or(i64::MAX))
            .bind(i64::try_from(memory_bytes).unwrap_or(i64::MAX))
            .bind(at)
            .bind(&id)
            .execute(&mut **tx)
            .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no agent with id {id}")));
            }
        }
        Command::AgentsDown { agents } => {
            for (id, last_seen) in agents {
                sqlx::query(
                    "UPDATE agents SET status = 'down', last_seen = MAX(last_seen, ?) \
                     WHERE id = ? AND revoked_at IS NULL",
                )
                .bind(last_seen)
                .bind(id)
                .execute(&mut **tx)
                .await?;
            }
        }
        Command::RevokeAgent { id, at } => {
            let done =
                sqlx::query("UPDATE agents SET revoked_at = ?, status = 'down' WHERE id = ? AND revoked_at IS NULL")
                    .bind(at)
                    .bind(&id)
                    .execute(&mut **tx)
                    .await?;
            if done.rows_affected() == 0 {
                return Ok(CommandResponse::rejected(Rejection::NotFound, format!("no agent with id {id}")));
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

#[cfg(test)]
mod tests {
    use sqlx::sqlite::SqliteSynchronous;

    use super::apply;
    use crate::command::{Command, CommandResponse, Rejection};

    fn create(id: &str, name: &str) -> Command {
        Command::CreateProject { id: id.into(), name: name.into(), created_at: 1 }
    }

    fn is_conflict(r: &CommandResponse) -> bool {
        matches!(r, CommandResponse::Rejected { reason: Rejection::Conflict, .. })
    }

    #[tokio::test]
    async fn a_batch_answers_each_write_on_its_own_and_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let pool = super::super::open_pool(
            &dir.path().join("state.db"),
            SqliteSynchronous::Normal,
            1,
            Some(&super::super::state_machine::MIGRATOR),
        )
        .await
        .unwrap();
        let mut tx = pool.begin().await.unwrap();
        assert!(matches!(apply(&mut tx, create("p0", "old")).await.unwrap(), CommandResponse::Applied));
        let batch = Command::Batch {
            commands: vec![
                create("p1", "web"),
                create("p2", "web"),   // name taken earlier in the same run
                create("p3", "old"),   // name taken before the batch
                create("p1", "other"), // id taken earlier in the same run
                Command::DeleteProject { id: "missing".into() },
                create("p4", "api"),
            ],
        };
        let CommandResponse::Batch { responses } = apply(&mut tx, batch).await.unwrap() else {
            panic!("a batch answers a batch");
        };
        assert_eq!(responses.len(), 6);
        assert!(matches!(responses[0], CommandResponse::Applied));
        assert!(is_conflict(&responses[1]) && is_conflict(&responses[2]) && is_conflict(&responses[3]));
        assert!(matches!(responses[4], CommandResponse::Rejected { reason: Rejection::NotFound, .. }));
        assert!(matches!(responses[5], CommandResponse::Applied));
        tx.commit().await.unwrap();
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM projects ORDER BY name").fetch_all(&pool).await.unwrap();
        assert_eq!(names, ["api", "old", "web"]);
    }
}
