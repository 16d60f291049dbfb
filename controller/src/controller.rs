//! One running controller node: its Raft, its copy of the state, and how it proposes commands.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployer_common::seal::ClusterKey;
use deployer_proto::cluster::cluster_client::ClusterClient;
use deployer_proto::cluster::{ProposeRequest, ReadIndexRequest};
use openraft::error::{ClientWriteError, RaftError};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio::task::JoinSet;

use crate::command::{Command, CommandResponse};
use crate::raft::network::PeerChannels;
use crate::raft::{ControllerNode, NodeId, Raft};
use crate::store::queries::{ApiTokenRow, SessionRow, StateReader};

/// How long a write or a read barrier may wait for a leader before answering 503.
const LEADER_WAIT: Duration = Duration::from_secs(5);

/// Most writes committed together as one log entry.
const MAX_BATCH: usize = 256;
/// Batches on their way through Raft at once; while all are busy, new writes gather into the
/// next batch.
const MAX_BATCHES_IN_FLIGHT: usize = 2;
/// Writes waiting for a batch; callers wait (back-pressure) when it is full.
const PROPOSAL_QUEUE: usize = 4096;
/// Most API tokens cached in memory.
const TOKEN_CACHE_MAX: usize = 10_000;

pub struct Controller {
    pub id: NodeId,
    pub node: ControllerNode,
    pub raft: Raft,
    pub state: StateReader,
    pub key: ClusterKey,
    pub peers: PeerChannels,
    pub applied: watch::Receiver<u64>,
    /// The leader's live view of agent sessions (empty on followers).
    pub agents: Arc<crate::agents::Registry>,
    /// What applying committed entries changed (deployments, for live streams).
    pub events: tokio::sync::broadcast::Sender<crate::store::state_machine::StateEvent>,
    /// The leader's deployment dispatcher.
    pub deploys: Arc<crate::deploy::Dispatcher>,
    /// The leader's view of the agents' route tables.
    pub ingress: Arc<crate::ingress::Ingress>,
    /// Read barriers that arrive together share one leadership check.
    reads: ReadGate,
    /// Failed logins, to slow down password guessing.
    pub logins: crate::api::users::LoginThrottle,
    proposals: mpsc::Sender<Proposal>,
    /// Batches (or lone writes) on their way through Raft; see [`MAX_BATCHES_IN_FLIGHT`].
    slots: Arc<Semaphore>,
    tokens: TokenCache,
}

struct Proposal {
    command: Command,
    reply: oneshot::Sender<Result<CommandResponse, ProposeError>>,
}

/// API tokens and sessions by hash, dropped whenever the state machine applies a change to
/// tokens, sessions or users.
struct TokenCache {
    generation: Arc<AtomicU64>,
    entries: Mutex<(u64, HashMap<String, Credential>)>,
}

#[derive(Clone)]
enum Credential {
    Token(ApiTokenRow),
    Session(SessionRow),
}

/// What [`Controller::new`] returns besides the controller: the batcher to run.
pub struct Batcher {
    proposals: mpsc::Receiver<Proposal>,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum ProposeError {
    #[error("the cluster has no leader right now (an election may be in progress, or too few controllers are up); retry shortly")]
    NoLeader,
    #[error("the leader did not answer: {0}")]
    Forward(String),
    #[error("this controller leads but has lost contact with a majority of the cluster for {0} ms; nothing was written; retry once more controllers are up")]
    NoQuorum(u64),
    #[error("the write was not confirmed within {0:?}: the cluster may have lost its quorum; it may still be applied once the quorum is back, so check before retrying")]
    Unconfirmed(Duration),
    #[error("the controller is shutting down")]
    ShuttingDown,
    #[error("timed out waiting for this node to apply the change")]
    ApplyTimeout,
}

impl Controller {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: NodeId,
        node: ControllerNode,
        raft: Raft,
        state: StateReader,
        key: ClusterKey,
        peers: PeerChannels,
        applied: watch::Receiver<u64>,
        tokens_generation: Arc<AtomicU64>,
        agent_settings: crate::agents::AgentSettings,
        deploy_settings: crate::deploy::DeploySettings,
        ingress_settings: crate::ingress::IngressSettings,
        events: tokio::sync::broadcast::Sender<crate::store::state_machine::StateEvent>,
    ) -> (Arc<Controller>, Batcher) {
        let (tx, rx) = mpsc::channel(PROPOSAL_QUEUE);
        let controller = Controller {
            id,
            node,
            raft,
            state,
            key,
            peers,
            applied,
            agents: Arc::new(crate::agents::Registry::new(agent_settings)),
            deploys: Arc::new(crate::deploy::Dispatcher::new(deploy_settings)),
            ingress: Arc::new(crate::ingress::Ingress::new(ingress_settings)),
            events,
            logins: Default::default(),
            reads: ReadGate::default(),
            proposals: tx,
            slots: Arc::new(Semaphore::new(MAX_BATCHES_IN_FLIGHT)),
            tokens: TokenCache { generation: tokens_generation, entries: Mutex::new((0, HashMap::new())) },
        };
        (Arc::new(controller), Batcher { proposals: rx })
    }

