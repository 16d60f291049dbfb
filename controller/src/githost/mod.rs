//! Reports deployments back to the git host: commit statuses on the deployed commit and one
//! comment per pull/merge request (the preview's address), edited in place on each deployment.
//!
//! GitHub (a token, or a GitHub App's installation tokens) and GitLab (an access token), over
//! their REST APIs. Tokens and keys are never logged, nor shown by `Debug`.

mod github;
mod github_app;
mod gitlab;
mod transport;

use std::fmt;

use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Bytes;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use self::transport::TransportError;

use self::github_app::AppAuth;
use self::transport::{error_chain, status_text, HttpClient};

/// The hidden first line of the comment this client owns on a pull/merge request.
pub const COMMENT_MARKER: &str = "<!-- deployer:preview -->";
/// The most GitHub keeps of a commit status's description.
const GITHUB_DESCRIPTION_CHARS: usize = 140;
/// The most GitLab keeps of a commit status's description (a 255-character column).
const GITLAB_DESCRIPTION_CHARS: usize = 255;
/// `User-Agent` of every request (GitHub refuses requests without one).
const USER_AGENT: &str = "deployer";
/// How many pages of 100 comments are searched for the marker before posting a new comment.
const MAX_COMMENT_PAGES: usize = 10;

/// The state of a commit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Pending,
    Success,
    Failure,
}

/// A commit status to set.
#[derive(Clone, Debug)]
pub struct StatusUpdate<'a> {
    /// `owner/name` on GitHub; the project path `group/subgroup/project` (or its numeric ID) on GitLab.
    pub repo: &'a str,
    /// The full commit SHA.
    pub sha: &'a str,
    pub state: State,
    /// Where the status links to: the deployment's page or the preview.
    pub target_url: Option<&'a str>,
    /// One line for people; GitHub keeps 140 characters, the rest is cut.
    pub description: &'a str,
    /// Tells this status apart from the commit's others, e.g. `deployer/web`.
    pub context: &'a str,
}

/// How to authenticate to the git host; the variant also chooses the host's API.
#[derive(Clone)]
pub enum Credentials {
    /// A GitHub personal access token, classic (`repo` scope) or fine-grained ("Commit statuses:
    /// write", "Pull requests: write").
    GithubToken(String),
    /// A GitHub App (`GITHUB_APP_ID`, `GITHUB_APP_PRIVATE_KEY`): each call uses a token of the
    /// app's installation on the repository, kept until 5 minutes before it expires.
    GithubApp { app_id: String, private_key_pem: String },
    /// A GitLab personal, group or project access token (`GITLAB_ACCESS_TOKEN`) with the `api` scope.
    GitlabToken(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::GithubToken(_) => f.write_str("GithubToken(<redacted>)"),
            Credentials::GithubApp { app_id, .. } => {
                f.debug_struct("GithubApp").field("app_id", app_id).field("private_key_pem", &"<redacted>").finish()
            }
            Credentials::GitlabToken(_) => f.write_str("GitlabToken(<redacted>)"),
        }
    }
}

/// Why a call to the git host failed. Each names the call, e.g.
/// `set commit status (POST /repos/acme/web/statuses/0f3c…)`.
#[derive(Debug, thiserror::Error)]
pub enum GitHostError {
    #[error("git host URL {url:?} {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("TLS to the git host: {0}")]
    Tls(String),
    #[error("GitHub App credentials: {0}")]
    InvalidAppCredentials(String),
    #[error("{0}")]
    InvalidInput(String),
    #[error("{call}: {host}: {}", error_chain(source))]
    Unreachable {
        call: String,
        host: String,
        #[source]
        source: TransportError,
    },
    #[error("{call}: {host} answered {}: {message}{hint}", status_text(*status))]
    Rejected { call: String, host: String, status: StatusCode, message: String, hint: &'static str },
    #[error("{call}: unexpected answer from {host}: {reason}")]
    UnexpectedAnswer { call: String, host: String, reason: String },
}

impl GitHostError {
    /// The host's HTTP status, when it answered with an error.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            GitHostError::Rejected { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A client of one git host's API.
pub struct GitHost {
    http: HttpClient,
    auth: Auth,
}

enum Auth {
    GithubToken(String),
    GithubApp(Box<AppAuth>),
    GitlabToken(String),
}

impl fmt::Debug for GitHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.auth {
            Auth::GithubToken(_) => "GitHub token",
            Auth::GithubApp(app) => return write!(f, "GitHost(GitHub App {} at {})", app.app_id(), self.http.host()),
            Auth::GitlabToken(_) => "GitLab token",
        };
        write!(f, "GitHost({kind} at {})", self.http.host())
    }
}

