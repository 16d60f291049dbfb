//! Certificates for custom domains, by ACME: the leader orders one for every domain claimed by
//! a service that runs, answers the HTTP-01 challenges through every agent's ingress, commits the
//! result (the key sealed with the cluster key) so any agent and any later leader can serve it,
//! and renews it before it runs out. A failure is recorded where the API shows it and retried
//! later; the last good certificate keeps serving meanwhile.

use std::collections::HashSet;
use std::time::Duration;

use deployer_proto::agent::Certificate;
use tokio::sync::broadcast;

use crate::acme::{needs_renewal, AcmeClient, ChallengeBoard};
use crate::command::Command;
use crate::controller::{Controller, SharedController};
use crate::store::state_machine::StateEvent;
use crate::util::now_ms;

/// How often the leader looks for certificates to order.
const CHECK_EVERY: Duration = Duration::from_secs(30);
/// How long one order may take.
const ORDER_TIMEOUT: Duration = Duration::from_secs(90);
/// After a failure, the next try waits this long (doubling per failure is left to the ACME
/// server's rate limits: one try per domain per interval is gentle enough).
const RETRY_AFTER: Duration = Duration::from_secs(300);
/// How long publishing an answer waits for the agents to apply it.
const PUBLISH_WAIT: Duration = Duration::from_secs(5);

/// The custom domains' certificates in force, for the agents' tables.
pub async fn custom_certificates(c: &Controller) -> anyhow::Result<Vec<Certificate>> {
    let mut certificates = Vec::new();
    for row in c.state.certificates().await? {
        let Some(sealed) = row.key_sealed.filter(|_| !row.cert_chain_pem.is_empty()) else { continue };
        let aad = format!("certificate:{}", row.domain);
        let Ok(key) = c.key.open(&sealed, aad.as_bytes()) else {
            tracing::warn!(domain = %row.domain, "cannot unseal a certificate's key");
            continue;
        };
        let Ok(key_pem) = String::from_utf8(key) else { continue };
        certificates.push(Certificate {
            names: vec![row.domain],
            cert_chain_pem: row.cert_chain_pem,
            key_pem,
            redirect_http: true,
        });
    }
    Ok(certificates)
}

/// Publishes answers through the leader's route tables.
struct Board<'a>(&'a Controller);

impl ChallengeBoard for Board<'_> {
    fn publish(&self, token: &str, key_authorization: &str) -> impl std::future::Future<Output = ()> + Send {
        let sessions = self.0.agents.all_sessions();
        async move { self.0.ingress.publish_challenge(token, key_authorization, PUBLISH_WAIT, &sessions).await }
    }

    fn withdraw(&self, token: &str) -> impl std::future::Future<Output = ()> + Send {
        self.0.ingress.withdraw_challenge(token);
        std::future::ready(())
    }
}

/// The leader's loop (a no-op without an ACME directory): a look after every change of what is
/// routed, and every [`CHECK_EVERY`] for renewals and retries.
pub async fn run(c: SharedController, mut events: broadcast::Receiver<StateEvent>) {
    let Some(config) = c.ingress.settings.acme.clone() else { return };
    let mut client: Option<AcmeClient> = None;
    loop {
        if c.agents.is_active() && c.agents.sessions() > 0 {
            if let Err(e) = round(&c, &config, &mut client).await {
                tracing::warn!(error = %format!("{e:#}"), "certificates: cannot check the custom domains");
            }
        } else {
            client = None;
        }
        let changed = async {
            loop {
                match events.recv().await {
                    Ok(StateEvent::DeploymentChanged { .. } | StateEvent::IngressChanged) => return true,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => return true,
                    Err(broadcast::error::RecvError::Closed) => return false,
                }
            }
        };
        tokio::select! {
            open = changed => if !open { return },
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
    }
}

/// One look at every custom domain: orders what is missing or due.
async fn round(
    c: &Controller,
    config: &crate::acme::AcmeConfig,
    client: &mut Option<AcmeClient>,
) -> anyhow::Result<()> {
    let routed: HashSet<String> = c.state.routed_services().await?.into_iter().map(|r| r.service_id).collect();
    let known: std::collections::HashMap<String, crate::store::queries::CertificateRow> =
        c.state.certificates().await?.into_iter().map(|r| (r.domain.clone(), r)).collect();
    let now = now_ms();
    let due: Vec<String> = c
        .state
        .service_domains()
        .await?
        .into_iter()
        .filter(|(_, service)| routed.contains(service))
        .map(|(domain, _)| domain)
        .filter(|domain| match known.get(domain) {
            None => true,
            Some(row) => {
                row.retry_at <= now
                    && (row.cert_chain_pem.is_empty()
                        || needs_renewal(row.not_before / 1000, row.not_after / 1000, now / 1000))
            }
        })
        .collect();
    if due.is_empty() {
        return Ok(());
    }
    if client.is_none() {
        *client = Some(account(c, config).await?);
    }
    let Some(acme) = client.as_ref() else { return Ok(()) };
    for domain in due {
        tracing::info!(%domain, "ordering a certificate");
        match acme.issue(std::slice::from_ref(&domain), &Board(c), ORDER_TIMEOUT).await {
            Ok(issued) => {
                let aad = format!("certificate:{domain}");
                let sealed = c.key.seal(issued.key_pem.as_bytes(), aad.as_bytes());
                let not_after = issued.not_after_unix * 1000;
                c.propose(Command::PutCertificate {
                    domain: domain.clone(),
                    cert_chain_pem: issued.cert_chain_pem,
                    key_sealed_hex: hex::encode(sealed),
                    not_before: issued.not_before_unix * 1000,
                    not_after,
                    at: now_ms(),
                })
                .await?;
                tracing::info!(%domain, "certificate issued");
            }
            Err(e) => {
                let error = format!("{:#}", anyhow::Error::from(e));
                tracing::warn!(%domain, %error, "cannot obtain a certificate");
                c.propose(Command::CertificateFailed {
                    domain: domain.clone(),
                    error,
                    retry_at: now_ms() + RETRY_AFTER.as_millis() as i64,
                    at: now_ms(),
                })
                .await?;
            }
        }
    }
    Ok(())
}

/// The ACME account: the stored one for this directory, or a new one, committed.
async fn account(c: &Controller, config: &crate::acme::AcmeConfig) -> anyhow::Result<AcmeClient> {
    let stored = match c.state.acme_account().await? {
        Some((directory, sealed)) if directory == config.directory_url => {
            c.key.open(&sealed, b"acme-account").ok().and_then(|b| String::from_utf8(b).ok())
        }
        _ => None,
    };
    let (client, credentials) = AcmeClient::connect(config, stored.as_deref()).await?;
    if stored.as_deref() != Some(credentials.as_str()) {
        let sealed = c.key.seal(credentials.as_bytes(), b"acme-account");
        c.propose(Command::SetAcmeAccount {
            directory_url: config.directory_url.clone(),
            credentials_sealed_hex: hex::encode(sealed),
            at: now_ms(),
        })
        .await?;
    }
    Ok(client)
}
