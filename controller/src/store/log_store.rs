//! The Raft log in SQLite, written by one thread of its own, with group commit.
//!
//! openraft hands each append over and learns of its durability through a callback. The writer
//! thread takes every pending operation, writes them in one transaction and fsyncs once
//! (`synchronous=FULL`), then fires the callbacks in order: under load many appends share one
//! fsync. Entries are also kept in a bounded in-memory tail, so replication can read entries
//! that are still being flushed, and recent reads skip the database. The tail is filled from the
//! database at start: a new leader's first offer to each follower starts midway through the log
//! (openraft's search for where the follower's log ends), and decoding those entries from disk
//! delayed a failover's first commit by 50 to 100 ms.
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

/// Flushed entries kept in memory behind the newest one: as many as the log holds between
/// snapshots with the default settings (10,000 plus 2,000 kept behind a snapshot)...
const TAIL_KEEP: u64 = 16_384;
/// ...as long as their encoded size stays within this (upload chunks are 256 KiB each).
const TAIL_BYTES: usize = 64 * 1024 * 1024;
/// Most operations written in one transaction.
const MAX_BATCH: usize = 4096;
/// Purged entries deleted per transaction. A purge behind a snapshot covers thousands of
/// entries (megabytes); deleting them a slice at a time keeps every append's transaction short.
const PURGE_SLICE: u64 = 128;
/// A log write this slow is reported at info level.
const SLOW_WRITE: std::time::Duration = std::time::Duration::from_millis(100);

enum Op {
    Append {
        rows: Vec<(i64, Vec<u8>)>,
        last_index: u64,
        callback: LogFlushed<TypeConfig>,
    },
    Truncate {
        from: u64,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Records the purge; its entries are deleted afterwards, a slice at a time.
    Purge {
        log_id: LogId,
    },
    SaveVote {
        vote: Vec<u8>,
        done: oneshot::Sender<Result<(), String>>,
    },
}

/// Entries appended but possibly not flushed yet, plus the most recent flushed ones.
#[derive(Default)]
struct Tail {
    /// Each entry with its encoded size.
    entries: BTreeMap<u64, (Entry, usize)>,
    /// The encoded size of `entries`.
    bytes: usize,
    /// The last purged entry. Reads stop above it at once, while the writer deletes the
    /// entries at its own pace.
    purged: Option<LogId>,
}

impl Tail {
    fn insert(&mut self, index: u64, entry: Entry, size: usize) {
        if let Some((_, replaced)) = self.entries.insert(index, (entry, size)) {
            self.bytes -= replaced;
        }
        self.bytes += size;
    }

    /// Forgets the entries from `index` on.
    fn remove_from(&mut self, index: u64) {
        let removed = self.entries.split_off(&index);
        self.bytes -= removed.values().map(|(_, size)| size).sum::<usize>();
    }

    /// Forgets the entries before `index`.
    fn remove_before(&mut self, index: u64) {
        let kept = self.entries.split_off(&index);
        let removed = std::mem::replace(&mut self.entries, kept);
        self.bytes -= removed.values().map(|(_, size)| size).sum::<usize>();
    }

    /// Keeps the flushed entries within [`TAIL_KEEP`] and [`TAIL_BYTES`], oldest out first.
    /// Entries after `flushed` stay whatever their size: the database does not have them yet.
    fn trim(&mut self, flushed: u64) {
        self.remove_before(flushed.saturating_sub(TAIL_KEEP));
        while self.bytes > TAIL_BYTES {
            match self.entries.first_key_value() {
                Some((&first, _)) if first <= flushed => {
                    if let Some((_, (_, size))) = self.entries.pop_first() {
                        self.bytes -= size;
                    }
                }
                _ => break,
            }
        }
    }

