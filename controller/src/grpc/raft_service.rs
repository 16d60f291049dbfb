//! The Raft RPCs, served to controller identities only.

use std::sync::Arc;

use deployer_proto::raft::raft_server::Raft as RaftRpc;
use deployer_proto::raft::{RaftReply, RaftRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::require_controller;
use crate::raft::detector::LeaderContact;
use crate::raft::Raft;

pub struct RaftService {
    raft: Raft,
    contact: Arc<LeaderContact>,
}

impl RaftService {
    pub fn new(raft: Raft, contact: Arc<LeaderContact>) -> RaftService {
        RaftService { raft, contact }
    }
}

fn decode<T: DeserializeOwned>(request: &tonic::Request<RaftRequest>) -> Result<T, tonic::Status> {
    serde_json::from_slice(&request.get_ref().payload)
        .map_err(|e| tonic::Status::invalid_argument(format!("malformed Raft payload: {e}")))
}

fn reply<T: Serialize, E: Serialize>(result: Result<T, E>) -> Result<tonic::Response<RaftReply>, tonic::Status> {
    let payload = serde_json::to_vec(&result).map_err(|e| tonic::Status::internal(e.to_string()))?;
    Ok(tonic::Response::new(RaftReply { payload }))
}

#[tonic::async_trait]
impl RaftRpc for RaftService {
    async fn vote(&self, request: tonic::Request<RaftRequest>) -> Result<tonic::Response<RaftReply>, tonic::Status> {
        require_controller(&request)?;
        reply(self.raft.vote(decode(&request)?).await)
    }

    async fn append_entries(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftReply>, tonic::Status> {
        require_controller(&request)?;
        let started = std::time::Instant::now();
        let rpc: openraft::raft::AppendEntriesRequest<crate::raft::TypeConfig> = decode(&request)?;
        let entries = rpc.entries.len();
        let decoded_us = started.elapsed().as_micros() as u64;
        // Count the leader as heard on receipt, as openraft does: an append can then wait a
        // while behind a busy log writer without the detector calling the leader dead.
        let current_term = self.raft.metrics().borrow().current_term;
        if rpc.vote.is_committed() && rpc.vote.leader_id().term >= current_term {
            self.contact.heard();
        }
        let result = self.raft.append_entries(rpc).await;
        tracing::debug!(
            entries,
            decoded_us,
            elapsed_us = started.elapsed().as_micros() as u64,
            "append entries served"
        );
        reply(result)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftReply>, tonic::Status> {
        require_controller(&request)?;
        let result = self.raft.install_snapshot(decode(&request)?).await;
        if result.is_ok() {
            // A leader streaming a snapshot is a leader alive.
            self.contact.heard();
        }
        reply(result)
    }
}
