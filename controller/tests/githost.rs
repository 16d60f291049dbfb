//! The git host client against local fakes of GitHub's and GitLab's REST APIs.
//!
//! Each fake checks every request against the documented shape of its endpoint (method, path,
//! headers, JSON fields and their allowed values), answers as the real API does (201 with the
//! created object, `Link` pagination, `{"message": ...}` errors) and keeps what was created, so a
//! test asserts what a user of the git host would see: the statuses and the comments.
//!
//! The GitHub App tests sign with an RSA key made by the `openssl` command.

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use deployer_controller::githost::{Credentials, GitHost, GitHostError, State, StatusUpdate, COMMENT_MARKER};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

const SHA: &str = "6dcb09b5b57875f334f61aebed695e2e4193db5e";
const GITHUB_TOKEN: &str = "ghp_test_token_0123456789";
const GITLAB_TOKEN: &str = "glpat-test-token-0123";
const APP_ID: u64 = 12345;
const INSTALLATION_ID: u64 = 4242;
const REPOSITORY_ID: u64 = 1296269;

// ---- GitHub ----------------------------------------------------------------------------------

#[tokio::test]
async fn github_statuses_with_a_token_are_posted_as_documented() {
    let github = FakeGitHub::with_token(GITHUB_TOKEN);
    let server = FakeServer::start(github.clone()).await;
    let host = GitHost::new(Credentials::GithubToken(GITHUB_TOKEN.to_owned()), &server.url, None).unwrap();

    let mut update = status_update("acme/web", State::Pending, None, "deploying (building)");
    host.set_status(&update).await.expect("pending status set");
    let long = "the build failed: ".to_owned() + &"x".repeat(200);
    update.state = State::Failure;
    update.description = &long;
    update.target_url = Some("https://deployer.example/deployments/d-1");
    host.set_status(&update).await.expect("failure status set");
    update.state = State::Success;
    update.description = "running";
    host.set_status(&update).await.expect("success status set");

    github.assert_no_violations();
    let statuses = github.statuses();
    assert_eq!(statuses.len(), 3);
    assert_eq!(statuses[0]["state"], "pending");
    assert_eq!(statuses[0]["context"], "deployer/web");
    assert_eq!(statuses[0]["description"], "deploying (building)");
    assert!(statuses[0].get("target_url").is_none(), "no target_url when none is given: {}", statuses[0]);
    assert_eq!(statuses[1]["state"], "failure");
    let description = statuses[1]["description"].as_str().unwrap();
    assert_eq!(description.chars().count(), 140, "GitHub keeps 140 characters: {description}");
    assert!(description.starts_with("the build failed: xxx"), "{description}");
    assert_eq!(statuses[1]["target_url"], "https://deployer.example/deployments/d-1");
    assert_eq!(statuses[2]["state"], "success");
    let paths: Vec<String> = server.requests().iter().map(|r| format!("{} {}", r.method, r.target)).collect();
    assert_eq!(paths, vec![format!("POST /repos/acme/web/statuses/{SHA}"); 3]);
}

#[tokio::test]
async fn a_github_app_signs_a_jwt_finds_its_installation_and_reuses_the_installation_token() {
    let key = AppKey::generate(KeyFormat::Pkcs8);
    let github = FakeGitHub::with_app(&key, time::Duration::hours(1));
    let server = FakeServer::start(github.clone()).await;
    let credentials = Credentials::GithubApp { app_id: APP_ID.to_string(), private_key_pem: key.private_pem.clone() };
    let host = GitHost::new(credentials, &server.url, None).unwrap();

    let mut update = status_update("acme/web", State::Pending, None, "deploying");
    host.set_status(&update).await.expect("first status set with an installation token");
    update.state = State::Success;
    host.set_status(&update).await.expect("second status set with the same token");

    github.assert_no_violations();
    let requests = server.requests();
    let calls: Vec<String> = requests.iter().map(|r| format!("{} {}", r.method, r.target)).collect();
    assert_eq!(
        calls,
        [
            "GET /repos/acme/web/installation".to_owned(),
            format!("POST /app/installations/{INSTALLATION_ID}/access_tokens"),
            format!("POST /repos/acme/web/statuses/{SHA}"),
            format!("POST /repos/acme/web/statuses/{SHA}"),
        ],
        "one installation lookup and one token for two statuses"
    );
    // The app's own calls carry a JWT; the statuses the installation token GitHub issued.
    for jwt_call in &requests[..2] {
        let jwt = jwt_call.bearer().expect("a bearer JWT");
        let claims = verify_jwt(jwt, &key.public_pkcs1_der).unwrap_or_else(|e| panic!("{e}: {jwt}"));
        assert_eq!(claims["iss"], APP_ID);
        let (iat, exp) = (claims["iat"].as_i64().unwrap(), claims["exp"].as_i64().unwrap());
        let now = OffsetDateTime::now_utc().unix_timestamp();
        assert!((now - 75..=now - 45).contains(&iat), "iat is backdated a minute: iat {iat}, now {now}");
        assert!(exp > now && exp - now <= 600, "exp within GitHub's 10 minutes: exp {exp}, now {now}");
    }
    let issued = github.issued_tokens();
    assert_eq!(issued.len(), 1);
    for status_call in &requests[2..] {
        assert_eq!(status_call.bearer(), Some(issued[0].as_str()));
    }
    assert_eq!(github.statuses().len(), 2);
}

