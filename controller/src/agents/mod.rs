//! Agents: their sessions with the leader, their liveness, and their latest metrics.
//!
//! The registry of agents (who joined, status, capacity) is replicated state. What changes on
//! every heartbeat (last seen, metrics) lives only in the leader's memory, in [`Registry`]:
//! committing 2,000 heartbeats a second for 10,000 agents would buy nothing. Only a change of
//! status is committed: `down` when an agent has not been heard from for the TTL (or for a short
//! grace after its session dropped), `ready` when it is back. A new leader starts every agent's
//! clock afresh, so a leader change never marks a healthy agent down.

pub mod service;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use deployer_proto::agent::{ContainerMetrics, ControllerMessage, HostMetrics};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

use crate::command::{Command, CommandResponse, UnixMillis};
use crate::controller::SharedController;
use crate::store::state_machine::StateEvent;
use crate::util::now_ms;

/// Samples of metrics kept per agent (10 minutes at the default heartbeat).
const HISTORY: usize = 120;
/// How often the leader looks for agents past their deadline.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

#[derive(Clone, Debug)]
pub struct AgentSettings {
    /// An agent not heard from for this long is marked `down`.
    pub ttl: Duration,
    /// An agent whose session dropped and that has not come back within this is marked `down`.
    pub disconnect_grace: Duration,
    /// Lifetime of the certificates issued to agents.
    pub cert_ttl: Duration,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            ttl: Duration::from_secs(15),
            disconnect_grace: Duration::from_secs(3),
            cert_ttl: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// What an agent said in its hello, kept to mark it `ready` again without a new hello.
#[derive(Clone, Debug)]
pub struct HelloInfo {
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub version: String,
    pub cpu_millis: u64,
    pub memory_bytes: u64,
    /// Where its ingress answers plain HTTP, host:port ('' for none), and its HTTPS port.
    pub ingress: String,
    pub ingress_https_port: u32,
}

impl HelloInfo {
    pub fn up_command(&self, id: &str, at: UnixMillis) -> Command {
        Command::AgentUp {
            id: id.to_string(),
            hostname: self.hostname.clone(),
            labels: self.labels.clone(),
            version: self.version.clone(),
            cpu_millis: self.cpu_millis,
            memory_bytes: self.memory_bytes,
            ingress: self.ingress.clone(),
            ingress_https_port: self.ingress_https_port,
            at,
        }
    }
}

/// Host metrics of one heartbeat, as the API shows them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MetricsView {
    pub at: UnixMillis,
    pub cpu_percent: f64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_used_bytes: u64,
    pub disk_total_bytes: u64,
    pub net_rx_bytes: u64,
    pub net_tx_bytes: u64,
}

impl MetricsView {
    fn from_proto(at: UnixMillis, m: &HostMetrics) -> MetricsView {
        MetricsView {
            at,
            cpu_percent: finite(m.cpu_percent),
            load1: finite(m.load1),
            load5: finite(m.load5),
            load15: finite(m.load15),
            memory_used_bytes: m.memory_used_bytes,
            memory_total_bytes: m.memory_total_bytes,
            disk_used_bytes: m.disk_used_bytes,
            disk_total_bytes: m.disk_total_bytes,
            net_rx_bytes: m.net_rx_bytes,
            net_tx_bytes: m.net_tx_bytes,
        }
    }
}

/// Per-container metrics of the latest heartbeat.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ContainerView {
    pub id: String,
    pub name: String,
    pub project: String,
    pub service: String,
    pub deployment: String,
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_limit_bytes: u64,
}

impl From<&ContainerMetrics> for ContainerView {
    fn from(c: &ContainerMetrics) -> ContainerView {
        ContainerView {
            id: c.id.clone(),
            name: c.name.clone(),
            project: c.project.clone(),
            service: c.service.clone(),
            deployment: c.deployment.clone(),
            cpu_percent: finite(c.cpu_percent),
            memory_used_bytes: c.memory_used_bytes,
            memory_limit_bytes: c.memory_limit_bytes,
        }
    }
}

/// JSON has no NaN or infinity; an agent that sends one gets 0.
fn finite(x: f64) -> f64 {
    if x.is_finite() {
        x
    } else {
        0.0
    }
}

