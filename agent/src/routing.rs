//! The agent's side of ingress: it listens, applies the route tables the leader pushes (resolving
//! the deployments that run here to their instances' addresses) and, when a release replaces
//! another, holds the old instances until no route points at them and their requests are done.
//!
//! The proxy itself is [`crate::ingress`]; this module only feeds it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use deployer_proto::agent::UpdateRoutes;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::docker::Docker;
use crate::ingress::{CertifiedHost, Proxy, ProxySettings, Route, RouteTable};
use crate::runtime::{self, LocalBackend};

/// How long a replaced release waits for the leader's new routes before it is stopped anyway.
const ROUTES_WAIT: Duration = Duration::from_secs(10);
/// How often draining looks at the requests in flight.
const DRAIN_POLL: Duration = Duration::from_millis(20);
/// The last table from a leader, in the data dir, served again after a restart until a leader
/// sends its own. It holds certificate keys: mode 0600.
const SAVED_TABLE: &str = "ingress-routes.pb";

/// Where the ingress listens.
#[derive(Clone, Debug)]
pub struct IngressConfig {
    /// Plain HTTP (None: no ingress at all).
    pub http: Option<SocketAddr>,
    /// HTTPS (None: none).
    pub https: Option<SocketAddr>,
    /// The host other agents reach this one's ingress at (None: what the controller sees).
    pub advertise_host: Option<String>,
    /// How long a replaced instance may finish its requests in flight before it is stopped.
    pub drain_grace: Duration,
    /// Threads serving connections.
    pub threads: usize,
    /// When a port cannot be bound (taken, or below 1024 without the right), take a free one
    /// on the same address instead (dev mode).
    pub fallback_to_free_port: bool,
}

impl Default for IngressConfig {
    fn default() -> IngressConfig {
        IngressConfig {
            http: Some(SocketAddr::from(([0, 0, 0, 0], 80))),
            https: Some(SocketAddr::from(([0, 0, 0, 0], 443))),
            advertise_host: None,
            drain_grace: Duration::from_secs(30),
            threads: 2,
            fallback_to_free_port: false,
        }
    }
}

/// The running ingress.
pub struct Ingress {
    proxy: Arc<Proxy>,
    docker: Docker,
    agent_id: String,
    pub http_port: u16,
    pub https_port: u16,
    pub advertise_host: Option<String>,
    drain_grace: Duration,
    /// The last table applied, and the backends of this agent's deployments it resolved.
    applied: Mutex<Applied>,
    /// Bumped every time a table is applied.
    changed: watch::Sender<u64>,
    /// Where the last table is kept.
    saved_path: PathBuf,
    /// The version kept there (writes never go backwards); held while one is written.
    saved_version: tokio::sync::Mutex<u64>,
}

#[derive(Default)]
struct Applied {
    update: Option<UpdateRoutes>,
    local: Vec<LocalBackend>,
}