#[tokio::test]
async fn a_github_app_token_close_to_expiry_is_replaced_and_a_pkcs1_key_works() {
    let key = AppKey::generate(KeyFormat::Pkcs1);
    assert!(key.private_pem.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "GitHub hands out PKCS#1 keys");
    // Tokens that expire in 4 minutes: inside the 5-minute margin, so each is used once.
    let github = FakeGitHub::with_app(&key, time::Duration::minutes(4));
    let server = FakeServer::start(github.clone()).await;
    // As an environment variable often carries it: one line, newlines written as `\n`.
    let one_line = key.private_pem.trim_end().replace('\n', "\\n");
    let credentials = Credentials::GithubApp { app_id: APP_ID.to_string(), private_key_pem: one_line };
    let host = GitHost::new(credentials, &server.url, None).unwrap();

    let update = status_update("acme/web", State::Pending, None, "deploying");
    host.set_status(&update).await.unwrap();
    host.set_status(&update).await.unwrap();

    github.assert_no_violations();
    let calls: Vec<String> = server.requests().iter().map(|r| format!("{} {}", r.method, r.target)).collect();
    let count = |call: &str| calls.iter().filter(|c| c.as_str() == call).count();
    assert_eq!(count("GET /repos/acme/web/installation"), 1, "the installation is remembered: {calls:?}");
    assert_eq!(count(&format!("POST /app/installations/{INSTALLATION_ID}/access_tokens")), 2, "{calls:?}");
    let issued = github.issued_tokens();
    assert_eq!(issued.len(), 2);
    let status_tokens: Vec<_> = server
        .requests()
        .iter()
        .filter(|r| r.target.contains("/statuses/"))
        .map(|r| r.bearer().unwrap().to_owned())
        .collect();
    assert_eq!(status_tokens, issued, "each status used the token issued just before it");
}

#[tokio::test]
async fn a_github_app_not_installed_on_the_repository_says_so() {
    let key = AppKey::generate(KeyFormat::Pkcs8);
    let github = FakeGitHub::with_app(&key, time::Duration::hours(1));
    let server = FakeServer::start(github.clone()).await;
    let credentials = Credentials::GithubApp { app_id: APP_ID.to_string(), private_key_pem: key.private_pem.clone() };
    let host = GitHost::new(credentials, &server.url, None).unwrap();

    let err = host.set_status(&status_update("other/repo", State::Pending, None, "x")).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::NOT_FOUND), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("GET /repos/other/repo/installation"), "{text}");
    assert!(text.contains("not installed on this repository"), "{text}");
    github.assert_no_violations();
}

#[tokio::test]
async fn a_pull_request_comment_is_posted_once_then_edited_in_place_across_pages() {
    let github = FakeGitHub::with_token(GITHUB_TOKEN);
    // Others' comments first, two per page, so ours lands on the third page.
    github.add_comment(7, "octocat", "Looks good to me");
    github.add_comment(7, "hubot", &format!("Quoting the bot:\n{COMMENT_MARKER}\nnot the bot's comment"));
    github.add_comment(7, "octocat", "Can we deploy this?");
    github.add_comment(8, "octocat", &format!("{COMMENT_MARKER}\nanother pull request's preview"));
    let server = FakeServer::start(github.clone()).await;
    let host = GitHost::new(Credentials::GithubToken(GITHUB_TOKEN.to_owned()), &server.url, None).unwrap();

    host.upsert_comment("acme/web", 7, "Preview at https://pr-7.example").await.expect("comment posted");
    let comments = github.comments(7);
    assert_eq!(comments.len(), 4);
    assert_eq!(comments[3].body, format!("{COMMENT_MARKER}\nPreview at https://pr-7.example"));
    let ours = comments[3].id;

    server.clear_requests();
    host.upsert_comment("acme/web", 7, "Preview at https://pr-7.example (new commit)").await.expect("comment edited");
    let comments = github.comments(7);
    assert_eq!(comments.len(), 4, "edited, not posted again: {comments:?}");
    assert_eq!(comments[3].id, ours);
    assert_eq!(comments[3].body, format!("{COMMENT_MARKER}\nPreview at https://pr-7.example (new commit)"));
    assert_eq!(comments[1].body, format!("Quoting the bot:\n{COMMENT_MARKER}\nnot the bot's comment"), "untouched");
    assert_eq!(github.comments(8).len(), 1, "the other pull request is untouched");

    let calls: Vec<String> = server.requests().iter().map(|r| format!("{} {}", r.method, r.target)).collect();
    assert_eq!(
        calls,
        [
            "GET /repos/acme/web/issues/7/comments?per_page=100".to_owned(),
            format!("GET /repositories/{REPOSITORY_ID}/issues/7/comments?per_page=100&page=2"),
            format!("PATCH /repos/acme/web/issues/comments/{ours}"),
        ],
        "the second page came from the Link header, as GitHub writes it"
    );

    // The same body again: nothing to edit.
    server.clear_requests();
    host.upsert_comment("acme/web", 7, "Preview at https://pr-7.example (new commit)").await.unwrap();
    assert!(server.requests().iter().all(|r| r.method == Method::GET), "{:?}", server.requests());
    github.assert_no_violations();
}