impl GitHost {
    /// `api_url`: GitHub's API root (`https://api.github.com`, or `https://host/api/v3` for GitHub
    /// Enterprise Server), or GitLab's instance URL (`https://gitlab.com`; the API is under
    /// `/api/v4`). `extra_roots_pem`: trust these CA certificates instead of the system's (a
    /// private CA). Plain `http://` is accepted for tests and private networks.
    pub fn new(
        credentials: Credentials,
        api_url: &str,
        extra_roots_pem: Option<&str>,
    ) -> Result<GitHost, GitHostError> {
        let auth = match credentials {
            Credentials::GithubToken(token) => Auth::GithubToken(checked_token(token, "GitHub token")?),
            Credentials::GithubApp { app_id, private_key_pem } => {
                Auth::GithubApp(Box::new(AppAuth::new(app_id, &private_key_pem)?))
            }
            Credentials::GitlabToken(token) => Auth::GitlabToken(checked_token(token, "GitLab token")?),
        };
        Ok(GitHost { http: HttpClient::new(api_url, extra_roots_pem)?, auth })
    }

    /// Sets the status of a commit: GitHub's commit statuses, GitLab's external pipeline jobs.
    pub async fn set_status(&self, update: &StatusUpdate<'_>) -> Result<(), GitHostError> {
        check_sha(update.sha)?;
        if update.context.is_empty() {
            return Err(GitHostError::InvalidInput("a commit status needs a context, e.g. deployer/web".to_owned()));
        }
        match &self.auth {
            Auth::GitlabToken(token) => gitlab::set_status(self, token, update).await,
            Auth::GithubToken(_) | Auth::GithubApp(_) => github::set_status(self, update).await,
        }
    }

    /// Posts `body` as a comment on pull request / merge request `number`, or edits the comment
    /// posted before (found by [`COMMENT_MARKER`], which the posted body starts with).
    pub async fn upsert_comment(&self, repo: &str, number: u64, body: &str) -> Result<(), GitHostError> {
        let body = format!("{COMMENT_MARKER}\n{body}");
        match &self.auth {
            Auth::GitlabToken(token) => gitlab::upsert_comment(self, token, repo, number, &body).await,
            Auth::GithubToken(_) | Auth::GithubApp(_) => github::upsert_comment(self, repo, number, &body).await,
        }
    }

    /// Sends one request and returns the answer if its status is a success; `what` names the
    /// call in errors, `not_found` says what a 404 means for it.
    async fn call(
        &self,
        what: &str,
        req: Request<String>,
        not_found: &'static str,
    ) -> Result<(Response<Bytes>, String), GitHostError> {
        let call = format!("{what} ({} {})", req.method(), req.uri().path());
        let answer = match self.http.send(req).await {
            Ok(answer) => answer,
            Err(source) => {
                tracing::debug!(%call, error = %error_chain(&source), "git host unreachable");
                return Err(GitHostError::Unreachable { call, host: self.http.host().to_owned(), source });
            }
        };
        let status = answer.status();
        tracing::debug!(%call, %status, "git host answered");
        if status.is_success() {
            return Ok((answer, call));
        }
        let hint = match status {
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => self.credentials_hint(),
            StatusCode::NOT_FOUND => not_found,
            _ => "",
        };
        Err(GitHostError::Rejected {
            call,
            host: self.http.host().to_owned(),
            status,
            message: error_message(answer.body()),
            hint,
        })
    }