impl Ingress {
    /// Binds the listeners (a port that cannot be bound is an error that names it) and starts
    /// serving on threads of their own. Serving stops with `shutdown`.
    ///
    /// The table saved by the last run in `data_dir` is applied at once, so the services this
    /// agent routes answer even while no controller can be reached (see [`Ingress::restore`]).
    pub async fn start(
        config: &IngressConfig,
        docker: Docker,
        agent_id: String,
        data_dir: &Path,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Option<Arc<Ingress>>, crate::AgentError> {
        let Some(http_addr) = config.http else { return Ok(None) };
        let fallback = config.fallback_to_free_port;
        let bind = |addr: SocketAddr, what: &'static str| async move {
            let bound = match TcpListener::bind(addr).await {
                Err(e) if fallback => {
                    tracing::info!(%addr, error = %e, "cannot bind the {what} ingress port; taking a free one");
                    TcpListener::bind(SocketAddr::new(addr.ip(), 0)).await
                }
                bound => bound,
            };
            bound.map_err(|e| {
                crate::AgentError::Config(format!(
                    "the ingress cannot listen for {what} on {addr}: {e} (choose another with --ingress-{})",
                    what.to_ascii_lowercase()
                ))
            })
        };
        let http = bind(http_addr, "HTTP").await?;
        let https = match config.https {
            Some(addr) => Some(bind(addr, "HTTPS").await?),
            None => None,
        };
        let http_port = http.local_addr().map(|a| a.port()).unwrap_or_default();
        let https_port = https.as_ref().and_then(|l| l.local_addr().ok()).map(|a| a.port()).unwrap_or_default();
        let settings = ProxySettings { https_port: (https_port != 0).then_some(https_port), ..Default::default() };
        let proxy = Proxy::new(settings);
        let threads = config.threads.max(1);
        let stopped = |mut stop: watch::Receiver<bool>| async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        {
            let proxy = proxy.clone();
            let stop = stopped(shutdown.clone());
            tokio::spawn(async move {
                if let Err(e) = proxy.serve_threads(http, threads, stop).await {
                    tracing::error!(error = %e, "the HTTP ingress stopped");
                }
            });
        }
        if let Some(https) = https {
            let proxy = proxy.clone();
            let stop = stopped(shutdown);
            tokio::spawn(async move {
                if let Err(e) = proxy.serve_tls_threads(https, threads, stop).await {
                    tracing::error!(error = %e, "the HTTPS ingress stopped");
                }
            });
        }
        tracing::info!(http = http_port, https = https_port, "ingress listening");
        let ingress = Arc::new(Ingress {
            proxy,
            docker,
            agent_id,
            http_port,
            https_port,
            advertise_host: config.advertise_host.clone(),
            drain_grace: config.drain_grace,
            applied: Mutex::new(Applied::default()),
            changed: watch::channel(0).0,
            saved_path: data_dir.join(SAVED_TABLE),
            saved_version: tokio::sync::Mutex::new(0),
        });
        ingress.restore().await;
        Ok(Some(ingress))
    }

