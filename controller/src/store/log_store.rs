//! The Raft log in SQLite, with group commit.
//!
//! openraft hands each append over and learns of its durability through a callback. A single
//! writer task takes every pending operation, writes them in one transaction and fsyncs once
//! (`synchronous=FULL`), then fires the callbacks in order: under load many appends share one
//! fsync. Entries are also kept in a bounded in-memory tail, so replication can read entries
//! that are still being flushed, and recent reads skip the database.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, OptionalSend, RaftLogId, RaftLogReader, Vote};
use sqlx::sqlite::{SqlitePool, SqliteSynchronous};
use sqlx::Row;
use tokio::sync::{mpsc, oneshot};

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
    pool: SqlitePool,
    _checkpointer: Arc<super::Checkpointer>,
    ops: mpsc::UnboundedSender<Op>,
    tail: Arc<Mutex<Tail>>,
}

impl LogStore {
    pub async fn open(path: &Path) -> anyhow::Result<LogStore> {
        let pool = open_pool(path, SqliteSynchronous::Full, 4, Some(&MIGRATOR)).await?;
        let (ops, rx) = mpsc::unbounded_channel();
        let tail = Arc::new(Mutex::new(Tail::default()));
        // The writer ends when the last LogStore handle (owned by openraft) is dropped.
        tokio::spawn(writer(pool.clone(), rx, tail.clone()));
        let checkpointer = Arc::new(super::Checkpointer::start(pool.clone()));
        Ok(LogStore { pool, _checkpointer: checkpointer, ops, tail })
    }

    fn tail(&self) -> std::sync::MutexGuard<'_, Tail> {
        self.tail.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn meta<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StorageError> {
        let row = sqlx::query("SELECT value FROM log_meta WHERE key = ?")
            .bind(key)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| read_err(ErrorSubject::Store, e))?;
        match row {
            None => Ok(None),
            Some(row) => {
                let bytes: Vec<u8> = row.get(0);
                serde_json::from_slice(&bytes).map(Some).map_err(|e| read_err(ErrorSubject::Store, e))
            }
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

async fn writer(pool: SqlitePool, mut rx: mpsc::UnboundedReceiver<Op>, tail: Arc<Mutex<Tail>>) {
    let mut batch = Vec::new();
    while let Some(op) = rx.recv().await {
        batch.push(op);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let result = write_batch(&pool, &batch).await.map_err(|e| e.to_string());
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

/// Rows per INSERT statement (two bound values each, well under SQLite's limit).
const ROWS_PER_STATEMENT: usize = 400;

async fn write_batch(pool: &SqlitePool, batch: &[Op]) -> Result<(), sqlx::Error> {
    // The common case, appends only: one multi-row INSERT is one round trip to SQLite and, in
    // autocommit, one atomic fsynced commit.
    let rows: Vec<&(i64, Vec<u8>)> = batch
        .iter()
        .filter_map(|op| match op {
            Op::Append { rows, .. } => Some(rows.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let only_appends = batch.iter().all(|op| matches!(op, Op::Append { .. }));
    if only_appends && rows.len() <= ROWS_PER_STATEMENT {
        return insert_rows(pool, &rows).await;
    }
    let mut tx = pool.begin().await?;
    for op in batch {
        match op {
            Op::Append { rows, .. } => {
                let rows: Vec<&(i64, Vec<u8>)> = rows.iter().collect();
                for chunk in rows.chunks(ROWS_PER_STATEMENT) {
                    insert_rows(&mut *tx, chunk).await?;
                }
            }
            Op::Truncate { from, .. } => {
                sqlx::query("DELETE FROM log WHERE idx >= ?").bind(*from as i64).execute(&mut *tx).await?;
            }
            Op::Purge { log_id, .. } => {
                let value = serde_json::to_vec(log_id).unwrap_or_default();
                set_meta(&mut tx, "last_purged", value).await?;
                sqlx::query("DELETE FROM log WHERE idx <= ?").bind(log_id.index as i64).execute(&mut *tx).await?;
            }
            Op::SaveVote { vote, .. } => set_meta(&mut tx, "vote", vote.clone()).await?,
        }
    }
    // synchronous=FULL: the commit returns once the WAL is fsynced.
    tx.commit().await
}

async fn insert_rows<'e, E>(executor: E, rows: &[&(i64, Vec<u8>)]) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = sqlx::Sqlite>,
{
    if rows.is_empty() {
        return Ok(());
    }
    let mut sql = String::from("INSERT OR REPLACE INTO log (idx, entry) VALUES (?, ?)");
    for _ in 1..rows.len() {
        sql.push_str(", (?, ?)");
    }
    let mut query = sqlx::query(&sql);
    for (index, bytes) in rows {
        query = query.bind(*index).bind(bytes.as_slice());
    }
    query.execute(executor).await?;
    Ok(())
}

async fn set_meta(tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>, key: &str, value: Vec<u8>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO log_meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
    )
    .bind(key)
    .bind(value)
    .execute(&mut **tx)
    .await?;
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
        let rows = sqlx::query("SELECT entry FROM log WHERE idx >= ? AND idx < ? ORDER BY idx")
            .bind(start as i64)
            .bind(db_end as i64)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| read_err(ErrorSubject::Logs, e))?;
        let mut entries = rows
            .iter()
            .map(|row| {
                let bytes: &[u8] = row.get(0);
                serde_json::from_slice::<Entry>(bytes).map_err(|e| read_err(ErrorSubject::Logs, e))
            })
            .collect::<Result<Vec<_>, _>>()?;
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
        let row = sqlx::query("SELECT entry FROM log ORDER BY idx DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| read_err(ErrorSubject::Logs, e))?;
        let last = match row {
            Some(row) => {
                let bytes: &[u8] = row.get(0);
                let entry: Entry = serde_json::from_slice(bytes).map_err(|e| read_err(ErrorSubject::Logs, e))?;
                Some(*entry.get_log_id())
            }
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
