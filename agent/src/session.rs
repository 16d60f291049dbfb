//! The session with the controller leader: one bidirectional gRPC stream over mutual TLS.
//!
//! The agent dials a controller it knows; a controller that does not lead answers with a
//! redirect to the leader. Once welcomed, the agent sends a heartbeat with its metrics every
//! interval and renews its certificate after two thirds of its life. When the session drops it
//! redials, trying every controller it learned, with capped, jittered backoff; its containers
//! keep running meanwhile (the session never owns them).

use std::collections::BTreeMap;
use std::time::Duration;

use deployer_common::grpc_client;
use deployer_common::pki;
use deployer_common::tls::{controller_client_config, ServerTrust};
use deployer_proto::agent::agent_client::AgentClient;
use deployer_proto::agent::agent_message::Body as AgentBody;
use deployer_proto::agent::controller_message::Body as ControllerBody;
use deployer_proto::agent::{
    AgentMessage, Capacity, ContainerMetrics, Heartbeat, Hello, HostMetrics, RenewCertificate, RoutesApplied,
};
use time::OffsetDateTime;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::docker::Docker;
use crate::identity::{describe, same_addr, AgentState, Credentials, Paths};
use crate::metrics::HostSampler;
use crate::AgentError;

/// Backoff between failed attempts: from this...
const BACKOFF_MIN: Duration = Duration::from_millis(200);
/// ...doubling up to this.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Redirects followed in a row before backing off (a cluster in the middle of an election).
const REDIRECTS_BEFORE_BACKOFF: u32 = 3;
/// How long the first answer of a session may take.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeats in a row without an ack after which the session counts as dead.
const UNACKED_LIMIT: u64 = 3;
/// How long deployment progress waits for more before it is sent.
const FLUSH_DELAY: Duration = Duration::from_millis(30);
/// Largest message the controller may send.
const MESSAGE_MAX: usize = 4 * 1024 * 1024;

pub struct Session {
    pub paths: Paths,
    pub credentials: Credentials,
    pub state: AgentState,
    /// The `--controller` address, always kept among the ones to try.
    pub first_controller: String,
    pub hostname: String,
    pub labels: BTreeMap<String, String>,
    pub heartbeat_interval: Duration,
    pub docker: Docker,
    pub docker_version: String,
    pub tasks: std::sync::Arc<crate::tasks::Tasks>,
    pub ingress: Option<std::sync::Arc<crate::routing::Ingress>>,
}

/// How one attempt ended.
enum Ended {
    /// The controller does not lead; try this address next (if any).
    Redirect(Option<String>),
    /// A welcomed session ended (the leader stepped down or went away).
    Dropped(String),
    /// The attempt failed before the session was welcomed.
    Failed(String),
    Shutdown,
}

/// Runs sessions until `shutdown` resolves or this agent is revoked.
pub async fn run(
    mut s: Session,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let containers = spawn_container_sampler(&s, stop.clone());
    let mut sampler = HostSampler::new(&s.paths.dir);
    let mut next: Option<String> = None;
    let mut rotation = 0usize;
    let mut failures = 0u32;
    let mut redirects = 0u32;
    loop {
        if *stop.borrow() {
            return Ok(());
        }
        let addr = match next.take() {
            Some(addr) => addr,
            None => {
                let known = s.known_controllers();
                rotation = rotation.wrapping_add(1);
                known[rotation % known.len()].clone()
            }
        };
        let ended = s.attempt(&addr, &mut sampler, &containers, stop.clone()).await?;
        let pause = match ended {
            Ended::Shutdown => return Ok(()),
            Ended::Redirect(leader) => {
                tracing::debug!(from = %addr, to = ?leader, "redirected to the leader");
                redirects += 1;
                next = leader;
                if redirects <= REDIRECTS_BEFORE_BACKOFF {
                    continue;
                }
                failures += 1;
                backoff(failures)
            }
            Ended::Dropped(why) => {
                tracing::warn!(controller = %addr, reason = %why, "session with the controller ended; redialing");
                failures = 0;
                redirects = 0;
                // Redial at once, but not all agents in the same instant.
                jitter(BACKOFF_MIN)
            }
            Ended::Failed(why) => {
                failures += 1;
                redirects = 0;
                let pause = backoff(failures);
                tracing::warn!(controller = %addr, reason = %why, retry_in = ?pause, "cannot open a session");
                pause
            }
        };
        let stop = stop.clone();
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = until_stopped(stop.clone()) => return Ok(()),
        }
    }
}

