//! Ingress on the controller side: host names, and the route tables the leader computes for
//! every agent and pushes over its session whenever something they depend on is committed.
//!
//! Every service with a running deployment answers at `<service>-<project>.<base domain>` and at
//! its custom domains. An agent serves a host itself when the deployment runs on it, and
//! forwards to the ingress of the agent that runs it otherwise. Default host names get
//! certificates from the ingress CA (a CA of its own, never the cluster CA); custom domains get
//! theirs by ACME (see [`crate::acme`] and [`certify`]).

pub mod certify;

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use deployer_common::pki::ClusterCa;
use deployer_proto::agent::controller_message::Body as ControllerBody;
use deployer_proto::agent::{Certificate, Challenge, ControllerMessage, Route, UpdateRoutes};
use tokio::sync::broadcast;

use crate::command::Command;
use crate::controller::{Controller, SharedController};
use crate::store::queries::RoutedRow;
use crate::store::state_machine::StateEvent;
use crate::util::now_ms;

/// A DNS label's limit.
const MAX_LABEL: usize = 63;
/// How long the default host names' certificates are valid; renewed with a third left.
const DEFAULT_CERT_VALIDITY: Duration = Duration::from_secs(90 * 24 * 3600);
/// How often the tables are recomputed even when nothing was committed (new sessions, retries).
const RECHECK: Duration = Duration::from_secs(5);

#[derive(Clone, Debug)]
pub struct IngressSettings {
    /// `DEPLOYER_BASE_DOMAIN`: services answer at `<service>-<project>.<base>`.
    pub base_domain: String,
    /// Where custom domains get their certificates (None: they are served over plain HTTP).
    pub acme: Option<crate::acme::AcmeConfig>,
}

impl Default for IngressSettings {
    fn default() -> IngressSettings {
        IngressSettings { base_domain: "localhost".into(), acme: None }
    }
}

/// The leader's ingress state: what it sent to whom, the certificates it made, the ACME answers
/// it publishes.
pub struct Ingress {
    pub settings: IngressSettings,
    wake: tokio::sync::Notify,
    counter: AtomicU64,
    /// The Raft term of the last table pushed (versions start with it).
    term: AtomicU64,
    inner: Mutex<Inner>,
    /// Bumped when an agent reports a table applied: (agent, version).
    applied: tokio::sync::watch::Sender<(String, u64)>,
}

#[derive(Default)]
struct Inner {
    /// Per agent: the session serial and the fingerprint of the last table sent on it.
    sent: HashMap<String, (u64, u64)>,
    /// Default host certificates by host: (cert, key, renew after ms).
    default_certs: HashMap<String, (String, String, i64)>,
    /// ACME HTTP-01 answers being published: token -> key authorization.
    challenges: BTreeMap<String, String>,
    /// The version of the last table each agent applied.
    applied: HashMap<String, u64>,
    /// Releases routed before their `running` is committed, by service id and preview (see
    /// [`pin_running`]).
    pins: HashMap<(String, String), RoutedRow>,
    /// Bumped by [`Ingress::sync`]: tables computed after it hold what it waits for.
    generation: u64,
    /// Per agent: the generation and version of the last table sent.
    sent_generation: HashMap<String, (u64, u64)>,
}

