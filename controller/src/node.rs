//! Starting a controller node: bootstrap a new cluster, join one with a token, or resume from
//! the data dir; then run Raft, the gRPC services and the HTTP API until shutdown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use deployer_common::pki::{self, ClusterCa, Identity};
use deployer_common::seal::ClusterKey;
use deployer_common::tls::{controller_client_config, ServerTrust};
use deployer_common::token::{hash_secret, random_hex, JoinToken};
use deployer_proto::agent::agent_server::AgentServer;
use deployer_proto::cluster::cluster_client::ClusterClient;
use deployer_proto::cluster::cluster_server::ClusterServer;
use deployer_proto::cluster::{AddVoterRequest, JoinRequest};
use deployer_proto::raft::raft_server::RaftServer;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agents::service::AgentService;
use crate::command::Command;
use crate::controller::{Controller, SharedController};
use crate::files::{ensure_private_dir, write_atomic};
use crate::grpc::cluster_service::{ClusterService, LEADER_HINT};
use crate::grpc::raft_service::RaftService;
use crate::raft::network::{Network, PeerChannels};
use crate::raft::{ControllerNode, NodeId, Raft, RaftTuning};
use crate::store::log_store::LogStore;
use crate::store::queries::StateReader;
use crate::store::state_machine::StateMachine;
use crate::util::now_ms;

const NODE_FILE: &str = "node.json";
const KEYRING_FILE: &str = "keyring";
const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The admin token before it is committed; renamed to `admin-token` once it works.
const ADMIN_TOKEN_PENDING_FILE: &str = "admin-token.pending";
const PENDING_FILE: &str = "bootstrap-pending.json";
/// Pings on an idle gRPC connection, and how long an answer may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest message an agent may send on its session (a heartbeat with many containers).
const AGENT_MESSAGE_MAX: usize = 1024 * 1024;

/// Everything `serve` needs, from flags and environment.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data_dir: PathBuf,
    /// Address other controllers and agents use for gRPC; defaults to the bound address.
    pub advertise_grpc: Option<String>,
    pub advertise_http: Option<String>,
    /// `https://PEER_GRPC_ADDR` of any member, with `token`, to join an existing cluster.
    pub join: Option<String>,
    pub token: Option<String>,
    pub tuning: RaftTuning,
    pub agents: crate::agents::AgentSettings,
    pub deploys: crate::deploy::DeploySettings,
    pub ingress: crate::ingress::IngressSettings,
    /// Dev mode: run an agent in this process against the local Docker engine.
    pub dev_agent: Option<DevAgent>,
}