/// The leader's live view of one agent, as served to other controllers and the API.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LiveView {
    pub connected: bool,
    pub last_seen: Option<UnixMillis>,
    pub metrics: Option<MetricsView>,
    pub containers: Vec<ContainerView>,
    pub history: Vec<MetricsView>,
}

struct Session {
    serial: u64,
    /// Dropping it ends the session's outgoing stream; the session task notices and stops.
    tx: mpsc::Sender<Result<ControllerMessage, tonic::Status>>,
    /// Dropping it tells the session task to stop.
    _close: oneshot::Sender<()>,
}

struct Live {
    session: Option<Session>,
    hello: Option<HelloInfo>,
    last_seen_ms: Option<UnixMillis>,
    /// When the agent is marked `down` unless heard from before.
    deadline: Instant,
    /// Whether the committed status is `ready`, as far as this leader knows.
    ready: bool,
    /// A status change is being committed; the sweep leaves the agent alone meanwhile.
    pending: bool,
    metrics: Option<MetricsView>,
    containers: Vec<ContainerView>,
    history: VecDeque<MetricsView>,
}

impl Live {
    fn new(deadline: Instant, ready: bool) -> Live {
        Live {
            session: None,
            hello: None,
            last_seen_ms: None,
            deadline,
            ready,
            pending: false,
            metrics: None,
            containers: Vec::new(),
            history: VecDeque::new(),
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Whether this node leads and has loaded the registry (sessions are refused otherwise).
    active: bool,
    agents: HashMap<String, Live>,
    next_serial: u64,
}

/// The leader's in-memory state of agent sessions.
pub struct Registry {
    pub settings: AgentSettings,
    inner: Mutex<Inner>,
}

/// What a heartbeat asks of the session: nothing, or to commit that the agent is `ready` again.
pub enum HeartbeatOutcome {
    Recorded,
    MarkReady(Box<Command>),
    /// The session was replaced or closed meanwhile.
    Stale,
}

impl Registry {
    pub fn new(settings: AgentSettings) -> Registry {
        Registry { settings, inner: Mutex::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_active(&self) -> bool {
        self.lock().active
    }

    /// This node became leader: every listed agent gets a full TTL from now.
    fn activate(&self, agents: Vec<(String, bool)>) {
        let deadline = Instant::now() + self.settings.ttl;
        let mut inner = self.lock();
        inner.agents = agents.into_iter().map(|(id, ready)| (id, Live::new(deadline, ready))).collect();
        inner.active = true;
    }

    /// This node stopped leading: every session ends (agents redial the new leader).
    fn deactivate(&self) {
        let mut inner = self.lock();
        inner.active = false;
        inner.agents.clear();
    }

    /// Starts a session for `id`, replacing (and so ending) an older one: returns its serial
    /// and a receiver that completes when the session must end. `None` when this node does not
    /// lead.
    pub fn attach(
        &self,
        id: &str,
        hello: HelloInfo,
        tx: mpsc::Sender<Result<ControllerMessage, tonic::Status>>,
    ) -> Option<(u64, oneshot::Receiver<()>)> {
        let now = Instant::now();
        let mut inner = self.lock();
        if !inner.active {
            return None;
        }
        inner.next_serial += 1;
        let serial = inner.next_serial;
        let live = inner.agents.entry(id.to_string()).or_insert_with(|| Live::new(now, false));
        let (close, closed) = oneshot::channel();
        live.session = Some(Session { serial, tx, _close: close });
        live.hello = Some(hello);
        live.last_seen_ms = Some(now_ms());
        live.deadline = now + self.settings.ttl;
        Some((serial, closed))
    }

    /// The session's hello was committed: the agent is `ready`.
    pub fn confirmed_ready(&self, id: &str, serial: u64) {
        let mut inner = self.lock();
        if let Some(live) = inner.agents.get_mut(id) {
            if live.session.as_ref().is_some_and(|s| s.serial == serial) {
                live.ready = true;
            }
        }
    }

    pub fn heartbeat(
        &self,
        id: &str,
        serial: u64,
        host: Option<&HostMetrics>,
        containers: &[ContainerMetrics],
    ) -> HeartbeatOutcome {
        let now = Instant::now();
        let at = now_ms();
        let mut inner = self.lock();
        let Some(live) = inner.agents.get_mut(id) else { return HeartbeatOutcome::Stale };
        if live.session.as_ref().is_none_or(|s| s.serial != serial) {
            return HeartbeatOutcome::Stale;
        }
        live.last_seen_ms = Some(at);
        live.deadline = now + self.settings.ttl;
        if let Some(host) = host {
            let view = MetricsView::from_proto(at, host);
            if live.history.len() == HISTORY {
                live.history.pop_front();
            }
            live.history.push_back(view.clone());
            live.metrics = Some(view);
        }
        live.containers = containers.iter().map(ContainerView::from).collect();
        if !live.ready && !live.pending {
            if let Some(hello) = &live.hello {
                live.pending = true;
                return HeartbeatOutcome::MarkReady(Box::new(hello.up_command(id, at)));
            }
        }
        HeartbeatOutcome::Recorded
    }

    /// The outcome of committing a status change started by [`Registry::heartbeat`].
    pub fn status_committed(&self, id: &str, ready: Option<bool>) {
        let mut inner = self.lock();
        if let Some(live) = inner.agents.get_mut(id) {
            live.pending = false;
            if let Some(ready) = ready {
                live.ready = ready;
            }
        }
    }

    /// The session ended: the agent has the disconnect grace to come back.
    pub fn detach(&self, id: &str, serial: u64) {
        let grace = Instant::now() + self.settings.disconnect_grace;
        let mut inner = self.lock();
        if let Some(live) = inner.agents.get_mut(id) {
            if live.session.as_ref().is_some_and(|s| s.serial == serial) {
                live.session = None;
                live.deadline = live.deadline.min(grace);
            }
        }
    }

    /// Ends the agent's session at once and forgets it (it was revoked).
    pub fn remove(&self, id: &str) -> bool {
        self.lock().agents.remove(id).is_some_and(|live| live.session.is_some())
    }

    /// Sends a message on the agent's current session.
    pub fn send(&self, id: &str, serial: u64, message: ControllerMessage) -> bool {
        let tx = {
            let inner = self.lock();
            match inner.agents.get(id).and_then(|l| l.session.as_ref()) {
                Some(s) if s.serial == serial => s.tx.clone(),
                _ => return false,
            }
        };
        tx.try_send(Ok(message)).is_ok()
    }

    /// Agents past their deadline that the state still says are `ready`; marks them pending.
    fn take_expired(&self) -> Vec<(String, UnixMillis)> {
        let now = Instant::now();
        let mut inner = self.lock();
        if !inner.active {
            return Vec::new();
        }
        let mut expired = Vec::new();
        for (id, live) in inner.agents.iter_mut() {
            if live.ready && !live.pending && live.deadline <= now {
                live.pending = true;
                expired.push((id.clone(), live.last_seen_ms.unwrap_or_else(now_ms)));
            }
        }
        expired
    }

    /// The live view of every agent this leader knows (without history), or of one (with it).
    pub fn live(&self, only: Option<&str>) -> HashMap<String, LiveView> {
        let inner = self.lock();
        let view = |live: &Live, history: bool| LiveView {
            connected: live.session.is_some(),
            last_seen: live.last_seen_ms,
            metrics: live.metrics.clone(),
            containers: live.containers.clone(),
            history: if history { live.history.iter().cloned().collect() } else { Vec::new() },
        };
        match only {
            Some(id) => inner.agents.get(id).map(|l| (id.to_string(), view(l, true))).into_iter().collect(),
            None => inner.agents.iter().map(|(id, l)| (id.clone(), view(l, false))).collect(),
        }
    }

    /// The agent's current session: its serial and outgoing queue.
    pub fn session_of(&self, id: &str) -> Option<(u64, mpsc::Sender<Result<ControllerMessage, tonic::Status>>)> {
        let inner = self.lock();
        inner.agents.get(id).and_then(|l| l.session.as_ref()).map(|s| (s.serial, s.tx.clone()))
    }

    /// Every agent in session, with its session serial.
    pub fn all_sessions(&self) -> Vec<(String, u64)> {
        let inner = self.lock();
        inner.agents.iter().filter_map(|(id, l)| l.session.as_ref().map(|s| (id.clone(), s.serial))).collect()
    }

    /// Number of agents in session with this leader.
    pub fn sessions(&self) -> usize {
        self.lock().agents.values().filter(|l| l.session.is_some()).count()
    }
}

/// Runs on every controller: activates the registry while this node leads, marks silent agents
/// `down`, and ends the session of a revoked agent at once.
pub async fn run(controller: SharedController, mut events: broadcast::Receiver<StateEvent>) {
    let registry = controller.agents.clone();
    // The server metrics change with the vote, the role, the leader and the membership only:
    // openraft sends the full metrics on every turn of its loop, several times per write.
    let mut metrics = controller.raft.server_metrics();
    let mut led_term: Option<u64> = None;
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (leading, term) = {
            let m = metrics.borrow_and_update();
            (m.state.is_leader(), m.vote.leader_id().term)
        };
        if leading && led_term != Some(term) {
            // The registry is loaded after this node's state caught up with everything
            // committed before its term (the read barrier), so no agent is missed.
            match load_agents(&controller).await {
                Ok(agents) => {
                    tracing::info!(term, agents = agents.len(), "leading: tracking agent sessions");
                    registry.activate(agents);
                    led_term = Some(term);
                }
                Err(e) => tracing::warn!(error = %e, "cannot load the agent registry yet"),
            }
        } else if !leading && led_term.is_some() {
            tracing::info!("no longer leading: ending agent sessions");
            registry.deactivate();
            led_term = None;
        }
        tokio::select! {
            changed = metrics.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = sweep.tick() => {
                let expired = registry.take_expired();
                if !expired.is_empty() {
                    mark_down(&controller, expired).await;
                }
            }
            event = events.recv() => match event {
                Ok(StateEvent::AgentRevoked(id)) => {
                    if registry.remove(&id) {
                        tracing::info!(agent = %id, "agent revoked: its session is closed");
                    }
                }
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

async fn load_agents(controller: &SharedController) -> anyhow::Result<Vec<(String, bool)>> {
    controller.read_barrier().await?;
    let rows = controller.state.agents().await?;
    Ok(rows.into_iter().map(|a| (a.id, a.status == "ready")).collect())
}

async fn mark_down(controller: &SharedController, expired: Vec<(String, UnixMillis)>) {
    let ids: Vec<String> = expired.iter().map(|(id, _)| id.clone()).collect();
    tracing::info!(agents = ?ids, "agents missed their heartbeats: marking them down");
    let result = controller.propose(Command::AgentsDown { agents: expired }).await;
    let ready = match result {
        Ok(CommandResponse::Applied) => Some(false),
        Ok(other) => {
            tracing::warn!(?other, "marking agents down was refused");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot mark agents down yet; will retry");
            None
        }
    };
    for id in ids {
        controller.agents.status_committed(&id, ready);
    }
}

/// The live view of every agent (or of `only`, with its history), from this node if it leads,
/// else from the leader. `None` when the leader cannot be asked (the API then shows the
/// committed state only).
pub async fn live_view(controller: &SharedController, only: Option<&str>) -> Option<HashMap<String, LiveView>> {
    if controller.agents.is_active() {
        return Some(controller.agents.live(only));
    }
    let (_, leader) = controller.leader()?;
    if leader == controller.node {
        return None;
    }
    let channel = controller.peers.get(&leader.grpc_addr).ok()?;
    let mut request = tonic::Request::new(deployer_proto::cluster::AgentLiveRequest {
        agent_id: only.unwrap_or_default().to_string(),
    });
    request.set_timeout(Duration::from_secs(2));
    let reply = deployer_proto::cluster::cluster_client::ClusterClient::new(channel)
        .max_decoding_message_size(256 * 1024 * 1024)
        .agent_live(request)
        .await
        .ok()?;
    serde_json::from_slice(&reply.into_inner().live).ok()
}

/// Shared handle type.
pub type SharedRegistry = Arc<Registry>;
