//! ACME (RFC 8555) client: obtains publicly trusted certificates for the ingress by HTTP-01.
//!
//! The controller keeps one ACME account (its credentials are JSON text to store) and orders a
//! certificate per set of host names; the HTTP-01 answers are served by whatever implements
//! [`ChallengeBoard`] (the agents' ingress). Built on `instant-acme`; its types stay inside
//! this module.

use std::error::Error as StdError;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::{PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Uri};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper_util::rt::TokioIo;
use instant_acme::{
    Account, AccountBuilder, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    HttpClient, Identifier, NewAccount, NewOrder, Order, OrderStatus, Problem, RetryPolicy,
};
use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Where the ACME server is and how to reach it.
#[derive(Debug, Clone)]
pub struct AcmeConfig {
    /// The server's directory, e.g. `https://acme-v02.api.letsencrypt.org/directory`.
    pub directory_url: String,
    /// Given to the CA as `mailto:` contact (expiry notices); None: no contact.
    pub contact_email: Option<String>,
    /// Root certificates (PEM) to trust for the ACME server's own HTTPS instead of the system's
    /// (a private CA, or Pebble's test CA); None: the operating system's roots.
    pub trusted_roots_pem: Option<String>,
}

/// Publishes HTTP-01 answers where the ACME server will look (the agents' ingress).
pub trait ChallengeBoard: Send + Sync {
    /// Serves `key_authorization` at `http://<domain>/.well-known/acme-challenge/<token>` for
    /// every domain being validated; returns once it is served.
    fn publish(&self, token: &str, key_authorization: &str) -> impl Future<Output = ()> + Send;
    /// Stops serving `token`.
    fn withdraw(&self, token: &str) -> impl Future<Output = ()> + Send;
}

