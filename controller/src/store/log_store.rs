//! The Raft log in SQLite. Every append is one transaction, fsynced (`synchronous=FULL`) before
//! openraft is told the entries are durable.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{ErrorSubject, OptionalSend, RaftLogId, RaftLogReader, Vote};
use sqlx::sqlite::{SqlitePool, SqliteSynchronous};
use sqlx::Row;

use super::{open_pool, read_err, write_err};
use crate::raft::{Entry, LogId, NodeId, StorageError, TypeConfig};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/log");

#[derive(Clone)]
pub struct LogStore {
    pool: SqlitePool,
}

impl LogStore {
    pub async fn open(path: &Path) -> anyhow::Result<LogStore> {
        let pool = open_pool(path, SqliteSynchronous::Full, 4).await?;
        MIGRATOR.run(&pool).await?;
        Ok(LogStore { pool })
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
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| read_err(ErrorSubject::Store, e))
            }
        }
    }

    async fn set_meta<T: serde::Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(value).map_err(|e| write_err(ErrorSubject::Store, e))?;
        sqlx::query("INSERT INTO log_meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value")
            .bind(key)
            .bind(bytes)
            .execute(&self.pool)
            .await
            .map_err(|e| write_err(ErrorSubject::Store, e))?;
        Ok(())
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (i64, i64) {
    let start = match range.start_bound() {
        Bound::Included(&s) => s,
        Bound::Excluded(&s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&e) => e.saturating_add(1),
        Bound::Excluded(&e) => e,
        Bound::Unbounded => u64::MAX,
    };
    // SQLite integers are signed; log indexes never come near i64::MAX.
    (start.min(i64::MAX as u64) as i64, end.min(i64::MAX as u64) as i64)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let (start, end) = bounds(&range);
        let rows = sqlx::query("SELECT entry FROM log WHERE idx >= ? AND idx < ? ORDER BY idx")
            .bind(start)
            .bind(end)
            .fetch_all(&self.pool)
            .await
            .map_err(|e| read_err(ErrorSubject::Logs, e))?;
        rows.iter()
            .map(|row| {
                let bytes: &[u8] = row.get(0);
                serde_json::from_slice::<Entry>(bytes).map_err(|e| read_err(ErrorSubject::Logs, e))
            })
            .collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self.meta("last_purged").await?;
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
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.set_meta("vote", vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.meta("vote").await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut tx = self.pool.begin().await.map_err(|e| write_err(ErrorSubject::Logs, e))?;
        for entry in entries {
            let bytes = serde_json::to_vec(&entry).map_err(|e| write_err(ErrorSubject::Logs, e))?;
            sqlx::query("INSERT OR REPLACE INTO log (idx, entry) VALUES (?, ?)")
                .bind(entry.get_log_id().index as i64)
                .bind(bytes)
                .execute(&mut *tx)
                .await
                .map_err(|e| write_err(ErrorSubject::Logs, e))?;
        }
        // synchronous=FULL: the commit returns after the WAL is fsynced.
        tx.commit().await.map_err(|e| write_err(ErrorSubject::Logs, e))?;
        callback.log_io_completed(Ok(()));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        sqlx::query("DELETE FROM log WHERE idx >= ?")
            .bind(log_id.index as i64)
            .execute(&self.pool)
            .await
            .map_err(|e| write_err(ErrorSubject::Logs, e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first: a crash between the two leaves extra entries, never a gap.
        self.set_meta("last_purged", &log_id).await?;
        sqlx::query("DELETE FROM log WHERE idx <= ?")
            .bind(log_id.index as i64)
            .execute(&self.pool)
            .await
            .map_err(|e| write_err(ErrorSubject::Logs, e))?;
        Ok(())
    }
}
