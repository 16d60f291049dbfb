//! The replicated state machine: committed commands applied to SQLite, snapshots as consistent
//! copies of the whole database (`VACUUM INTO`), installed by copying their tables back in one
//! transaction.
//!
//! One thread of its own writes the database (the `Writer`), through rusqlite: a batch of
//! committed entries is one hand-over to it and one answer back. Through sqlx every statement
//! (BEGIN, each write, the applied index, COMMIT) was a round trip to sqlx's connection thread,
//! two thread wake-ups each, on the commit path of every write. The HTTP API reads through a
//! sqlx pool; the schema is applied with `sqlx::migrate!`.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{EntryPayload, ErrorSubject, OptionalSend, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqliteSynchronous};
use sqlx::{Connection, Row};
use tokio::sync::{broadcast, oneshot, watch};

use super::{open_pool, read_err, write_err};
use crate::command::CommandResponse;
use crate::raft::{Entry, LogId, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::util::MessageError;

pub(crate) static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/state");

const CURRENT_SNAPSHOT: &str = "current.json";

#[derive(Serialize, Deserialize)]
struct SnapshotIndex {
    meta: SnapshotMeta,
    file: String,
}

pub struct StateMachine {
    /// The state database's file.
    db: PathBuf,
    writer: Writer,
    _checkpointer: super::Checkpointer,
    reader: SqlitePool,
    snapshot_dir: PathBuf,
    files: Arc<SnapshotFiles>,
    applied: watch::Sender<u64>,
    /// Bumped whenever API tokens may have changed, so caches of them know to drop their copy.
    tokens_generation: Arc<std::sync::atomic::AtomicU64>,
    events: broadcast::Sender<StateEvent>,
}

/// What applying committed entries changed, for the parts of a node that act on it at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateEvent {
    /// The agent's certificate is refused from now on: its session must end.
    AgentRevoked(String),
    /// A deployment was created or changed status.
    DeploymentChanged { id: String, project_id: String },
    /// Log lines up to number `upto` were added to a deployment.
    DeploymentLogs { id: String, project_id: String, upto: i64 },
    /// Something the ingress routes by changed (agents, services, domains, certificates).
    IngressChanged,
    /// A preview environment was opened, moved, or is being (or was) torn down.
    PreviewsChanged,
}

impl StateMachine {
    /// Opens the state database under `dir` and returns the state machine for openraft plus a
    /// pool for readers (the HTTP API).
    pub async fn open(dir: &Path) -> anyhow::Result<StateMachine> {
        let db = dir.join("state.db");
        let snapshot_dir = dir.join("snapshots");
        tokio::fs::create_dir_all(&snapshot_dir).await?;
        // The log is the durable record; after a power loss this database may be a little
        // behind, and openraft re-applies from the log (or from the latest snapshot, below).
        open_pool(&db, SqliteSynchronous::Normal, 1, Some(&MIGRATOR)).await?.close().await;
        let conn = super::connect_direct(&db, "NORMAL")?;
        conn.execute(
            "INSERT OR IGNORE INTO raft_applied (id, last_applied, membership) VALUES (1, NULL, ?1)",
            [serde_json::to_string(&StoredMembership::default())?],
        )?;
        let writer = Writer::start(conn)?;
        let reader = open_pool(&db, SqliteSynchronous::Normal, 8, None).await?;
        let (applied, _) = watch::channel(0);
        let mut sm = StateMachine {
            db: db.clone(),
            _checkpointer: super::Checkpointer::start(&db).await?,
            writer,
            reader,
            files: Arc::new(SnapshotFiles { dir: snapshot_dir.clone(), publish_lock: tokio::sync::Mutex::new(()) }),
            snapshot_dir,
            applied,
            tokens_generation: Arc::default(),
            events: broadcast::channel(4096).0,
        };
        // If the database lost what a snapshot already holds, start again from the snapshot:
        // the log behind it may have been purged.
        if let Some(index) = sm.snapshot_index().await? {
            let (applied, _) = sm.applied_state().await?;
            if applied < index.meta.last_log_id {
                tracing::warn!(snapshot = %index.meta.snapshot_id, "state database is behind the latest snapshot; restoring it");
                sm.restore(&sm.snapshot_dir.join(&index.file)).await?;
            }
        }
        let (applied, _) = sm.applied_state().await?;
        sm.applied.send_replace(applied.map(|l| l.index).unwrap_or(0));
        Ok(sm)
    }

