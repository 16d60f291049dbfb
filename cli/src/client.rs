//! The HTTP client of the Deployer API, and the errors a user of the CLI can see.

use std::time::Duration;

use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE, COOKIE, SET_COOKIE, USER_AGENT,
};
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// An upload is replicated chunk by chunk before the controller answers.
const UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);
const CLIENT_NAME: &str = concat!("deployer-cli/", env!("CARGO_PKG_VERSION"));

const TOKEN_HINT: &str =
    "run `deployer login`, or set DEPLOYER_TOKEN or pass --token; a new cluster's admin token is in \
     <data-dir>/admin-token (export DEPLOYER_TOKEN=$(cat <data-dir>/admin-token))";

/// The dashboard's session cookie, which `deployer login` holds only long enough to make a token.
const SESSION_COOKIE: &str = "deployer_session";

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The invocation cannot work as given; exits 2 like clap's own usage errors.
    #[error("{message}")]
    Usage { message: String, hint: Option<String> },
    #[error("cannot reach the controller at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The API's own `{"error":{"code","message"}}` answer.
    #[error("{message}")]
    Api { status: StatusCode, code: String, message: String, hint: Option<String> },
    /// Something the CLI itself found wrong (a file, an answer, the terminal), with what to do.
    #[error("{message}")]
    Failed { message: String, hint: Option<String> },
    #[error("{0}")]
    Unexpected(String),
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
}

impl CliError {
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage { .. } => 2,
            _ => 1,
        }
    }

    pub fn hint(&self) -> Option<String> {
        match self {
            CliError::Usage { hint, .. } | CliError::Api { hint, .. } | CliError::Failed { hint, .. } => hint.clone(),
            CliError::Unreachable { .. } => {
                Some("is the controller running? set DEPLOYER_URL (or pass --url) to its HTTP address".into())
            }
            _ => None,
        }
    }
}

/// An answer of the API: its body as sent (kept for `--output json`) and parsed.
pub struct Answer {
    pub raw: String,
    pub json: Value,
}

impl Answer {
    /// The body as one of the CLI's views of a resource.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, CliError> {
        serde_json::from_value(self.json.clone())
            .map_err(|e| CliError::Unexpected(format!("the controller's answer has an unexpected shape: {e}")))
    }

    pub fn is_empty(&self) -> bool {
        self.raw.trim().is_empty()
    }
}

/// How the client proves who it is.
#[derive(Clone)]
enum Credential {
    None,
    /// An API token, and the hint to show when the controller refuses it.
    Token {
        token: String,
        refused_hint: String,
    },
    /// A session cookie's value, from a login.
    Session(String),
}

#[derive(Clone)]
pub struct Client {
    base: Url,
    credential: Credential,
    http: reqwest::Client,
}

impl Client {
    pub fn new(url: &str, token: Option<String>) -> Result<Client, CliError> {
        let usage = |message: String| CliError::Usage {
            message,
            hint: Some(
                "set DEPLOYER_URL (or pass --url) to the controller's HTTP address, like http://127.0.0.1:7700".into(),
            ),
        };
        if !url.contains("://") {
            return Err(usage(format!("invalid controller URL {url:?}: it needs a scheme, as in http://{url}")));
        }
        let base = Url::parse(url).map_err(|e| usage(format!("invalid controller URL {url:?}: {e}")))?;
        match base.scheme() {
            "http" => {}
            // This build of reqwest has no TLS, and the controller's API serves plain HTTP for now.
            "https" => {
                return Err(usage(format!(
                    "{url}: https:// URLs are not supported yet; use the controller's http:// address"
                )))
            }
            other => return Err(usage(format!("{url}: unsupported URL scheme {other:?}; use http://"))),
        }
        if base.cannot_be_a_base() || base.host().is_none() {
            return Err(usage(format!("invalid controller URL {url:?}: it has no host")));
        }
        let http = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .user_agent(CLIENT_NAME)
            .build()
            .map_err(|e| CliError::Unexpected(format!("cannot set up the HTTP client: {e}")))?;
        let credential = match token.filter(|t| !t.trim().is_empty()) {
            Some(token) => Credential::Token { token, refused_hint: format!("check the token: {TOKEN_HINT}") },
            None => Credential::None,
        };
        Ok(Client { base, credential, http })
    }

    /// The same client, for a token read from the config file at `path`: a refusal says to log in again.
    pub fn token_from_config(mut self, path: &std::path::Path) -> Client {
        if let Credential::Token { refused_hint, .. } = &mut self.credential {
            *refused_hint = format!(
                "the token saved in {} by `deployer login` no longer works; run `deployer login` again \
                 (or set DEPLOYER_TOKEN)",
                path.display()
            );
        }
        self
    }