/// Resolves once `stop` says so (or its sender is gone). Holds no borrow of the value across
/// an await, so the futures that use it stay `Send`.
async fn until_stopped(mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}

/// Exponential backoff with equal jitter: half fixed, half random, capped.
fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(1u32 << failures.min(16).saturating_sub(1));
    jitter(exp.min(BACKOFF_MAX))
}

fn jitter(d: Duration) -> Duration {
    let half = d / 2;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    // The clock's low bits vary enough to spread agents that failed together.
    let random = u64::from(nanos.wrapping_mul(2_654_435_761)) % (half.as_millis() as u64 + 1);
    half + Duration::from_millis(random)
}

/// Samples the agent's containers in the background (a Docker stats sample takes about a
/// second), so a heartbeat never waits for Docker.
fn spawn_container_sampler(s: &Session, stop: watch::Receiver<bool>) -> watch::Receiver<Vec<ContainerMetrics>> {
    let (tx, rx) = watch::channel(Vec::new());
    let docker = s.docker.clone();
    let agent_id = s.credentials.agent_id.clone();
    let interval = s.heartbeat_interval;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = until_stopped(stop.clone()) => return,
            }
            match docker.managed_container_stats(&agent_id).await {
                Ok(stats) => {
                    warned = false;
                    let metrics = stats
                        .into_iter()
                        .map(|c| ContainerMetrics {
                            id: c.id,
                            name: c.name,
                            project: c.project.unwrap_or_default(),
                            service: c.service.unwrap_or_default(),
                            deployment: c.deployment.unwrap_or_default(),
                            cpu_percent: c.cpu_percent,
                            memory_used_bytes: c.memory_used_bytes,
                            memory_limit_bytes: c.memory_limit_bytes,
                        })
                        .collect();
                    tx.send_replace(metrics);
                }
                Err(e) => {
                    if !warned {
                        tracing::warn!(error = %e, "cannot sample container stats");
                        warned = true;
                    }
                }
            }
        }
    });
    rx
}

impl Session {
    fn known_controllers(&self) -> Vec<String> {
        let mut known = self.state.controllers.clone();
        if !known.iter().any(|c| same_addr(c, &self.first_controller)) {
            known.push(self.first_controller.clone());
        }
        known
    }

    fn hello(&self, sampler: &HostSampler) -> AgentMessage {
        let capacity = sampler.capacity();
        AgentMessage {
            body: Some(AgentBody::Hello(Hello {
                version: env!("CARGO_PKG_VERSION").to_string(),
                hostname: self.hostname.clone(),
                labels: self.labels.clone().into_iter().collect(),
                capacity: Some(Capacity { cpu_millis: capacity.cpu_millis, memory_bytes: capacity.memory_bytes }),
                docker_version: self.docker_version.clone(),
                ingress_http_port: self.ingress.as_ref().map_or(0, |i| u32::from(i.http_port)),
                ingress_https_port: self.ingress.as_ref().map_or(0, |i| u32::from(i.https_port)),
                ingress_host: self.ingress.as_ref().and_then(|i| i.advertise_host.clone()).unwrap_or_default(),
            })),
        }
    }

