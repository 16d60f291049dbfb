//! openraft's own storage conformance suite, run against the SQLite log store and state machine.

use openraft::testing::{StoreBuilder, Suite};

use super::log_store::LogStore;
use super::state_machine::StateMachine;
use crate::raft::{StorageError, TypeConfig};

struct SqliteBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SqliteBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = LogStore::open(&dir.path().join("raft-log.db")).await.expect("open log");
        let sm = StateMachine::open(dir.path()).await.expect("open state");
        Ok((dir, log, sm))
    }
}

#[test]
fn sqlite_stores_pass_the_openraft_suite() -> Result<(), StorageError> {
    Suite::test_all(SqliteBuilder)
}
