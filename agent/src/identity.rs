//! The agent's identity: joining with a token, and its key, certificate and CA under
//! `<data-dir>/tls/`.
//!
//! Files: `tls/agent.key` (0600), `tls/agent.crt`, `tls/ca.crt`, and `agent.json` (the agent's id
//! and the controllers it learned). A renewed key and certificate are written beside the old
//! ones and renamed into place, key first; a start that finds a half-finished renewal finishes it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use deployer_common::files::{ensure_private_dir, write_atomic};
use deployer_common::grpc_client;
use deployer_common::pki::{self, Identity};
use deployer_common::tls::{controller_client_config, ServerTrust};
use deployer_common::token::JoinToken;
use deployer_proto::agent::agent_client::AgentClient;
use deployer_proto::agent::JoinRequest;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::AgentError;

const STATE_FILE: &str = "agent.json";

/// Where the agent keeps what it needs to reconnect.
#[derive(Clone, Debug)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn tls(&self) -> PathBuf {
        self.dir.join("tls")
    }
    pub fn key(&self) -> PathBuf {
        self.tls().join("agent.key")
    }
    pub fn cert(&self) -> PathBuf {
        self.tls().join("agent.crt")
    }
    pub fn ca(&self) -> PathBuf {
        self.tls().join("ca.crt")
    }
    fn state(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }
    fn pending(path: &Path) -> PathBuf {
        let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".new");
        path.with_file_name(name)
    }
}

/// What `agent.json` holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentState {
    pub agent_id: String,
    /// gRPC addresses of the controllers, as last learned from a session.
    pub controllers: Vec<String>,
}

/// The agent's TLS material.
#[derive(Clone)]
pub struct Credentials {
    pub agent_id: String,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

impl Credentials {
    /// When to ask for a new certificate: after two thirds of its lifetime.
    pub fn renew_at(&self) -> Result<OffsetDateTime, AgentError> {
        let (not_before, not_after) = pki::validity_pem(&self.cert_pem)
            .map_err(|e| AgentError::Identity(format!("cannot read the agent certificate: {e}")))?;
        // The CA backdates notBefore for clock skew; the lifetime starts at issuance.
        let issued = not_before + pki::BACKDATE;
        Ok(issued + (not_after - issued) * 2 / 3)
    }

    pub fn not_after(&self) -> Result<OffsetDateTime, AgentError> {
        pki::not_after_pem(&self.cert_pem)
            .map_err(|e| AgentError::Identity(format!("cannot read the agent certificate: {e}")))
    }
}

impl Paths {
    /// The saved identity, or `None` when this data dir has never joined.
    pub fn load(&self) -> Result<Option<(Credentials, AgentState)>, AgentError> {
        self.finish_renewal()?;
        let state = match std::fs::read(self.state()) {
            Ok(bytes) => serde_json::from_slice::<AgentState>(&bytes).map_err(|e| {
                AgentError::Identity(format!(
                    "{} is not valid: {e}; remove the data dir to join again",
                    self.state().display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(AgentError::Identity(format!("cannot read {}: {e}", self.state().display()))),
        };
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p).map_err(|e| AgentError::Identity(format!("cannot read {}: {e}", p.display())))
        };
        let credentials = Credentials {
            agent_id: state.agent_id.clone(),
            key_pem: read(self.key())?,
            cert_pem: read(self.cert())?,
            ca_pem: read(self.ca())?,
        };
        Ok(Some((credentials, state)))
    }

    /// A renewal interrupted after the key was renamed but before the certificate was: finish
    /// it. One interrupted before the key was renamed is dropped (the old pair still matches).
    fn finish_renewal(&self) -> Result<(), AgentError> {
        let (key_new, cert_new) = (Paths::pending(&self.key()), Paths::pending(&self.cert()));
        let io = |e: std::io::Error| AgentError::Identity(format!("cannot finish a certificate renewal: {e}"));
        if cert_new.exists() {
            if key_new.exists() {
                std::fs::remove_file(&key_new).map_err(io)?;
                std::fs::remove_file(&cert_new).map_err(io)?;
            } else {
                std::fs::rename(&cert_new, self.cert()).map_err(io)?;
            }
        } else if key_new.exists() {
            std::fs::remove_file(&key_new).map_err(io)?;
        }
        Ok(())
    }

    pub fn save_state(&self, state: &AgentState) -> Result<(), AgentError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| AgentError::Identity(e.to_string()))?;
        write_atomic(&self.state(), &bytes, true)
            .map_err(|e| AgentError::Identity(format!("cannot write {}: {e}", self.state().display())))
    }

    fn save_new(&self, credentials: &Credentials, state: &AgentState) -> Result<(), AgentError> {
        let io =
            |p: PathBuf| move |e: std::io::Error| AgentError::Identity(format!("cannot write {}: {e}", p.display()));
        ensure_private_dir(&self.dir).map_err(io(self.dir.clone()))?;
        ensure_private_dir(&self.tls()).map_err(io(self.tls()))?;
        write_atomic(&self.key(), credentials.key_pem.as_bytes(), true).map_err(io(self.key()))?;
        write_atomic(&self.cert(), credentials.cert_pem.as_bytes(), false).map_err(io(self.cert()))?;
        write_atomic(&self.ca(), credentials.ca_pem.as_bytes(), false).map_err(io(self.ca()))?;
        // Written last: its presence means the identity is complete.
        self.save_state(state)
    }