    /// An API token by the hash of its secret, from memory when possible.
    pub async fn api_token(&self, hash: &str) -> Result<Option<ApiTokenRow>, sqlx::Error> {
        let key = format!("t:{hash}");
        let found = self
            .cached(&key, || async { Ok(self.state.api_token_by_hash(hash).await?.map(Credential::Token)) })
            .await?;
        Ok(found.and_then(|c| match c {
            Credential::Token(t) => Some(t),
            Credential::Session(_) => None,
        }))
    }

    /// A dashboard session by the hash of its cookie, from memory when possible.
    pub async fn session(&self, hash: &str) -> Result<Option<SessionRow>, sqlx::Error> {
        let key = format!("s:{hash}");
        let found = self
            .cached(&key, || async { Ok(self.state.session_by_hash(hash).await?.map(Credential::Session)) })
            .await?;
        Ok(found.and_then(|c| match c {
            Credential::Session(s) => Some(s),
            Credential::Token(_) => None,
        }))
    }

    async fn cached<F, Fut>(&self, key: &str, load: F) -> Result<Option<Credential>, sqlx::Error>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Option<Credential>, sqlx::Error>>,
    {
        let generation = self.tokens.generation.load(Ordering::Acquire);
        {
            let mut cache = self.tokens.entries.lock().unwrap_or_else(|e| e.into_inner());
            if cache.0 != generation {
                cache.1.clear();
                cache.0 = generation;
            }
            if let Some(found) = cache.1.get(key) {
                return Ok(Some(found.clone()));
            }
        }
        let found = load().await?;
        if let Some(found) = &found {
            let mut cache = self.tokens.entries.lock().unwrap_or_else(|e| e.into_inner());
            // Only if no change was applied since we looked: otherwise the row may be stale.
            if cache.0 == generation {
                if cache.1.len() >= TOKEN_CACHE_MAX {
                    cache.1.clear();
                }
                cache.1.insert(key.to_string(), found.clone());
            }
        }
        Ok(found)
    }

    pub fn leader(&self) -> Option<(NodeId, ControllerNode)> {
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        let leader = metrics.current_leader?;
        let node = metrics.membership_config.membership().get_node(&leader)?.clone();
        Some((leader, node))
    }

    pub fn voters(&self) -> BTreeSet<NodeId> {
        let metrics = self.raft.metrics();
        let voters = metrics.borrow().membership_config.membership().voter_ids().collect();
        voters
    }