    /// Applies the table saved by the last run, as version 0 so that the first one a leader
    /// sends replaces it. Until then this agent routes what it routed when it stopped, to the
    /// instances that run here now: a host rebooted while the controllers are unreachable
    /// serves its services again as soon as Docker has restarted their containers (and the
    /// controllers' view replaces a stale table the moment a session is up).
    async fn restore(&self) {
        let path = &self.saved_path;
        let bytes = match tokio::fs::read(path).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the saved route table; starting with none");
                return;
            }
        };
        let mut update = match UpdateRoutes::decode(bytes.as_slice()) {
            Ok(update) => update,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "the saved route table does not decode; starting with none");
                return;
            }
        };
        update.version = 0;
        let routes = update.routes.len();
        for problem in self.apply(update).await {
            tracing::warn!(%problem, "ingress (saved table)");
        }
        tracing::info!(routes, "serving the route table saved by the last run until a leader sends its own");
    }

    /// Keeps the table in force in the data dir (atomically, 0600), unless it is the saved one
    /// or older than what is there. Called once a table is in force and acknowledged, so the
    /// write never delays a switch of routes.
    pub async fn keep(&self) {
        let mut saved = self.saved_version.lock().await;
        let Some(update) = self.lock().update.clone() else { return };
        if update.version == 0 || update.version <= *saved {
            return;
        }
        let (path, bytes) = (self.saved_path.clone(), update.encode_to_vec());
        let written =
            tokio::task::spawn_blocking(move || deployer_common::files::write_atomic(&path, &bytes, true)).await;
        match written {
            Ok(Ok(())) => *saved = update.version,
            Ok(Err(e)) => tracing::warn!(file = %self.saved_path.display(), error = %e, "cannot save the route table"),
            Err(e) => tracing::warn!(error = %e, "saving the route table stopped"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Applied> {
        self.applied.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies a table from the leader: routes, certificates and ACME answers together. A table
    /// older than the one applied is ignored. Returns what could not be applied (certificates
    /// that do not parse, peers that do not resolve), for the leader's log.
    pub async fn apply(&self, update: UpdateRoutes) -> Vec<String> {
        if self.lock().update.as_ref().is_some_and(|u| u.version > update.version) {
            return Vec::new();
        }
        let local = match runtime::running_backends(&self.docker, &self.agent_id).await {
            Ok(local) => local,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the running instances; keeping the ones known");
                self.lock().local.clone()
            }
        };
        let mut problems = Vec::new();
        let mut peers: HashMap<String, Vec<SocketAddr>> = HashMap::new();
        for peer in update.routes.iter().flat_map(|r| &r.peers) {
            if peers.contains_key(peer) {
                continue;
            }
            let resolved = match tokio::net::lookup_host(peer.as_str()).await {
                Ok(addrs) => addrs.collect(),
                Err(e) => {
                    problems.push(format!("cannot resolve the agent ingress {peer}: {e}"));
                    Vec::new()
                }
            };
            peers.insert(peer.clone(), resolved);
        }
        let routes = table(&update, &local, &peers);
        let certificates = update
            .certificates
            .iter()
            .map(|c| CertifiedHost {
                names: c.names.clone(),
                cert_chain_pem: c.cert_chain_pem.clone(),
                key_pem: c.key_pem.clone(),
                redirect: c.redirect_http,
            })
            .collect();
        let challenges = update.challenges.iter().map(|c| (c.token.clone(), c.key_authorization.clone())).collect();
        let mut applied = self.lock();
        if applied.update.as_ref().is_some_and(|u| u.version > update.version) {
            return Vec::new();
        }
        problems.extend(self.proxy.set_certificates(certificates));
        self.proxy.set_challenges(challenges);
        self.proxy.set_routes(routes);
        let version = update.version;
        applied.update = Some(update);
        applied.local = local;
        drop(applied);
        self.changed.send_replace(version);
        problems
    }

    /// Resolves this agent's instances again (one was restarted and may have a new address)
    /// and re-applies the last table.
    pub async fn refresh(&self) {
        let last = self.lock().update.clone();
        if let Some(update) = last {
            for problem in self.apply(update).await {
                tracing::warn!(%problem, "ingress");
            }
        }
    }

    /// The version of the table applied last (0: none yet).
    pub fn version(&self) -> u64 {
        *self.changed.borrow()
    }

    /// Waits until the instances of `service_id` in `preview` ("": the service's own release)
    /// other than `keep`'s are out of every route of this agent (for at most [`ROUTES_WAIT`]),
    /// then until they have no request in flight (for at most the drain grace). The caller stops
    /// them afterwards. Another preview's instances, or the service's own, are not waited for.
    pub async fn release(&self, service_id: &str, preview: &str, keep: Option<&str>) {
        let routed_elsewhere = |applied: &Applied| {
            applied.update.as_ref().is_none_or(|u| !routes_old_instances(u, service_id, preview, keep))
        };
        let mut changed = self.changed.subscribe();
        let waited = tokio::time::timeout(ROUTES_WAIT, async {
            loop {
                if routed_elsewhere(&self.lock()) {
                    return;
                }
                if changed.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        if waited.is_err() {
            let service = service_id;
            tracing::warn!(%service, %preview, "no new routes from the leader; stopping the old instances anyway");
        }
        let old: Vec<SocketAddr> = match runtime::running_backends(&self.docker, &self.agent_id).await {
            Ok(all) => old_instances(&all, service_id, preview, keep),
            Err(_) => Vec::new(),
        };
        if old.is_empty() {
            return;
        }
        let drained = tokio::time::timeout(self.drain_grace, async {
            while self.proxy.in_flight(&old) > 0 {
                tokio::time::sleep(DRAIN_POLL).await;
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(service = %service_id, grace = ?self.drain_grace, "requests still in flight after the drain grace");
        }
    }
}

/// Whether `update` still sends requests for `service_id` in `preview` to this agent's instances
/// of a deployment other than `keep`.
fn routes_old_instances(update: &UpdateRoutes, service_id: &str, preview: &str, keep: Option<&str>) -> bool {
    update.routes.iter().any(|r| {
        r.service_id == service_id && r.preview == preview && r.local && Some(r.deployment_id.as_str()) != keep
    })
}

/// The addresses of this agent's instances of `service_id` in `preview` other than `keep`'s.
fn old_instances(local: &[LocalBackend], service_id: &str, preview: &str, keep: Option<&str>) -> Vec<SocketAddr> {
    local
        .iter()
        .filter(|b| b.service == service_id && b.preview == preview && Some(b.deployment.as_str()) != keep)
        .map(|b| b.addr)
        .collect()
}

/// The proxy's table for an update: a route served here balances over this agent's instances
/// of its deployment; any other goes to the ingress of the agents that run it.
fn table(update: &UpdateRoutes, local: &[LocalBackend], peers: &HashMap<String, Vec<SocketAddr>>) -> RouteTable {
    let routes = update
        .routes
        .iter()
        .map(|r| Route {
            host: r.host.clone(),
            service: r.service.clone(),
            via_peer: !r.local,
            backends: if r.local {
                local.iter().filter(|b| b.deployment == r.deployment_id).map(|b| b.addr).collect()
            } else {
                r.peers.iter().flat_map(|p| peers.get(p).into_iter().flatten().copied()).collect()
            },
        })
        .collect();
    RouteTable::new(routes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use deployer_proto::agent::Route as RouteMessage;

    fn backend(deployment: &str, port: u16) -> LocalBackend {
        LocalBackend {
            deployment: deployment.into(),
            service: "s1".into(),
            preview: String::new(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn local_route(deployment: &str, preview: &str) -> RouteMessage {
        RouteMessage {
            host: format!("{deployment}.example.com"),
            service_id: "s1".into(),
            deployment_id: deployment.into(),
            local: true,
            preview: preview.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_release_waits_only_for_the_routes_of_its_own_preview() {
        // The service's own release d1 and preview pr-1's release p1 are both routed here.
        let update = UpdateRoutes {
            version: 1,
            routes: vec![local_route("d1", ""), local_route("p1", "pr-1")],
            ..Default::default()
        };
        // A new release of the service (d2): the route to d1 holds it, the preview's does not.
        assert!(routes_old_instances(&update, "s1", "", Some("d2")));
        assert!(!routes_old_instances(&update, "s1", "", Some("d1")));
        // A new release of the preview (p2): only the route to p1 holds it.
        assert!(routes_old_instances(&update, "s1", "pr-1", Some("p2")));
        assert!(!routes_old_instances(&update, "s1", "pr-1", Some("p1")));
        assert!(!routes_old_instances(&update, "s1", "pr-2", None), "another preview has no route");
        assert!(!routes_old_instances(&update, "s2", "", None), "another service");
        let remote =
            UpdateRoutes { routes: vec![RouteMessage { local: false, ..local_route("d1", "") }], ..Default::default() };
        assert!(!routes_old_instances(&remote, "s1", "", Some("d2")), "served by another agent");
    }

    #[test]
    fn a_release_drains_only_its_own_previews_instances() {
        let preview =
            |deployment: &str, port: u16| LocalBackend { preview: "pr-1".into(), ..backend(deployment, port) };
        let local = [backend("d1", 4001), backend("d2", 4002), preview("p1", 4003), preview("p2", 4004)];
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(old_instances(&local, "s1", "", Some("d2")), [addr(4001)]);
        assert_eq!(old_instances(&local, "s1", "pr-1", Some("p2")), [addr(4003)]);
        assert_eq!(old_instances(&local, "s1", "pr-1", None), [addr(4003), addr(4004)]);
        assert_eq!(old_instances(&local, "s1", "pr-2", None), Vec::<SocketAddr>::new());
        assert_eq!(old_instances(&local, "s2", "", None), Vec::<SocketAddr>::new());
    }

    #[test]
    fn local_routes_use_the_deployments_instances_and_remote_ones_the_peers() {
        let update = UpdateRoutes {
            version: 1,
            routes: vec![
                RouteMessage {
                    host: "web-shop.example.com".into(),
                    service_id: "s1".into(),
                    service: "web.shop".into(),
                    deployment_id: "d2".into(),
                    local: true,
                    peers: vec![],
                    preview: String::new(),
                },
                RouteMessage {
                    host: "api-shop.example.com".into(),
                    service_id: "s2".into(),
                    service: "api.shop".into(),
                    deployment_id: "d9".into(),
                    local: false,
                    peers: vec!["10.0.0.2:80".into()],
                    preview: String::new(),
                },
            ],
            ..Default::default()
        };
        let local = [backend("d1", 4001), backend("d2", 4002), backend("d2", 4003)];
        let peers = HashMap::from([("10.0.0.2:80".to_string(), vec![SocketAddr::from(([10, 0, 0, 2], 80))])]);
        let table = table(&update, &local, &peers);
        assert_eq!(
            table.get("web-shop.example.com").map(|r| r.backends.clone()),
            Some(vec![SocketAddr::from(([127, 0, 0, 1], 4002)), SocketAddr::from(([127, 0, 0, 1], 4003))])
        );
        assert_eq!(
            table.get("api-shop.example.com").map(|r| r.backends.clone()),
            Some(vec![SocketAddr::from(([10, 0, 0, 2], 80))])
        );
        assert!(table.get("other.example.com").is_none());
    }
}
