//! The agent gRPC service: joining with a token, and the session stream with the leader.

use std::pin::Pin;
use std::time::Duration;

use deployer_common::pki::Identity;
use deployer_proto::agent::agent_message::Body as AgentBody;
use deployer_proto::agent::agent_server::Agent;
use deployer_proto::agent::controller_message::Body as ControllerBody;
use deployer_proto::agent::{
    AgentMessage, CertificateIssued, ControllerMessage, HeartbeatAck, Hello, JoinReply, JoinRequest, Redirect, Welcome,
};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{HeartbeatOutcome, HelloInfo};
use crate::command::{Command, CommandResponse, JoinTokenKind};
use crate::controller::SharedController;
use crate::deploy::dispatch::SessionReport;
use crate::grpc::peer_identity;
use crate::store::queries::AgentRow;
use crate::util::{new_id, now_ms, rfc3339};

/// How long a new session may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest hostname, label key or value an agent may send.
const MAX_FIELD: usize = 253;
/// Most labels on one agent.
const MAX_LABELS: usize = 64;

pub struct AgentService {
    controller: SharedController,
}

impl AgentService {
    pub fn new(controller: SharedController) -> AgentService {
        AgentService { controller }
    }

    fn controllers(&self) -> Vec<String> {
        let metrics = self.controller.raft.metrics();
        let metrics = metrics.borrow();
        metrics.membership_config.membership().nodes().map(|(_, n)| n.grpc_addr.clone()).collect()
    }

    /// The caller's agent id, if its certificate names an agent that is registered and not revoked.
    async fn authorized_agent<T>(&self, request: &tonic::Request<T>) -> Result<AgentRow, tonic::Status> {
        let id = match peer_identity(request)? {
            Identity::Agent(id) => id,
            other => return Err(tonic::Status::permission_denied(format!("{} is not an agent identity", other.uri()))),
        };
        let c = &self.controller;
        let unavailable = |e: sqlx::Error| tonic::Status::unavailable(format!("state unavailable: {e}"));
        let row = match c.state.agent(&id).await.map_err(unavailable)? {
            Some(row) => row,
            None => {
                // This node may not have applied the registration yet.
                c.read_barrier().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                c.state
                    .agent(&id)
                    .await
                    .map_err(unavailable)?
                    .ok_or_else(|| tonic::Status::permission_denied(format!("agent {id} is not registered")))?
            }
        };
        if let Some(at) = row.revoked_at {
            return Err(tonic::Status::permission_denied(format!(
                "agent {id} was revoked at {}; join again with a new agent token",
                rfc3339(at)
            )));
        }
        Ok(row)
    }
}

fn check_labels(labels: &std::collections::HashMap<String, String>) -> Result<(), tonic::Status> {
    if labels.len() > MAX_LABELS {
        return Err(tonic::Status::invalid_argument(format!("at most {MAX_LABELS} labels")));
    }
    for (k, v) in labels {
        if k.is_empty() || k.len() > MAX_FIELD || v.len() > MAX_FIELD {
            return Err(tonic::Status::invalid_argument(format!(
                "label {k:?}: keys must be 1 to {MAX_FIELD} bytes and values at most {MAX_FIELD}"
            )));
        }
    }
    Ok(())
}

