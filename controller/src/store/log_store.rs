//! The Raft log in SQLite, written by one thread of its own, with group commit.
//!
//! openraft hands each append over and learns of its durability through a callback. The writer
//! thread takes every pending operation, writes them in one transaction and fsyncs once
//! (`synchronous=FULL`), then fires the callbacks in order: under load many appends share one
//! fsync. Entries are also kept in a bounded in-memory tail, so replication can read entries
//! that are still being flushed, and recent reads skip the database.
//!
//! The writer calls SQLite directly (rusqlite) rather than through sqlx: an append is then one
//! hand-over to the writer thread and one callback back, where sqlx's worker thread added a
//! round trip per statement behind a task of our own. openraft 0.9 waits for every log flush
//! before it replicates, so these hand-overs sit on the path of every write, on the leader and
//! on a follower; on a busy two-core machine each one also waits for a core. The schema is still
//! applied with `sqlx::migrate!`, and the state database stays on sqlx.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, OptionalSend, RaftLogId, RaftLogReader, Vote};
use rusqlite::OptionalExtension;
use sqlx::sqlite::SqliteSynchronous;
use tokio::sync::oneshot;

use super::{open_pool, read_err, write_err};
use crate::raft::{Entry, LogId, NodeId, StorageError, TypeConfig};
use crate::util::MessageError;

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/log");

/// Flushed entries kept in memory behind the newest one.
const TAIL_KEEP: u64 = 4096;
/// Most operations written in one transaction.
const MAX_BATCH: usize = 4096;

enum Op {
    Append { rows: Vec<(i64, Vec<u8>)>, last_index: u64, callback: LogFlushed<TypeConfig> },
    Truncate { from: u64, done: oneshot::Sender<Result<(), String>> },
    Purge { log_id: LogId, done: oneshot::Sender<Result<(), String>> },
    SaveVote { vote: Vec<u8>, done: oneshot::Sender<Result<(), String>> },
}

/// Entries appended but possibly not flushed yet, plus the most recent flushed ones.
#[derive(Default)]
struct Tail {
    entries: BTreeMap<u64, Entry>,
}

#[derive(Clone)]
pub struct LogStore {
    /// Reads (a lagging follower's entries, the vote, the log state at start) on a connection
    /// of their own, from the blocking pool, so they never wait behind an fsync.
    reader: Arc<Mutex<rusqlite::Connection>>,
    _checkpointer: Arc<super::Checkpointer>,
    ops: mpsc::Sender<Op>,
    tail: Arc<Mutex<Tail>>,
}

/// Opens a connection with the settings every connection to the log has.
fn connect(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        anyhow::bail!("the Raft log could not switch to WAL (it is in {mode} mode)");
    }
    // FULL: a commit returns once it is fsynced.
    conn.pragma_update(None, "synchronous", "FULL")?;
    for (name, value) in super::SHARED_PRAGMAS {
        conn.pragma_update(None, name, value)?;
    }
    Ok(conn)
}

impl LogStore {
    pub async fn open(path: &Path) -> anyhow::Result<LogStore> {
        // The schema: applied once by sqlx's migrator, which keeps its own record of it.
        open_pool(path, SqliteSynchronous::Full, 1, Some(&MIGRATOR)).await?.close().await;
        let writer = connect(path)?;
        let reader = Arc::new(Mutex::new(connect(path)?));
        let (ops, rx) = mpsc::channel();
        let tail = Arc::new(Mutex::new(Tail::default()));
        // The writer ends when the last LogStore handle (owned by openraft) is dropped.
        let writer_tail = tail.clone();
        std::thread::Builder::new()
            .name("raft-log-writer".into())
            .spawn(move || write_loop(writer, rx, writer_tail))?;
        let checkpointer = Arc::new(super::Checkpointer::start(path).await?);
        Ok(LogStore { reader, _checkpointer: checkpointer, ops, tail })
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `read` on the reading connection, off the async threads.
    async fn read<T, F>(&self, subject: ErrorSubject<NodeId>, read: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let reader = self.reader.clone();
        let result = tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(|e| e.into_inner());
            read(&conn)
        })
        .await;
        match result {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(read_err(subject, e)),
            Err(e) => Err(read_err(subject, MessageError(format!("a log read stopped: {e}")))),
        }
    }

    async fn meta<T: serde::de::DeserializeOwned>(&self, key: &'static str) -> Result<Option<T>, StorageError> {
        let bytes: Option<Vec<u8>> = self
            .read(ErrorSubject::Store, move |conn| {
                conn.query_row("SELECT value FROM log_meta WHERE key = ?1", [key], |row| row.get(0)).optional()
            })
            .await?;
        match bytes {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| read_err(ErrorSubject::Store, e)),
        }
    }

    /// Queues `op` for the writer and waits until it is durable.
    async fn submit(&self, op: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Op) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        let gone = || write_err(ErrorSubject::Logs, MessageError("the log writer has stopped".into()));
        self.ops.send(op(tx)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?.map_err(|e| write_err(ErrorSubject::Logs, MessageError(e)))
    }
}