/// The in-process agent of dev mode.
#[derive(Clone, Debug)]
pub struct DevAgent {
    pub data_dir: PathBuf,
    pub docker_host: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Stage {
    /// Files are written; the cluster's first commands may still have to be committed.
    Bootstrapping,
    /// Certificate received; the leader has yet to make this node a voter.
    Joining,
    Member,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct NodeRecord {
    node_id: NodeId,
    grpc_addr: String,
    http_addr: String,
    stage: Stage,
    /// Where to ask to become a voter while `Joining`.
    #[serde(default)]
    join_addr: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct PendingBootstrap {
    ca_key_sealed_hex: String,
}

struct Paths {
    dir: PathBuf,
}

impl Paths {
    fn node(&self) -> PathBuf {
        self.dir.join(NODE_FILE)
    }
    fn keyring(&self) -> PathBuf {
        self.dir.join(KEYRING_FILE)
    }
    fn ca(&self) -> PathBuf {
        self.dir.join("tls/ca.pem")
    }
    fn cert(&self) -> PathBuf {
        self.dir.join("tls/node.pem")
    }
    fn key(&self) -> PathBuf {
        self.dir.join("tls/node.key")
    }
    fn admin_token(&self) -> PathBuf {
        self.dir.join(ADMIN_TOKEN_FILE)
    }
    fn admin_token_pending(&self) -> PathBuf {
        self.dir.join(ADMIN_TOKEN_PENDING_FILE)
    }
    fn pending(&self) -> PathBuf {
        self.dir.join(PENDING_FILE)
    }
}

fn advertised(explicit: &Option<String>, recorded: Option<&str>, bound: SocketAddr) -> String {
    if let Some(a) = explicit {
        return a.clone();
    }
    if let Some(r) = recorded {
        return r.to_string();
    }
    if bound.ip().is_unspecified() {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        return format!("{host}:{}", bound.port());
    }
    bound.to_string()
}

/// Runs a controller on already bound listeners until `shutdown` resolves.
pub async fn serve(
    config: ServeConfig,
    http: TcpListener,
    grpc: TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    deployer_common::tls::install_crypto_provider();
    let paths = Paths { dir: config.data_dir.clone() };
    ensure_private_dir(&paths.dir).with_context(|| format!("cannot create data dir {}", paths.dir.display()))?;
    let http_bound = http.local_addr()?;
    let grpc_bound = grpc.local_addr()?;

    let record = match read_record(&paths)? {
        Some(mut record) => {
            if config.join.is_some() {
                tracing::info!("data dir already holds a node; --join is ignored");
            }
            if let Some(a) = &config.advertise_grpc {
                record.grpc_addr = a.clone();
            }
            if let Some(a) = &config.advertise_http {
                record.http_addr = a.clone();
            }
            tracing::info!(node_id = record.node_id, stage = ?record.stage, "resuming from data dir");
            record
        }
        None => {
            let grpc_addr = advertised(&config.advertise_grpc, None, grpc_bound);
            let http_addr = advertised(&config.advertise_http, None, http_bound);
            match (&config.join, &config.token) {
                (Some(peer), Some(token)) => join(&paths, peer, token, grpc_addr, http_addr).await?,
                (Some(_), None) => {
                    bail!("--join needs --token (a controller join token: DPLY1.<fingerprint>.<secret>)")
                }
                (None, _) => bootstrap(&paths, grpc_addr, http_addr)?,
            }
        }
    };

    let key = ClusterKey::load(&paths.keyring()).context("cannot load the cluster key")?;
    let ca_pem = read_text(&paths.ca())?;
    let cert_pem = read_text(&paths.cert())?;
    let key_pem = read_text(&paths.key())?;
    let peer_tls = controller_client_config(&ServerTrust::Ca(ca_pem.clone()), Some((&cert_pem, &key_pem)))
        .context("cannot build the peer TLS configuration")?;

    tracing::info!(dir = %paths.dir.display(), "opening the Raft log and state");
    let log = LogStore::open(&paths.dir.join("raft-log.db")).await.context("cannot open the Raft log")?;
    let sm = StateMachine::open(&paths.dir).await.context("cannot open the state database")?;
    let applied = sm.applied_index();
    let reader = StateReader::new(sm.reader(), applied.clone());
    let tokens_generation = sm.tokens_generation();
    let state_events = sm.events();
    let peers = PeerChannels::new(peer_tls);
    let raft_config = Arc::new(config.tuning.openraft_config()?);
    let raft = Raft::new(record.node_id, raft_config, Network::new(peers.clone()), log, sm)
        .await
        .context("cannot start Raft")?;

    let node = ControllerNode { grpc_addr: record.grpc_addr.clone(), http_addr: record.http_addr.clone() };
    let (controller, batcher): (SharedController, _) = Controller::new(
        record.node_id,
        node.clone(),
        raft.clone(),
        reader,
        key,
        peers,
        applied,
        tokens_generation,
        config.agents.clone(),
        config.deploys.clone(),
        config.ingress.clone(),
        state_events.clone(),
    );
    let agents_task = tokio::spawn(crate::agents::run(controller.clone(), state_events.subscribe()));
    let dispatch_task = tokio::spawn(crate::deploy::dispatch::run(controller.clone(), state_events.subscribe()));
    let ingress_task = tokio::spawn(crate::ingress::run(controller.clone(), state_events.subscribe()));
    let previews_task = tokio::spawn(crate::deploy::previews::run(controller.clone(), state_events.subscribe()));
    let notify_task = tokio::spawn(crate::deploy::notify::run(controller.clone(), state_events.subscribe()));
    let certify_task = tokio::spawn(crate::ingress::certify::run(controller.clone(), state_events.subscribe()));
    let batcher = tokio::spawn(batcher.run(controller.clone()));
    let contact = Arc::new(crate::raft::detector::LeaderContact::default());
    let detector = tokio::spawn(crate::raft::detector::run(
        raft.clone(),
        contact.clone(),
        Duration::from_millis(config.tuning.election_max_ms),
        Duration::from_millis(config.tuning.election_min_ms),
        Duration::from_millis(config.tuning.election_max_ms * 5 + 2000),
    ));

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    // gRPC: Raft and cluster services, mutual TLS. Client certificates are optional at the TLS
    // layer only because a joining node has none yet; every service but Join demands one.
    let identity = tonic::transport::Identity::from_pem(format!("{cert_pem}\n{ca_pem}"), &key_pem);
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .client_ca_root(tonic::transport::Certificate::from_pem(&ca_pem))
        .client_auth_optional(true)
        .timeout(Duration::from_secs(10));
    let grpc_server = tonic::transport::Server::builder()
        // A peer that vanished without closing its connection (power loss, a cut cable) stops
        // answering pings: its connection is closed, and an agent's session with it.
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tls_config(tls)
        .context("invalid gRPC TLS configuration")?
        .add_service(
            RaftServer::new(RaftService::new(raft.clone(), contact)).max_decoding_message_size(64 * 1024 * 1024),
        )
        .add_service(ClusterServer::new(ClusterService::new(controller.clone())))
        .add_service(
            AgentServer::new(AgentService::new(controller.clone()))
                .max_decoding_message_size(AGENT_MESSAGE_MAX)
                .max_encoding_message_size(AGENT_MESSAGE_MAX),
        )
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true)),
            stopped(stop_rx.clone()),
        );
    let grpc_task = tokio::spawn(grpc_server);
    tracing::info!(addr = %grpc_bound, advertised = %record.grpc_addr, "gRPC (mutual TLS) listening");