fn check_hostname(hostname: &str) -> Result<(), tonic::Status> {
    if hostname.is_empty() || hostname.len() > MAX_FIELD || hostname.chars().any(char::is_control) {
        return Err(tonic::Status::invalid_argument(format!(
            "hostname must be 1 to {MAX_FIELD} bytes without control characters"
        )));
    }
    Ok(())
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<ControllerMessage, tonic::Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Agent for AgentService {
    async fn join(&self, request: tonic::Request<JoinRequest>) -> Result<tonic::Response<JoinReply>, tonic::Status> {
        let req = request.into_inner();
        check_hostname(&req.hostname)?;
        check_labels(&req.labels)?;
        let c = &self.controller;
        let token = crate::grpc::valid_join_token(c, &req.token_secret, JoinTokenKind::Agent).await?;
        let (ca, ca_pem) = crate::grpc::cluster_ca(c).await?;
        let id = new_id();
        let cert_pem = ca
            .sign_csr(&req.csr_pem, &Identity::Agent(id.clone()), &[], c.agents.settings.cert_ttl)
            .map_err(|e| tonic::Status::invalid_argument(format!("the CSR was refused: {e}")))?;
        let command = Command::RegisterAgent {
            id: id.clone(),
            hostname: req.hostname.clone(),
            labels: req.labels.into_iter().collect(),
            token_id: token.id.clone(),
            created_at: now_ms(),
        };
        match c.propose(command).await {
            Ok(CommandResponse::Applied) => {}
            Ok(other) => return Err(tonic::Status::aborted(format!("registering the agent was refused: {other:?}"))),
            Err(e) => return Err(tonic::Status::unavailable(format!("cannot register the agent: {e}"))),
        }
        tracing::info!(agent = %id, hostname = %req.hostname, token = %token.id, "agent joined");
        Ok(tonic::Response::new(JoinReply { agent_id: id, cert_pem, ca_pem, controllers: self.controllers() }))
    }

    type SessionStream = SessionStream;

    async fn session(
        &self,
        request: tonic::Request<tonic::Streaming<AgentMessage>>,
    ) -> Result<tonic::Response<Self::SessionStream>, tonic::Status> {
        let agent = self.authorized_agent(&request).await?;
        let c = self.controller.clone();
        if !c.agents.is_active() {
            let leader = c.leader().map(|(_, n)| n.grpc_addr).filter(|a| *a != c.node.grpc_addr).unwrap_or_default();
            let redirect = ControllerMessage {
                body: Some(ControllerBody::Redirect(Redirect { leader, controllers: self.controllers() })),
            };
            let stream: SessionStream = Box::pin(futures::stream::iter([Ok(redirect)]));
            return Ok(tonic::Response::new(stream));
        }
        let remote = request.remote_addr();
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let controllers = self.controllers();
        tokio::spawn(async move {
            let id = agent.id.clone();
            if let Err(status) = run_session(c, agent, remote, inbound, tx.clone(), controllers).await {
                tracing::info!(agent = %id, error = %status.message(), "agent session ended");
                let _ = tx.send(Err(status)).await;
            }
        });
        let stream: SessionStream = Box::pin(ReceiverStream::new(rx));
        Ok(tonic::Response::new(stream))
    }
}

async fn run_session(
    c: SharedController,
    agent: AgentRow,
    remote: Option<std::net::SocketAddr>,
    mut inbound: tonic::Streaming<AgentMessage>,
    tx: mpsc::Sender<Result<ControllerMessage, tonic::Status>>,
    controllers: Vec<String>,
) -> Result<(), tonic::Status> {
    let id = agent.id;
    let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.next())
        .await
        .map_err(|_| tonic::Status::deadline_exceeded("no hello within 10 s"))?;
    let hello = match first {
        Some(Ok(AgentMessage { body: Some(AgentBody::Hello(hello)) })) => hello,
        Some(Ok(_)) => return Err(tonic::Status::invalid_argument("the first message of a session must be a hello")),
        Some(Err(status)) => return Err(status),
        None => return Ok(()),
    };
    check_hostname(&hello.hostname)?;
    check_labels(&hello.labels)?;
    let capacity = hello.capacity.unwrap_or_default();
    let ingress = ingress_address(&hello, remote)?;
    let info = HelloInfo {
        hostname: hello.hostname,
        labels: hello.labels.into_iter().collect(),
        version: hello.version.chars().take(MAX_FIELD).collect(),
        cpu_millis: capacity.cpu_millis,
        memory_bytes: capacity.memory_bytes,
        ingress,
        ingress_https_port: hello.ingress_https_port.min(u32::from(u16::MAX)),
    };
    let up = info.up_command(&id, now_ms());
    let Some((serial, mut closed)) = c.agents.attach(&id, info, tx.clone()) else {
        return Err(tonic::Status::unavailable("this controller stopped leading; redial"));
    };
    // Whatever happens below, the registry learns that this session is over.
    let _detach = Detach { c: c.clone(), id: id.clone(), serial };
    match c.propose(up).await {
        Ok(CommandResponse::Applied) => c.agents.confirmed_ready(&id, serial),
        Ok(_) => return Err(tonic::Status::permission_denied(format!("agent {id} was revoked"))),
        Err(e) => return Err(tonic::Status::unavailable(format!("cannot record the agent as ready: {e}"))),
    }
    tracing::info!(agent = %id, serial, "agent session started");
    // Deployment reports are handled in order, off this loop.
    let (reports, reports_rx) = mpsc::channel(64);
    tokio::spawn(crate::deploy::dispatch::session_worker(c.clone(), id.clone(), serial, reports_rx));
    c.deploys.wake();
    let welcome =
        ControllerMessage { body: Some(ControllerBody::Welcome(Welcome { agent_id: id.clone(), controllers })) };
    if tx.send(Ok(welcome)).await.is_err() {
        return Ok(());
    }
    // Its route table goes out now rather than at the next commit.
    c.ingress.wake();
    loop {
        let message = tokio::select! {
            // Replaced, revoked, or this node stepped down.
            _ = &mut closed => return Ok(()),
            // The agent went away.
            _ = tx.closed() => return Ok(()),
            m = inbound.next() => m,
        };
        let body = match message {
            None => return Ok(()),
            Some(Err(status)) => return Err(status),
            Some(Ok(AgentMessage { body: None })) => continue,
            Some(Ok(AgentMessage { body: Some(body) })) => body,
        };
        match body {
            AgentBody::Hello(_) => {}
            AgentBody::Heartbeat(hb) => match c.agents.heartbeat(&id, serial, hb.host.as_ref(), &hb.containers) {
                HeartbeatOutcome::Recorded => ack(&tx, hb.seq),
                HeartbeatOutcome::Stale => return Ok(()),
                HeartbeatOutcome::MarkReady(command) => {
                    ack(&tx, hb.seq);
                    let c2 = c.clone();
                    let id2 = id.clone();
                    tokio::spawn(async move {
                        let ready = match c2.propose(*command).await {
                            Ok(CommandResponse::Applied) => Some(true),
                            _ => None,
                        };
                        tracing::info!(agent = %id2, "agent heard from again: ready");
                        c2.agents.status_committed(&id2, ready);
                    });
                }
            },
            AgentBody::DeploymentUpdate(update) => {
                if reports.send(SessionReport::Update(update)).await.is_err() {
                    return Ok(());
                }
            }
            AgentBody::PreviewDestroyed(report) => {
                if !report.error.is_empty() {
                    tracing::warn!(agent = %id, preview = %report.preview, error = %report.error, "a preview teardown left something");
                }
                c.deploys.teardowns.reported(&id, report);
            }
            AgentBody::RoutesApplied(applied) => {
                if !applied.error.is_empty() {
                    tracing::warn!(agent = %id, version = applied.version, error = %applied.error, "the agent's ingress reported problems");
                }
                c.ingress.applied(&id, applied.version);
            }
            AgentBody::InstanceEvent(event) => {
                if reports.send(SessionReport::Instance(event)).await.is_err() {
                    return Ok(());
                }
            }
            AgentBody::FetchUpload(fetch) => {
                if reports.send(SessionReport::FetchUpload(fetch)).await.is_err() {
                    return Ok(());
                }
            }
            AgentBody::RenewCertificate(renew) => {
                let (ca, _) = crate::grpc::cluster_ca(&c).await?;
                let cert_pem = ca
                    .sign_csr(&renew.csr_pem, &Identity::Agent(id.clone()), &[], c.agents.settings.cert_ttl)
                    .map_err(|e| tonic::Status::invalid_argument(format!("the renewal CSR was refused: {e}")))?;
                tracing::info!(agent = %id, "renewed the agent's certificate");
                let issued =
                    ControllerMessage { body: Some(ControllerBody::CertificateIssued(CertificateIssued { cert_pem })) };
                if !c.agents.send(&id, serial, issued) {
                    return Ok(());
                }
            }
        }
    }
}