    /// The answer's JSON, as documented for the call.
    fn decode<T: DeserializeOwned>(&self, call: &str, answer: &Response<Bytes>) -> Result<T, GitHostError> {
        serde_json::from_slice(answer.body()).map_err(|e| GitHostError::UnexpectedAnswer {
            call: call.to_owned(),
            host: self.http.host().to_owned(),
            reason: format!("not the documented JSON: {e}"),
        })
    }

    /// The path of the next page of a listing, from its `Link` header.
    fn next_page(&self, call: &str, answer: &Response<Bytes>) -> Result<Option<String>, GitHostError> {
        let Some(link) = answer.headers().get(http::header::LINK).and_then(|v| v.to_str().ok()) else {
            return Ok(None);
        };
        let Some(url) = transport::next_link(link) else { return Ok(None) };
        match self.http.path_on_origin(url) {
            Some(path) => Ok(Some(path)),
            None => Err(GitHostError::UnexpectedAnswer {
                call: call.to_owned(),
                host: self.http.host().to_owned(),
                reason: format!("the next page is elsewhere ({url}); not following it with these credentials"),
            }),
        }
    }

    fn credentials_hint(&self) -> &'static str {
        match &self.auth {
            Auth::GithubToken(_) => {
                ". Check the GitHub token: it must be valid and allowed to write to this repository \
                 (fine-grained: \"Commit statuses: write\" and \"Pull requests: write\"; classic: the repo scope)"
            }
            Auth::GithubApp(_) => {
                ". Check the GitHub App credentials (GITHUB_APP_ID, GITHUB_APP_PRIVATE_KEY), that the app \
                 is installed on this repository and that it has the permissions \"Commit statuses: write\" \
                 and \"Pull requests: write\""
            }
            Auth::GitlabToken(_) => {
                ". Check the GitLab access token (GITLAB_ACCESS_TOKEN): it must be valid, unexpired, have \
                 the api scope and at least the Developer role on the project"
            }
        }
    }
}

/// A request with a JSON body (or none), the path under the API root, and this client's
/// `User-Agent`; the caller adds the authentication headers.
fn request(method: Method, path: &str, body: Option<&Value>) -> Request<String> {
    let mut builder = Request::builder().method(method).uri(path).header(http::header::USER_AGENT, USER_AGENT);
    if body.is_some() {
        builder = builder.header(CONTENT_TYPE, "application/json");
    }
    builder
        .body(body.map(Value::to_string).unwrap_or_default())
        .expect("a request from a validated path and static headers is valid")
}

/// Whether a comment is the one this client posted: its first line is the marker.
fn is_ours(comment: &str) -> bool {
    comment.lines().next().is_some_and(|line| line.trim() == COMMENT_MARKER)
}

/// A header value holding a secret: hyper will not index it (HPACK) and `Debug` hides it.
fn secret_header(value: &str) -> Result<HeaderValue, GitHostError> {
    let mut value = HeaderValue::from_str(value)
        .map_err(|_| GitHostError::InvalidInput("the token holds characters not allowed in a header".to_owned()))?;
    value.set_sensitive(true);
    Ok(value)
}

fn checked_token(token: String, what: &str) -> Result<String, GitHostError> {
    let token = token.trim().to_owned();
    if token.is_empty() {
        return Err(GitHostError::InvalidInput(format!("the {what} is empty")));
    }
    secret_header(&token)?;
    Ok(token)
}

fn check_sha(sha: &str) -> Result<(), GitHostError> {
    if (7..=64).contains(&sha.len()) && sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(GitHostError::InvalidInput(format!("{sha:?} is not a commit SHA")))
    }
}