    /// The same controller, with this session instead of a token.
    pub fn with_session(&self, session: String) -> Client {
        Client { credential: Credential::Session(session), ..self.clone() }
    }

    /// The controller's address as the user gave it, without a trailing slash.
    pub fn url(&self) -> String {
        self.shown_base()
    }

    /// `POST /api/v1/auth/login`: the answer and the session cookie's value.
    pub async fn login(&self, email: &str, password: &str) -> Result<(Answer, String), CliError> {
        let body = serde_json::json!({ "email": email, "password": password });
        let request = self.http.post(self.endpoint(&["auth", "login"])).json(&body);
        let (headers, answer) = self.execute(request, None, REQUEST_TIMEOUT).await?;
        let session = session_cookie(&headers).ok_or_else(|| {
            CliError::Unexpected(format!("{} accepted the login but set no {SESSION_COOKIE} cookie", self.shown_base()))
        })?;
        Ok((answer, session))
    }

    /// `<base>/api/v1/<segments...>`, each segment percent-encoded so an id cannot change the route.
    fn endpoint(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", "v1"]).extend(segments);
        }
        url
    }

    /// A base URL for messages: what the user set, without a trailing slash.
    fn shown_base(&self) -> String {
        self.base.as_str().trim_end_matches('/').to_string()
    }

    pub async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> Result<Answer, CliError> {
        self.send(Method::GET, segments, query, None, true).await
    }

    /// A GET that needs no token (the health check).
    pub async fn get_public(&self, segments: &[&str]) -> Result<Answer, CliError> {
        self.send(Method::GET, segments, &[], None, false).await
    }

    pub async fn post(&self, segments: &[&str], body: &Value) -> Result<Answer, CliError> {
        self.send(Method::POST, segments, &[], Some(body), true).await
    }

    pub async fn patch(&self, segments: &[&str], body: &Value) -> Result<Answer, CliError> {
        self.send(Method::PATCH, segments, &[], Some(body), true).await
    }

    pub async fn put(&self, segments: &[&str], body: &Value) -> Result<Answer, CliError> {
        self.send(Method::PUT, segments, &[], Some(body), true).await
    }

    pub async fn delete(&self, segments: &[&str]) -> Result<Answer, CliError> {
        self.send(Method::DELETE, segments, &[], None, true).await
    }

    /// POSTs `body` as it is, with this content type (an upload, which may take minutes).
    pub async fn post_bytes(&self, segments: &[&str], content_type: &str, body: Vec<u8>) -> Result<Answer, CliError> {
        check_segments(segments)?;
        let (name, value, refused_hint) = self.authorization()?;
        let request = self
            .http
            .post(self.endpoint(segments))
            .header(name, value)
            .header(CONTENT_TYPE, content_type)
            .timeout(UPLOAD_TIMEOUT)
            .body(body);
        Ok(self.execute(request, refused_hint, UPLOAD_TIMEOUT).await?.1)
    }

    async fn send(
        &self,
        method: Method,
        segments: &[&str],
        query: &[(&str, String)],
        body: Option<&Value>,
        auth: bool,
    ) -> Result<Answer, CliError> {
        check_segments(segments)?;
        let mut request = self.http.request(method, self.endpoint(segments));
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(body) = body {
            request = request.json(body);
        }
        let mut refused_hint = None;
        if auth {
            let (name, value, hint) = self.authorization()?;
            request = request.header(name, value);
            refused_hint = hint;
        }
        Ok(self.execute(request, refused_hint, REQUEST_TIMEOUT).await?.1)
    }

    /// The header that proves who the client is, and the hint to show when the controller refuses it.
    fn authorization(&self) -> Result<(HeaderName, HeaderValue, Option<String>), CliError> {
        let (name, value, refused_hint) = match &self.credential {
            Credential::Token { token, refused_hint } => {
                (AUTHORIZATION, format!("Bearer {}", token.trim()), Some(refused_hint.clone()))
            }
            Credential::Session(session) => (COOKIE, format!("{SESSION_COOKIE}={session}"), None),
            Credential::None => {
                return Err(CliError::Usage {
                    message: "this command needs an API token, and none was given".into(),
                    hint: Some(TOKEN_HINT.into()),
                })
            }
        };
        let mut value = HeaderValue::from_str(&value).map_err(|_| CliError::Usage {
            message: "the API token holds characters that an HTTP header cannot carry".into(),
            hint: Some(format!("check the token: {TOKEN_HINT}")),
        })?;
        value.set_sensitive(true);
        Ok((name, value, refused_hint))
    }

    /// Opens the WebSocket at `/api/v1/<segments...>`: ws:// for an http:// controller.
    pub async fn websocket(&self, segments: &[&str]) -> Result<WebSocket, CliError> {
        check_segments(segments)?;
        let mut url = self.endpoint(segments);
        match url.scheme() {
            "http" => {
                url.set_scheme("ws").map_err(|()| CliError::Unexpected(format!("cannot make a ws:// URL of {url}")))?
            }
            // Client::new refuses https:// today; this build has no TLS for WebSockets either.
            "https" => {
                return Err(CliError::Usage {
                    message: "TLS WebSockets (wss://) are not supported by this CLI build yet".into(),
                    hint: Some("use the controller's http:// address".into()),
                })
            }
            other => return Err(CliError::Unexpected(format!("no WebSocket scheme for {other}:// URLs"))),
        }
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| CliError::Unexpected(format!("cannot make a WebSocket request for {url}: {e}")))?;
        let (name, value, refused_hint) = self.authorization()?;
        request.headers_mut().insert(name, value);
        request.headers_mut().insert(USER_AGENT, HeaderValue::from_static(CLIENT_NAME));
        match tokio::time::timeout(REQUEST_TIMEOUT, tokio_tungstenite::connect_async(request)).await {
            Ok(Ok((socket, _))) => Ok(socket),
            Ok(Err(e)) => Err(self.websocket_refused(e, refused_hint)),
            Err(_) => Err(CliError::Unreachable {
                url: self.shown_base(),
                reason: format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()),
            }),
        }
    }

    /// Why a WebSocket could not be opened, as the HTTP calls would say it.
    fn websocket_refused(&self, e: tungstenite::Error, refused_hint: Option<String>) -> CliError {
        match e {
            tungstenite::Error::Http(response) => {
                let status = response.status();
                let raw = String::from_utf8_lossy(response.body().as_deref().unwrap_or_default()).into_owned();
                match serde_json::from_str::<Value>(&raw).ok().as_ref().and_then(api_error) {
                    Some((code, message)) => {
                        let hint = refused_hint.filter(|_| status == StatusCode::UNAUTHORIZED);
                        CliError::Api { status, code, message, hint }
                    }
                    None => self.not_the_api(status, &raw),
                }
            }
            tungstenite::Error::Io(e) => CliError::Unreachable { url: self.shown_base(), reason: root_cause(&e) },
            // The connection went away mid-handshake: as unreachable as a refused one.
            tungstenite::Error::Protocol(tungstenite::error::ProtocolError::HandshakeIncomplete)
            | tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed => CliError::Unreachable {
                url: self.shown_base(),
                reason: "the connection closed during the WebSocket handshake".into(),
            },
            e => CliError::Unexpected(format!("cannot open a WebSocket to {}: {e}", self.shown_base())),
        }
    }

    /// Sends `request`; an API error answer becomes [`CliError::Api`], with `refused_hint` on a 401.
    async fn execute(
        &self,
        request: RequestBuilder,
        refused_hint: Option<String>,
        timeout: Duration,
    ) -> Result<(HeaderMap, Answer), CliError> {
        let response = request.send().await.map_err(|e| self.unreachable(&e, timeout))?;
        let status = response.status();
        let headers = response.headers().clone();
        let raw = response.text().await.map_err(|e| self.unreachable(&e, timeout))?;
        let parsed = if raw.trim().is_empty() { Ok(Value::Null) } else { serde_json::from_str::<Value>(&raw) };
        match parsed {
            Ok(json) if status.is_success() => Ok((headers, Answer { raw, json })),
            Ok(json) => match api_error(&json) {
                Some((code, message)) => {
                    let hint = refused_hint.filter(|_| status == StatusCode::UNAUTHORIZED);
                    Err(CliError::Api { status, code, message, hint })
                }
                None => Err(self.not_the_api(status, &raw)),
            },
            Err(_) => Err(self.not_the_api(status, &raw)),
        }
    }

    fn unreachable(&self, e: &reqwest::Error, timeout: Duration) -> CliError {
        let reason = if e.is_timeout() { format!("no answer within {} s", timeout.as_secs()) } else { root_cause(e) };
        CliError::Unreachable { url: self.shown_base(), reason }
    }

    fn not_the_api(&self, status: StatusCode, raw: &str) -> CliError {
        let mut excerpt: String = raw.trim().chars().take(200).collect();
        if excerpt.is_empty() {
            excerpt = "(empty body)".into();
        }
        CliError::Unexpected(format!(
            "{} answered HTTP {status}, which is not a Deployer API answer: {excerpt}\n\
             hint: is DEPLOYER_URL the controller's HTTP API address?",
            self.shown_base()
        ))
    }
}