#[tokio::test]
async fn github_over_https_trusts_the_given_ca_and_only_it() {
    let (ca_pem, cert_pem, key_pem) = deployer_tests::pebble::https_certificate();
    let github = FakeGitHub::with_token(GITHUB_TOKEN);
    let server = FakeServer::start_tls(github.clone(), &cert_pem, &key_pem).await;
    assert!(server.url.starts_with("https://127.0.0.1:"));

    let host = GitHost::new(Credentials::GithubToken(GITHUB_TOKEN.to_owned()), &server.url, Some(&ca_pem)).unwrap();
    host.set_status(&status_update("acme/web", State::Success, None, "running")).await.expect("status over HTTPS");
    host.upsert_comment("acme/web", 3, "Preview").await.expect("comment over HTTPS");
    assert_eq!(github.statuses().len(), 1);
    assert_eq!(github.comments(3).len(), 1);

    let (other_ca, _, _) = deployer_tests::pebble::https_certificate();
    let host = GitHost::new(Credentials::GithubToken(GITHUB_TOKEN.to_owned()), &server.url, Some(&other_ca)).unwrap();
    let err = host.set_status(&status_update("acme/web", State::Success, None, "running")).await.unwrap_err();
    assert!(matches!(err, GitHostError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("TLS"), "{err}");
    assert_eq!(github.statuses().len(), 1, "nothing sent to a server that is not trusted");
    github.assert_no_violations();
}

#[tokio::test]
async fn refused_credentials_are_named_in_the_error() {
    let github = FakeGitHub::with_token(GITHUB_TOKEN);
    let server = FakeServer::start(github.clone()).await;
    let host = GitHost::new(Credentials::GithubToken("ghp_revoked".to_owned()), &server.url, None).unwrap();
    let err = host.set_status(&status_update("acme/web", State::Pending, None, "x")).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNAUTHORIZED));
    let text = err.to_string();
    assert!(text.contains(&format!("set commit status (POST /repos/acme/web/statuses/{SHA})")), "{text}");
    assert!(text.contains("401 Unauthorized: Bad credentials"), "{text}");
    assert!(text.contains("Check the GitHub token"), "{text}");
    assert!(!text.contains("ghp_revoked"), "the token is never shown: {text}");

    let gitlab = FakeGitLab::new(GITLAB_TOKEN);
    let server = FakeServer::start(gitlab.clone()).await;
    let host = GitHost::new(Credentials::GitlabToken("glpat-wrong".to_owned()), &server.url, None).unwrap();
    let err = host.upsert_comment("group/project", 5, "Preview").await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("401 Unauthorized: 401 Unauthorized"), "{text}");
    assert!(text.contains("GITLAB_ACCESS_TOKEN") && text.contains("api scope"), "{text}");
    assert!(!text.contains("glpat-wrong"), "{text}");

    let key = AppKey::generate(KeyFormat::Pkcs8);
    let github = FakeGitHub::with_app(&AppKey::generate(KeyFormat::Pkcs8), time::Duration::hours(1));
    let server = FakeServer::start(github.clone()).await;
    let credentials = Credentials::GithubApp { app_id: APP_ID.to_string(), private_key_pem: key.private_pem.clone() };
    let host = GitHost::new(credentials, &server.url, None).unwrap();
    let err = host.set_status(&status_update("acme/web", State::Pending, None, "x")).await.unwrap_err();
    let text = err.to_string();
    assert!(text.contains("401 Unauthorized: A JSON web token could not be decoded"), "{text}");
    assert!(text.contains("GITHUB_APP_PRIVATE_KEY"), "{text}");
    assert!(text.contains("\"Commit statuses: write\"") && text.contains("\"Pull requests: write\""), "{text}");
}

#[tokio::test]
async fn githubs_validation_message_is_in_the_error() {
    let github = FakeGitHub::with_token(GITHUB_TOKEN);
    *github.refuse_statuses.lock().unwrap() = Some((
        StatusCode::UNPROCESSABLE_ENTITY,
        json!({
            "message": "Validation Failed",
            "errors": [{"resource": "Status", "code": "custom", "field": "target_url", "message": "target_url is not a valid URL"}],
            "documentation_url": "https://docs.github.com/rest/commits/statuses#create-a-commit-status",
            "status": "422"
        }),
    ));
    let server = FakeServer::start(github.clone()).await;
    let host = GitHost::new(Credentials::GithubToken(GITHUB_TOKEN.to_owned()), &server.url, None).unwrap();
    let err =
        host.set_status(&status_update("acme/web", State::Success, Some("not a url"), "running")).await.unwrap_err();
    assert_eq!(err.status(), Some(StatusCode::UNPROCESSABLE_ENTITY));
    let text = err.to_string();
    assert!(text.contains("422 Unprocessable Entity: Validation Failed; target_url is not a valid URL"), "{text}");
    assert!(!text.contains("Check the"), "no credentials hint for a validation error: {text}");
}

#[tokio::test]
async fn a_host_nobody_listens_on_is_reported_with_the_call() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let host = GitHost::new(Credentials::GitlabToken(GITLAB_TOKEN.to_owned()), &url, None).unwrap();
    let err = host.set_status(&status_update("group/project", State::Pending, None, "x")).await.unwrap_err();
    assert!(matches!(err, GitHostError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().starts_with("set commit status (POST /api/v4/projects/group%2Fproject/statuses/"), "{err}");
}

// ---- GitLab ----------------------------------------------------------------------------------

#[tokio::test]
async fn gitlab_statuses_use_the_encoded_project_path_and_gitlabs_states() {
    let gitlab = FakeGitLab::new(GITLAB_TOKEN);
    let server = FakeServer::start(gitlab.clone()).await;
    let host = GitHost::new(Credentials::GitlabToken(GITLAB_TOKEN.to_owned()), &server.url, None).unwrap();

    let mut update = status_update("group/project", State::Pending, None, "deploying");
    host.set_status(&update).await.expect("pending");
    // GitLab refuses a status already in the state asked for; that is not an error.
    host.set_status(&update).await.expect("pending again");
    update.state = State::Failure;
    update.target_url = Some("https://deployer.example/deployments/d-2");
    update.description = "build failed";
    host.set_status(&update).await.expect("failed");

    gitlab.assert_no_violations();
    let statuses = gitlab.statuses();
    assert_eq!(statuses.len(), 2, "{statuses:?}");
    assert_eq!(statuses[0]["state"], "pending");
    assert_eq!(statuses[0]["name"], "deployer/web");
    assert_eq!(statuses[1]["state"], "failed");
    assert_eq!(statuses[1]["target_url"], "https://deployer.example/deployments/d-2");
    assert_eq!(statuses[1]["description"], "build failed");
    let requests = server.requests();
    assert_eq!(requests.len(), 3);
    for r in &requests {
        assert_eq!(r.target, format!("/api/v4/projects/group%2Fproject/statuses/{SHA}"));
    }
}