    /// One session attempt with `addr`, until it ends.
    async fn attempt(
        &mut self,
        addr: &str,
        sampler: &mut HostSampler,
        containers: &watch::Receiver<Vec<ContainerMetrics>>,
        stop: watch::Receiver<bool>,
    ) -> Result<Ended, AgentError> {
        let c = &self.credentials;
        let tls = controller_client_config(&ServerTrust::Ca(c.ca_pem.clone()), Some((&c.cert_pem, &c.key_pem)))
            .map_err(|e| AgentError::Identity(format!("cannot use the agent's certificate: {e}")))?;
        let channel = match grpc_client::channel(addr, tls) {
            Ok(channel) => channel,
            Err(e) => return Ok(Ended::Failed(format!("invalid controller address {addr}: {e}"))),
        };
        let mut client = AgentClient::new(channel).max_decoding_message_size(MESSAGE_MAX);
        let (tx, rx) = mpsc::channel::<AgentMessage>(16);
        let _ = tx.try_send(self.hello(sampler));
        let open = tokio::time::timeout(OPEN_TIMEOUT, client.session(ReceiverStream::new(rx)));
        let mut inbound = tokio::select! {
            opened = open => match opened {
                Err(_) => return Ok(Ended::Failed("the controller did not answer within 10 s".into())),
                Ok(Err(status)) => return self.refused(status),
                Ok(Ok(response)) => response.into_inner(),
            },
            _ = until_stopped(stop.clone()) => return Ok(Ended::Shutdown),
        };
        let first = tokio::select! {
            first = tokio::time::timeout(OPEN_TIMEOUT, inbound.message()) => first,
            _ = until_stopped(stop.clone()) => return Ok(Ended::Shutdown),
        };
        match first {
            Err(_) => return Ok(Ended::Failed("the controller did not welcome the session within 10 s".into())),
            Ok(Err(status)) => return self.refused(status),
            Ok(Ok(None)) => return Ok(Ended::Failed("the controller closed the session at once".into())),
            Ok(Ok(Some(message))) => match message.body {
                Some(ControllerBody::Redirect(r)) => {
                    self.learn_controllers(r.controllers);
                    let leader = Some(r.leader).filter(|l| !l.is_empty() && !same_addr(l, addr));
                    return Ok(Ended::Redirect(leader));
                }
                Some(ControllerBody::Welcome(w)) => {
                    tracing::info!(controller = %addr, agent = %w.agent_id, "in session with the leader");
                    self.learn_controllers(w.controllers);
                    self.tasks.session_started();
                }
                _ => {
                    return Ok(Ended::Failed("the controller's first message was neither welcome nor redirect".into()))
                }
            },
        }

        let mut heartbeat = tokio::time::interval(self.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seq = 0u64;
        let mut acked = 0u64;
        // When waiting deployment progress goes out.
        let mut flush_at: Option<tokio::time::Instant> = None;
        // A key waiting for its certificate, and when it was asked for.
        let mut renewing: Option<(String, tokio::time::Instant)> = None;
        loop {
            tokio::select! {
                _ = heartbeat.tick() => {
                    if seq.saturating_sub(acked) >= UNACKED_LIMIT {
                        return Ok(Ended::Dropped(format!("no answer to the last {UNACKED_LIMIT} heartbeats")));
                    }
                    seq += 1;
                    let host = sampler.sample();
                    let message = AgentMessage {
                        body: Some(AgentBody::Heartbeat(Heartbeat {
                            seq,
                            host: Some(HostMetrics {
                                cpu_percent: host.cpu_percent,
                                load1: host.load1,
                                load5: host.load5,
                                load15: host.load15,
                                memory_used_bytes: host.memory_used_bytes,
                                memory_total_bytes: host.memory_total_bytes,
                                disk_used_bytes: host.disk_used_bytes,
                                disk_total_bytes: host.disk_total_bytes,
                                net_rx_bytes: host.net_rx_bytes,
                                net_tx_bytes: host.net_tx_bytes,
                            }),
                            containers: containers.borrow().clone(),
                        })),
                    };
                    if tx.send(message).await.is_err() {
                        return Ok(Ended::Dropped("the outgoing stream closed".into()));
                    }
                    let stuck = renewing.as_ref().is_some_and(|(_, at)| at.elapsed() > Duration::from_secs(30));
                    if (renewing.is_none() || stuck) && self.renewal_due()? {
                        let (key_pem, csr_pem) =
                            pki::generate_key_and_csr().map_err(|e| AgentError::Identity(e.to_string()))?;
                        tracing::info!("asking for a new certificate");
                        let ask = AgentMessage { body: Some(AgentBody::RenewCertificate(RenewCertificate { csr_pem })) };
                        if tx.send(ask).await.is_err() {
                            return Ok(Ended::Dropped("the outgoing stream closed".into()));
                        }
                        renewing = Some((key_pem, tokio::time::Instant::now()));
                    }
                }
                // Deployment progress goes out in batches: lines that arrive together (a build's
                // output) share a message, and so one commit on the controller.
                _ = self.tasks.ready.notified(), if flush_at.is_none() => {
                    flush_at = Some(tokio::time::Instant::now() + FLUSH_DELAY);
                }
                _ = tokio::time::sleep_until(flush_at.unwrap_or_else(tokio::time::Instant::now)), if flush_at.is_some() => {
                    flush_at = None;
                    for message in self.tasks.drain() {
                        if tx.send(message).await.is_err() {
                            return Ok(Ended::Dropped("the outgoing stream closed".into()));
                        }
                    }
                }
                message = inbound.message() => match message {
                    Ok(Some(m)) => match m.body {
                        Some(ControllerBody::CertificateIssued(issued)) => {
                            let Some((key_pem, _)) = renewing.take() else { continue };
                            self.install_certificate(key_pem, issued.cert_pem)?;
                        }
                        Some(ControllerBody::Redirect(r)) => {
                            self.learn_controllers(r.controllers);
                            return Ok(Ended::Redirect(Some(r.leader).filter(|l| !l.is_empty())));
                        }
                        Some(ControllerBody::HeartbeatAck(a)) => acked = acked.max(a.seq.min(seq)),
                        Some(ControllerBody::RunDeployment(run)) => self.tasks.run(run),
                        Some(ControllerBody::UpdateAck(ack)) => self.tasks.acked(ack),
                        Some(ControllerBody::UploadChunk(chunk)) => self.tasks.upload_chunk(chunk),
                        Some(ControllerBody::StopService(stop)) => self.tasks.stop_service(stop),
                        Some(ControllerBody::DestroyPreview(destroy)) => self.tasks.destroy_preview(destroy),
                        Some(ControllerBody::UpdateRoutes(update)) => self.apply_routes(update),
                        Some(ControllerBody::Welcome(_)) | None => {}
                    },
                    Ok(None) => return Ok(Ended::Dropped("the controller ended the session".into())),
                    Err(status) => {
                        if let Ended::Failed(why) = self.refused(status)? {
                            return Ok(Ended::Dropped(why));
                        }
                    }
                },
                _ = until_stopped(stop.clone()) => return Ok(Ended::Shutdown),
            }
        }
    }

    /// Applies a route table off the session loop (resolving instances asks Docker) and tells
    /// the leader when it is in force.
    fn apply_routes(&self, update: deployer_proto::agent::UpdateRoutes) {
        let version = update.version;
        let Some(ingress) = self.ingress.clone() else {
            let error = "this agent runs no ingress (--ingress-http none)".to_string();
            self.tasks.send(AgentMessage { body: Some(AgentBody::RoutesApplied(RoutesApplied { version, error })) });
            return;
        };
        let tasks = self.tasks.clone();
        tokio::spawn(async move {
            let problems = ingress.apply(update).await;
            for problem in &problems {
                tracing::warn!(%problem, "ingress");
            }
            let error = problems.join("; ");
            tasks.send(AgentMessage { body: Some(AgentBody::RoutesApplied(RoutesApplied { version, error })) });
            ingress.keep().await;
        });
    }

    /// A session refused or broken by `status`: revoked is final, the rest is retried.
    fn refused(&self, status: tonic::Status) -> Result<Ended, AgentError> {
        if status.code() == tonic::Code::PermissionDenied {
            return Err(AgentError::Revoked(format!(
                "the cluster refused agent {}: {}",
                self.credentials.agent_id,
                status.message()
            )));
        }
        Ok(Ended::Failed(describe(&status)))
    }

    fn renewal_due(&self) -> Result<bool, AgentError> {
        Ok(OffsetDateTime::now_utc() >= self.credentials.renew_at()?)
    }

    fn install_certificate(&mut self, key_pem: String, cert_pem: String) -> Result<(), AgentError> {
        let der = deployer_common::tls::certs_from_pem(&cert_pem)
            .map_err(|e| AgentError::Identity(format!("the controller sent an invalid certificate: {e}")))?;
        match pki::identity_of_cert_der(der[0].as_ref()) {
            Ok(pki::Identity::Agent(id)) if id == self.credentials.agent_id => {}
            _ => return Err(AgentError::Identity("the controller sent a certificate for another identity".into())),
        }
        self.paths.save_renewed(&key_pem, &cert_pem)?;
        self.credentials.key_pem = key_pem;
        self.credentials.cert_pem = cert_pem;
        tracing::info!(valid_until = %self.credentials.not_after()?, "installed a renewed certificate");
        Ok(())
    }

    fn learn_controllers(&mut self, controllers: Vec<String>) {
        if controllers.is_empty() || controllers == self.state.controllers {
            return;
        }
        self.state.controllers = controllers;
        if let Err(e) = self.paths.save_state(&self.state) {
            tracing::warn!(error = %e, "cannot remember the controllers' addresses");
        }
    }
}
