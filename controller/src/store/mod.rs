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

/// Opens (creating if needed) a WAL-mode SQLite database.
pub(crate) async fn open_pool(
    path: &Path,
    synchronous: SqliteSynchronous,
    max_connections: u32,
) -> Result<SqlitePool, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
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