#[tokio::test]
async fn a_merge_request_note_is_posted_once_then_edited_in_place() {
    let gitlab = FakeGitLab::new(GITLAB_TOKEN);
    gitlab.add_note(11, "alice", "Please review", false);
    gitlab.add_note(11, "deployer-bot", "added 1 commit", true);
    gitlab.add_note(11, "bob", "LGTM", false);
    let server = FakeServer::start(gitlab.clone()).await;
    let host = GitHost::new(Credentials::GitlabToken(GITLAB_TOKEN.to_owned()), &server.url, None).unwrap();

    host.upsert_comment("group/sub/project", 11, "Preview at https://mr-11.example").await.expect("note posted");
    let notes = gitlab.notes(11);
    assert_eq!(notes.len(), 4);
    let ours = notes[3].id;
    assert_eq!(notes[3].body, format!("{COMMENT_MARKER}\nPreview at https://mr-11.example"));

    server.clear_requests();
    host.upsert_comment("group/sub/project", 11, "Preview at https://mr-11.example (updated)").await.expect("edited");
    let notes = gitlab.notes(11);
    assert_eq!(notes.len(), 4, "edited, not posted again");
    assert_eq!(notes[3].body, format!("{COMMENT_MARKER}\nPreview at https://mr-11.example (updated)"));
    let calls: Vec<String> = server.requests().iter().map(|r| format!("{} {}", r.method, r.target)).collect();
    let notes_path = "/api/v4/projects/group%2Fsub%2Fproject/merge_requests/11/notes";
    assert_eq!(
        calls,
        [
            format!("GET {notes_path}?sort=asc&order_by=created_at&per_page=100"),
            format!("GET {notes_path}?sort=asc&order_by=created_at&per_page=100&page=2"),
            format!("PUT {notes_path}/{ours}"),
        ]
    );
    gitlab.assert_no_violations();
}

// ---- The fake GitHub ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Comment {
    id: u64,
    number: u64,
    user: String,
    body: String,
}

#[derive(Default)]
struct FakeGitHub {
    /// Personal access tokens and the installation tokens issued so far.
    tokens: Mutex<Vec<String>>,
    app: Option<FakeApp>,
    issued: Mutex<Vec<String>>,
    statuses: Mutex<Vec<Value>>,
    comments: Mutex<Vec<Comment>>,
    refuse_statuses: Mutex<Option<(StatusCode, Value)>>,
    violations: Mutex<Vec<String>>,
}

struct FakeApp {
    public_key: Vec<u8>,
    token_lifetime: time::Duration,
}

/// GitHub's page size here: small, so that a few comments make several pages.
const GITHUB_PAGE: usize = 2;

impl FakeGitHub {
    fn with_token(token: &str) -> Arc<FakeGitHub> {
        Arc::new(FakeGitHub { tokens: Mutex::new(vec![token.to_owned()]), ..Default::default() })
    }

    fn with_app(key: &AppKey, token_lifetime: time::Duration) -> Arc<FakeGitHub> {
        let app = FakeApp { public_key: key.public_pkcs1_der.clone(), token_lifetime };
        Arc::new(FakeGitHub { app: Some(app), ..Default::default() })
    }

    fn statuses(&self) -> Vec<Value> {
        self.statuses.lock().unwrap().clone()
    }

    fn issued_tokens(&self) -> Vec<String> {
        self.issued.lock().unwrap().clone()
    }

    fn comments(&self, number: u64) -> Vec<Comment> {
        self.comments.lock().unwrap().iter().filter(|c| c.number == number).cloned().collect()
    }

    fn add_comment(&self, number: u64, user: &str, body: &str) -> Value {
        let mut comments = self.comments.lock().unwrap();
        let id = 1_000 + comments.len() as u64;
        let comment = Comment { id, number, user: user.to_owned(), body: body.to_owned() };
        comments.push(comment.clone());
        comment_json(&comment)
    }

    fn assert_no_violations(&self) {
        let violations = self.violations.lock().unwrap();
        assert!(violations.is_empty(), "requests that do not follow GitHub's API: {violations:#?}");
    }

    /// A request that breaks the documented shape: noted for the test, refused for the client.
    fn violation(&self, req: &Recorded, what: String) -> Response<String> {
        self.violations.lock().unwrap().push(format!("{} {}: {what}", req.method, req.target));
        reply(StatusCode::BAD_REQUEST, json!({ "message": format!("fake GitHub: {what}") }))
    }

    fn check_headers(&self, req: &Recorded) -> Result<(), String> {
        // GitHub refuses requests without a User-Agent.
        if req.header("user-agent").is_none_or(str::is_empty) {
            return Err("no User-Agent".to_owned());
        }
        expect_header(req, "accept", "application/vnd.github+json")?;
        expect_header(req, "x-github-api-version", "2022-11-28")?;
        check_json_body(req)
    }

    fn authenticate_app(&self, req: &Recorded) -> Result<(), Response<String>> {
        let app = self.app.as_ref().ok_or_else(not_found_github)?;
        match req.bearer().map(|jwt| verify_jwt(jwt, &app.public_key)) {
            Some(Ok(_)) => Ok(()),
            _ => Err(reply(
                StatusCode::UNAUTHORIZED,
                json!({"message": "A JSON web token could not be decoded", "documentation_url": "https://docs.github.com/rest"}),
            )),
        }
    }