impl Ingress {
    pub fn new(settings: IngressSettings) -> Ingress {
        Ingress {
            settings,
            wake: tokio::sync::Notify::new(),
            counter: AtomicU64::new(0),
            term: AtomicU64::new(0),
            inner: Mutex::default(),
            applied: tokio::sync::watch::channel((String::new(), 0)).0,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Something changed that the committed state does not show (a new session, a challenge):
    /// recompute now.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// The default host name of a service (`preview` "": its own; else one of its previews).
    pub fn default_host(&self, service: &str, project: &str, preview: &str) -> String {
        format!("{}.{}", host_label(service, project, preview), self.settings.base_domain)
    }

    /// An agent applied the table of `version`.
    pub fn applied(&self, agent_id: &str, version: u64) {
        self.lock().applied.insert(agent_id.to_string(), version);
        self.applied.send_replace((agent_id.to_string(), version));
    }

    /// Waits until `agent_id` applied a table of at least `version`.
    pub async fn wait_applied(&self, agent_id: &str, version: u64, max: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        tokio::time::timeout(max, async {
            loop {
                if self.lock().applied.get(agent_id).is_some_and(|v| *v >= version) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        })
        .await
        .is_ok()
    }

    /// Publishes an ACME answer on every agent; returns once they all applied it (or after
    /// `max`).
    pub async fn publish_challenge(
        &self,
        token: &str,
        key_authorization: &str,
        max: Duration,
        sessions: &[(String, u64)],
    ) {
        self.lock().challenges.insert(token.to_string(), key_authorization.to_string());
        self.sync(max, sessions).await;
    }

    /// Sends every agent in session a fresh table and waits (at most `max`) until they all
    /// applied it.
    async fn sync(&self, max: Duration, sessions: &[(String, u64)]) {
        let generation = {
            let mut inner = self.lock();
            inner.generation += 1;
            inner.sent.clear();
            inner.generation
        };
        self.wake();
        // The tables go out from the loop: wait until it sent each agent one computed after now.
        let deadline = tokio::time::Instant::now() + max;
        for (agent, _) in sessions {
            let version = loop {
                let sent = self.lock().sent_generation.get(agent).copied();
                match sent {
                    Some((g, version)) if g >= generation => break Some(version),
                    _ if tokio::time::Instant::now() >= deadline => break None,
                    _ => tokio::time::sleep(Duration::from_millis(1)).await,
                }
            };
            let Some(version) = version else { return };
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.wait_applied(agent, version, left).await;
        }
    }

    pub fn unpin(&self, service_id: &str, preview: &str) {
        if self.lock().pins.remove(&(service_id.to_string(), preview.to_string())).is_some() {
            self.wake();
        }
    }

    pub fn withdraw_challenge(&self, token: &str) {
        self.lock().challenges.remove(token);
        self.wake();
    }

    /// A version above every earlier one, across leaders too (the term leads).
    fn next_version(&self, term: u64) -> u64 {
        self.term.store(term, Ordering::SeqCst);
        let n = self.counter.fetch_add(1, Ordering::SeqCst) + 1;
        (term << 32) | (n & 0xffff_ffff)
    }
}

/// `<service>-<project>`, shortened with a hash of the whole when it is longer than a DNS label.
pub fn default_label(service: &str, project: &str) -> String {
    let label = format!("{service}-{project}");
    if label.len() <= MAX_LABEL {
        return label;
    }
    let digest = hex::encode(&ring::digest::digest(&ring::digest::SHA256, label.as_bytes()).as_ref()[..4]);
    let keep = label[..MAX_LABEL - digest.len() - 1].trim_end_matches('-');
    format!("{keep}-{digest}")
}

/// `<service>-<project>`, or `<service>-<project>-<preview>` for a preview, within a DNS label.
pub fn host_label(service: &str, project: &str, preview: &str) -> String {
    if preview.is_empty() {
        default_label(service, project)
    } else {
        default_label(service, &format!("{project}-{preview}"))
    }
}

/// The URL a running deployment answers at: its service's default host, through the ingress
/// of the agent that runs it.
pub fn url_for(ingress: &Ingress, service: &str, project: &str, preview: &str, agent_ingress: &str) -> Option<String> {
    if agent_ingress.is_empty() {
        return None;
    }
    let host = ingress.default_host(service, project, preview);
    let port = agent_ingress.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok()).unwrap_or(80);
    Some(if port == 80 { format!("http://{host}") } else { format!("http://{host}:{port}") })
}

/// How a deployment that runs on `agent_id` is routed: its service's and project's names and the
/// agent's ingress (None when one of them is gone).
pub async fn routed_row(c: &Controller, d: &crate::store::queries::DeploymentRow, agent_id: &str) -> Option<RoutedRow> {
    let service = c.state.service(&d.project_id, &d.service_id).await.ok()??;
    let project = c.state.project(&d.project_id).await.ok()??;
    let ingress = c.state.agent_ingress(agent_id).await.ok()??;
    Some(RoutedRow {
        service_id: d.service_id.clone(),
        service_name: service.name,
        project_name: project.name,
        deployment_id: d.id.clone(),
        agent_id: agent_id.to_string(),
        ingress,
        ingress_https_port: 0,
        preview: d.preview.clone(),
    })
}

/// Routes a service to a release whose instances just turned healthy (`row`), before its
/// `running` is committed, and waits (at most `max`) until every agent in session serves it:
/// once the API says `running`, its URL answers everywhere. The caller unpins after the commit.
pub async fn pin_running(c: &Controller, row: RoutedRow, max: Duration) {
    c.ingress.lock().pins.insert((row.service_id.clone(), row.preview.clone()), row);
    c.ingress.sync(max, &c.agents.all_sessions()).await;
}

/// The leader's loop: recomputes and pushes the agents' tables after every commit that changes
/// what they route by, and every few seconds for sessions that just started.
pub async fn run(c: SharedController, mut events: broadcast::Receiver<StateEvent>) {
    loop {
        if c.agents.is_active() {
            if let Err(e) = push(&c).await {
                tracing::warn!(error = %format!("{e:#}"), "cannot compute the ingress routes");
            }
        } else {
            c.ingress.lock().sent.clear();
        }
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(StateEvent::DeploymentLogs { .. } | StateEvent::PreviewsChanged) => continue,
                    Ok(
                        StateEvent::DeploymentChanged { .. } | StateEvent::IngressChanged | StateEvent::AgentRevoked(_),
                    ) => return true,
                    Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        };
        tokio::select! {
            open = wait => if !open { return },
            _ = c.ingress.wake.notified() => {}
            _ = tokio::time::sleep(RECHECK) => {}
        }
    }
}

/// Computes every agent's table and sends those that changed.
async fn push(c: &Controller) -> anyhow::Result<()> {
    let sessions = c.agents.all_sessions();
    if sessions.is_empty() {
        return Ok(());
    }
    // Pinned releases first: of two rows of a service, the first is routed.
    let (pins, generation) = {
        let inner = c.ingress.lock();
        (inner.pins.values().cloned().collect::<Vec<RoutedRow>>(), inner.generation)
    };
    let routed: Vec<RoutedRow> = pins.into_iter().chain(c.state.routed_services().await?).collect();
    let mut domains: HashMap<String, Vec<String>> = HashMap::new();
    for (domain, service_id) in c.state.service_domains().await? {
        domains.entry(service_id).or_default().push(domain);
    }
    let mut certificates = default_certificates(c, &routed).await?;
    certificates.extend(certify::custom_certificates(c).await?);
    certificates.sort_by(|a, b| a.names.cmp(&b.names));
    let challenges: Vec<Challenge> = c
        .ingress
        .lock()
        .challenges
        .iter()
        .map(|(token, key_authorization)| Challenge {
            token: token.clone(),
            key_authorization: key_authorization.clone(),
        })
        .collect();
    let term = c.raft.metrics().borrow().current_term;
    let mut seen = std::collections::HashSet::new();
    for (agent_id, serial) in sessions {
        let routes = routes_for(&c.ingress, &agent_id, &routed, &domains, &mut seen);
        let fingerprint = {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            for r in &routes {
                (&r.host, &r.service_id, &r.deployment_id, r.local, &r.peers, &r.preview).hash(&mut h);
            }
            for cert in &certificates {
                (&cert.names, &cert.cert_chain_pem).hash(&mut h);
            }
            for ch in &challenges {
                (&ch.token, &ch.key_authorization).hash(&mut h);
            }
            h.finish()
        };
        {
            let mut inner = c.ingress.lock();
            if inner.sent.get(&agent_id) == Some(&(serial, fingerprint)) {
                // What it has is current: it counts as sent for this generation.
                if let Some(sent) = inner.sent_generation.get_mut(&agent_id) {
                    sent.0 = sent.0.max(generation);
                }
                continue;
            }
        }
        let version = c.ingress.next_version(term);
        let update =
            UpdateRoutes { version, routes, certificates: certificates.clone(), challenges: challenges.clone() };
        let message = ControllerMessage { body: Some(ControllerBody::UpdateRoutes(update)) };
        if c.agents.send(&agent_id, serial, message) {
            let mut inner = c.ingress.lock();
            inner.sent.insert(agent_id.clone(), (serial, fingerprint));
            inner.sent_generation.insert(agent_id, (generation, version));
        }
    }
    Ok(())
}

/// One agent's routes: every running service's hosts, served here or forwarded.
fn routes_for(
    ingress: &Ingress,
    agent_id: &str,
    routed: &[RoutedRow],
    domains: &HashMap<String, Vec<String>>,
    seen: &mut std::collections::HashSet<(String, String)>,
) -> Vec<Route> {
    seen.clear();
    let mut routes = Vec::new();
    for row in routed {
        // The newest running deployment of a service (or of one of its previews) wins: there is
        // one but for an instant.
        if !seen.insert((row.service_id.clone(), row.preview.clone())) {
            continue;
        }
        let local = row.agent_id == agent_id;
        let peers = if local || row.ingress.is_empty() { Vec::new() } else { vec![row.ingress.clone()] };
        let service = format!("{}.{}", row.service_name, row.project_name);
        // Custom domains are the service's own release's; a preview answers at its host only.
        let custom = if row.preview.is_empty() { domains.get(&row.service_id) } else { None };
        let hosts = std::iter::once(ingress.default_host(&row.service_name, &row.project_name, &row.preview))
            .chain(custom.into_iter().flatten().cloned());
        for host in hosts {
            routes.push(Route {
                host,
                service_id: row.service_id.clone(),
                service: service.clone(),
                deployment_id: row.deployment_id.clone(),
                local,
                peers: peers.clone(),
                preview: row.preview.clone(),
            });
        }
    }
    routes.sort_by(|a, b| a.host.cmp(&b.host));
    routes
}

/// Certificates for the default host names of the running services, from the ingress CA
/// (made on first use and kept in the replicated state, so every leader signs with the same).
async fn default_certificates(c: &Controller, routed: &[RoutedRow]) -> anyhow::Result<Vec<Certificate>> {
    if routed.is_empty() {
        return Ok(Vec::new());
    }
    let now = now_ms();
    // A pinned release's host may also be a committed one's: each host once.
    let hosts: std::collections::BTreeSet<String> =
        routed.iter().map(|r| c.ingress.default_host(&r.service_name, &r.project_name, &r.preview)).collect();
    let due: Vec<&String> = {
        let inner = c.ingress.lock();
        hosts.iter().filter(|h| inner.default_certs.get(*h).is_none_or(|(_, _, renew)| *renew <= now)).collect()
    };
    if !due.is_empty() {
        let ca = ingress_ca(c).await?;
        let renew = now + (DEFAULT_CERT_VALIDITY.as_millis() as i64) * 2 / 3;
        let mut issued = Vec::with_capacity(due.len());
        for host in due {
            let (cert, key) = ca.issue_server_cert(std::slice::from_ref(host), DEFAULT_CERT_VALIDITY)?;
            issued.push((host.clone(), (cert, key, renew)));
        }
        c.ingress.lock().default_certs.extend(issued);
    }
    let inner = c.ingress.lock();
    Ok(hosts
        .iter()
        .filter_map(|h| inner.default_certs.get(h).map(|(cert, key, _)| (h, cert, key)))
        .map(|(h, cert, key)| Certificate {
            names: vec![h.clone()],
            cert_chain_pem: cert.clone(),
            key_pem: key.clone(),
            redirect_http: false,
        })
        .collect())
}

/// The ingress CA, made and committed by the first leader that needs it.
pub async fn ingress_ca(c: &Controller) -> anyhow::Result<ClusterCa> {
    if let Some((cert_pem, sealed)) = c.state.ingress_ca().await? {
        let key =
            c.key.open(&sealed, b"ingress-ca-key").map_err(|_| anyhow::anyhow!("cannot unseal the ingress CA"))?;
        return Ok(ClusterCa::from_pem(&cert_pem, &String::from_utf8(key)?)?);
    }
    let ca = ClusterCa::generate_named("Deployer ingress CA")?;
    let sealed = c.key.seal(ca.key_pem().as_bytes(), b"ingress-ca-key");
    let command = Command::SetIngressCa {
        cert_pem: ca.cert_pem().to_string(),
        key_sealed_hex: hex::encode(sealed),
        at: now_ms(),
    };
    c.propose(command).await?;
    // Another leader may have won the race: use what was committed.
    let (cert_pem, sealed) =
        c.state.ingress_ca().await?.ok_or_else(|| anyhow::anyhow!("the ingress CA was not recorded"))?;
    let key = c.key.open(&sealed, b"ingress-ca-key").map_err(|_| anyhow::anyhow!("cannot unseal the ingress CA"))?;
    Ok(ClusterCa::from_pem(&cert_pem, &String::from_utf8(key)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_labels_fit_in_a_dns_label_and_stay_distinct() {
        assert_eq!(default_label("web", "shop"), "web-shop");
        let long = default_label(&"a".repeat(40), &"b".repeat(40));
        assert_eq!(long.len(), MAX_LABEL);
        assert_ne!(long, default_label(&"a".repeat(40), &"b".repeat(39)));
        assert!(!long.contains("--"));
        let exact = default_label(&"a".repeat(31), &"b".repeat(31));
        assert_eq!(exact, format!("{}-{}", "a".repeat(31), "b".repeat(31)));
    }

    fn row(service: &str, deployment: &str, agent: &str, ingress: &str) -> RoutedRow {
        RoutedRow {
            service_id: format!("id-{service}"),
            service_name: service.into(),
            project_name: "shop".into(),
            deployment_id: deployment.into(),
            agent_id: agent.into(),
            ingress: ingress.into(),
            ingress_https_port: 0,
            preview: String::new(),
        }
    }

    #[test]
    fn an_agent_serves_what_it_runs_and_forwards_the_rest() {
        let ingress = Ingress::new(IngressSettings { base_domain: "apps.example.com".into(), acme: None });
        let routed = vec![
            row("web", "d2", "a1", "10.0.0.1:80"),
            row("web", "d1", "a2", "10.0.0.2:80"),
            row("api", "d3", "a2", "10.0.0.2:80"),
        ];
        let domains = HashMap::from([("id-web".to_string(), vec!["www.example.com".to_string()])]);
        let mut seen = Default::default();
        let on_a1 = routes_for(&ingress, "a1", &routed, &domains, &mut seen);
        let hosts: Vec<(&str, &str, bool, Vec<String>)> =
            on_a1.iter().map(|r| (r.host.as_str(), r.deployment_id.as_str(), r.local, r.peers.clone())).collect();
        assert_eq!(
            hosts,
            vec![
                ("api-shop.apps.example.com", "d3", false, vec!["10.0.0.2:80".to_string()]),
                ("web-shop.apps.example.com", "d2", true, vec![]),
                ("www.example.com", "d2", true, vec![]),
            ]
        );
        let on_a2 = routes_for(&ingress, "a2", &routed, &domains, &mut seen);
        assert!(on_a2.iter().any(|r| r.host == "web-shop.apps.example.com" && !r.local && r.peers == ["10.0.0.1:80"]));
        assert!(on_a2.iter().any(|r| r.host == "api-shop.apps.example.com" && r.local));
    }

    #[test]
    fn urls_name_the_port_only_when_it_is_not_the_default() {
        let ingress = Ingress::new(IngressSettings::default());
        assert_eq!(
            url_for(&ingress, "web", "shop", "", "127.0.0.1:8080").as_deref(),
            Some("http://web-shop.localhost:8080")
        );
        assert_eq!(url_for(&ingress, "web", "shop", "", "10.0.0.1:80").as_deref(), Some("http://web-shop.localhost"));
        assert_eq!(url_for(&ingress, "web", "shop", "", ""), None);
    }

    #[test]
    fn versions_grow_across_terms() {
        let ingress = Ingress::new(IngressSettings::default());
        let a = ingress.next_version(3);
        let b = ingress.next_version(3);
        let fresh = Ingress::new(IngressSettings::default());
        assert!(b > a);
        assert!(fresh.next_version(4) > b);
    }
}
