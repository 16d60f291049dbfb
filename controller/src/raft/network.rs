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

/// Most bytes of entries in one append RPC (a single larger entry goes alone; the receiver
/// accepts 64 MiB). openraft gives every append the heartbeat interval (50 ms) to complete: a
/// lagging or restarted follower offered `max_payload_entries` at once, megabytes under load,
/// timed out on every try and could only catch up through a snapshot.
const APPEND_BYTES_PER_RPC: usize = 512 * 1024;
/// Offers of more entries than this are probed first (see `append_entries`); steady replication
/// sends a few at a time and is never probed.
const PROBE_ABOVE_ENTRIES: usize = 64;
/// How far from the end of a large offer the probes ask, in turn.
const PROBE_BACK: [usize; 4] = [1, 8, 64, 512];

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

    /// Sends the entries in one message of at most [`APPEND_BYTES_PER_RPC`] (or the first entry
    /// alone, if it is larger): when openraft offers more, only a prefix goes and the answer is
    /// `PartialSuccess` up to its last entry, so openraft sends the rest in the next round.
    ///
    /// A new leader does not know where a follower's log ends: openraft offers it thousands of
    /// entries from far back, most of which the follower already has. A large offer is probed
    /// first, from its end backwards (does the follower have the last entry, the 8th from last,
    /// the 64th, ...?); by Raft's log matching, a follower that has one has every entry before
    /// it, so only what follows is sent.
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, ControllerNode, RaftError<NodeId>>> {
        let started = std::time::Instant::now();
        let AppendEntriesRequest { vote, mut prev_log_id, leader_commit, mut entries } = rpc;
        let offered = entries.len();
        if offered > PROBE_ABOVE_ENTRIES {
            for back in PROBE_BACK {
                let Some(at) = offered.checked_sub(back) else { break };
                let probe = AppendEntriesRequest::<TypeConfig> {
                    vote,
                    prev_log_id: Some(entries[at].log_id),
                    leader_commit,
                    entries: Vec::new(),
                };
                match self.call(Rpc::Append, &probe, &option).await? {
                    AppendEntriesResponse::Conflict => continue,
                    AppendEntriesResponse::Success if at + 1 == offered => return Ok(AppendEntriesResponse::Success),
                    AppendEntriesResponse::Success => {
                        prev_log_id = Some(entries[at].log_id);
                        entries.drain(..=at);
                        break;
                    }
                    answer => return Ok(answer),
                }
            }
        }
        let encode = |r: &AppendEntriesRequest<TypeConfig>| {
            serde_json::to_vec(r).map_err(|e| RPCError::Network(NetworkError::new(&e)))
        };
        let mut request = AppendEntriesRequest::<TypeConfig> { vote, prev_log_id, leader_commit, entries };
        let mut payload = encode(&request)?;
        let mut partial = None;
        if payload.len() > APPEND_BYTES_PER_RPC && request.entries.len() > 1 {
            let mut bytes = 0;
            let mut keep = 0;
            for entry in &request.entries {
                bytes += serde_json::to_vec(entry).map(|b| b.len()).unwrap_or(0);
                if keep > 0 && bytes > APPEND_BYTES_PER_RPC {
                    break;
                }
                keep += 1;
            }
            request.entries.truncate(keep);
            partial = request.entries.last().map(|e| e.log_id);
            // A follower commits no further than what it has accepted, so the prefix may carry
            // the leader's commit index.
            payload = encode(&request)?;
        }
        let bytes = payload.len();
        let result = self.call_raw(Rpc::Append, payload, &option).await;
        tracing::debug!(
            peer = self.target,
            offered,
            sent = request.entries.len(),
            bytes,
            elapsed_us = started.elapsed().as_micros() as u64,
            "append entries sent"
        );
        match (result, partial) {
            (Ok(AppendEntriesResponse::Success), Some(upto)) => Ok(AppendEntriesResponse::PartialSuccess(Some(upto))),
            (result, _) => result,
        }
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