    let app = crate::api::router(controller.clone());
    let http_server = axum::serve(http, app.into_make_service_with_connect_info::<SocketAddr>())
        .with_graceful_shutdown(stopped(stop_rx.clone()));
    let http_task = tokio::spawn(async move { http_server.await });
    tracing::info!(addr = %http_bound, "HTTP API listening");

    // Finish whatever the data dir says is unfinished.
    let finisher = {
        let controller = controller.clone();
        let paths = Paths { dir: paths.dir.clone() };
        let record = record.clone();
        tokio::spawn(async move { finish_stage(&controller, &paths, record).await })
    };
    if record.stage == Stage::Member {
        write_record(&paths, &record)?;
    }
    let dev_agent = config.dev_agent.clone().map(|dev| {
        let controller = controller.clone();
        let ca = paths.ca();
        let grpc_addr = record.grpc_addr.clone();
        tokio::spawn(run_dev_agent(controller, dev, ca, grpc_addr, stopped(stop_rx.clone())))
    });

    // Runs until the shutdown signal, or until finishing the bootstrap or join fails, which
    // leaves the node useless: then it stops and reports the error.
    tokio::pin!(shutdown);
    let mut finisher = Some(finisher);
    let failure = loop {
        match &mut finisher {
            Some(task) => tokio::select! {
                _ = &mut shutdown => break None,
                result = task => {
                    finisher = None;
                    match result {
                        Ok(Ok(())) => continue,
                        Ok(Err(e)) => break Some(e.context("could not finish bootstrapping or joining")),
                        Err(e) => break Some(anyhow::anyhow!("the bootstrap task failed: {e}")),
                    }
                }
            },
            None => {
                (&mut shutdown).await;
                break None;
            }
        }
    };
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    if let Some(task) = finisher {
        task.abort();
    }
    // Writes still gathering are answered "shutting down"; HTTP drains below.
    if let Some(task) = dev_agent {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    batcher.abort();
    detector.abort();
    agents_task.abort();
    dispatch_task.abort();
    ingress_task.abort();
    previews_task.abort();
    notify_task.abort();
    certify_task.abort();
    let deadline = Duration::from_secs(10);
    match tokio::time::timeout(deadline, http_task).await {
        Ok(Ok(Ok(()))) => tracing::info!("HTTP API stopped"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP API stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP task failed"),
        Err(_) => tracing::warn!("HTTP API did not drain within {deadline:?}"),
    }
    match tokio::time::timeout(deadline, grpc_task).await {
        Ok(Ok(Ok(()))) => tracing::info!("gRPC stopped"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC stopped with an error"),
        Ok(Err(e)) => tracing::warn!(error = %e, "gRPC task failed"),
        Err(_) => tracing::warn!("gRPC did not drain within {deadline:?}"),
    }
    if let Err(e) = raft.shutdown().await {
        tracing::warn!(error = %e, "Raft shutdown failed");
    }
    tracing::info!("Raft stopped");
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn read_text(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_record(paths: &Paths) -> anyhow::Result<Option<NodeRecord>> {
    match std::fs::read(paths.node()) {
        Ok(bytes) => {
            Ok(Some(serde_json::from_slice(&bytes).with_context(|| format!("{} is corrupt", paths.node().display()))?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", paths.node().display())),
    }
}

fn write_record(paths: &Paths, record: &NodeRecord) -> anyhow::Result<()> {
    write_atomic(&paths.node(), &serde_json::to_vec_pretty(record)?, false)
        .with_context(|| format!("cannot write {}", paths.node().display()))
}

/// A new cluster: CA, cluster key, this node's certificate and the first admin token. The node
/// record is written last: until it exists, a restart starts the bootstrap over.
fn bootstrap(paths: &Paths, grpc_addr: String, http_addr: String) -> anyhow::Result<NodeRecord> {
    let node_id = crate::util::new_node_id();
    tracing::info!(node_id, "bootstrapping a new cluster");
    let ca = ClusterCa::generate()?;
    let key = ClusterKey::generate();
    let (node_key, csr) = pki::generate_key_and_csr()?;
    let cert = ca.sign_csr(&csr, &Identity::Controller(node_id), &[], Duration::from_secs(10 * 365 * 24 * 3600))?;
    key.save(&paths.keyring())?;
    write_atomic(&paths.ca(), ca.cert_pem().as_bytes(), false)?;
    write_atomic(&paths.cert(), cert.as_bytes(), false)?;
    write_atomic(&paths.key(), node_key.as_bytes(), true)?;
    let pending = PendingBootstrap { ca_key_sealed_hex: hex::encode(key.seal(ca.key_pem().as_bytes(), b"ca-key")) };
    write_atomic(&paths.pending(), &serde_json::to_vec(&pending)?, true)?;
    let admin_token = format!("dpl_{}", random_hex(32));
    write_atomic(&paths.admin_token_pending(), format!("{admin_token}\n").as_bytes(), true)?;
    let record = NodeRecord { node_id, grpc_addr, http_addr, stage: Stage::Bootstrapping, join_addr: None };
    write_record(paths, &record)?;
    Ok(record)
}

/// Joins through `peer` with a controller token: pins the CA by the token's fingerprint, sends a
/// CSR with the token's secret, and stores what comes back. Nothing is written if it fails.
async fn join(
    paths: &Paths,
    peer: &str,
    token: &str,
    grpc_addr: String,
    http_addr: String,
) -> anyhow::Result<NodeRecord> {
    let token = JoinToken::parse(token).context("invalid --token")?;
    let peer_addr = peer.trim_start_matches("https://").trim_end_matches('/').to_string();
    if peer_addr.contains("://") {
        bail!("--join must be https://HOST:PORT of a controller's gRPC address (got {peer})");
    }
    tracing::info!(peer = %peer_addr, "joining a cluster");
    let tls = controller_client_config(&ServerTrust::Fingerprint(token.ca_fingerprint.clone()), None)?;
    let channel = crate::grpc::client::channel(&peer_addr, tls)?;
    let (key_pem, csr_pem) = pki::generate_key_and_csr()?;
    let mut request =
        tonic::Request::new(JoinRequest { token_secret: token.secret.clone(), kind: "controller".into(), csr_pem });
    request.set_timeout(Duration::from_secs(15));
    let reply = ClusterClient::new(channel)
        .join(request)
        .await
        .map_err(|s| anyhow::anyhow!("{}", join_error(&s)))?
        .into_inner();
    // The TLS handshake already proved the peer holds a certificate from the pinned CA.
    let ca_fingerprint = pki::fingerprint_of_pem(&reply.ca_pem)?;
    if ca_fingerprint != token.ca_fingerprint {
        bail!("the controller sent a CA that does not match the token's fingerprint; refusing to join");
    }
    match pki::identity_of_cert_der(&deployer_common::tls::certs_from_pem(&reply.cert_pem)?[0])? {
        Identity::Controller(id) if id == reply.node_id => {}
        other => bail!("the controller issued a certificate for {other}, not for node {}", reply.node_id),
    }
    let key = ClusterKey::from_hex(&reply.cluster_key_hex)?;
    key.save(&paths.keyring())?;
    write_atomic(&paths.ca(), reply.ca_pem.as_bytes(), false)?;
    write_atomic(&paths.cert(), reply.cert_pem.as_bytes(), false)?;
    write_atomic(&paths.key(), key_pem.as_bytes(), true)?;
    let join_addr = if reply.leader_grpc_addr.is_empty() { peer_addr } else { reply.leader_grpc_addr };
    let record =
        NodeRecord { node_id: reply.node_id, grpc_addr, http_addr, stage: Stage::Joining, join_addr: Some(join_addr) };
    write_record(paths, &record)?;
    tracing::info!(node_id = record.node_id, "received a controller certificate");
    Ok(record)
}

fn join_error(status: &tonic::Status) -> String {
    match status.code() {
        tonic::Code::Unavailable => format!(
            "cannot reach the controller, or its certificate does not match the token's CA fingerprint: {}",
            status.message()
        ),
        _ => format!("the controller refused to let this node join: {}", status.message()),
    }
}

/// Dev mode's agent: joins with a token made here (first start only), then runs until shutdown.
async fn run_dev_agent(
    controller: SharedController,
    dev: DevAgent,
    ca_path: PathBuf,
    grpc_addr: String,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let token = if dev.data_dir.join("agent.json").exists() {
        None
    } else {
        match dev_agent_token(&controller, &ca_path).await {
            Ok(token) => Some(token),
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "dev mode: cannot make a token for the local agent");
                return;
            }
        }
    };
    let config = deployer_agent::AgentConfig {
        controller: format!("https://{grpc_addr}"),
        token,
        data_dir: dev.data_dir,
        labels: Default::default(),
        hostname: None,
        docker_host: dev.docker_host,
        heartbeat_interval: Duration::from_secs(5),
        storage: None,
        // Dev mode deploys the repositories on this machine.
        allow_file_git: true,
        // Ports 80 and 443 when this user may bind them, else free ones; on loopback only.
        ingress: deployer_agent::routing::IngressConfig {
            http: Some(SocketAddr::from(([127, 0, 0, 1], 80))),
            https: Some(SocketAddr::from(([127, 0, 0, 1], 443))),
            advertise_host: Some("127.0.0.1".into()),
            drain_grace: Duration::from_secs(5),
            threads: 2,
            fallback_to_free_port: true,
        },
    };
    // Say where services answer once the agent has told (its ports may be free ones).
    let base = controller.ingress.settings.base_domain.clone();
    let state = controller.state.clone();
    tokio::spawn(async move {
        for _ in 0..600 {
            if let Ok(agents) = state.agents().await {
                if let Some(agent) = agents.iter().find(|a| !a.ingress.is_empty()) {
                    let port = agent.ingress.rsplit_once(':').map_or("80", |(_, p)| p);
                    let port = if port == "80" { String::new() } else { format!(":{port}") };
                    eprintln!("  Services:     http://<service>-<project>.{base}{port}");
                    if agent.ingress_https_port != 0 {
                        eprintln!("                https://<service>-<project>.{base}:{} (CA: GET /api/v1/cluster/ingress-ca)", agent.ingress_https_port);
                    }
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    if let Err(e) = deployer_agent::run(config, shutdown).await {
        tracing::error!(error = %e, "dev mode: the local agent stopped");
    }
}

/// A short-lived agent token, committed once this node can write.
async fn dev_agent_token(c: &Controller, ca_path: &Path) -> anyhow::Result<String> {
    let fingerprint = pki::fingerprint_of_pem(&read_text(ca_path)?)?;
    let token = JoinToken::new(fingerprint);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = now_ms();
        let command = Command::CreateJoinToken {
            id: crate::util::new_id(),
            kind: crate::command::JoinTokenKind::Agent,
            secret_hash: token.secret_hash(),
            created_at: now,
            expires_at: now + 10 * 60 * 1000,
        };
        match c.propose(command).await {
            Ok(crate::command::CommandResponse::Applied) => return Ok(token.to_string()),
            Ok(other) => bail!("the token was refused: {other:?}"),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "dev mode: waiting to be able to write");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

async fn finish_stage(controller: &Controller, paths: &Paths, mut record: NodeRecord) -> anyhow::Result<()> {
    match record.stage {
        Stage::Member => return Ok(()),
        Stage::Bootstrapping => finish_bootstrap(controller, paths).await?,
        Stage::Joining => finish_join(controller, &record).await?,
    }
    record.stage = Stage::Member;
    record.join_addr = None;
    write_record(paths, &record)?;
    let _ = std::fs::remove_file(paths.pending());
    tracing::info!(node_id = record.node_id, "node is a cluster member");
    Ok(())
}

async fn finish_bootstrap(c: &Controller, paths: &Paths) -> anyhow::Result<()> {
    if !c.raft.is_initialized().await? {
        let members: BTreeMap<NodeId, ControllerNode> = [(c.id, c.node.clone())].into();
        c.raft.initialize(members).await.context("cannot initialize the cluster")?;
    }
    if c.state.cluster_ca().await?.is_none() {
        let pending: PendingBootstrap = serde_json::from_slice(&std::fs::read(paths.pending())?)?;
        let ca_cert_pem = read_text(&paths.ca())?;
        c.propose(Command::InitCluster { ca_cert_pem, ca_key_sealed_hex: pending.ca_key_sealed_hex, at: now_ms() })
            .await?;
    }
    // The token file appears under its final name only once the token is committed, so whoever
    // waits for the file can use it at once.
    let pending_token = paths.admin_token_pending();
    let token_file = if pending_token.exists() { pending_token.clone() } else { paths.admin_token() };
    let admin_token = read_text(&token_file)?;
    let hash = hash_secret(admin_token.trim());
    if c.state.api_token_by_hash(&hash).await?.is_none() {
        c.propose(Command::CreateApiToken {
            id: crate::util::new_id(),
            name: "admin".into(),
            token_hash: hash,
            scopes: vec!["admin".into()],
            created_at: now_ms(),
            expires_at: None,
            user_id: None,
        })
        .await?;
    }
    if token_file == pending_token {
        std::fs::rename(&pending_token, paths.admin_token())?;
        std::fs::File::open(&paths.dir)?.sync_all()?;
    }
    tracing::info!(path = %paths.admin_token().display(), "cluster bootstrapped; admin API token written");
    Ok(())
}

/// Asks the leader to add this node, following leader hints, until it succeeds.
async fn finish_join(c: &Controller, record: &NodeRecord) -> anyhow::Result<()> {
    let mut target = record.join_addr.clone().unwrap_or_default();
    let mut delay = Duration::from_millis(200);
    loop {
        if c.voters().contains(&c.id) {
            return Ok(());
        }
        let channel = c.peers.get(&target)?;
        let mut request = tonic::Request::new(AddVoterRequest {
            node_id: c.id,
            grpc_addr: c.node.grpc_addr.clone(),
            http_addr: c.node.http_addr.clone(),
        });
        request.set_timeout(Duration::from_secs(60));
        match ClusterClient::new(channel).add_voter(request).await {
            Ok(_) => {
                tracing::info!("joined as a voter");
                return Ok(());
            }
            Err(status) => {
                if let Some(hint) = status.metadata().get(LEADER_HINT).and_then(|v| v.to_str().ok()) {
                    tracing::info!(leader = hint, "redirected to the leader");
                    target = hint.to_string();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                if let Some((_, leader)) = c.leader() {
                    if leader.grpc_addr != c.node.grpc_addr {
                        target = leader.grpc_addr;
                    }
                }
                tracing::warn!(code = ?status.code(), message = status.message(), "could not become a voter yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