    fn authenticate_token(&self, req: &Recorded) -> Result<(), Response<String>> {
        match req.bearer() {
            Some(token) if self.tokens.lock().unwrap().iter().any(|t| t == token) => Ok(()),
            _ => Err(reply(
                StatusCode::UNAUTHORIZED,
                json!({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest", "status": "401"}),
            )),
        }
    }

    fn create_status(&self, req: &Recorded, sha: &str) -> Response<String> {
        let body = req.json();
        if let Err(what) = check_fields(
            &body,
            &[("state", Field::OneOf(&["error", "failure", "pending", "success"]))],
            &[("target_url", Field::Text), ("description", Field::TextAtMost(140)), ("context", Field::Text)],
        ) {
            return self.violation(req, what);
        }
        if let Some((status, answer)) = self.refuse_statuses.lock().unwrap().clone() {
            return reply(status, answer);
        }
        let mut statuses = self.statuses.lock().unwrap();
        let mut created = body.clone();
        created["id"] = json!(statuses.len() + 1);
        created["url"] = json!(format!("https://api.github.com/repos/acme/web/statuses/{sha}"));
        created["created_at"] = json!("2024-05-01T12:00:00Z");
        created["creator"] = json!({"login": "deployer-bot", "type": "Bot"});
        statuses.push(body);
        reply(StatusCode::CREATED, created)
    }

    fn list_comments(&self, req: &Recorded, number: u64, base: &str) -> Response<String> {
        let query = req.query();
        let per_page = query.get("per_page").and_then(|p| p.parse().ok()).unwrap_or(30usize).min(100);
        let page = query.get("page").and_then(|p| p.parse().ok()).unwrap_or(1usize).max(1);
        let size = per_page.min(GITHUB_PAGE);
        let comments = self.comments(number);
        let on_page: Vec<Value> = comments.iter().skip((page - 1) * size).take(size).map(comment_json).collect();
        let mut response = reply(StatusCode::OK, Value::Array(on_page));
        let pages = comments.len().div_ceil(size).max(1);
        // GitHub's links name the repository by its ID.
        let link = |page: usize| {
            format!("{base}/repositories/{REPOSITORY_ID}/issues/{number}/comments?per_page={per_page}&page={page}")
        };
        let mut links = Vec::new();
        if page < pages {
            links.push(format!("<{}>; rel=\"next\"", link(page + 1)));
            links.push(format!("<{}>; rel=\"last\"", link(pages)));
        }
        if page > 1 {
            links.push(format!("<{}>; rel=\"prev\"", link(page - 1)));
            links.push(format!("<{}>; rel=\"first\"", link(1)));
        }
        if !links.is_empty() {
            response.headers_mut().insert("link", links.join(", ").parse().unwrap());
        }
        response
    }

    fn comment_body(&self, req: &Recorded) -> Result<String, Response<String>> {
        let body = req.json();
        check_fields(&body, &[("body", Field::Text)], &[]).map_err(|what| self.violation(req, what))?;
        Ok(body["body"].as_str().unwrap().to_owned())
    }
}

fn comment_json(c: &Comment) -> Value {
    json!({
        "id": c.id,
        "node_id": format!("IC_{}", c.id),
        "url": format!("https://api.github.com/repos/acme/web/issues/comments/{}", c.id),
        "html_url": format!("https://github.com/acme/web/pull/{}#issuecomment-{}", c.number, c.id),
        "body": c.body,
        "user": {"login": c.user, "id": 1, "type": "User"},
        "created_at": "2024-05-01T12:00:00Z",
        "updated_at": "2024-05-01T12:00:00Z",
        "author_association": "MEMBER",
    })
}

fn not_found_github() -> Response<String> {
    reply(
        StatusCode::NOT_FOUND,
        json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest", "status": "404"}),
    )
}

impl Api for FakeGitHub {
    fn answer(&self, req: &Recorded, base: &str) -> Response<String> {
        if let Err(what) = self.check_headers(req) {
            return self.violation(req, what);
        }
        let segments: Vec<&str> = req.path().split('/').skip(1).collect();
        let method = req.method.clone();
        match (method, segments.as_slice()) {
            (Method::GET, ["repos", owner, repo, "installation"]) => {
                if let Err(refused) = self.authenticate_app(req) {
                    return refused;
                }
                if (*owner, *repo) != ("acme", "web") {
                    return not_found_github();
                }
                reply(
                    StatusCode::OK,
                    json!({"id": INSTALLATION_ID, "app_id": APP_ID, "account": {"login": "acme"}, "target_type": "Organization"}),
                )
            }
            (Method::POST, ["app", "installations", id, "access_tokens"]) => {
                if let Err(refused) = self.authenticate_app(req) {
                    return refused;
                }
                if *id != INSTALLATION_ID.to_string() {
                    return not_found_github();
                }
                if !req.body.is_empty() && !req.json().is_object() {
                    return self.violation(req, "the body is not a JSON object".to_owned());
                }
                let app = self.app.as_ref().unwrap();
                let mut issued = self.issued.lock().unwrap();
                let token = format!("ghs_installation_token_{}", issued.len() + 1);
                issued.push(token.clone());
                self.tokens.lock().unwrap().push(token.clone());
                let expires_at = (OffsetDateTime::now_utc() + app.token_lifetime).replace_nanosecond(0).unwrap();
                reply(
                    StatusCode::CREATED,
                    json!({
                        "token": token,
                        "expires_at": expires_at.format(&Rfc3339).unwrap(),
                        "permissions": {"statuses": "write", "pull_requests": "write", "metadata": "read"},
                        "repository_selection": "selected",
                    }),
                )
            }
            (method, segments) => {
                if let Err(refused) = self.authenticate_token(req) {
                    return refused;
                }
                match (method, segments) {
                    (Method::POST, ["repos", "acme", "web", "statuses", sha]) => {
                        if !is_full_sha(sha) {
                            return reply(
                                StatusCode::UNPROCESSABLE_ENTITY,
                                json!({"message": "No commit found for SHA"}),
                            );
                        }
                        self.create_status(req, sha)
                    }
                    (Method::GET, ["repos", "acme", "web", "issues", number, "comments"]) => {
                        self.list_comments(req, number.parse().unwrap(), base)
                    }
                    (Method::GET, ["repositories", id, "issues", number, "comments"])
                        if *id == REPOSITORY_ID.to_string() =>
                    {
                        self.list_comments(req, number.parse().unwrap(), base)
                    }
                    (Method::POST, ["repos", "acme", "web", "issues", number, "comments"]) => {
                        let body = match self.comment_body(req) {
                            Ok(body) => body,
                            Err(refused) => return refused,
                        };
                        let created = self.add_comment(number.parse().unwrap(), "deployer-bot", &body);
                        reply(StatusCode::CREATED, created)
                    }
                    (Method::PATCH, ["repos", "acme", "web", "issues", "comments", id]) => {
                        let body = match self.comment_body(req) {
                            Ok(body) => body,
                            Err(refused) => return refused,
                        };
                        let mut comments = self.comments.lock().unwrap();
                        let Some(comment) = comments.iter_mut().find(|c| c.id.to_string() == *id) else {
                            return not_found_github();
                        };
                        comment.body = body;
                        reply(StatusCode::OK, comment_json(comment))
                    }
                    _ => not_found_github(),
                }
            }
        }
    }
}

// ---- The fake GitLab ---------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Note {
    id: u64,
    iid: u64,
    author: String,
    body: String,
    system: bool,
}

#[derive(Default)]
struct FakeGitLab {
    token: String,
    statuses: Mutex<Vec<Value>>,
    notes: Mutex<Vec<Note>>,
    violations: Mutex<Vec<String>>,
}

const GITLAB_PAGE: usize = 3;
const GITLAB_PROJECTS: &[&str] = &["group%2Fproject", "group%2Fsub%2Fproject"];

impl FakeGitLab {
    fn new(token: &str) -> Arc<FakeGitLab> {
        Arc::new(FakeGitLab { token: token.to_owned(), ..Default::default() })
    }