    /// Waits (at most `max`) until the known leader is another than `old`.
    async fn leader_change(&self, old: &ControllerNode, max: Duration) {
        let mut metrics = self.raft.metrics();
        let _ = tokio::time::timeout(max, async {
            loop {
                if self.leader().is_some_and(|(_, node)| &node != old) {
                    return;
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Waits until some node is known as leader, or the deadline passes.
    async fn wait_for_leader(&self, deadline: tokio::time::Instant) -> Option<(NodeId, ControllerNode)> {
        let mut metrics = self.raft.metrics();
        loop {
            if let Some(l) = self.leader() {
                return Some(l);
            }
            if tokio::time::timeout_at(deadline, metrics.changed()).await.is_err() {
                return None;
            }
        }
    }

    /// Commits `command` through the leader (this node or, forwarded, another). Writes that
    /// arrive together are committed together (see [`Batcher`]).
    pub async fn propose(&self, command: Command) -> Result<CommandResponse, ProposeError> {
        // With a slot free nothing is gathering into a batch: the write goes on from its own
        // task, without the hand-over to the batcher, its task and the answer back (three task
        // wake-ups on the path of a lone write). A free slot goes to the batcher first when it
        // waits for one, so queued writes are never passed over for long.
        if let Ok(_slot) = self.slots.try_acquire() {
            return self.propose_now(command).await;
        }
        let (reply, answer) = oneshot::channel();
        self.proposals.send(Proposal { command, reply }).await.map_err(|_| ProposeError::ShuttingDown)?;
        answer.await.map_err(|_| ProposeError::ShuttingDown)?
    }

    /// Commits a batch and answers each of its writers.
    async fn commit_batch(&self, batch: Vec<Proposal>) {
        if batch.len() == 1 {
            for p in batch {
                let result = self.propose_now(p.command).await;
                let _ = p.reply.send(result);
            }
            return;
        }
        let (commands, replies): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
        let count = commands.len();
        let started = std::time::Instant::now();
        let result = self.propose_now(Command::Batch { commands }).await;
        tracing::debug!(writes = count, elapsed_us = started.elapsed().as_micros() as u64, "batch committed");
        match result {
            Ok(CommandResponse::Batch { responses }) if responses.len() == count => {
                for (reply, response) in replies.into_iter().zip(responses) {
                    let _ = reply.send(Ok(response));
                }
            }
            Ok(other) => {
                tracing::error!(?other, "a batch was answered with something other than one response per write");
                for reply in replies {
                    let _ = reply.send(Err(ProposeError::Forward("malformed batch response".into())));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Commits `command` as one log entry, through the leader.
    async fn propose_now(&self, command: Command) -> Result<CommandResponse, ProposeError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        loop {
            let leader = match self.propose_local(command.clone(), deadline).await? {
                LocalWrite::Done(response, _) => return Ok(response),
                LocalWrite::NotLeader(Some(node)) => Some(node),
                LocalWrite::NotLeader(None) => self.wait_for_leader(deadline).await.map(|(_, n)| n),
            };
            let Some(leader) = leader else {
                return Err(ProposeError::NoLeader);
            };
            if tokio::time::Instant::now() > deadline {
                return Err(ProposeError::NoLeader);
            }
            if leader == self.node {
                // We are about to become leader, or just stopped being it: try again.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            match self.forward(&leader, &command, deadline).await {
                // Committed. This node may apply it a heartbeat later; its reads pass a read
                // barrier, so they see the write anyway.
                Ok(response) => return Ok(response),
                Err(Forwarded::Retry(e)) => {
                    tracing::debug!(error = %e, "forwarding to the leader failed; retrying");
                    self.leader_change(&leader, Duration::from_millis(50)).await;
                }
                Err(Forwarded::Final(e)) => return Err(e),
            }
        }
    }

    /// Proposes on this node if it is the leader; otherwise says who leads, if known.
    pub async fn propose_local(
        &self,
        command: Command,
        deadline: tokio::time::Instant,
    ) -> Result<LocalWrite, ProposeError> {
        self.check_quorum_contact()?;
        let write = tokio::time::timeout_at(deadline, self.raft.client_write(command));
        let Ok(result) = write.await else {
            return Err(ProposeError::Unconfirmed(LEADER_WAIT));
        };
        match result {
            Ok(reply) => Ok(LocalWrite::Done(reply.data, reply.log_id.index)),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Ok(LocalWrite::NotLeader(f.leader_node)),
            Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
                Err(ProposeError::Forward(e.to_string()))
            }
            Err(RaftError::Fatal(_)) => Err(ProposeError::ShuttingDown),
        }
    }

    /// A leader that has not heard from a majority for several election timeouts is likely cut
    /// off: refuse before proposing, so the write is not left pending in its log.
    fn check_quorum_contact(&self) -> Result<(), ProposeError> {
        // Borrow, not clone: this runs on every write.
        let metrics = self.raft.metrics();
        let metrics = metrics.borrow();
        if metrics.state != openraft::ServerState::Leader {
            return Ok(());
        }
        let limit = self.raft.config().election_timeout_max * 2;
        match metrics.millis_since_quorum_ack {
            Some(ms) if ms > limit => Err(ProposeError::NoQuorum(ms)),
            _ => Ok(()),
        }
    }

    async fn forward(
        &self,
        leader: &ControllerNode,
        command: &Command,
        deadline: tokio::time::Instant,
    ) -> Result<CommandResponse, Forwarded> {
        let retry = |e: String| Forwarded::Retry(e);
        let channel = self.peers.get(&leader.grpc_addr).map_err(|e| retry(e.to_string()))?;
        let bytes = serde_json::to_vec(command).map_err(|e| Forwarded::Final(ProposeError::Forward(e.to_string())))?;
        let mut request = tonic::Request::new(ProposeRequest { command: bytes });
        request.set_timeout(deadline.saturating_duration_since(tokio::time::Instant::now()));
        let reply = match ClusterClient::new(channel).propose(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return Err(classify_forward_error(&status)),
        };
        let response = serde_json::from_slice(&reply.response)
            .map_err(|e| Forwarded::Final(ProposeError::Forward(e.to_string())))?;
        Ok(response)
    }

    async fn wait_applied(&self, index: u64, deadline: tokio::time::Instant) -> Result<(), ProposeError> {
        let mut applied = self.applied.clone();
        let result = tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= index)).await;
        match result {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ProposeError::ShuttingDown),
            Err(_) => Err(ProposeError::ApplyTimeout),
        }
    }

    /// A read barrier: returns once this node has applied everything committed before the call,
    /// so the read that follows is linearizable even on a follower.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + LEADER_WAIT;
        let index = self.reads.read_index(|| self.read_index_once(deadline)).await?;
        self.wait_applied(index, deadline).await
    }

    /// One check that this node's view is current: the commit index confirmed by the leader
    /// (this node or another) after the call began.
    async fn read_index_once(&self, deadline: tokio::time::Instant) -> Result<u64, ProposeError> {
        loop {
            let Ok(check) = tokio::time::timeout_at(deadline, self.raft.ensure_linearizable()).await else {
                return Err(ProposeError::NoLeader);
            };
            let index = match check {
                Ok(read_log_id) => read_log_id.map(|l| l.index).unwrap_or(0),
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(_))) => {
                    let Some((_, leader)) = self.wait_for_leader(deadline).await else {
                        return Err(ProposeError::NoLeader);
                    };
                    if leader == self.node {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    match self.leader_read_index(&leader).await {
                        Ok(i) => i,
                        Err(_) if tokio::time::Instant::now() < deadline => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                Err(RaftError::APIError(openraft::error::CheckIsLeaderError::QuorumNotEnough(_))) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(ProposeError::NoLeader);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                Err(RaftError::Fatal(_)) => return Err(ProposeError::ShuttingDown),
            };
            return Ok(index);
        }
    }

    async fn leader_read_index(&self, leader: &ControllerNode) -> Result<u64, ProposeError> {
        let channel = self.peers.get(&leader.grpc_addr).map_err(|e| ProposeError::Forward(e.to_string()))?;
        let mut request = tonic::Request::new(ReadIndexRequest {});
        request.set_timeout(LEADER_WAIT);
        let reply = ClusterClient::new(channel)
            .read_index(request)
            .await
            .map_err(|s| ProposeError::Forward(format!("{:?}: {}", s.code(), s.message())))?;
        Ok(reply.into_inner().log_index)
    }
}

pub type SharedController = Arc<Controller>;

impl Batcher {
    /// Gathers writes into batches and commits them, several batches in flight at once. Runs
    /// until aborted; the batches in flight are aborted with it (their writers see
    /// `ShuttingDown`).
    pub async fn run(mut self, controller: SharedController) {
        let slots = controller.slots.clone();
        let mut in_flight = JoinSet::new();
        loop {
            while in_flight.try_join_next().is_some() {}
            // Wait for a free slot first: meanwhile, writes queue up into a larger batch.
            let Ok(slot) = slots.clone().acquire_owned().await else { return };
            let Some(first) = self.proposals.recv().await else { return };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.proposals.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            let controller = controller.clone();
            in_flight.spawn(async move {
                controller.commit_batch(batch).await;
                drop(slot);
            });
        }
    }
}

pub enum LocalWrite {
    /// Committed and applied here, at this log index.
    Done(CommandResponse, u64),
    /// Another node leads (if known).
    NotLeader(Option<ControllerNode>),
}

pub enum Forwarded {
    /// The leader surely did not take the command (it was not leader, or was not reached).
    Retry(String),
    Final(ProposeError),
}

/// Metadata key carrying why the leader refused a forwarded write.
pub const ERROR_KIND: &str = "x-deployer-error";

/// Encodes a leader-side refusal of a forwarded write, so the follower can tell its client.
pub fn propose_error_status(e: &ProposeError) -> tonic::Status {
    let (code, kind) = match e {
        ProposeError::NoQuorum(_) => (tonic::Code::Unavailable, "no_quorum"),
        ProposeError::Unconfirmed(_) => (tonic::Code::DeadlineExceeded, "unconfirmed"),
        ProposeError::NoLeader => (tonic::Code::FailedPrecondition, "no_leader"),
        ProposeError::ShuttingDown => (tonic::Code::Unavailable, "shutting_down"),
        _ => (tonic::Code::Unavailable, "forward"),
    };
    let mut status = tonic::Status::new(code, e.to_string());
    if let Ok(v) = kind.parse() {
        status.metadata_mut().insert(ERROR_KIND, v);
    }
    status
}

fn classify_forward_error(status: &tonic::Status) -> Forwarded {
    let kind = status.metadata().get(ERROR_KIND).and_then(|v| v.to_str().ok());
    match kind {
        Some("no_quorum") => {
            let ms = status.message().split_whitespace().find_map(|w| w.parse().ok()).unwrap_or_default();
            Forwarded::Final(ProposeError::NoQuorum(ms))
        }
        Some("unconfirmed") => Forwarded::Final(ProposeError::Unconfirmed(LEADER_WAIT)),
        Some("shutting_down") | Some("no_leader") => Forwarded::Retry(status.message().to_string()),
        Some(_) => Forwarded::Final(ProposeError::Forward(status.message().to_string())),
        // Not leader any more, or not reached: the command was not proposed there.
        None if matches!(status.code(), tonic::Code::FailedPrecondition | tonic::Code::Unavailable) => {
            Forwarded::Retry(format!("{:?}: {}", status.code(), status.message()))
        }
        None if status.code() == tonic::Code::DeadlineExceeded => {
            Forwarded::Final(ProposeError::Unconfirmed(LEADER_WAIT))
        }
        None => Forwarded::Final(ProposeError::Forward(format!("{:?}: {}", status.code(), status.message()))),
    }
}

/// Coalesces read-index checks: a check confirms the leadership (a heartbeat round to a quorum)
/// and so costs a network round trip; reads arriving while one runs share the next one. A
/// caller only ever uses a check that began after it arrived, which keeps reads linearizable.
#[derive(Default)]
struct ReadGate {
    state: Mutex<GateState>,
    completed: tokio::sync::Notify,
}

#[derive(Default)]
struct GateState {
    /// Number of the last check begun, and whether it is still running.
    started: u64,
    running: bool,
    /// The latest finished check: its number and result.
    last: Option<(u64, Result<u64, ProposeError>)>,
}

impl ReadGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn read_index<F, Fut>(&self, check: F) -> Result<u64, ProposeError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<u64, ProposeError>>,
    {
        // Any check numbered `needed` or later began after this call.
        let needed = self.lock().started + 1;
        loop {
            let notified = self.completed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let round = {
                let mut state = self.lock();
                match &state.last {
                    Some((round, result)) if *round >= needed => return result.clone(),
                    _ => {}
                }
                if state.running {
                    None
                } else {
                    state.started += 1;
                    state.running = true;
                    Some(state.started)
                }
            };
            let Some(round) = round else {
                notified.await;
                continue;
            };
            // This caller runs the check for everyone waiting; if it is cancelled midway, the
            // guard lets a waiter take over.
            let guard = RoundGuard { gate: self };
            let result = check().await;
            std::mem::forget(guard);
            {
                let mut state = self.lock();
                state.running = false;
                state.last = Some((round, result.clone()));
            }
            self.completed.notify_waiters();
            return result;
        }
    }
}

/// Clears `running` if the caller running a check is dropped before it finishes.
struct RoundGuard<'a> {
    gate: &'a ReadGate,
}

impl Drop for RoundGuard<'_> {
    fn drop(&mut self) {
        self.gate.lock().running = false;
        self.gate.completed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::ReadGate;

    #[tokio::test]
    async fn concurrent_reads_share_checks_that_began_after_them() {
        let gate = Arc::new(ReadGate::default());
        let checks = Arc::new(AtomicU64::new(0));
        // Each check answers its own number, so a caller can tell which one it got.
        let run = |gate: Arc<ReadGate>, checks: Arc<AtomicU64>| async move {
            let began = checks.load(Ordering::SeqCst);
            let got = gate
                .read_index(|| {
                    let checks = checks.clone();
                    async move {
                        let n = checks.fetch_add(1, Ordering::SeqCst) + 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        Ok(n)
                    }
                })
                .await
                .unwrap();
            (began, got)
        };
        let mut tasks = Vec::new();
        for i in 0..50 {
            tasks.push(tokio::spawn(run(gate.clone(), checks.clone())));
            if i % 10 == 9 {
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
        }
        for t in tasks {
            let (began, got) = t.await.unwrap();
            // The check a caller used started after every check that had started before it.
            assert!(got > began, "a caller used check {got} though {began} had begun before it arrived");
        }
        let total = checks.load(Ordering::SeqCst);
        assert!(total < 10, "50 callers in a few rounds should share checks, but {total} ran");
    }
}
