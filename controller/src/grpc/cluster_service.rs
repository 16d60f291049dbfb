//! Membership and forwarding between controllers: joining with a token, becoming a voter,
//! forwarded writes and read barriers.

use std::collections::BTreeSet;
use std::time::Duration;

use deployer_common::pki::Identity;
use deployer_proto::cluster::cluster_server::Cluster;
use deployer_proto::cluster::{
    AddVoterReply, AddVoterRequest, AgentLiveReply, AgentLiveRequest, JoinReply, JoinRequest, ProposeReply,
    ProposeRequest, ReadIndexReply, ReadIndexRequest,
};
use openraft::error::{ClientWriteError, RaftError};
use openraft::ChangeMembers;

use super::require_controller;
use crate::command::{Command, JoinTokenKind};
use crate::controller::{propose_error_status, LocalWrite, SharedController};
use crate::raft::ControllerNode;
use crate::util::new_node_id;

/// Controller certificates are long-lived; agents get short-lived ones (agents issue).
const CONTROLLER_CERT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The caller's deadline (grpc-timeout), at most five seconds.
fn request_deadline<T>(request: &tonic::Request<T>) -> Duration {
    let max = Duration::from_secs(5);
    request
        .metadata()
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(max, |d| d.min(max))
}

/// `grpc-timeout` is an integer and a unit: H, M, S, m (ms), u (µs), n (ns).
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (n, unit) = v.split_at(v.len().checked_sub(1)?);
    let n: u64 = n.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Metadata key naming the leader's gRPC address when a call reached a follower.
pub const LEADER_HINT: &str = "x-deployer-leader";

pub struct ClusterService {
    controller: SharedController,
}

impl ClusterService {
    pub fn new(controller: SharedController) -> ClusterService {
        ClusterService { controller }
    }

    fn not_leader(&self) -> tonic::Status {
        let mut status = tonic::Status::failed_precondition("this controller is not the leader");
        if let Some((_, leader)) = self.controller.leader() {
            if let Ok(v) = leader.grpc_addr.parse() {
                status.metadata_mut().insert(LEADER_HINT, v);
            }
        }
        status
    }
}

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn join(&self, request: tonic::Request<JoinRequest>) -> Result<tonic::Response<JoinReply>, tonic::Status> {
        let req = request.into_inner();
        let kind = JoinTokenKind::parse(&req.kind)
            .ok_or_else(|| tonic::Status::invalid_argument(format!("unknown join kind {:?}", req.kind)))?;
        if kind != JoinTokenKind::Controller {
            return Err(tonic::Status::invalid_argument("agents join through the agent service"));
        }
        let c = &self.controller;
        let token = super::valid_join_token(c, &req.token_secret, kind).await?;
        let (ca, ca_pem) = super::cluster_ca(c).await?;
        let node_id = new_node_id();
        let cert_pem = ca
            .sign_csr(&req.csr_pem, &Identity::Controller(node_id), &[], CONTROLLER_CERT_VALIDITY)
            .map_err(|e| tonic::Status::invalid_argument(format!("the CSR was refused: {e}")))?;
        let leader_grpc_addr = c.leader().map(|(_, n)| n.grpc_addr).unwrap_or_default();
        tracing::info!(node_id, token = %token.id, "issued a controller certificate");
        Ok(tonic::Response::new(JoinReply {
            node_id,
            cert_pem,
            ca_pem,
            cluster_key_hex: c.key.to_hex(),
            leader_grpc_addr,
        }))
    }

    async fn add_voter(
        &self,
        request: tonic::Request<AddVoterRequest>,
    ) -> Result<tonic::Response<AddVoterReply>, tonic::Status> {
        let caller = require_controller(&request)?;
        let req = request.into_inner();
        if caller != req.node_id {
            return Err(tonic::Status::permission_denied("a controller may only add itself"));
        }
        let c = &self.controller;
        if c.raft.ensure_linearizable().await.is_err() {
            return Err(self.not_leader());
        }
        if c.voters().contains(&req.node_id) {
            return Ok(tonic::Response::new(AddVoterReply {}));
        }
        let node = ControllerNode { grpc_addr: req.grpc_addr, http_addr: req.http_addr };
        tracing::info!(node_id = req.node_id, %node, "adding a controller as learner");
        match c.raft.add_learner(req.node_id, node, true).await {
            Ok(_) => {}
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => return Err(self.not_leader()),
            Err(e) => return Err(tonic::Status::unavailable(format!("could not add the learner: {e}"))),
        }
        tracing::info!(node_id = req.node_id, "learner caught up; promoting to voter");
        let voters: BTreeSet<u64> = [req.node_id].into();
        match c.raft.change_membership(ChangeMembers::AddVoterIds(voters), false).await {
            Ok(_) => Ok(tonic::Response::new(AddVoterReply {})),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => Err(self.not_leader()),
            Err(e) => Err(tonic::Status::unavailable(format!("could not promote to voter: {e}"))),
        }
    }

    async fn propose(
        &self,
        request: tonic::Request<ProposeRequest>,
    ) -> Result<tonic::Response<ProposeReply>, tonic::Status> {
        require_controller(&request)?;
        let command: Command = serde_json::from_slice(&request.get_ref().command)
            .map_err(|e| tonic::Status::invalid_argument(format!("malformed command: {e}")))?;
        let deadline = tokio::time::Instant::now() + request_deadline(&request);
        match self.controller.propose_local(command, deadline).await {
            Ok(LocalWrite::Done(response, log_index)) => {
                let response = serde_json::to_vec(&response).map_err(|e| tonic::Status::internal(e.to_string()))?;
                Ok(tonic::Response::new(ProposeReply { response, log_index }))
            }
            Ok(LocalWrite::NotLeader(_)) => Err(self.not_leader()),
            Err(e) => Err(propose_error_status(&e)),
        }
    }

    async fn agent_live(
        &self,
        request: tonic::Request<AgentLiveRequest>,
    ) -> Result<tonic::Response<AgentLiveReply>, tonic::Status> {
        require_controller(&request)?;
        if !self.controller.agents.is_active() {
            return Err(self.not_leader());
        }
        let only = Some(request.get_ref().agent_id.as_str()).filter(|id| !id.is_empty());
        let live = serde_json::to_vec(&self.controller.agents.live(only))
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(AgentLiveReply { live }))
    }

    async fn read_index(
        &self,
        request: tonic::Request<ReadIndexRequest>,
    ) -> Result<tonic::Response<ReadIndexReply>, tonic::Status> {
        require_controller(&request)?;
        match self.controller.raft.ensure_linearizable().await {
            Ok(log_id) => Ok(tonic::Response::new(ReadIndexReply { log_index: log_id.map(|l| l.index).unwrap_or(0) })),
            Err(_) => Err(self.not_leader()),
        }
    }
}