    /// Installs a renewed key and certificate (see the module docs for the order).
    pub fn save_renewed(&self, key_pem: &str, cert_pem: &str) -> Result<(), AgentError> {
        let io = |e: std::io::Error| AgentError::Identity(format!("cannot store the renewed certificate: {e}"));
        let (key_new, cert_new) = (Paths::pending(&self.key()), Paths::pending(&self.cert()));
        write_atomic(&key_new, key_pem.as_bytes(), true).map_err(io)?;
        write_atomic(&cert_new, cert_pem.as_bytes(), false).map_err(io)?;
        std::fs::rename(&key_new, self.key()).map_err(io)?;
        std::fs::rename(&cert_new, self.cert()).map_err(io)?;
        Ok(())
    }

    /// Moves a revoked identity aside, so that the next start joins afresh with a new token.
    pub fn retire(&self) -> Result<PathBuf, AgentError> {
        let io = |e: std::io::Error| AgentError::Identity(format!("cannot move the revoked identity aside: {e}"));
        let aside = self.dir.join("tls.revoked");
        if aside.exists() {
            std::fs::remove_dir_all(&aside).map_err(io)?;
        }
        std::fs::rename(self.tls(), &aside).map_err(io)?;
        std::fs::remove_file(self.state()).map_err(io)?;
        Ok(aside)
    }
}

/// Joins the cluster through `controller` with `token`: pins the CA by the token's fingerprint
/// (refusing any other server before the CSR is sent), sends a CSR and the secret, checks and
/// stores what comes back.
pub async fn join(
    paths: &Paths,
    controller: &str,
    token: &str,
    hostname: &str,
    labels: &BTreeMap<String, String>,
) -> Result<(Credentials, AgentState), AgentError> {
    let token = JoinToken::parse(token).map_err(|e| AgentError::Config(format!("invalid --token: {e}")))?;
    let tls = controller_client_config(&ServerTrust::Fingerprint(token.ca_fingerprint.clone()), None)
        .map_err(|e| AgentError::Config(format!("cannot set up TLS: {e}")))?;
    let channel = grpc_client::channel(controller, tls)
        .map_err(|e| AgentError::Config(format!("invalid --controller {controller}: {e}")))?;
    let (key_pem, csr_pem) = pki::generate_key_and_csr().map_err(|e| AgentError::Identity(e.to_string()))?;
    let mut request = tonic::Request::new(JoinRequest {
        token_secret: token.secret.clone(),
        csr_pem,
        hostname: hostname.to_string(),
        labels: labels.clone().into_iter().collect(),
    });
    request.set_timeout(Duration::from_secs(15));
    let reply = AgentClient::new(channel).join(request).await.map_err(|status| join_error(controller, status))?;
    let reply = reply.into_inner();
    // The TLS handshake proved the server holds a certificate of the pinned CA; the CA we keep
    // must be that same one.
    let ca_fp = pki::fingerprint_of_pem(&reply.ca_pem)
        .map_err(|e| AgentError::Identity(format!("the controller sent an invalid CA certificate: {e}")))?;
    if ca_fp != token.ca_fingerprint {
        return Err(AgentError::Identity("the controller sent a CA that does not match the join token".into()));
    }
    let cert_der = deployer_common::tls::certs_from_pem(&reply.cert_pem)
        .map_err(|e| AgentError::Identity(format!("the controller sent an invalid certificate: {e}")))?;
    match pki::identity_of_cert_der(cert_der[0].as_ref()) {
        Ok(Identity::Agent(id)) if id == reply.agent_id => {}
        _ => return Err(AgentError::Identity("the controller sent a certificate for another identity".into())),
    }
    let credentials =
        Credentials { agent_id: reply.agent_id.clone(), key_pem, cert_pem: reply.cert_pem, ca_pem: reply.ca_pem };
    let mut controllers = reply.controllers;
    if !controllers.iter().any(|c| same_addr(c, controller)) {
        controllers.insert(0, controller.to_string());
    }
    let state = AgentState { agent_id: reply.agent_id, controllers };
    paths.save_new(&credentials, &state)?;
    Ok((credentials, state))
}

fn join_error(controller: &str, status: tonic::Status) -> AgentError {
    match status.code() {
        tonic::Code::PermissionDenied | tonic::Code::InvalidArgument | tonic::Code::Unauthenticated => {
            AgentError::Refused(format!("the cluster refused to let this agent join: {}", status.message()))
        }
        _ => AgentError::Unreachable(format!("cannot join through {controller}: {}", describe(&status))),
    }
}

/// A transport failure described with its cause; a refused TLS handshake says why in words.
pub fn describe(status: &tonic::Status) -> String {
    use std::error::Error;
    let mut text = status.message().to_string();
    let mut source = status.source();
    while let Some(e) = source {
        if let Some(why) = tls_refusal(e) {
            return format!("the TLS handshake was refused: {why}");
        }
        let part = e.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = e.source();
    }
    text
}

/// Why rustls refused the peer, if `e` is (or wraps) such a refusal.
fn tls_refusal(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let rustls_error = e
        .downcast_ref::<rustls::Error>()
        .or_else(|| e.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()).and_then(|i| i.downcast_ref()))?;
    Some(match rustls_error {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => other.0.to_string(),
        other => other.to_string(),
    })
}

/// `https://host:port` and `host:port` name the same controller.
pub fn same_addr(a: &str, b: &str) -> bool {
    let strip =
        |s: &str| s.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/').to_string();
    strip(a) == strip(b)
}
