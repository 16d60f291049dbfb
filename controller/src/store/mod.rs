//! Durable storage of a controller node: the Raft log and the replicated state, each in its own
//! SQLite database under the data dir.

pub mod apply;
mod apply_deploy;
mod apply_ingress;
mod apply_previews;
mod apply_webhooks;
pub mod log_store;
pub mod queries;
pub mod state_machine;

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use openraft::{ErrorSubject, ErrorVerb, StorageIOError};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};

use crate::raft::StorageError;

/// Opens (creating if needed) a WAL-mode SQLite database and applies `migrator` first, on a
/// single connection, so that no two connections race to switch a new file to WAL.
pub(crate) async fn open_pool(
    path: &Path,
    synchronous: SqliteSynchronous,
    max_connections: u32,
    migrator: Option<&sqlx::migrate::Migrator>,
) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(10))
        // Checkpoints run in the background (see `Checkpointer`), not inside a commit.
        .pragma("wal_autocheckpoint", "0")
        .foreign_keys(true);
    let first = SqlitePoolOptions::new().max_connections(1).connect_with(options.clone()).await?;
    if let Some(m) = migrator {
        m.run(&first).await?;
    }
    first.close().await;
    SqlitePoolOptions::new()
        .max_connections(max_connections)
        .min_connections(1)
        .idle_timeout(None)
        .max_lifetime(None)
        .connect_with(options)
        .await
}

/// Copies the WAL back into the database file every `CHECKPOINT_EVERY`, off the commit path,
/// until dropped.
pub(crate) struct Checkpointer(tokio::task::AbortHandle);

const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// WAL size (in 4 KiB pages) above which the checkpointer empties it: 16 MiB.
const WAL_TRUNCATE_FRAMES: i64 = 4096;

impl Checkpointer {
    pub(crate) fn start(pool: SqlitePool) -> Checkpointer {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // PASSIVE never waits, but under constant writes it cannot reset the WAL; once
                // the WAL is large, TRUNCATE waits briefly for writers and empties it.
                let frames: Result<(i64, i64, i64), sqlx::Error> =
                    sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&pool).await;
                let result = match frames {
                    Ok((_, log_frames, _)) if log_frames > WAL_TRUNCATE_FRAMES => {
                        sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&pool).await.map(|_| ())
                    }
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
            }
        });
        Checkpointer(task.abort_handle())
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

pub(crate) fn read_err(subject: ErrorSubject<u64>, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, ErrorVerb::Read, openraft::AnyError::new(&e)).into()
}

pub(crate) fn write_err(subject: ErrorSubject<u64>, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, ErrorVerb::Write, openraft::AnyError::new(&e)).into()
}

#[cfg(test)]
mod suite_test;

/// A fresh state database with every migration applied, for tests of the state machine's rules.
#[cfg(test)]
pub(crate) async fn test_state() -> (tempfile::TempDir, SqlitePool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pool = open_pool(&dir.path().join("state.db"), SqliteSynchronous::Normal, 1, Some(&state_machine::MIGRATOR))
        .await
        .expect("state database");
    (dir, pool)
}