    /// Fills the tail with the newest stored entries above `purged`, within the budgets.
    fn load(conn: &rusqlite::Connection, purged: Option<LogId>) -> anyhow::Result<Tail> {
        let mut tail = Tail { purged, ..Tail::default() };
        let above = purged.map_or(-1, |p| p.index as i64);
        let mut select = conn.prepare("SELECT idx, entry FROM log WHERE idx > ?1 ORDER BY idx DESC LIMIT ?2")?;
        let mut rows = select.query(rusqlite::params![above, TAIL_KEEP as i64])?;
        while let Some(row) = rows.next()? {
            let bytes = row.get_ref(1)?.as_blob()?;
            if tail.bytes + bytes.len() > TAIL_BYTES {
                break;
            }
            let entry = decode(bytes)?;
            tail.insert(row.get::<_, i64>(0)? as u64, entry, bytes.len());
        }
        Ok(tail)
    }
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

/// Opens a connection with the settings every connection to the log has: FULL, a commit
/// returns once it is fsynced.
fn connect(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    super::connect_direct(path, "FULL")
}

impl LogStore {
    pub async fn open(path: &Path) -> anyhow::Result<LogStore> {
        // The schema: applied once by sqlx's migrator, which keeps its own record of it.
        open_pool(path, SqliteSynchronous::Full, 1, Some(&MIGRATOR)).await?.close().await;
        let writer = connect(path)?;
        let reader = Arc::new(Mutex::new(connect(path)?));
        let (ops, rx) = mpsc::channel();
        let purged = match writer
            .query_row("SELECT value FROM log_meta WHERE key = 'last_purged'", [], |row| row.get::<_, Vec<u8>>(0))
        {
            Ok(bytes) => Some(serde_json::from_slice::<LogId>(&bytes)?),
            Err(rusqlite::Error::QueryReturnedNoRows) => None,
            Err(e) => return Err(e.into()),
        };
        let tail = Arc::new(Mutex::new(Tail::load(&writer, purged)?));
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
    // A purge that a crash interrupted is finished here after a restart.
    let purged = tail.lock().unwrap_or_else(|e| e.into_inner()).purged.map(|log_id| log_id.index);
    let mut backlog = Backlog { purged, pending: purged.is_some() };
    let mut batch = Vec::new();
    loop {
        // While purged entries remain, an idle moment deletes a slice of them.
        let first = if backlog.pending {
            match rx.recv_timeout(std::time::Duration::from_millis(20)) {
                Ok(op) => Some(op),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        } else {
            match rx.recv() {
                Ok(op) => Some(op),
                Err(_) => return,
            }
        };
        batch.extend(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = write_batch(&mut conn, &batch, &mut backlog).map_err(|e| e.to_string());
        let elapsed = started.elapsed();
        tracing::debug!(ops = batch.len(), elapsed_us = elapsed.as_micros() as u64, "log written");
        if elapsed >= SLOW_WRITE {
            // Replication to and from this node waits for these writes; a slow disk shows here.
            tracing::info!(ops = batch.len(), elapsed_ms = elapsed.as_millis() as u64, "a Raft log write was slow");
        }
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
                Op::Truncate { done, .. } | Op::SaveVote { done, .. } => {
                    let _ = done.send(result.clone());
                }
                Op::Purge { .. } => {}
            }
        }
        if let (Some(last), Ok(())) = (flushed, &result) {
            tail.lock().unwrap_or_else(|e| e.into_inner()).trim(last);
        }
    }
}

/// Purged entries not deleted yet.
#[derive(Clone, Copy)]
struct Backlog {
    /// The last purged index, if any.
    purged: Option<u64>,
    /// Whether entries up to `purged` may still be stored.
    pending: bool,
}

/// Deletes the next slice of entries up to `purged`, lowest first, so no hole opens in the log.
/// Returns whether purged entries remain.
fn delete_slice(tx: &rusqlite::Transaction<'_>, purged: u64) -> rusqlite::Result<bool> {
    // From the lowest stored index, not from the last slice's end: an installed snapshot can
    // purge far past the stored entries.
    let lowest: Option<i64> = tx.prepare_cached("SELECT MIN(idx) FROM log")?.query_row([], |row| row.get(0))?;
    match lowest {
        Some(lowest) if (lowest as u64) <= purged => {
            let upto = purged.min((lowest as u64).saturating_add(PURGE_SLICE - 1));
            tx.prepare_cached("DELETE FROM log WHERE idx <= ?1")?.execute([upto as i64])?;
            Ok(upto < purged)
        }
        _ => Ok(false),
    }
}

/// Writes every operation of `batch` in one transaction; its commit is the one fsync.
/// With purged entries outstanding it also deletes one slice of them. The backlog changes only
/// once the transaction is committed: the purge's record always reaches the disk no later than
/// the first deletion it allows.
fn write_batch(conn: &mut rusqlite::Connection, batch: &[Op], backlog: &mut Backlog) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let Backlog { mut purged, mut pending } = *backlog;
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
            Op::Purge { log_id } => {
                let value = serde_json::to_vec(log_id).unwrap_or_default();
                set_meta(&tx, "last_purged", &value)?;
                purged = purged.max(Some(log_id.index));
                pending = true;
            }
            Op::SaveVote { vote, .. } => set_meta(&tx, "vote", vote)?,
        }
    }
    if let (Some(upto), true) = (purged, pending) {
        pending = delete_slice(&tx, upto)?;
    }
    // synchronous=FULL: the commit returns once the WAL is fsynced. A failed batch rolls back
    // when `tx` is dropped.
    tx.commit()?;
    *backlog = Backlog { purged, pending };
    Ok(())
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
        // Purged entries may still be stored until the writer gets to them.
        let start = match self.tail().purged {
            Some(purged) => start.max(purged.index + 1),
            None => start,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        // Everything below the tail's first index is already flushed, so the database has it.
        let (tail_first, from_tail): (u64, Vec<Entry>) = {
            let tail = self.tail();
            let first = tail.entries.keys().next().copied().unwrap_or(u64::MAX);
            let lo = start.max(first);
            let entries =
                if lo < end { tail.entries.range(lo..end).map(|(_, (e, _))| e.clone()).collect() } else { Vec::new() };
            (first, entries)
        };
        if start >= tail_first {
            return Ok(from_tail);
        }
        let db_end = end.min(tail_first);
        let started = std::time::Instant::now();
        let rows: Vec<Vec<u8>> = self
            .read(ErrorSubject::Logs, move |conn| {
                let mut select =
                    conn.prepare_cached("SELECT entry FROM log WHERE idx >= ?1 AND idx < ?2 ORDER BY idx")?;
                let rows = select.query_map([start as i64, db_end as i64], |row| row.get(0))?;
                rows.collect()
            })
            .await?;
        let mut entries = rows.iter().map(|bytes| decode(bytes)).collect::<Result<Vec<_>, _>>()?;
        tracing::debug!(
            entries = entries.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "log entries read from the database"
        );
        entries.extend(from_tail);
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged = self.tail().purged;
        if let Some((last, _)) = self.tail().entries.values().next_back() {
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
                tail.insert(index, entry, bytes.len());
                rows.push((index as i64, bytes));
                last_index = index;
            }
        }
        self.ops
            .send(Op::Append { rows, last_index, callback })
            .map_err(|_| write_err(ErrorSubject::Logs, MessageError("the log writer has stopped".into())))
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let from = log_id.index;
        self.tail().remove_from(from);
        self.submit(|done| Op::Truncate { from, done }).await
    }

    /// Records the purge and returns: openraft 0.9 awaits `purge` inside its core, where
    /// deleting thousands of entries after each snapshot held back heartbeats long enough for a
    /// follower to stand. The entries go afterwards, a slice per transaction, lowest first, so
    /// the log never has a hole; the record reaches the disk with the next write. Purging is not
    /// a promise of durability: a purge lost in a crash leaves entries the snapshot also holds.
    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut tail = self.tail();
            tail.remove_before(log_id.index + 1);
            tail.purged = tail.purged.max(Some(log_id));
        }
        self.ops
            .send(Op::Purge { log_id })
            .map_err(|_| write_err(ErrorSubject::Logs, MessageError("the log writer has stopped".into())))
    }
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;

    /// A place for a log in a directory of its own (kept while the guard lives).
    fn log_path() -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft-log.db");
        (dir, path)
    }

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 1), index)
    }

    /// Stores blank entries `1..=last` through a connection of the test's own, as an earlier run
    /// of the writer would have left them.
    fn store_entries(path: &Path, last: u64) {
        let conn = connect(path).expect("connect");
        for index in 1..=last {
            let entry = Entry { log_id: log_id(index), payload: EntryPayload::Blank };
            conn.execute(
                "INSERT INTO log (idx, entry) VALUES (?1, ?2)",
                rusqlite::params![index as i64, serde_json::to_vec(&entry).expect("encode")],
            )
            .expect("insert");
        }
    }

    fn stored_range(path: &Path) -> (i64, Option<i64>) {
        let conn = connect(path).expect("connect");
        conn.query_row("SELECT COUNT(*), MIN(idx) FROM log", [], |row| Ok((row.get(0)?, row.get(1)?))).expect("count")
    }

    async fn wait_until_stored(path: &Path, wanted: (i64, Option<i64>)) {
        for _ in 0..500 {
            if stored_range(path) == wanted {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the log still holds {:?}, wanted {wanted:?}", stored_range(path));
    }

    #[tokio::test]
    async fn a_purge_hides_its_entries_at_once_and_deletes_them_in_slices() {
        let (_dir, path) = log_path();
        let mut log = LogStore::open(&path).await.expect("open");
        store_entries(&path, 1000);

        log.purge(log_id(900)).await.expect("purge");
        // Readers see the purge before the writer has deleted anything.
        let entries = log.try_get_log_entries(0..2000).await.expect("read");
        assert_eq!(entries.first().map(|e| e.log_id.index), Some(901));
        assert_eq!(entries.len(), 100);
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(900)));
        assert_eq!(state.last_log_id, Some(log_id(1000)));
        // 900 entries are several slices: the writer goes on while idle until all are gone.
        wait_until_stored(&path, (100, Some(901))).await;

        drop(log);
        let mut log = LogStore::open(&path).await.expect("reopen");
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(900)));
        assert_eq!(state.last_log_id, Some(log_id(1000)));
    }

    #[tokio::test]
    async fn a_purge_a_crash_interrupted_is_finished_after_a_restart() {
        let (_dir, path) = log_path();
        drop(LogStore::open(&path).await.expect("open"));
        store_entries(&path, 600);
        // The purge's record reached the disk, its deletions did not.
        let conn = connect(&path).expect("connect");
        conn.execute(
            "INSERT INTO log_meta (key, value) VALUES ('last_purged', ?1)",
            [serde_json::to_vec(&log_id(500)).expect("encode")],
        )
        .expect("meta");
        drop(conn);

        let mut log = LogStore::open(&path).await.expect("reopen");
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(500)));
        assert_eq!(state.last_log_id, Some(log_id(600)));
        let entries = log.try_get_log_entries(400..=600).await.expect("read");
        assert_eq!(entries.first().map(|e| e.log_id.index), Some(501));
        wait_until_stored(&path, (100, Some(501))).await;
    }

    #[tokio::test]
    async fn a_purge_past_every_stored_entry_empties_the_log() {
        // A follower that installs a snapshot purges up to the snapshot, beyond its own log.
        let (_dir, path) = log_path();
        let mut log = LogStore::open(&path).await.expect("open");
        store_entries(&path, 300);
        log.purge(log_id(1_000_000)).await.expect("purge");
        wait_until_stored(&path, (0, None)).await;
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id, Some(log_id(1_000_000)));
        assert_eq!(state.last_log_id, Some(log_id(1_000_000)));
    }

    #[tokio::test]
    async fn a_reopened_log_serves_its_newest_entries_from_memory() {
        let (_dir, path) = log_path();
        drop(LogStore::open(&path).await.expect("open"));
        store_entries(&path, 50);
        let mut log = LogStore::open(&path).await.expect("reopen");
        assert_eq!(log.tail().entries.len(), 50);
        // Served from the tail: the database no longer has them, the tail still does.
        connect(&path).expect("connect").execute("DELETE FROM log", []).expect("delete");
        let entries = log.try_get_log_entries(10..20).await.expect("read");
        assert_eq!(entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), (10..20).collect::<Vec<_>>());
    }

    #[test]
    fn the_tail_keeps_flushed_entries_within_its_byte_budget_and_every_unflushed_one() {
        let mut tail = Tail::default();
        let big = TAIL_BYTES / 4;
        for index in 1..=8 {
            tail.insert(index, Entry { log_id: log_id(index), payload: EntryPayload::Blank }, big);
        }
        // 1 to 6 are flushed: the oldest go until the rest fit, 7 and 8 stay regardless.
        tail.trim(6);
        assert_eq!(tail.entries.keys().copied().collect::<Vec<_>>(), vec![5, 6, 7, 8]);
        assert_eq!(tail.bytes, 4 * big);
        tail.trim(8);
        assert_eq!(tail.entries.keys().copied().collect::<Vec<_>>(), vec![5, 6, 7, 8]);
        tail.remove_from(7);
        assert_eq!(tail.bytes, 2 * big);
        tail.insert(6, Entry { log_id: log_id(6), payload: EntryPayload::Blank }, 10);
        assert_eq!(tail.bytes, big + 10);
        tail.remove_before(6);
        assert_eq!((tail.entries.len(), tail.bytes), (1, 10));
    }
}