    pub fn reader(&self) -> SqlitePool {
        self.reader.clone()
    }

    pub fn tokens_generation(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.tokens_generation.clone()
    }

    /// Events of applied changes (a receiver that lags loses the oldest).
    pub fn events(&self) -> broadcast::Sender<StateEvent> {
        self.events.clone()
    }

    fn tokens_changed(&self) {
        self.tokens_generation.fetch_add(1, std::sync::atomic::Ordering::Release);
    }

    /// The index of the last applied entry, updated after each applied batch is committed.
    pub fn applied_index(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    async fn snapshot_index(&self) -> anyhow::Result<Option<SnapshotIndex>> {
        match tokio::fs::read(self.snapshot_dir.join(CURRENT_SNAPSHOT)).await {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces every table of the state database by the snapshot's, in one transaction.
    async fn restore(&self, file: &Path) -> Result<(), StorageError> {
        let file = file.to_path_buf();
        self.writer
            .run(move |conn| restore_here(conn, &file))
            .await?
            .map_err(|e| write_err(ErrorSubject::StateMachine, e))
    }

    async fn write_index(&self, index: &SnapshotIndex) -> std::io::Result<()> {
        self.files.publish(index).await
    }
}

async fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::File::create(path).await?;
    f.write_all(bytes).await?;
    f.sync_all().await
}

async fn sync_dir(dir: &Path) -> std::io::Result<()> {
    tokio::fs::File::open(dir).await?.sync_all().await
}

/// Deletes snapshot files other than `keep`; a failure only leaves a stale file behind.
async fn remove_other_snapshots(dir: &Path, keep: &str) {
    let Ok(mut entries) = tokio::fs::read_dir(dir).await else { return };
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name().to_string_lossy().to_string();
        if name.ends_with(".db") && name != keep {
            if let Err(e) = tokio::fs::remove_file(entry.path()).await {
                tracing::warn!(file = %name, error = %e, "could not remove old snapshot");
            }
        }
    }
}

fn snapshot_err(verb: openraft::ErrorVerb, e: impl std::error::Error + 'static) -> StorageError {
    StorageIOError::new(ErrorSubject::Snapshot(None), verb, openraft::AnyError::new(&e)).into()
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let row = sqlx::query("SELECT last_applied, membership FROM raft_applied WHERE id = 1")
            .fetch_one(&self.reader)
            .await
            .map_err(|e| read_err(ErrorSubject::StateMachine, e))?;
        let last: Option<String> = row.get(0);
        let membership: String = row.get(1);
        let last = match last {
            Some(s) => Some(serde_json::from_str(&s).map_err(|e| read_err(ErrorSubject::StateMachine, e))?),
            None => None,
        };
        let membership = serde_json::from_str(&membership).map_err(|e| read_err(ErrorSubject::StateMachine, e))?;
        Ok((last, membership))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<CommandResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let started = std::time::Instant::now();
        let applied = self
            .writer
            .run(move |conn| apply_entries(conn, entries))
            .await?
            .map_err(|e| write_err(ErrorSubject::StateMachine, MessageError(format!("{e:#}"))))?;
        let Some(last) = applied.last else { return Ok(applied.responses) };
        tracing::debug!(
            upto = last.index,
            entries = applied.responses.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "applied"
        );
        if applied.tokens_changed {
            self.tokens_changed();
        }
        for event in applied.events {
            let _ = self.events.send(event);
        }
        self.applied.send_replace(last.index);
        Ok(applied.responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { db: self.db.clone(), dir: self.snapshot_dir.clone(), files: self.files.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        use openraft::ErrorVerb::Write;
        let file = format!("{}.db", sanitize(&meta.snapshot_id));
        let path = self.snapshot_dir.join(&file);
        write_synced(&path, snapshot.get_ref()).await.map_err(|e| snapshot_err(Write, e))?;
        self.restore(&path).await?;
        self.write_index(&SnapshotIndex { meta: meta.clone(), file }).await.map_err(|e| snapshot_err(Write, e))?;
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        self.tokens_changed();
        self.applied.send_replace(index);
        tracing::info!(snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        use openraft::ErrorVerb::Read;
        let Some(index) =
            self.snapshot_index().await.map_err(|e| snapshot_err(Read, MessageError(format!("{e:#}"))))?
        else {
            return Ok(None);
        };
        let data = tokio::fs::read(self.snapshot_dir.join(&index.file)).await.map_err(|e| snapshot_err(Read, e))?;
        Ok(Some(Snapshot { meta: index.meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

/// What one batch of committed entries did.
struct Applied {
    responses: Vec<CommandResponse>,
    /// The batch's last entry, if it had any.
    last: Option<LogId>,
    events: Vec<StateEvent>,
    tokens_changed: bool,
}

/// Applies `entries` in one transaction, with the index of the last one, on the writer thread.
fn apply_entries(conn: &mut rusqlite::Connection, entries: Vec<Entry>) -> anyhow::Result<Applied> {
    let tx = conn.transaction()?;
    let mut applied = Applied { responses: Vec::new(), last: None, events: Vec::new(), tokens_changed: false };
    let mut membership = None;
    for entry in entries {
        applied.last = Some(entry.log_id);
        match entry.payload {
            EntryPayload::Blank => applied.responses.push(CommandResponse::Applied),
            EntryPayload::Normal(command) => {
                applied.tokens_changed |= command.touches_api_tokens();
                command.collect_events(&mut applied.events);
                let kind = command.kind();
                let response = super::apply::apply(&tx, command, &mut applied.events)?;
                tracing::debug!(index = entry.log_id.index, command = kind, "applied");
                applied.responses.push(response);
            }
            EntryPayload::Membership(m) => {
                membership = Some(StoredMembership::new(Some(entry.log_id), m));
                applied.responses.push(CommandResponse::Applied);
            }
        }
    }
    let Some(last) = applied.last else { return Ok(applied) };
    let last_json = serde_json::to_string(&last)?;
    match membership {
        Some(m) => super::apply::exec(
            &tx,
            "UPDATE raft_applied SET last_applied = ?1, membership = ?2 WHERE id = 1",
            [last_json, serde_json::to_string(&m)?],
        )?,
        None => super::apply::exec(&tx, "UPDATE raft_applied SET last_applied = ?1 WHERE id = 1", [last_json])?,
    };
    tx.commit()?;
    Ok(applied)
}

/// Copies every table of the snapshot database `file` over the state database's, in one
/// transaction, on the writer thread.
fn restore_here(conn: &mut rusqlite::Connection, file: &Path) -> rusqlite::Result<()> {
    let name = file.to_string_lossy();
    conn.execute("ATTACH DATABASE ?1 AS snap", [name.as_ref()])?;
    let copied = (|| {
        let tx = conn.transaction()?;
        // Rows are copied table by table; references are checked once, at commit.
        tx.execute_batch("PRAGMA defer_foreign_keys = ON")?;
        let tables: Vec<String> = tx
            .prepare(
                "SELECT name FROM snap.sqlite_master WHERE type = 'table' \
                 AND name NOT LIKE 'sqlite_%' AND name != '_sqlx_migrations'",
            )?
            .query_map([], |row| row.get(0))?
            .collect::<Result<_, _>>()?;
        for table in &tables {
            let quoted = table.replace('"', "\"\"");
            tx.execute(&format!("DELETE FROM main.\"{quoted}\""), [])?;
            tx.execute(&format!("INSERT INTO main.\"{quoted}\" SELECT * FROM snap.\"{quoted}\""), [])?;
        }
        tx.commit()
    })();
    let detached = conn.execute("DETACH DATABASE snap", []);
    copied?;
    detached?;
    Ok(())
}

/// The thread that writes the state database: applies and snapshot restores run on it, one at
/// a time, in the order they are handed over. It ends when the state machine is dropped.
struct Writer(std::sync::mpsc::Sender<Job>);

type Job = Box<dyn FnOnce(&mut rusqlite::Connection) + Send>;

impl Writer {
    fn start(mut conn: rusqlite::Connection) -> std::io::Result<Writer> {
        let (jobs, queue) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new().name("state-writer".into()).spawn(move || {
            while let Ok(job) = queue.recv() {
                job(&mut conn);
            }
        })?;
        Ok(Writer(jobs))
    }

    /// Runs `job` on the writer thread and waits for its result.
    async fn run<T, F>(&self, job: F) -> Result<T, StorageError>
    where
        T: Send + 'static,
        F: FnOnce(&mut rusqlite::Connection) -> T + Send + 'static,
    {
        let gone = || write_err(ErrorSubject::StateMachine, MessageError("the state writer has stopped".into()));
        let (done, result) = oneshot::channel();
        self.0
            .send(Box::new(move |conn| {
                let _ = done.send(job(conn));
            }))
            .map_err(|_| gone())?;
        result.await.map_err(|_| gone())
    }
}

/// Snapshot ids become file names: keep them to a safe alphabet.
fn sanitize(id: &str) -> String {
    id.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect()
}

pub struct SnapshotBuilder {
    db: PathBuf,
    dir: PathBuf,
    files: Arc<SnapshotFiles>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        use openraft::ErrorVerb::{Read, Write};
        let tmp = self.dir.join(format!("building-{}.tmp", uuid::Uuid::new_v4().simple()));
        let started = std::time::Instant::now();
        if let Err(e) = copy_database(&self.db, &tmp).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(snapshot_err(Read, MessageError(format!("{e:#}"))));
        }
        tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "state database copied for a snapshot");
        let result = async {
            let options = SqliteConnectOptions::new().filename(&tmp).read_only(true);
            let mut conn = sqlx::SqliteConnection::connect_with(&options).await.map_err(|e| snapshot_err(Read, e))?;
            let row = sqlx::query("SELECT last_applied, membership FROM raft_applied WHERE id = 1")
                .fetch_one(&mut conn)
                .await
                .map_err(|e| snapshot_err(Read, e))?;
            conn.close().await.map_err(|e| snapshot_err(Read, e))?;
            let last: Option<String> = row.get(0);
            let membership: String = row.get(1);
            let last_log_id: Option<LogId> = match last {
                Some(s) => Some(serde_json::from_str(&s).map_err(|e| snapshot_err(Read, e))?),
                None => None,
            };
            let last_membership: StoredMembership =
                serde_json::from_str(&membership).map_err(|e| snapshot_err(Read, e))?;
            let snapshot_id = match last_log_id {
                Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, uuid::Uuid::new_v4().simple()),
                None => format!("0-0-{}", uuid::Uuid::new_v4().simple()),
            };
            let file = format!("{snapshot_id}.db");
            let path = self.dir.join(&file);
            tokio::fs::rename(&tmp, &path).await.map_err(|e| snapshot_err(Write, e))?;
            let meta = SnapshotMeta { last_log_id, last_membership, snapshot_id };
            self.files
                .publish(&SnapshotIndex { meta: meta.clone(), file: file.clone() })
                .await
                .map_err(|e| snapshot_err(Write, e))?;
            let bytes = tokio::fs::metadata(&path).await.map(|m| m.len()).unwrap_or_default();
            tracing::info!(snapshot = %meta.snapshot_id, bytes, "built snapshot");
            // openraft 0.9.25 keeps only the meta of a snapshot it had built (core/sm/worker.rs,
            // storage/helper.rs); a follower gets the data from `get_current_snapshot`, which
            // reads the file. Reading back a state of hundreds of megabytes here only cost
            // memory and time.
            Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(Vec::new())) })
        }
        .await;
        let _ = tokio::fs::remove_file(&tmp).await;
        result
    }
}

/// Copies the state database to `target` (`VACUUM INTO`: one consistent version, while applies
/// go on) and makes the copy durable, on a thread of its own at the lowest CPU priority.
///
/// A copy of a state of hundreds of megabytes takes seconds of a core, and every node takes its
/// snapshot at about the same index: on a small machine the three copies crowded out the Raft
/// path, and a follower that heard no heartbeat for its lease stood, in step with the copies'
/// ends. At nice 19 the copy takes what the Raft path leaves, and it reaches the disk as it is
/// written rather than all at once.
async fn copy_database(db: &Path, target: &Path) -> anyhow::Result<()> {
    let (db, target) = (db.to_path_buf(), target.to_path_buf());
    let (done, result) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("snapshot-copy".into()).spawn(move || {
        let _ = done.send(copy_database_here(&db, &target));
    })?;
    result.await.map_err(|_| anyhow::anyhow!("the snapshot copy stopped"))?
}

fn copy_database_here(db: &Path, target: &Path) -> anyhow::Result<()> {
    lower_priority();
    // While the copy is written, a second thread flushes it every 50 ms: one fsync of hundreds
    // of megabytes at the end held up the log's fsyncs for 100 to 300 ms on every node at once
    // (their journal commits wait for it), long enough for followers to stand.
    let copying = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flusher = {
        let (copying, target) = (copying.clone(), target.to_path_buf());
        std::thread::Builder::new().name("snapshot-flush".into()).spawn(move || {
            lower_priority();
            let mut file = None;
            while copying.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(std::time::Duration::from_millis(50));
                if file.is_none() {
                    file = std::fs::File::open(&target).ok();
                }
                if let Some(file) = &file {
                    let _ = file.sync_data();
                }
            }
        })?
    };
    let copied = (|| -> anyhow::Result<()> {
        let conn = rusqlite::Connection::open(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let target_name = target.to_str().ok_or_else(|| anyhow::anyhow!("the snapshot path is not UTF-8"))?;
        conn.execute("VACUUM INTO ?1", [target_name])?;
        Ok(())
    })();
    copying.store(false, std::sync::atomic::Ordering::Relaxed);
    let _ = flusher.join();
    copied?;
    std::fs::File::open(target)?.sync_all()?;
    Ok(())
}

/// Puts the calling thread at nice 19 (on Linux the nice value belongs to the thread). Failing
/// to only costs the Raft path some CPU.
fn lower_priority() {
    if let Err(e) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), 19) {
        tracing::debug!(error = %e, "could not lower the snapshot copy's priority");
    }
}

/// The snapshot directory, shared by the state machine and the builder that runs beside it.
pub(crate) struct SnapshotFiles {
    dir: PathBuf,
    publish_lock: tokio::sync::Mutex<()>,
}

impl SnapshotFiles {
    /// Makes `index` the current snapshot unless a newer one is already current.
    async fn publish(&self, index: &SnapshotIndex) -> std::io::Result<()> {
        let _guard = self.publish_lock.lock().await;
        if let Ok(bytes) = tokio::fs::read(self.dir.join(CURRENT_SNAPSHOT)).await {
            if let Ok(current) = serde_json::from_slice::<SnapshotIndex>(&bytes) {
                if current.meta.last_log_id > index.meta.last_log_id {
                    let _ = tokio::fs::remove_file(self.dir.join(&index.file)).await;
                    return Ok(());
                }
            }
        }
        let tmp = self.dir.join("current.json.tmp");
        let bytes = serde_json::to_vec(index)?;
        write_synced(&tmp, &bytes).await?;
        tokio::fs::rename(&tmp, self.dir.join(CURRENT_SNAPSHOT)).await?;
        sync_dir(&self.dir).await?;
        remove_other_snapshots(&self.dir, &index.file).await;
        Ok(())
    }
}