    fn statuses(&self) -> Vec<Value> {
        self.statuses.lock().unwrap().clone()
    }

    fn notes(&self, iid: u64) -> Vec<Note> {
        self.notes.lock().unwrap().iter().filter(|n| n.iid == iid).cloned().collect()
    }

    fn add_note(&self, iid: u64, author: &str, body: &str, system: bool) -> Value {
        let mut notes = self.notes.lock().unwrap();
        let note = Note { id: 300 + notes.len() as u64, iid, author: author.to_owned(), body: body.to_owned(), system };
        notes.push(note.clone());
        note_json(&note)
    }

    fn assert_no_violations(&self) {
        let violations = self.violations.lock().unwrap();
        assert!(violations.is_empty(), "requests that do not follow GitLab's API: {violations:#?}");
    }

    fn violation(&self, req: &Recorded, what: String) -> Response<String> {
        self.violations.lock().unwrap().push(format!("{} {}: {what}", req.method, req.target));
        reply(StatusCode::BAD_REQUEST, json!({ "error": format!("fake GitLab: {what}") }))
    }

    fn create_status(&self, req: &Recorded, sha: &str) -> Response<String> {
        let body = req.json();
        if let Err(what) = check_fields(
            &body,
            &[("state", Field::OneOf(&["pending", "running", "success", "failed", "canceled", "skipped"]))],
            &[
                ("name", Field::Text),
                ("description", Field::Text),
                ("target_url", Field::Text),
                ("ref", Field::Text),
                ("context", Field::Text),
            ],
        ) {
            return self.violation(req, what);
        }
        let mut statuses = self.statuses.lock().unwrap();
        let name = body.get("name").and_then(Value::as_str).unwrap_or("default");
        let last = statuses.iter().rev().find(|s| s["name"] == name);
        if last.is_some_and(|s| s["state"] == body["state"]) {
            let state = body["state"].as_str().unwrap();
            return reply(
                StatusCode::BAD_REQUEST,
                json!({"message": format!("Cannot transition status via :enqueue from :{state} (Reason(s): Status cannot transition via \"enqueue\")")}),
            );
        }
        let mut created = body.clone();
        created["id"] = json!(statuses.len() + 1);
        created["sha"] = json!(sha);
        created["status"] = body["state"].clone();
        created["author"] = json!({"username": "deployer-bot"});
        statuses.push(body);
        reply(StatusCode::CREATED, created)
    }

    fn list_notes(&self, req: &Recorded, iid: u64, base: &str) -> Response<String> {
        let query = req.query();
        let per_page: usize = query.get("per_page").and_then(|p| p.parse().ok()).unwrap_or(20).min(100);
        let page: usize = query.get("page").and_then(|p| p.parse().ok()).unwrap_or(1).max(1);
        let size = per_page.min(GITLAB_PAGE);
        let mut notes = self.notes(iid);
        if query.get("sort").map(String::as_str) != Some("asc") {
            notes.reverse();
        }
        let on_page: Vec<Value> = notes.iter().skip((page - 1) * size).take(size).map(note_json).collect();
        let mut response = reply(StatusCode::OK, Value::Array(on_page));
        let pages = notes.len().div_ceil(size).max(1);
        if page < pages {
            let sort = query.get("sort").cloned().unwrap_or_default();
            let order_by = query.get("order_by").cloned().unwrap_or_default();
            let url =
                format!("{base}{}?sort={sort}&order_by={order_by}&per_page={per_page}&page={}", req.path(), page + 1);
            response.headers_mut().insert("link", format!("<{url}>; rel=\"next\"").parse().unwrap());
            response.headers_mut().insert("x-next-page", (page + 1).to_string().parse().unwrap());
        }
        response
    }

