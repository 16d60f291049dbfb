//! The Raft RPCs, served to controller identities only.

use deployer_proto::raft::raft_server::Raft as RaftRpc;
use deployer_proto::raft::{RaftReply, RaftRequest};
use serde::de::DeserializeOwned;
use serde::Serialize;

use std::sync::Arc;

use openraft::raft::AppendEntriesResponse;

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
        let result = self.raft.append_entries(decode(&request)?).await;
        if matches!(
            result,
            Ok(AppendEntriesResponse::Success
                | AppendEntriesResponse::PartialSuccess(_)
                | AppendEntriesResponse::Conflict)
        ) {
            self.contact.heard();
        }
        reply(result)
    }

    async fn install_snapshot(
        &self,
        request: tonic::Request<RaftRequest>,
    ) -> Result<tonic::Response<RaftReply>, tonic::Status> {
        require_controller(&request)?;
        reply(self.raft.install_snapshot(decode(&request)?).await)
    }
}
