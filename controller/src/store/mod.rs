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

/// Connection settings of every database of a node: WAL, the given durability, checkpoints left
/// to the [`Checkpointer`].
fn connect_options(path: &Path, synchronous: SqliteSynchronous) -> Result<SqliteConnectOptions, sqlx::Error> {
    let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(10));
    Ok(SHARED_PRAGMAS.iter().fold(options, |o, (name, value)| o.pragma(*name, *value)))
}

/// Opens a connection for one of the writer threads (the Raft log's, the state machine's),
/// which call SQLite directly through rusqlite, with the settings sqlx's connections have.
/// `synchronous` is SQLite's setting: `FULL` (a commit returns once fsynced) or `NORMAL`.
pub(crate) fn connect_direct(path: &Path, synchronous: &str) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!("{} could not switch to WAL (it is in {mode} mode)", path.display());
    }
    conn.pragma_update(None, "synchronous", synchronous)?;
    for (name, value) in SHARED_PRAGMAS {
        conn.pragma_update(None, name, value)?;
    }
    Ok(conn)
}

/// Settings every connection of a node has, sqlx's and the writer threads' (rusqlite) alike.
pub(crate) const SHARED_PRAGMAS: [(&str, &str); 5] = [
    // Pages kept per connection, in KiB (SQLite's default is 2 MiB): an apply touches the
    // recent end of every index, and the API reads the same hot pages.
    ("cache_size", "-16384"),
    ("foreign_keys", "ON"),
    // Checkpoints run in the background (see `Checkpointer`), not inside a commit.
    ("wal_autocheckpoint", "0"),
    // When the WAL starts over from its beginning, a file that grew past 16 MiB is cut back.
    ("journal_size_limit", "16777216"),
    // Statement journals (a multi-row INSERT inside a transaction keeps one, to undo just that
    // statement) stay in memory instead of temporary files created and deleted every time.
    ("temp_store", "memory"),
];

/// Opens (creating if needed) a WAL-mode SQLite database and applies `migrator` first, on a
/// single connection, so that no two connections race to switch a new file to WAL.
pub(crate) async fn open_pool(
    path: &Path,
    synchronous: SqliteSynchronous,
    max_connections: u32,
    migrator: Option<&sqlx::migrate::Migrator>,
) -> Result<SqlitePool, sqlx::Error> {
    let options = connect_options(path, synchronous)?;
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
        // sqlx pings a connection before lending it, by default: one more round trip to the
        // connection's worker thread (two thread wake-ups) per apply and per read. A SQLite
        // connection is a file in this process; it does not go stale.
        .test_before_acquire(false)
        .connect_with(options)
        .await
}

/// Copies the WAL back into the database file every `CHECKPOINT_EVERY`, off the commit path,
/// until dropped.
///
/// A PASSIVE checkpoint never waits for anyone, but under a constant write load it never finds
/// the WAL fully copied with no reader on it, so the WAL is never started over and grows. Once
/// it passes `WAL_RESTART_FRAMES`, a RESTART checkpoint makes it start over. That one holds the
/// write lock while it copies and waits for readers, so it runs on a connection of its own whose
/// busy timeout is a few milliseconds: if readers or the writer are busy for longer it gives up
/// (SQLite then finishes it as a PASSIVE one) and tries again at the next tick. A commit (and
/// with it the Raft core, which waits for each log flush) is never held up for long; a
/// checkpoint that waits on SQLite's busy handler with a 10 s timeout could hold it long enough
/// for followers to call an election.
pub(crate) struct Checkpointer(tokio::task::AbortHandle);

const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);
/// WAL size (in 4 KiB pages) above which the checkpointer makes it start over: 4 MiB.
const WAL_RESTART_FRAMES: i64 = 1024;
/// Longest a RESTART checkpoint waits for the writer or readers before it gives up.
const RESTART_PATIENCE: Duration = Duration::from_millis(5);

impl Checkpointer {
    pub(crate) async fn start(path: &Path) -> Result<Checkpointer, sqlx::Error> {
        use sqlx::ConnectOptions;
        // `synchronous` only matters to commits; the checkpoint itself always syncs the file.
        let mut conn =
            connect_options(path, SqliteSynchronous::Normal)?.busy_timeout(RESTART_PATIENCE).connect().await?;
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let frames: Result<(i64, i64, i64), sqlx::Error> =
                    sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(&mut conn).await;
                let result = match frames {
                    Ok((_, log_frames, _)) if log_frames > WAL_RESTART_FRAMES => {
                        sqlx::query("PRAGMA wal_checkpoint(RESTART)").execute(&mut conn).await.map(|_| ())
                    }
                    Ok(_) => Ok(()),
                    Err(e) => Err(e),
                };
                if let Err(e) = result {
                    tracing::warn!(error = %e, "WAL checkpoint failed");
                }
            }
        });
        Ok(Checkpointer(task.abort_handle()))
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

/// Runs `f` in a transaction on a connection of its own to `pool`'s database, as the state
/// machine's writer thread would, and commits it.
#[cfg(test)]
pub(crate) fn test_direct<T>(pool: &SqlitePool, f: impl FnOnce(&rusqlite::Transaction<'_>) -> T) -> T {
    let mut conn = connect_direct(pool.connect_options().get_filename(), "NORMAL").expect("connect");
    let tx = conn.transaction().expect("begin");
    let result = f(&tx);
    tx.commit().expect("commit");
    result
}

/// Applies `command` in a transaction of its own and commits it, as the state machine would;
/// returns the answer and the events it raised.
#[cfg(test)]
pub(crate) async fn test_apply(
    pool: &SqlitePool,
    command: crate::command::Command,
) -> (crate::command::CommandResponse, Vec<state_machine::StateEvent>) {
    let mut events = Vec::new();
    let response = test_direct(pool, |tx| apply::apply(tx, command, &mut events)).expect("apply");
    (response, events)
}
