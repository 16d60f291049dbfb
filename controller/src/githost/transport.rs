//! A minimal HTTP/1.1 client for one API origin: one connection per request (a deployment makes a
//! handful of calls, too few for a pool to matter), a deadline on each, a bounded answer.

use std::error::Error as StdError;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{header, HeaderValue, Request, Response, StatusCode, Uri};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::GitHostError;

/// Bounds every request, connection and TLS handshake included.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A page of 100 comments of up to 65536 characters each, with room to spare.
const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// Where the CA bundle lives on common Linux distributions and BSDs (the list openssl-probe uses).
const SYSTEM_CA_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
    "/etc/ssl/ca-bundle.pem",
    "/etc/pki/tls/cacert.pem",
    "/etc/ssl/cert.pem",
];

/// Why a request got no HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("connection failed")]
    Connect(#[source] std::io::Error),
    #[error("TLS handshake failed")]
    Tls(#[source] std::io::Error),
    #[error("HTTP exchange failed")]
    Http(#[source] hyper::Error),
    #[error("answer larger than {MAX_RESPONSE_BYTES} bytes")]
    TooLarge,
}

/// One API origin (`https://api.github.com`, `https://gitlab.example.com`) and the path its API
/// lives under (empty, `/api/v3` for GitHub Enterprise, or a GitLab installed under a path).
pub(super) struct HttpClient {
    scheme: Scheme,
    authority: Authority,
    host: String,
    port: u16,
    base_path: String,
    tls: Option<TlsConnector>,
}

impl HttpClient {
    pub(super) fn new(api_url: &str, extra_roots_pem: Option<&str>) -> Result<HttpClient, GitHostError> {
        let invalid = |reason: &str| GitHostError::InvalidUrl { url: api_url.to_owned(), reason: reason.to_owned() };
        let uri: Uri = api_url.trim_end_matches('/').parse().map_err(|_| invalid("is not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| invalid("has no scheme (https://...)"))?;
        let authority = uri.authority().cloned().ok_or_else(|| invalid("has no host"))?;
        if uri.query().is_some() {
            return Err(invalid("must not have a query"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        let (port, tls) = if scheme == Scheme::HTTPS {
            (authority.port_u16().unwrap_or(443), Some(tls_connector(extra_roots_pem)?))
        } else if scheme == Scheme::HTTP {
            if !is_loopback(&host) {
                tracing::warn!(%host, "git host API over plain http: its token travels unencrypted");
            }
            (authority.port_u16().unwrap_or(80), None)
        } else {
            return Err(invalid("must be http:// or https://"));
        };
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Ok(HttpClient { scheme, authority, host, port, base_path, tls })
    }

    /// The host named in errors and logs.
    pub(super) fn host(&self) -> &str {
        &self.host
    }

    /// The absolute path of an API endpoint: `path` starts with `/`.
    pub(super) fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.base_path)
    }

    /// The path and query of `url` if it is on this origin (pagination links are absolute URLs);
    /// a link elsewhere is refused so the credentials never leave the configured host.
    pub(super) fn path_on_origin(&self, url: &str) -> Option<String> {
        let uri: Uri = url.parse().ok()?;
        let same = uri.scheme() == Some(&self.scheme) && uri.authority() == Some(&self.authority);
        same.then(|| uri.path_and_query().map(|p| p.as_str().to_owned())).flatten()
    }

    /// Sends `req`, whose URI is an origin-form path and query, and reads the whole answer.
    pub(super) async fn send(&self, mut req: Request<String>) -> Result<Response<Bytes>, TransportError> {
        let authority = HeaderValue::from_str(self.authority.as_str()).expect("an authority is a valid header");
        req.headers_mut().insert(header::HOST, authority);
        let length = HeaderValue::from(req.body().len());
        req.headers_mut().insert(header::CONTENT_LENGTH, length);
        match tokio::time::timeout(REQUEST_TIMEOUT, self.exchange(req)).await {
            Ok(result) => result,
            Err(_) => Err(TransportError::Timeout(REQUEST_TIMEOUT)),
        }
    }

    async fn exchange(&self, req: Request<String>) -> Result<Response<Bytes>, TransportError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port)).await.map_err(TransportError::Connect)?;
        match &self.tls {
            Some(tls) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| TransportError::Tls(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
                let stream = tls.connect(name, tcp).await.map_err(TransportError::Tls)?;
                exchange_on(stream, req).await
            }
            None => exchange_on(tcp, req).await,
        }
    }
}

async fn exchange_on<S>(stream: S, req: Request<String>) -> Result<Response<Bytes>, TransportError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(TransportError::Http)?;
    let exchange = async move {
        let (parts, body) = sender.send_request(req).await.map_err(TransportError::Http)?.into_parts();
        Ok(Response::from_parts(parts, read_body(body).await?))
    };
    // The connection is driven here, not by a spawned task, and ends with this request.
    let mut exchange = pin!(exchange);
    let mut connection = pin!(connection);
    tokio::select! {
        biased;
        response = &mut exchange => response,
        closed = &mut connection => {
            closed.map_err(TransportError::Http)?;
            exchange.await
        }
    }
}

async fn read_body(mut body: Incoming) -> Result<Bytes, TransportError> {
    let mut data = Vec::new();
    while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
        if let Ok(chunk) = frame.map_err(TransportError::Http)?.into_data() {
            if data.len() + chunk.len() > MAX_RESPONSE_BYTES {
                return Err(TransportError::TooLarge);
            }
            data.extend_from_slice(&chunk);
        }
    }
    Ok(Bytes::from(data))
}

/// rustls (ring) trusting `extra_roots_pem` alone when given, else the system's CA bundle.
fn tls_connector(extra_roots_pem: Option<&str>) -> Result<TlsConnector, GitHostError> {
    let certs = match extra_roots_pem {
        Some(pem) => parse_certs(pem.as_bytes(), "the given roots")?,
        None => system_roots()?,
    };
    let mut roots = rustls::RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(GitHostError::Tls("no usable CA certificate to verify the git host with".to_owned()));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| GitHostError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// `SSL_CERT_FILE` if set, else the first CA bundle found at the usual places.
fn system_roots() -> Result<Vec<CertificateDer<'static>>, GitHostError> {
    let candidates: Vec<String> = match std::env::var("SSL_CERT_FILE") {
        Ok(file) if !file.is_empty() => vec![file],
        _ => SYSTEM_CA_BUNDLES.iter().map(|s| (*s).to_owned()).collect(),
    };
    for path in &candidates {
        match std::fs::read(path) {
            Ok(pem) => return parse_certs(&pem, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(GitHostError::Tls(format!("cannot read the CA bundle {path}: {e}"))),
        }
    }
    Err(GitHostError::Tls(format!(
        "no CA bundle found (looked at {}); install ca-certificates or set SSL_CERT_FILE",
        candidates.join(", ")
    )))
}

fn parse_certs(pem: &[u8], origin: &str) -> Result<Vec<CertificateDer<'static>>, GitHostError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| GitHostError::Tls(format!("invalid PEM in {origin}: {e}")))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The URL of `rel="next"` in an RFC 8288 `Link` header, as GitHub and GitLab send for pages.
pub(super) fn next_link(link: &str) -> Option<&str> {
    let mut rest = link;
    while let Some(start) = rest.find('<') {
        let end = start + rest[start..].find('>')?;
        let url = &rest[start + 1..end];
        rest = &rest[end + 1..];
        // The parameters run to the comma before the next link.
        let params = rest[..rest.find('<').unwrap_or(rest.len())].trim_end().trim_end_matches(',');
        let is_next = params.split(';').any(|param| {
            let Some((name, value)) = param.split_once('=') else { return false };
            name.trim().eq_ignore_ascii_case("rel")
                && value.trim().trim_matches('"').split_ascii_whitespace().any(|rel| rel.eq_ignore_ascii_case("next"))
        });
        if is_next {
            return Some(url);
        }
    }
    None
}

/// Status text for errors, e.g. `422 Unprocessable Entity`.
pub(super) fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("{} {reason}", status.as_u16()),
        None => status.as_u16().to_string(),
    }
}