/// The host's reason in an error answer: GitHub's `message` and its `errors`, GitLab's `message`
/// (a string, or field errors as an object) or `error`; else the start of the body.
fn error_message(body: &[u8]) -> String {
    let Ok(Value::Object(answer)) = serde_json::from_slice::<Value>(body) else {
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        return if text.is_empty() { "no reason given".to_owned() } else { truncate(text, 200).into_owned() };
    };
    let mut parts = Vec::new();
    for key in ["message", "error", "error_description"] {
        match answer.get(key) {
            Some(Value::String(s)) if !s.is_empty() => parts.push(s.clone()),
            Some(Value::Null) | None => {}
            Some(other) => parts.push(other.to_string()),
        }
    }
    for error in answer.get("errors").and_then(Value::as_array).into_iter().flatten() {
        match error {
            Value::String(s) => parts.push(s.clone()),
            Value::Object(fields) => match fields.get("message").and_then(Value::as_str) {
                Some(message) => parts.push(message.to_owned()),
                None => {
                    let field = |key| fields.get(key).and_then(Value::as_str).unwrap_or("?");
                    parts.push(format!("{} {}: {}", field("resource"), field("field"), field("code")));
                }
            },
            other => parts.push(other.to_string()),
        }
    }
    if parts.is_empty() {
        "no reason given".to_owned()
    } else {
        parts.join("; ")
    }
}

/// At most `max` characters of `text`, the cut marked with an ellipsis.
fn truncate(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => text.into(),
        Some(_) => {
            let end = text.char_indices().nth(max - 1).map_or(text.len(), |(i, _)| i);
            format!("{}…", &text[..end]).into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_do_not_show_their_secrets() {
        let shown = format!(
            "{:?} {:?} {:?}",
            Credentials::GithubToken("ghp_secret".to_owned()),
            Credentials::GithubApp { app_id: "12345".to_owned(), private_key_pem: "-----BEGIN secret".to_owned() },
            Credentials::GitlabToken("glpat-secret".to_owned()),
        );
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("12345"), "{shown}");
        let host = GitHost::new(Credentials::GithubToken("ghp_secret".to_owned()), "http://127.0.0.1:1", None).unwrap();
        let shown = format!("{host:?}");
        assert!(!shown.contains("secret"), "{shown}");
    }

    #[test]
    fn the_hosts_reasons_are_extracted() {
        let github = br#"{"message":"Validation Failed","errors":[{"resource":"Status","code":"custom","field":"state","message":"state is not included in the list"}],"documentation_url":"https://docs.github.com/rest"}"#;
        assert_eq!(error_message(github), "Validation Failed; state is not included in the list");
        let github = br#"{"message":"Validation Failed","errors":[{"resource":"IssueComment","code":"missing_field","field":"body"}]}"#;
        assert_eq!(error_message(github), "Validation Failed; IssueComment body: missing_field");
        assert_eq!(error_message(br#"{"message":"401 Unauthorized"}"#), "401 Unauthorized");
        assert_eq!(
            error_message(br#"{"error":"state does not have a valid value"}"#),
            "state does not have a valid value"
        );
        assert_eq!(error_message(br#"{"message":{"name":["is too long"]}}"#), r#"{"name":["is too long"]}"#);
        assert_eq!(error_message(b"<html>Bad Gateway</html>"), "<html>Bad Gateway</html>");
        assert_eq!(error_message(b""), "no reason given");
        assert_eq!(error_message(b"{}"), "no reason given");
    }

    #[test]
    fn long_descriptions_are_cut_at_a_character() {
        assert_eq!(truncate("short", 140), "short");
        let long = "é".repeat(150);
        let cut = truncate(&long, 140);
        assert_eq!(cut.chars().count(), 140);
        assert!(cut.ends_with('…'));
        assert_eq!(truncate(&"a".repeat(140), 140).chars().count(), 140);
    }

    #[test]
    fn only_commit_shas_are_accepted() {
        assert!(check_sha("0123456789abcdef0123456789abcdef01234567").is_ok());
        for bad in ["", "main", "../../x", "0123456789abcdef0123456789abcdef0123456?"] {
            assert!(check_sha(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn empty_tokens_are_refused_at_construction() {
        let err = GitHost::new(Credentials::GitlabToken(" ".to_owned()), "https://gitlab.com", None).unwrap_err();
        assert!(err.to_string().contains("GitLab token is empty"), "{err}");
        let err = GitHost::new(Credentials::GithubToken("a\nb".to_owned()), "http://127.0.0.1:1", None).unwrap_err();
        assert!(matches!(err, GitHostError::InvalidInput(_)), "{err:?}");
    }
}
