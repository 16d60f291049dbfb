//! Durable storage of a controller node: the Raft log and the replicated state, each in its own
//! SQLite database under the data dir.

pub mod apply;
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

pub(crate) fn read_err(subject: ErrorSubject<u64>, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, ErrorVerb::Read, openraft::AnyError::new(&e)).into()
}

pub(crate) fn write_err(subject: ErrorSubject<u64>, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(subject, ErrorVerb::Write, openraft::AnyError::new(&e)).into()
}

#[cfg(test)]
mod suite_test;