/// A certificate obtained from the ACME server.
#[derive(Clone)]
pub struct Issued {
    /// Leaf first, then the intermediates, as the server sent them.
    pub cert_chain_pem: String,
    /// The leaf's ECDSA P-256 private key, PKCS#8 PEM.
    pub key_pem: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Issued")
            .field("not_before_unix", &self.not_before_unix)
            .field("not_after_unix", &self.not_after_unix)
            .field("key_pem", &"[redacted]")
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AcmeError {
    #[error("cannot set up TLS to the ACME server: {0}")]
    Tls(String),
    #[error("the stored ACME account credentials are not valid JSON credentials")]
    StoredCredentials(#[source] serde_json::Error),
    #[error("cannot reach the ACME directory at {url}")]
    DirectoryUnreachable {
        url: String,
        #[source]
        source: instant_acme::Error,
    },
    #[error("the ACME server refused the account: {reason}")]
    AccountRefused { reason: String },
    #[error("no domain to order a certificate for")]
    NoDomains,
    #[error("the ACME server refused the order for {domains}: {reason}")]
    OrderRefused { domains: String, reason: String },
    #[error("the ACME server offers no HTTP-01 challenge for {domain}")]
    NoHttpChallenge { domain: String },
    #[error("the HTTP-01 challenge failed for {domain}: {reason}")]
    ChallengeFailed { domain: String, reason: String },
    #[error("the ACME order for {domains} failed: {reason}")]
    OrderFailed { domains: String, reason: String },
    #[error("no certificate for {domains} within {timeout:?}")]
    TimedOut { domains: String, timeout: Duration },
    #[error("the ACME server sent an unusable certificate for {domains}: {reason}")]
    BadCertificate { domains: String, reason: String },
    #[error("an ACME request failed")]
    Request(#[source] instant_acme::Error),
}

/// A loaded ACME account; cheap to clone.
#[derive(Clone)]
pub struct AcmeClient {
    account: Account,
}

impl AcmeClient {
    /// Loads the account from its stored credentials (JSON text produced earlier by this
    /// module), or creates one (terms agreed) and returns the credentials to store. A new
    /// account is also created when the stored one belongs to another directory or the server
    /// no longer knows it; the returned text then differs from the stored one.
    pub async fn connect(
        config: &AcmeConfig,
        stored_credentials: Option<&str>,
    ) -> Result<(AcmeClient, String), AcmeError> {
        let contact = config.contact_email.as_ref().map(|email| format!("mailto:{email}"));
        let contacts: Vec<&str> = contact.iter().map(String::as_str).collect();

        if let Some(stored) = stored_credentials {
            let server: StoredServer = serde_json::from_str(stored).map_err(AcmeError::StoredCredentials)?;
            let credentials: AccountCredentials = serde_json::from_str(stored).map_err(AcmeError::StoredCredentials)?;
            if server.directory.as_deref() == Some(config.directory_url.as_str()) {
                let account = account_builder(config)?
                    .from_credentials(credentials)
                    .await
                    .map_err(|source| directory_unreachable(config, source))?;
                // Proves the account still exists, and keeps its contact in step with the config.
                match account.update_contacts(&contacts).await {
                    Ok(()) => return Ok((AcmeClient { account }, stored.to_owned())),
                    Err(instant_acme::Error::Api(problem)) if is_problem(&problem, "accountDoesNotExist") => {
                        tracing::warn!(
                            account = %account.id(),
                            "the ACME server no longer knows the stored account; creating a new one"
                        );
                    }
                    Err(instant_acme::Error::Api(problem)) => {
                        return Err(AcmeError::AccountRefused { reason: problem_text(&problem) })
                    }
                    Err(e) => return Err(AcmeError::Request(e)),
                }
            } else {
                tracing::info!(
                    directory = %config.directory_url,
                    "the stored ACME account is for another directory; creating a new one"
                );
            }
        }

        let new_account = NewAccount { contact: &contacts, terms_of_service_agreed: true, only_return_existing: false };
        let (account, credentials) = account_builder(config)?
            .create(&new_account, config.directory_url.clone(), None)
            .await
            .map_err(|e| match e {
                instant_acme::Error::Api(problem) => AcmeError::AccountRefused { reason: problem_text(&problem) },
                source => directory_unreachable(config, source),
            })?;
        let credentials = serde_json::to_string(&credentials).map_err(|e| AcmeError::Request(e.into()))?;
        tracing::info!(account = %account.id(), directory = %config.directory_url, "ACME account created");
        Ok((AcmeClient { account }, credentials))
    }

    /// The account's URL at the ACME server.
    pub fn account_id(&self) -> &str {
        self.account.id()
    }

    /// Orders a certificate for `domains` (one or more host names) by HTTP-01 with a fresh
    /// ECDSA P-256 key: publishes every challenge on `board`, waits for the order with backoff
    /// up to `timeout`, withdraws the challenges whatever happens, and returns the chain, key and
    /// validity. (Dropping the future before it ends leaves the published tokens on the board.)
    pub async fn issue<B: ChallengeBoard>(
        &self,
        domains: &[String],
        board: &B,
        timeout: Duration,
    ) -> Result<Issued, AcmeError> {
        if domains.is_empty() {
            return Err(AcmeError::NoDomains);
        }
        let mut published = Vec::new();
        let outcome = tokio::time::timeout(timeout, self.order(domains, board, timeout, &mut published)).await;
        for token in &published {
            board.withdraw(token).await;
        }
        let issued = outcome.unwrap_or_else(|_| Err(timed_out(domains, timeout)))?;
        tracing::info!(domains = %domains.join(", "), not_after = issued.not_after_unix, "ACME certificate issued");
        Ok(issued)
    }

    async fn order<B: ChallengeBoard>(
        &self,
        domains: &[String],
        board: &B,
        timeout: Duration,
        published: &mut Vec<String>,
    ) -> Result<Issued, AcmeError> {
        let deadline = Instant::now() + timeout;
        let names = || domains.join(", ");
        let identifiers: Vec<Identifier> = domains.iter().map(|domain| Identifier::Dns(domain.clone())).collect();
        let mut order = self.account.new_order(&NewOrder::new(&identifiers)).await.map_err(|e| match e {
            instant_acme::Error::Api(problem) => {
                AcmeError::OrderRefused { domains: names(), reason: problem_text(&problem) }
            }
            e => AcmeError::Request(e),
        })?;

        let mut authorizations = order.authorizations();
        while let Some(authorization) = authorizations.next().await {
            let mut authorization = authorization.map_err(AcmeError::Request)?;
            let domain = authorization.identifier().to_string();
            match authorization.status {
                AuthorizationStatus::Valid => continue,
                AuthorizationStatus::Pending => {}
                status => {
                    let reason = format!("the authorization is {status:?}");
                    return Err(AcmeError::ChallengeFailed { domain, reason });
                }
            }
            let Some(mut challenge) = authorization.challenge(ChallengeType::Http01) else {
                return Err(AcmeError::NoHttpChallenge { domain });
            };
            let key_authorization = challenge.key_authorization();
            published.push(challenge.token.clone());
            board.publish(&challenge.token, key_authorization.as_str()).await;
            tracing::debug!(%domain, "HTTP-01 challenge published");
            challenge.set_ready().await.map_err(|e| match e {
                instant_acme::Error::Api(problem) => {
                    AcmeError::ChallengeFailed { domain, reason: problem_text(&problem) }
                }
                e => AcmeError::Request(e),
            })?;
        }

        match order.poll_ready(&polling(deadline)).await {
            Ok(OrderStatus::Ready) => {}
            Ok(_) => return Err(failed_authorization(&mut order, domains, None).await),
            Err(instant_acme::Error::Api(problem)) => {
                return Err(failed_authorization(&mut order, domains, Some(problem)).await)
            }
            Err(instant_acme::Error::Timeout(_)) => return Err(timed_out(domains, timeout)),
            Err(e) => return Err(AcmeError::Request(e)),
        }

        // rcgen, through instant-acme: a fresh ECDSA P-256 key and a CSR naming the order's identifiers.
        let key_pem = order.finalize().await.map_err(|e| order_failed(domains, e))?;
        let cert_chain_pem = order.poll_certificate(&polling(deadline)).await.map_err(|e| match e {
            instant_acme::Error::Timeout(_) => timed_out(domains, timeout),
            e => order_failed(domains, e),
        })?;
        let (not_before, not_after) = deployer_common::pki::validity_pem(&cert_chain_pem)
            .map_err(|e| AcmeError::BadCertificate { domains: names(), reason: e.to_string() })?;
        Ok(Issued {
            cert_chain_pem,
            key_pem,
            not_before_unix: not_before.unix_timestamp(),
            not_after_unix: not_after.unix_timestamp(),
        })
    }
}

/// When a certificate valid from `not_before_unix` to `not_after_unix` is due for renewal:
/// once less than a third of its lifetime, or 30 days if that is smaller, remains. A validity
/// that ends before it starts is due at once.
pub fn renew_at(not_before_unix: i64, not_after_unix: i64) -> i64 {
    const MAX_MARGIN: i64 = 30 * 24 * 3600;
    if not_after_unix <= not_before_unix {
        return i64::MIN;
    }
    let lifetime = not_after_unix.saturating_sub(not_before_unix);
    not_after_unix - (lifetime / 3).min(MAX_MARGIN)
}

/// True when less than a third of the lifetime (or 30 days, whichever is smaller) remains.
pub fn needs_renewal(not_before_unix: i64, not_after_unix: i64, now_unix: i64) -> bool {
    now_unix >= renew_at(not_before_unix, not_after_unix)
}

/// The part of the stored credentials this module reads itself.
#[derive(Deserialize)]
struct StoredServer {
    directory: Option<String>,
}

fn account_builder(config: &AcmeConfig) -> Result<AccountBuilder, AcmeError> {
    match &config.trusted_roots_pem {
        None => Account::builder().map_err(|e| AcmeError::Tls(error_chain(&e))),
        Some(pem) => Ok(Account::builder_with_http(Box::new(PrivateRootsClient::new(pem)?))),
    }
}

fn directory_unreachable(config: &AcmeConfig, source: instant_acme::Error) -> AcmeError {
    AcmeError::DirectoryUnreachable { url: config.directory_url.clone(), source }
}

fn order_failed(domains: &[String], e: instant_acme::Error) -> AcmeError {
    match e {
        instant_acme::Error::Api(problem) => {
            AcmeError::OrderFailed { domains: domains.join(", "), reason: problem_text(&problem) }
        }
        e => AcmeError::Request(e),
    }
}

fn timed_out(domains: &[String], timeout: Duration) -> AcmeError {
    AcmeError::TimedOut { domains: domains.join(", "), timeout }
}

/// Polls after 250 ms, then backs off by half each time; gives up when the next poll would pass
/// `deadline`.
fn polling(deadline: Instant) -> RetryPolicy {
    RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(deadline.saturating_duration_since(Instant::now()))
}

/// The error naming the domain whose authorization failed, with the server's reason.
async fn failed_authorization(order: &mut Order, domains: &[String], order_problem: Option<Problem>) -> AcmeError {
    let mut authorizations = order.authorizations();
    while let Some(Ok(mut authorization)) = authorizations.next().await {
        if authorization.refresh().await.is_err() || authorization.status != AuthorizationStatus::Invalid {
            continue;
        }
        let reason = authorization
            .challenges
            .iter()
            .find_map(|challenge| challenge.error.as_ref())
            .or(order_problem.as_ref())
            .map_or_else(|| "the authorization is invalid".to_owned(), problem_text);
        return AcmeError::ChallengeFailed { domain: authorization.identifier().to_string(), reason };
    }
    let reason = order_problem.as_ref().map_or_else(|| "the order became invalid".to_owned(), problem_text);
    AcmeError::OrderFailed { domains: domains.join(", "), reason }
}

fn is_problem(problem: &Problem, kind: &str) -> bool {
    problem.r#type.as_deref().and_then(|t| t.strip_prefix("urn:ietf:params:acme:error:")) == Some(kind)
}

/// The server's reason, e.g. `Invalid response from ... (unauthorized)`.
fn problem_text(problem: &Problem) -> String {
    let kind = problem.r#type.as_deref().map(|t| t.strip_prefix("urn:ietf:params:acme:error:").unwrap_or(t));
    let mut text = match (problem.detail.as_deref(), kind) {
        (Some(detail), Some(kind)) => format!("{detail} ({kind})"),
        (Some(detail), None) => detail.to_owned(),
        (None, Some(kind)) => kind.to_owned(),
        (None, None) => "no reason given".to_owned(),
    };
    for sub in &problem.subproblems {
        text.push_str(&format!("; {sub}"));
    }
    text
}

fn error_chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    text
}

/// Bounds every ACME request, so an unresponsive server cannot hold an issuance forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// ACME answers are JSON documents and certificate chains: a few kilobytes.
const MAX_RESPONSE_BYTES: usize = 1 << 20;

/// The HTTP client for an ACME server under a private CA (instant-acme's own client takes its
/// roots from the system or a file). One HTTP/1.1 connection per request: an issuance makes a
/// dozen requests, too few for a connection pool to matter.
struct PrivateRootsClient {
    tls: TlsConnector,
}

impl PrivateRootsClient {
    fn new(roots_pem: &str) -> Result<PrivateRootsClient, AcmeError> {
        let certs = deployer_common::tls::certs_from_pem(roots_pem).map_err(|e| AcmeError::Tls(error_chain(&e)))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in certs {
            roots.add(cert).map_err(|e| AcmeError::Tls(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| AcmeError::Tls(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(PrivateRootsClient { tls: TlsConnector::from(Arc::new(config)) })
    }
}

type BoxError = Box<dyn StdError + Send + Sync>;

impl HttpClient for PrivateRootsClient {
    fn request(
        &self,
        req: Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let tls = self.tls.clone();
        Box::pin(async move {
            match tokio::time::timeout(REQUEST_TIMEOUT, send(tls, req)).await {
                Ok(result) => result.map_err(instant_acme::Error::Other),
                Err(_) => Err(instant_acme::Error::Other(
                    format!("no answer from the ACME server within {REQUEST_TIMEOUT:?}").into(),
                )),
            }
        })
    }
}

async fn send(tls: TlsConnector, mut req: Request<BodyWrapper<Bytes>>) -> Result<BytesResponse, BoxError> {
    let uri = req.uri().clone();
    if uri.scheme() != Some(&Scheme::HTTPS) {
        return Err(format!("ACME URL {uri} is not https").into());
    }
    let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
        return Err(format!("ACME URL {uri} has no host").into());
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let server_name = ServerName::try_from(host.to_owned())?;
    let tcp = TcpStream::connect((host, uri.port_u16().unwrap_or(443))).await?;
    let stream = tls.connect(server_name, tcp).await?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;

    // hyper's connection-level client sends the URI as given: use origin-form and a Host header.
    req.headers_mut().insert(header::HOST, HeaderValue::from_str(authority.as_str())?);
    *req.uri_mut() = Uri::from(uri.path_and_query().cloned().unwrap_or_else(|| PathAndQuery::from_static("/")));

    let exchange = async move {
        let (parts, body) = sender.send_request(req).await?.into_parts();
        let body = read_body(body).await?;
        Ok::<_, BoxError>(BytesResponse { parts, body: Box::new(body) })
    };
    // The connection is driven here, not by a spawned task, and ends with this request.
    let mut exchange = pin!(exchange);
    let mut connection = pin!(connection);
    tokio::select! {
        biased;
        response = &mut exchange => response,
        closed = &mut connection => {
            closed?;
            exchange.await
        }
    }
}

async fn read_body(mut body: Incoming) -> Result<Bytes, BoxError> {
    let mut data = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(chunk) = frame?.into_data() {
            if data.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(format!("ACME response larger than {MAX_RESPONSE_BYTES} bytes").into());
            }
            data.extend_from_slice(&chunk);
        }
    }
    Ok(Bytes::from(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 24 * 3600;

    #[test]
    fn a_90_day_certificate_is_renewed_with_30_days_left() {
        let not_before = 1_700_000_000;
        let not_after = not_before + 90 * DAY;
        assert!(!needs_renewal(not_before, not_after, not_before));
        assert!(!needs_renewal(not_before, not_after, not_after - 30 * DAY - 1));
        assert!(needs_renewal(not_before, not_after, not_after - 30 * DAY));
        assert!(needs_renewal(not_before, not_after, not_after + DAY));
    }

    #[test]
    fn a_short_lived_certificate_is_renewed_with_a_third_of_its_lifetime_left() {
        let not_before = 1_700_000_000;
        let not_after = not_before + 6 * DAY;
        assert!(!needs_renewal(not_before, not_after, not_before + 4 * DAY - 1));
        assert!(needs_renewal(not_before, not_after, not_before + 4 * DAY));
    }

    #[test]
    fn a_long_lived_certificate_is_renewed_30_days_before_expiry() {
        // Pebble's certificates last five years.
        let not_before = 1_700_000_000;
        let not_after = not_before + 5 * 365 * DAY;
        assert_eq!(renew_at(not_before, not_after), not_after - 30 * DAY);
        assert!(!needs_renewal(not_before, not_after, not_before + 365 * DAY));
    }

    #[test]
    fn a_certificate_with_no_lifetime_is_due_at_once() {
        assert!(needs_renewal(100, 100, 100));
        assert!(needs_renewal(200, 100, 50));
    }

    #[test]
    fn the_servers_reason_names_the_problem_kind() {
        let problem: Problem = serde_json::from_str(
            r#"{"type":"urn:ietf:params:acme:error:unauthorized","detail":"key authorization mismatch","status":403}"#,
        )
        .unwrap();
        assert_eq!(problem_text(&problem), "key authorization mismatch (unauthorized)");
        assert!(is_problem(&problem, "unauthorized"));
        assert!(!is_problem(&problem, "accountDoesNotExist"));
    }

    #[tokio::test]
    async fn a_directory_nobody_listens_on_is_reported_unreachable() {
        let port = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap().port()
        };
        let ca = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let config = AcmeConfig {
            directory_url: format!("https://127.0.0.1:{port}/dir"),
            contact_email: None,
            trusted_roots_pem: Some(ca.cert.pem()),
        };
        let err = AcmeClient::connect(&config, None).await.err().expect("no server listens");
        assert!(matches!(err, AcmeError::DirectoryUnreachable { .. }), "{err:?}");
        assert!(err.to_string().contains(&config.directory_url), "{err}");
    }

    #[tokio::test]
    async fn stored_credentials_that_are_not_json_are_refused_before_any_request() {
        let config = AcmeConfig {
            directory_url: "https://127.0.0.1:1/dir".to_owned(),
            contact_email: None,
            trusted_roots_pem: None,
        };
        let err = AcmeClient::connect(&config, Some("not json")).await.err().expect("bad credentials");
        assert!(matches!(err, AcmeError::StoredCredentials(_)), "{err:?}");
    }
}