fn write_loop(mut conn: rusqlite::Connection, rx: mpsc::Receiver<Op>, tail: Arc<Mutex<Tail>>) {
    let mut batch = Vec::new();
    while let Ok(op) = rx.recv() {
        batch.push(op);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = write_batch(&mut conn, &batch).map_err(|e| e.to_string());
        tracing::debug!(ops = batch.len(), elapsed_us = started.elapsed().as_micros() as u64, "log written");
        if let Err(e) = &result {
            tracing::error!(error = %e, "writing the Raft log failed");
        }
        let mut flushed = None;
        for op in batch.drain(..) {
            match op {
                Op::Append { callback, last_index, .. } => {
                    flushed = Some(last_index);
                    callback.log_io_completed(result.clone().map_err(std::io::Error::other));
                }
                Op::Truncate { done, .. } | Op::Purge { done, .. } | Op::SaveVote { done, .. } => {
                    let _ = done.send(result.clone());
                }
            }
        }
        if let (Some(last), Ok(())) = (flushed, &result) {
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            let keep_from = last.saturating_sub(TAIL_KEEP);
            tail.entries = tail.entries.split_off(&keep_from);
        }
    }
}

/// Writes every operation of `batch` in one transaction; its commit is the one fsync.
fn write_batch(conn: &mut rusqlite::Connection, batch: &[Op]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    for op in batch {
        match op {
            Op::Append { rows, .. } => {
                let mut insert = tx.prepare_cached("INSERT OR REPLACE INTO log (idx, entry) VALUES (?1, ?2)")?;
                for (index, bytes) in rows {
                    insert.execute(rusqlite::params![index, bytes])?;
                }
            }
            Op::Truncate { from, .. } => {
                tx.prepare_cached("DELETE FROM log WHERE idx >= ?1")?.execute([*from as i64])?;
            }
            Op::Purge { log_id, .. } => {
                let value = serde_json::to_vec(log_id).unwrap_or_default();
                set_meta(&tx, "last_purged", &value)?;
                tx.prepare_cached("DELETE FROM log WHERE idx <= ?1")?.execute([log_id.index as i64])?;
            }
            Op::SaveVote { vote, .. } => set_meta(&tx, "vote", vote)?,
        }
    }
    // synchronous=FULL: the commit returns once the WAL is fsynced. A failed batch rolls back
    // when `tx` is dropped.
    tx.commit()
}

fn set_meta(tx: &rusqlite::Transaction<'_>, key: &str, value: &[u8]) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO log_meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )?
    .execute(rusqlite::params![key, value])?;
    Ok(())
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => i64::MAX as u64,
    };
    // SQLite integers are signed; log indexes never come near i64::MAX.
    (start.min(i64::MAX as u64), end.min(i64::MAX as u64))
}

fn decode(bytes: &[u8]) -> Result<Entry, StorageError> {
    serde_json::from_slice::<Entry>(bytes).map_err(|e| read_err(ErrorSubject::Logs, e))
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        if start >= end {
            return Ok(Vec::new());
        }
        // Everything below the tail's first index is already flushed, so the database has it.
        let (tail_first, from_tail): (u64, Vec<Entry>) = {
            let tail = self.tail();
            let first = tail.entries.keys().next().copied().unwrap_or(u64::MAX);
            let lo = start.max(first);
            let entries =
                if lo < end { tail.entries.range(lo..end).map(|(_, e)| e.clone()).collect() } else { Vec::new() };
            (first, entries)
        };
        if start >= tail_first {
            return Ok(from_tail);
        }
        let db_end = end.min(tail_first);
        let rows: Vec<Vec<u8>> = self
            .read(ErrorSubject::Logs, move |conn| {
                let mut select =
                    conn.prepare_cached("SELECT entry FROM log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")?;
                let rows = select.query_map([start as i64, db_end as i64], |row| row.get(0))?;
                rows.collect()
            })
            .await?;
        let mut entries = rows.iter().map(|bytes| decode(bytes)).collect::<Result<Vec<_>, _>>()?;
        entries.extend(from_tail);
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.meta("last_purged").await?;
        if let Some(last) = self.tail().entries.values().next_back() {
            return Ok(LogState { last_purged_log_id: last_purged, last_log_id: Some(*last.get_log_id()) });
        }
        let newest: Option<Vec<u8>> = self
            .read(ErrorSubject::Logs, |conn| {
                conn.query_row("SELECT entry FROM log ORDER BY idx DESC LIMIT 1", [], |row| row.get(0)).optional()
            })
            .await?;
        let last = match newest {
            Some(bytes) => Some(*decode(&bytes)?.get_log_id()),
            None => last_purged,
        };
        Ok(LogState { last_purged_log_id: last_purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let vote = serde_json::to_vec(vote).map_err(|e| write_err(ErrorSubject::Vote, e))?;
        self.submit(|done| Op::SaveVote { vote, done }).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta("vote").await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut rows = Vec::new();
        let mut last_index = 0;
        {
            let mut tail = self.tail();
            for entry in entries {
                let bytes = serde_json::to_vec(&entry).map_err(|e| write_err(ErrorSubject::Logs, e))?;
                let index = entry.get_log_id().index;
                rows.push((index as i64, bytes));
                last_index = index;
                tail.entries.insert(index, entry);
            }
        }
        self.ops
            .send(Op::Append { rows, last_index, callback })
            .map_err(|_| write_err(ErrorSubject::Logs, MessageError("the log writer has stopped".into())))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index;
        self.tail().entries.split_off(&from);
        self.submit(|done| Op::Truncate { from, done }).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut tail = self.tail();
            tail.entries = tail.entries.split_off(&(log_id.index + 1));
        }
        self.submit(|done| Op::Purge { log_id, done }).await
    }
}