/// Where other agents reach this agent's ingress: the host it advertises, or the address its
/// session comes from, with its HTTP port.
fn ingress_address(hello: &Hello, remote: Option<std::net::SocketAddr>) -> Result<String, tonic::Status> {
    let port = u16::try_from(hello.ingress_http_port)
        .map_err(|_| tonic::Status::invalid_argument("the ingress port is out of range"))?;
    if port == 0 {
        return Ok(String::new());
    }
    let host = hello.ingress_host.trim();
    if !host.is_empty() {
        let valid = host.parse::<std::net::IpAddr>().is_ok()
            || (host.len() <= 253 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.'));
        if !valid {
            return Err(tonic::Status::invalid_argument(format!(
                "the ingress host {host:?} is not a host name or IP address"
            )));
        }
        return Ok(match host.parse::<std::net::Ipv6Addr>() {
            Ok(v6) => format!("[{v6}]:{port}"),
            Err(_) => format!("{host}:{port}"),
        });
    }
    Ok(remote.map(|r| std::net::SocketAddr::new(r.ip().to_canonical(), port).to_string()).unwrap_or_default())
}

/// Acknowledges a heartbeat. A full outgoing queue means the agent is not reading: the ack is
/// dropped rather than waited for, and the agent's own ack timeout takes over.
fn ack(tx: &mpsc::Sender<Result<ControllerMessage, tonic::Status>>, seq: u64) {
    let _ = tx.try_send(Ok(ControllerMessage { body: Some(ControllerBody::HeartbeatAck(HeartbeatAck { seq })) }));
}

struct Detach {
    c: SharedController,
    id: String,
    serial: u64,
}

impl Drop for Detach {
    fn drop(&mut self) {
        self.c.agents.detach(&self.id, self.serial);
    }
}