/// A WebSocket to the controller.
pub type WebSocket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The URL parser drops "." and ".." segments, which would turn `show ..` into a listing.
fn check_segments(segments: &[&str]) -> Result<(), CliError> {
    match segments.iter().find(|s| matches!(s.trim(), "" | "." | "..")) {
        Some(bad) => Err(CliError::Usage { message: format!("{bad:?} is not a valid id"), hint: None }),
        None => Ok(()),
    }
}

/// `{"error":{"code","message"}}`, the API's one error shape.
fn api_error(json: &Value) -> Option<(String, String)> {
    let error = json.get("error")?;
    let message = error.get("message")?.as_str()?.to_string();
    let code = error.get("code").and_then(Value::as_str).unwrap_or_default().to_string();
    Some((code, message))
}

/// The value of the session cookie among the answer's `Set-Cookie` headers.
fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| v.split(';').next()?.trim().split_once('='))
        .find(|(name, value)| *name == SESSION_COOKIE && !value.is_empty())
        .map(|(_, value)| value.to_string())
}

/// The innermost cause says what went wrong ("Connection refused"); the outer ones say where.
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_keep_a_base_path_and_encode_ids() {
        let c = Client::new("http://h:1/deployer/", None).unwrap();
        assert_eq!(c.endpoint(&["projects", "a/b c"]).as_str(), "http://h:1/deployer/api/v1/projects/a%2Fb%20c");
        let c = Client::new("http://h:1", None).unwrap();
        assert_eq!(c.endpoint(&["health"]).as_str(), "http://h:1/api/v1/health");
    }

    #[test]
    fn only_plain_http_urls_are_accepted() {
        for bad in ["https://h:1", "ftp://h", "127.0.0.1:7700", "not a url"] {
            let e = Client::new(bad, None).err().unwrap_or_else(|| panic!("{bad} should be refused"));
            assert_eq!(e.exit_code(), 2, "{bad}");
        }
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(SET_COOKIE, "theme=dark; Path=/".parse().unwrap());
        headers.append(SET_COOKIE, "deployer_session=abc123; Path=/; HttpOnly; SameSite=Lax".parse().unwrap());
        assert_eq!(session_cookie(&headers), Some("abc123".into()));
        let mut cleared = HeaderMap::new();
        cleared.append(SET_COOKIE, "deployer_session=; Max-Age=0".parse().unwrap());
        assert_eq!(session_cookie(&cleared), None);
    }

    #[test]
    fn a_refused_websocket_reads_like_a_refused_request() {
        let c = Client::new("http://h:1", Some("t".into())).unwrap();
        let refusal = |status: u16, body: &str| {
            let mut r = tungstenite::http::Response::new(Some(body.as_bytes().to_vec()));
            *r.status_mut() = StatusCode::from_u16(status).unwrap();
            c.websocket_refused(tungstenite::Error::Http(Box::new(r)), Some("log in again".into()))
        };
        let body = r#"{"error":{"code":"not_found","message":"no deployment with id d9"}}"#;
        match refusal(404, body) {
            CliError::Api { status, message, hint, .. } => {
                assert_eq!((status.as_u16(), message.as_str(), hint), (404, "no deployment with id d9", None));
            }
            other => panic!("{other:?}"),
        }
        let body = r#"{"error":{"code":"unauthorized","message":"invalid token"}}"#;
        assert_eq!(refusal(401, body).hint().as_deref(), Some("log in again"));
        assert!(matches!(refusal(502, "<html>bad gateway</html>"), CliError::Unexpected(_)));
        let refused = tungstenite::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(matches!(c.websocket_refused(refused, None), CliError::Unreachable { .. }));
        let cut = tungstenite::Error::Protocol(tungstenite::error::ProtocolError::HandshakeIncomplete);
        assert!(matches!(c.websocket_refused(cut, None), CliError::Unreachable { .. }));
    }

    #[test]
    fn api_errors_are_recognized() {
        let v = serde_json::json!({"error": {"code": "conflict", "message": "taken"}});
        assert_eq!(api_error(&v), Some(("conflict".into(), "taken".into())));
        assert_eq!(api_error(&serde_json::json!({"status": "ok"})), None);
    }
}