    fn note_body(&self, req: &Recorded) -> Result<String, Response<String>> {
        let body = req.json();
        check_fields(&body, &[("body", Field::Text)], &[("internal", Field::Any)])
            .map_err(|w| self.violation(req, w))?;
        Ok(body["body"].as_str().unwrap().to_owned())
    }
}

fn note_json(n: &Note) -> Value {
    json!({
        "id": n.id,
        "type": null,
        "body": n.body,
        "author": {"username": n.author},
        "system": n.system,
        "noteable_type": "MergeRequest",
        "noteable_iid": n.iid,
        "created_at": "2024-05-01T12:00:00.000Z",
    })
}

fn not_found_gitlab(what: &str) -> Response<String> {
    reply(StatusCode::NOT_FOUND, json!({"message": format!("404 {what} Not Found")}))
}

impl Api for FakeGitLab {
    fn answer(&self, req: &Recorded, base: &str) -> Response<String> {
        if req.header("private-token") != Some(self.token.as_str()) {
            return reply(StatusCode::UNAUTHORIZED, json!({"message": "401 Unauthorized"}));
        }
        if req.header("authorization").is_some() {
            return self.violation(req, "an Authorization header next to PRIVATE-TOKEN".to_owned());
        }
        if let Err(what) = check_json_body(req) {
            return self.violation(req, what);
        }
        let segments: Vec<&str> = req.path().split('/').skip(1).collect();
        let ["api", "v4", "projects", project, rest @ ..] = segments.as_slice() else {
            return not_found_gitlab("");
        };
        if !GITLAB_PROJECTS.contains(project) {
            return not_found_gitlab("Project");
        }
        match (req.method.clone(), rest) {
            (Method::POST, ["statuses", sha]) if is_full_sha(sha) => self.create_status(req, sha),
            (Method::GET, ["merge_requests", iid, "notes"]) => self.list_notes(req, iid.parse().unwrap(), base),
            (Method::POST, ["merge_requests", iid, "notes"]) => match self.note_body(req) {
                Ok(body) => {
                    reply(StatusCode::CREATED, self.add_note(iid.parse().unwrap(), "deployer-bot", &body, false))
                }
                Err(refused) => refused,
            },
            (Method::PUT, ["merge_requests", iid, "notes", id]) => {
                let body = match self.note_body(req) {
                    Ok(body) => body,
                    Err(refused) => return refused,
                };
                let mut notes = self.notes.lock().unwrap();
                match notes.iter_mut().find(|n| n.id.to_string() == *id && n.iid.to_string() == *iid) {
                    Some(note) => {
                        note.body = body;
                        reply(StatusCode::OK, note_json(note))
                    }
                    None => not_found_gitlab("Note"),
                }
            }
            _ => not_found_gitlab(""),
        }
    }
}

// ---- Request shapes ----------------------------------------------------------------------------

enum Field {
    Text,
    TextAtMost(usize),
    OneOf(&'static [&'static str]),
    Any,
}

/// The body is a JSON object with the `required` fields, possibly some `optional` ones, no other.
fn check_fields(body: &Value, required: &[(&str, Field)], optional: &[(&str, Field)]) -> Result<(), String> {
    let Value::Object(fields) = body else { return Err(format!("the body is not a JSON object: {body}")) };
    for (name, _) in required {
        if !fields.contains_key(*name) {
            return Err(format!("{name} is missing"));
        }
    }
    for (name, value) in fields {
        let Some((_, field)) = required.iter().chain(optional).find(|(n, _)| *n == name.as_str()) else {
            return Err(format!("{name} is not a documented field"));
        };
        let fits = match field {
            Field::Text => value.is_string(),
            Field::TextAtMost(max) => value.as_str().is_some_and(|s| s.chars().count() <= *max),
            Field::OneOf(allowed) => value.as_str().is_some_and(|s| allowed.contains(&s)),
            Field::Any => true,
        };
        if !fits {
            return Err(format!("{name} = {value} is not allowed"));
        }
    }
    Ok(())
}

/// A body is JSON, declared as such.
fn check_json_body(req: &Recorded) -> Result<(), String> {
    if req.body.is_empty() {
        return Ok(());
    }
    expect_header(req, "content-type", "application/json")?;
    serde_json::from_slice::<Value>(&req.body).map(|_| ()).map_err(|e| format!("the body is not JSON: {e}"))
}

fn expect_header(req: &Recorded, name: &str, expected: &str) -> Result<(), String> {
    match req.header(name) {
        Some(value) if value == expected => Ok(()),
        other => Err(format!("{name}: expected {expected:?}, got {other:?}")),
    }
}

fn is_full_sha(sha: &str) -> bool {
    sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit())
}

fn status_update<'a>(
    repo: &'a str,
    state: State,
    target_url: Option<&'a str>,
    description: &'a str,
) -> StatusUpdate<'a> {
    StatusUpdate { repo, sha: SHA, state, target_url, description, context: "deployer/web" }
}

// ---- The GitHub App's key and JWT ------------------------------------------------------------

enum KeyFormat {
    Pkcs1,
    Pkcs8,
}

struct AppKey {
    private_pem: String,
    /// RSAPublicKey (PKCS#1) DER, as ring verifies with.
    public_pkcs1_der: Vec<u8>,
}

impl AppKey {
    fn generate(format: KeyFormat) -> AppKey {
        let dir = tempfile::tempdir().unwrap();
        let pkcs8 = dir.path().join("key.pem");
        openssl(&["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out"], &pkcs8);
        let private = match format {
            KeyFormat::Pkcs8 => pkcs8.clone(),
            KeyFormat::Pkcs1 => {
                let pkcs1 = dir.path().join("key-pkcs1.pem");
                openssl(&["rsa", "-in", pkcs8.to_str().unwrap(), "-traditional", "-out"], &pkcs1);
                pkcs1
            }
        };
        let public = dir.path().join("public.der");
        openssl(&["rsa", "-in", pkcs8.to_str().unwrap(), "-RSAPublicKey_out", "-outform", "DER", "-out"], &public);
        AppKey {
            private_pem: std::fs::read_to_string(private).unwrap(),
            public_pkcs1_der: std::fs::read(public).unwrap(),
        }
    }
}