/// The error and its causes on one line.
pub(super) fn error_chain(e: &dyn StdError) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(e) = source {
        text.push_str(&format!(": {e}"));
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_page_is_found_among_other_relations() {
        let github = r#"<https://api.github.com/repositories/1/issues/2/comments?per_page=100&page=2>; rel="next", <https://api.github.com/repositories/1/issues/2/comments?per_page=100&page=5>; rel="last""#;
        assert_eq!(
            next_link(github),
            Some("https://api.github.com/repositories/1/issues/2/comments?per_page=100&page=2")
        );
        let last_page = r#"<https://x/a?page=1>; rel="prev", <https://x/a?page=1>; rel="first""#;
        assert_eq!(next_link(last_page), None);
        let gitlab = r#"<https://gitlab.example/api/v4/projects/1/merge_requests/3/notes?page=1&per_page=100>; rel="first", <https://gitlab.example/api/v4/projects/1/merge_requests/3/notes?page=2&per_page=100>; rel="next""#;
        assert_eq!(
            next_link(gitlab),
            Some("https://gitlab.example/api/v4/projects/1/merge_requests/3/notes?page=2&per_page=100")
        );
        assert_eq!(next_link("<https://x/a?page=3>; rel=next"), Some("https://x/a?page=3"));
        assert_eq!(next_link(""), None);
        assert_eq!(next_link("<broken"), None);
    }

    #[test]
    fn pagination_links_to_another_origin_are_refused() {
        let client = HttpClient::new("http://127.0.0.1:8080/api/v3/", None).unwrap();
        assert_eq!(client.endpoint("/repos/a/b"), "/api/v3/repos/a/b");
        assert_eq!(client.path_on_origin("http://127.0.0.1:8080/api/v3/x?page=2").as_deref(), Some("/api/v3/x?page=2"));
        assert_eq!(client.path_on_origin("http://127.0.0.1:9090/api/v3/x?page=2"), None);
        assert_eq!(client.path_on_origin("https://127.0.0.1:8080/api/v3/x?page=2"), None);
        assert_eq!(client.path_on_origin("http://evil.example/api/v3/x"), None);
    }

    #[test]
    fn api_urls_must_be_http_or_https() {
        for url in ["api.github.com", "ftp://api.github.com", "https://", "https://gitlab.example?x=1"] {
            let err = HttpClient::new(url, None).err().unwrap_or_else(|| panic!("{url} accepted"));
            assert!(matches!(err, GitHostError::InvalidUrl { .. }), "{url}: {err:?}");
        }
    }
}
