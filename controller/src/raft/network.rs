//! openraft's network: Raft RPCs to peer controllers over mutual-TLS gRPC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use deployer_proto::raft::raft_client::RaftClient;
use deployer_proto::raft::RaftRequest;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::Channel;

use super::{ControllerNode, NodeId, TypeConfig};
use crate::grpc::client;
use crate::util::MessageError;

/// Channels to peers, shared by the Raft network and request forwarding, keyed by address.
#[derive(Clone)]
pub struct PeerChannels {
    tls: Arc<rustls::ClientConfig>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl PeerChannels {
    pub fn new(tls: Arc<rustls::ClientConfig>) -> PeerChannels {
        PeerChannels { tls, channels: Arc::default() }
    }

    pub fn get(&self, addr: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = channels.get(addr) {
            return Ok(c.clone());
        }
        let c = client::channel(addr, self.tls.clone())?;
        channels.insert(addr.to_string(), c.clone());
        Ok(c)
    }
}

pub struct Network {
    peers: PeerChannels,
}

impl Network {
    pub fn new(peers: PeerChannels) -> Network {
        Network { peers }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &ControllerNode) -> PeerClient {
        PeerClient { target, client: self.peers.get(&node.grpc_addr).map(RaftClient::new).map_err(|e| e.to_string()) }
    }
}

/// Largest append-entries message sent in one piece (the receiver accepts 64 MiB).
const APPEND_BYTES_MAX: usize = 16 * 1024 * 1024;

pub struct PeerClient {
    target: NodeId,
    client: Result<RaftClient<Channel>, String>,
}

enum Rpc {
    Vote,
    Append,
    Snapshot,
}

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        rpc: Rpc,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, ControllerNode, E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let payload = serde_json::to_vec(req).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.call_raw(rpc, payload, option).await
    }

    async fn call_raw<Resp, E>(
        &mut self,
        rpc: Rpc,
        payload: Vec<u8>,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, ControllerNode, E>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = match &mut self.client {
            Ok(c) => c,
            Err(e) => return Err(RPCError::Unreachable(Unreachable::new(&MessageError(e.clone())))),
        };
        let mut request = tonic::Request::new(RaftRequest { payload });
        request.set_timeout(option.hard_ttl());
        let reply = match rpc {
            Rpc::Vote => client.vote(request).await,
            Rpc::Append => client.append_entries(request).await,
            Rpc::Snapshot => client.install_snapshot(request).await,
        };
        let reply = match reply {
            Ok(r) => r.into_inner(),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&MessageError(status.message().to_string()))))
            }
            Err(status) => {
                return Err(RPCError::Network(NetworkError::new(&MessageError(format!(
                    "{:?}: {}",
                    status.code(),
                    status.message()
                )))))
            }
        };
        let result: Result<Resp, E> =
            serde_json::from_slice(&reply.payload).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    /// openraft waits 500 ms before retrying an unreachable peer; a restarted controller would
    /// time out and call an election before hearing from the leader. Retry at heartbeat pace.
    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(std::time::Duration::from_millis(50)))
    }

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, ControllerNode, RaftError<NodeId>>> {
        let started = std::time::Instant::now();
        let payload = serde_json::to_vec(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        if payload.len() <= APPEND_BYTES_MAX || rpc.entries.len() <= 1 {
            let (entries, bytes, encoded_us) = (rpc.entries.len(), payload.len(), started.elapsed().as_micros() as u64);
            let result = self.call_raw(Rpc::Append, payload, &option).await;
            let elapsed_us = started.elapsed().as_micros() as u64;
            tracing::debug!(peer = self.target, entries, bytes, encoded_us, elapsed_us, "append entries sent");
            return result;
        }
        // Too large for one message (uploads are replicated in chunks, and a lagging follower
        // gets up to `max_payload_entries` of them at once): send consecutive parts, each
        // starting where the previous one ended. A follower caps what it commits at what it
        // has accepted, so every part may carry the leader's commit index.
        let AppendEntriesRequest { vote, prev_log_id, leader_commit, entries } = rpc;
        let sizes: Vec<usize> = entries.iter().map(|e| serde_json::to_vec(e).map(|b| b.len()).unwrap_or(0)).collect();
        let mut prev = prev_log_id;
        let mut part = Vec::new();
        let mut part_bytes = 0usize;
        let mut entries = entries.into_iter().enumerate().peekable();
        while let Some((i, entry)) = entries.next() {
            part_bytes += sizes[i];
            part.push(entry);
            let full = entries.peek().is_none_or(|(next, _)| part_bytes + sizes[*next] > APPEND_BYTES_MAX);
            if !full {
                continue;
            }
            let last = part.last().map(|e| e.log_id);
            let request = AppendEntriesRequest::<TypeConfig> {
                vote,
                prev_log_id: prev,
                leader_commit,
                entries: std::mem::take(&mut part),
            };
            part_bytes = 0;
            let response: AppendEntriesResponse<NodeId> = self.call(Rpc::Append, &request, &option).await?;
            if !response.is_success() || entries.peek().is_none() {
                return Ok(response);
            }
            prev = last;
        }
        Ok(AppendEntriesResponse::Success)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, ControllerNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call(Rpc::Snapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, ControllerNode, RaftError<NodeId>>> {
        self.call(Rpc::Vote, &rpc, &option).await
    }
}