fn openssl(args: &[&str], out: &Path) {
    let output = Command::new("openssl").args(args).arg(out).output().unwrap_or_else(|e| {
        panic!("the GitHub App tests make RSA keys with the openssl command, which cannot run ({e}): install openssl")
    });
    assert!(output.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
}

/// Checks a GitHub App JWT as GitHub does: RS256 over header.claims with the app's public key,
/// issued by the app; returns the claims.
fn verify_jwt(jwt: &str, public_key: &[u8]) -> Result<Map<String, Value>, String> {
    let [header, claims, signature] = jwt.split('.').collect::<Vec<_>>()[..] else {
        return Err("a JWT has three parts".to_owned());
    };
    let decode = |part: &str| base64url_decode(part).ok_or_else(|| format!("{part:?} is not base64url"));
    let header: Value = serde_json::from_slice(&decode(header)?).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" || header.get("typ").is_some_and(|t| t != "JWT") {
        return Err(format!("header {header}"));
    }
    let signed = &jwt[..jwt.rfind('.').unwrap()];
    ring::signature::UnparsedPublicKey::new(&ring::signature::RSA_PKCS1_2048_8192_SHA256, public_key)
        .verify(signed.as_bytes(), &decode(signature)?)
        .map_err(|_| "bad signature".to_owned())?;
    let Value::Object(claims) = serde_json::from_slice(&decode(claims)?).map_err(|e| e.to_string())? else {
        return Err("claims are not an object".to_owned());
    };
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let iat = claims.get("iat").and_then(Value::as_i64).ok_or("no iat")?;
    let exp = claims.get("exp").and_then(Value::as_i64).ok_or("no exp")?;
    if iat > now || exp <= now || exp > now + 600 {
        return Err(format!("iat {iat} / exp {exp} out of range at {now}"));
    }
    if claims.get("iss") != Some(&json!(APP_ID)) && claims.get("iss") != Some(&json!(APP_ID.to_string())) {
        return Err(format!("iss {:?}", claims.get("iss")));
    }
    Ok(claims)
}

fn base64url_decode(text: &str) -> Option<Vec<u8>> {
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.bytes() {
        let value = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(value);
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Some(out)
}

// ---- The HTTP server -----------------------------------------------------------------------------

/// A request as the fake received it.
#[derive(Clone, Debug)]
struct Recorded {
    method: Method,
    /// Path and query, as sent.
    target: String,
    headers: HeaderMap,
    body: Vec<u8>,
}

impl Recorded {
    fn path(&self) -> &str {
        self.target.split('?').next().unwrap()
    }

    fn query(&self) -> HashMap<String, String> {
        let query = self.target.split_once('?').map_or("", |(_, q)| q);
        query.split('&').filter_map(|pair| pair.split_once('=')).map(|(k, v)| (k.to_owned(), v.to_owned())).collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn bearer(&self) -> Option<&str> {
        self.header("authorization")?.strip_prefix("Bearer ")
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
}

trait Api: Send + Sync + 'static {
    /// The answer to `req`; `base` is the server's own URL, for links.
    fn answer(&self, req: &Recorded, base: &str) -> Response<String>;
}

fn reply(status: StatusCode, body: Value) -> Response<String> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(body.to_string())
        .unwrap()
}

/// A local HTTP(S) server answering with an [`Api`] and recording every request.
struct FakeServer {
    url: String,
    requests: Arc<Mutex<Vec<Recorded>>>,
    task: JoinHandle<()>,
}

impl FakeServer {
    async fn start(api: Arc<dyn Api>) -> FakeServer {
        FakeServer::start_with(api, None).await
    }

    async fn start_tls(api: Arc<dyn Api>, cert_pem: &str, key_pem: &str) -> FakeServer {
        let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>().unwrap();
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        FakeServer::start_with(api, Some(TlsAcceptor::from(Arc::new(config)))).await
    }

    async fn start_with(api: Arc<dyn Api>, tls: Option<TlsAcceptor>) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("{}://{addr}", if tls.is_some() { "https" } else { "http" });
        let requests = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn(serve(listener, tls, api, requests.clone(), url.clone()));
        FakeServer { url, requests, task }
    }

    fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    fn clear_requests(&self) {
        self.requests.lock().unwrap().clear();
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Accepts until aborted; the connections end with it (their JoinSet is dropped).
async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    api: Arc<dyn Api>,
    requests: Arc<Mutex<Vec<Recorded>>>,
    base: String,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((tcp, _)) = accepted else { continue };
                let (tls, api, requests, base) = (tls.clone(), api.clone(), requests.clone(), base.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (api, requests, base) = (api.clone(), requests.clone(), base.clone());
                        async move { Ok::<_, Infallible>(handle(req, &*api, &requests, &base).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(tcp), service).await;
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn handle(
    req: Request<Incoming>,
    api: &dyn Api,
    requests: &Mutex<Vec<Recorded>>,
    base: &str,
) -> Response<String> {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(axum::body::Body::new(body), 1 << 20).await.unwrap_or_default();
    let recorded = Recorded {
        method: parts.method,
        target: parts.uri.path_and_query().map_or("/".to_owned(), |p| p.as_str().to_owned()),
        headers: parts.headers,
        body: body.to_vec(),
    };
    requests.lock().unwrap().push(recorded.clone());
    api.answer(&recorded, base)
}
