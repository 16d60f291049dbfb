//! What a deploy needs from a GitHub or GitLab webhook body: which repository, which branch or pull
//! request, which commit. Everything else in the payload is ignored, so new fields never break us.
//!
//! Formats: <https://docs.github.com/en/webhooks/webhook-events-and-payloads> (header `X-GitHub-Event`)
//! and <https://docs.gitlab.com/user/project/integrations/webhook_events/> (header `X-Gitlab-Event`).
//! Only the events we act on are parsed; a ping or any other event is answered without reading the
//! body. Commit hashes must be 40 or 64 hex digits and branch names must not look like command-line
//! options, since both end up as arguments of git on the agents.

use serde::de::DeserializeOwned;
use serde::Deserialize;

/// A webhook delivery, as far as deploys are concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// GitHub's check that a new hook works.
    Ping,
    Push(Push),
    PullRequest(PullRequest),
    /// Anything else: answered 202 and ignored.
    Ignored {
        kind: String,
    },
}

/// The repository an event is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repo {
    /// Every URL form the payload gives (clone/https, ssh, git, html/web), as given, without
    /// duplicates; compare them with [`normalize_repo_url`].
    pub urls: Vec<String>,
    /// `owner/name` on GitHub, `group/subgroup/name` on GitLab.
    pub full_name: String,
    pub default_branch: Option<String>,
}

/// Commits pushed to a branch or tag, or a ref deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    pub repo: Repo,
    /// The branch pushed to; None for tag pushes, other refs and branch deletions.
    pub branch: Option<String>,
    /// The ref's new head; None when the ref was deleted.
    pub commit: Option<String>,
    pub deleted: bool,
}

/// What happened to a pull (merge) request, as far as preview deployments care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrAction {
    /// Opened or reopened.
    Opened,
    /// New commits on the head branch.
    Updated,
    /// Closed or merged.
    Closed,
    /// Anything else (edited, labeled, approved, an update without new commits...), as the forge names it.
    Other(String),
}

/// A pull request (GitHub) or merge request (GitLab) event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    /// The repository the request targets.
    pub repo: Repo,
    /// The number shown to users: GitHub's `number`, GitLab's `iid`.
    pub number: u64,
    pub action: PrAction,
    pub head_branch: String,
    pub head_commit: String,
    /// The fork's URLs when the request comes from a fork; empty when the head branch is in `repo`, or
    /// when a closed request's fork has since been deleted.
    pub head_repo_urls: Vec<String>,
    /// Empty if the payload has none.
    pub title: String,
    pub merged: bool,
}

/// Why a webhook body cannot be read. The messages name the event and the field, for the forge's
/// delivery log.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("the {event} payload is not a JSON object: {source}")]
    NotJson {
        event: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("the {event} event has a malformed {field}: {source}")]
    Malformed {
        event: &'static str,
        /// The path to the field, such as `pull_request.head.sha`.
        field: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the {event} event has no {field}")]
    Missing { event: &'static str, field: &'static str },
    #[error("the {event} event's {field} {problem}")]
    Invalid { event: &'static str, field: &'static str, problem: &'static str },
}

/// Reads a GitHub delivery; `event_header` is its `X-GitHub-Event`.
pub fn parse_github(event_header: &str, body: &[u8]) -> Result<Event, PayloadError> {
    match event_header.trim() {
        "ping" => Ok(Event::Ping),
        "push" => github_push(body).map(Event::Push),
        "pull_request" => github_pull_request(body).map(Event::PullRequest),
        other => Ok(Event::Ignored { kind: other.to_string() }),
    }
}

/// Reads a GitLab delivery; `event_header` is its `X-Gitlab-Event`. System hooks are ignored: they
/// come from the instance, not from a project's hook.
pub fn parse_gitlab(event_header: &str, body: &[u8]) -> Result<Event, PayloadError> {
    let kind = event_header.trim();
    if kind.eq_ignore_ascii_case("Push Hook") {
        gitlab_push(body).map(Event::Push)
    } else if kind.eq_ignore_ascii_case("Merge Request Hook") {
        gitlab_merge_request(body).map(Event::PullRequest)
    } else {
        Ok(Event::Ignored { kind: kind.to_string() })
    }
}

/// The `host/owner/repo` a repository URL points at, lowercased, whatever the transport: the scheme
/// (https, http, git, ssh), user, port, trailing `.git` and `/` are dropped, and scp-like
/// `git@host:owner/repo.git` is understood. An already normalized `host/path` (host with a dot, or
/// `localhost`) is returned as is. None for anything else, such as local paths or `file://` URLs.
pub fn normalize_repo_url(url: &str) -> Option<String> {
    const SCHEMES: [&str; 6] = ["https", "http", "git", "ssh", "git+ssh", "ssh+git"];
    let url = url.trim();
    if url.chars().any(|c| c.is_whitespace() || c.is_control() || c == '\\') {
        return None;
    }
    let (host, path) = if let Some((scheme, rest)) = url.split_once("://") {
        if !SCHEMES.iter().any(|known| scheme.eq_ignore_ascii_case(known)) {
            return None;
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        (host_of(authority)?, path)
    } else if let Some((authority, path)) = url.split_once(':').filter(|(before, _)| !before.contains('/')) {
        // scp-like: a colon before any slash, as git decides. No port in this form.
        let host = host_of(authority)?;
        (host, path)
    } else {
        let (host, path) = url.split_once('/')?;
        let looks_like_host = host.contains('.') || host.eq_ignore_ascii_case("localhost");
        if !looks_like_host || host.contains('@') {
            return None;
        }
        (host_of(host)?, path)
    };
    let path = path.split(['?', '#']).next().unwrap_or_default().to_lowercase();
    let mut segments: Vec<&str> = path.split('/').filter(|segment| !segment.is_empty()).collect();
    if let Some(last) = segments.last_mut() {
        *last = last.strip_suffix(".git").unwrap_or(last);
    }
    if segments.is_empty() || segments.iter().any(|segment| segment.is_empty() || *segment == "." || *segment == "..") {
        return None;
    }
    Some(format!("{}/{}", host.to_lowercase(), segments.join("/")))
}

/// The host of a URL authority (`user@host:port`), without user or port; brackets kept on IPv6.
fn host_of(authority: &str) -> Option<&str> {
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host_port)| host_port);
    let (host, port) = if host_port.starts_with('[') {
        let end = host_port.find(']')? + 1;
        let (host, after) = host_port.split_at(end);
        let inside = &host[1..end - 1];
        if inside.is_empty() || !inside.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
            return None;
        }
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':')?)),
        }
    } else {
        let (host, port) = host_port.split_once(':').map_or((host_port, None), |(host, port)| (host, Some(port)));
        if host.is_empty() || !host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')) {
            return None;
        }
        (host, port)
    };
    match port {
        Some(port) if !port.chars().all(|c| c.is_ascii_digit()) => None,
        _ => Some(host),
    }
}

/// A DNS-label-safe slug of a branch name for host names: lowercase letters, digits and single dashes,
/// at most 30 characters, never starting or ending with a dash; "branch" if nothing is left. Distinct
/// branches can share a slug (`feature/a` and `feature-a`).
pub fn branch_slug(branch: &str) -> String {
    const MAX_LEN: usize = 30;
    let mut slug = String::with_capacity(MAX_LEN + 1);
    let mut gap = false;
    for c in branch.chars() {
        if slug.len() >= MAX_LEN {
            break;
        }
        if c.is_ascii_alphanumeric() {
            if gap && !slug.is_empty() {
                slug.push('-');
            }
            gap = false;
            slug.push(c.to_ascii_lowercase());
        } else {
            gap = true;
        }
    }
    slug.truncate(MAX_LEN);
    let slug = slug.trim_end_matches('-');
    if slug.is_empty() {
        "branch".to_string()
    } else {
        slug.to_string()
    }
}

// ---- GitHub ----

const GITHUB_PUSH: &str = "push";
const GITHUB_PULL_REQUEST: &str = "pull_request";

#[derive(Deserialize)]
struct GithubPushBody {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    after: Option<String>,
    deleted: Option<bool>,
    repository: Option<GithubRepository>,
}

#[derive(Deserialize)]
struct GithubPullRequestBody {
    action: Option<String>,
    number: Option<u64>,
    pull_request: Option<GithubPullRequest>,
    repository: Option<GithubRepository>,
}

#[derive(Deserialize)]
struct GithubPullRequest {
    number: Option<u64>,
    title: Option<String>,
    merged: Option<bool>,
    head: Option<GithubBranch>,
}

#[derive(Deserialize)]
struct GithubBranch {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    sha: Option<String>,
    /// Null when the fork was deleted.
    repo: Option<GithubRepository>,
}

/// `url` is left out: outside push events it is the API's URL, not the repository's.
#[derive(Deserialize)]
struct GithubRepository {
    full_name: Option<String>,
    clone_url: Option<String>,
    ssh_url: Option<String>,
    git_url: Option<String>,
    html_url: Option<String>,
    default_branch: Option<String>,
}

impl GithubRepository {
    fn urls(&self) -> Vec<String> {
        distinct_urls([&self.clone_url, &self.ssh_url, &self.git_url, &self.html_url])
    }
}

fn github_repo(event: &'static str, repository: Option<GithubRepository>) -> Result<Repo, PayloadError> {
    let repository = need(event, "repository", repository)?;
    let urls = repository.urls();
    Ok(Repo {
        urls,
        full_name: need_text(event, "repository.full_name", repository.full_name)?,
        default_branch: repository.default_branch.filter(|branch| !branch.is_empty()),
    })
}

fn github_push(body: &[u8]) -> Result<Push, PayloadError> {
    let event = GITHUB_PUSH;
    let body: GithubPushBody = decode(event, body)?;
    let repo = github_repo(event, body.repository)?;
    let git_ref = need_text(event, "ref", body.git_ref)?;
    let after = need_text(event, "after", body.after)?;
    push(event, repo, &git_ref, &after, body.deleted.unwrap_or(false))
}

fn github_pull_request(body: &[u8]) -> Result<PullRequest, PayloadError> {
    let event = GITHUB_PULL_REQUEST;
    let body: GithubPullRequestBody = decode(event, body)?;
    let action_name = need_text(event, "action", body.action)?;
    let repo = github_repo(event, body.repository)?;
    let pull_request = need(event, "pull_request", body.pull_request)?;
    let number = need(event, "number", body.number.or(pull_request.number))?;
    let head = need(event, "pull_request.head", pull_request.head)?;
    let head_branch = branch_name(event, "pull_request.head.ref", head.git_ref)?;
    let head_commit = head_commit(event, "pull_request.head.sha", head.sha)?;
    let action = match action_name.as_str() {
        "opened" | "reopened" => PrAction::Opened,
        "synchronize" => PrAction::Updated,
        "closed" => PrAction::Closed,
        _ => PrAction::Other(action_name),
    };
    let head_repo_urls = match head.repo {
        Some(head_repo) => {
            let same = head_repo.full_name.as_deref().is_some_and(|name| name.eq_ignore_ascii_case(&repo.full_name));
            if same {
                Vec::new()
            } else {
                head_repo.urls()
            }
        }
        None if building(&action) => return Err(missing(event, "pull_request.head.repo")),
        None => Vec::new(),
    };
    Ok(PullRequest {
        repo,
        number,
        action,
        head_branch,
        head_commit,
        head_repo_urls,
        title: pull_request.title.unwrap_or_default(),
        merged: pull_request.merged.unwrap_or(false),
    })
}

// ---- GitLab ----

const GITLAB_PUSH: &str = "Push Hook";
const GITLAB_MERGE_REQUEST: &str = "Merge Request Hook";

#[derive(Deserialize)]
struct GitlabPushBody {
    #[serde(rename = "ref")]
    git_ref: Option<String>,
    after: Option<String>,
    checkout_sha: Option<String>,
    project: Option<GitlabProject>,
}

#[derive(Deserialize)]
struct GitlabMergeRequestBody {
    object_attributes: Option<GitlabMergeRequest>,
    project: Option<GitlabProject>,
}

#[derive(Deserialize)]
struct GitlabMergeRequest {
    iid: Option<u64>,
    action: Option<String>,
    state: Option<String>,
    title: Option<String>,
    source_branch: Option<String>,
    source_project_id: Option<u64>,
    target_project_id: Option<u64>,
    source: Option<GitlabProject>,
    last_commit: Option<GitlabCommit>,
    /// The previous head, present on an update only when it brought new commits.
    oldrev: Option<String>,
}

#[derive(Deserialize)]
struct GitlabCommit {
    id: Option<String>,
}

/// `url`, `ssh_url`, `http_url` and `homepage` are deprecated aliases, kept for older instances.
#[derive(Deserialize)]
struct GitlabProject {
    path_with_namespace: Option<String>,
    git_http_url: Option<String>,
    git_ssh_url: Option<String>,
    web_url: Option<String>,
    http_url: Option<String>,
    ssh_url: Option<String>,
    url: Option<String>,
    homepage: Option<String>,
    default_branch: Option<String>,
}

impl GitlabProject {
    fn urls(&self) -> Vec<String> {
        distinct_urls([
            &self.git_http_url,
            &self.git_ssh_url,
            &self.web_url,
            &self.http_url,
            &self.ssh_url,
            &self.url,
            &self.homepage,
        ])
    }
}

fn gitlab_repo(event: &'static str, project: Option<GitlabProject>) -> Result<Repo, PayloadError> {
    let project = need(event, "project", project)?;
    let urls = project.urls();
    Ok(Repo {
        urls,
        full_name: need_text(event, "project.path_with_namespace", project.path_with_namespace)?,
        default_branch: project.default_branch.filter(|branch| !branch.is_empty()),
    })
}

fn gitlab_push(body: &[u8]) -> Result<Push, PayloadError> {
    let event = GITLAB_PUSH;
    let body: GitlabPushBody = decode(event, body)?;
    let repo = gitlab_repo(event, body.project)?;
    let git_ref = need_text(event, "ref", body.git_ref)?;
    // `checkout_sha` is null when the branch was deleted; `after` is then all zeros.
    let after = need_text(event, "after", body.after.filter(|after| !after.is_empty()).or(body.checkout_sha))?;
    push(event, repo, &git_ref, &after, false)
}

fn gitlab_merge_request(body: &[u8]) -> Result<PullRequest, PayloadError> {
    let event = GITLAB_MERGE_REQUEST;
    let body: GitlabMergeRequestBody = decode(event, body)?;
    let repo = gitlab_repo(event, body.project)?;
    let request = need(event, "object_attributes", body.object_attributes)?;
    let number = need(event, "object_attributes.iid", request.iid)?;
    let action_name = need_text(event, "object_attributes.action", request.action)?;
    let head_branch = branch_name(event, "object_attributes.source_branch", request.source_branch)?;
    let head_commit =
        head_commit(event, "object_attributes.last_commit.id", request.last_commit.and_then(|commit| commit.id))?;
    let new_commits = request.oldrev.is_some_and(|oldrev| !oldrev.is_empty());
    let merged = action_name == "merge" || request.state.as_deref() == Some("merged");
    let action = match action_name.as_str() {
        "open" | "reopen" => PrAction::Opened,
        "update" if new_commits => PrAction::Updated,
        "close" | "merge" => PrAction::Closed,
        _ => PrAction::Other(action_name),
    };
    let from_fork = match (request.source_project_id, request.target_project_id) {
        (Some(source), Some(target)) => source != target,
        _ => request
            .source
            .as_ref()
            .and_then(|source| source.path_with_namespace.as_deref())
            .is_some_and(|path| !path.eq_ignore_ascii_case(&repo.full_name)),
    };
    let head_repo_urls = match (from_fork, request.source) {
        (false, _) => Vec::new(),
        (true, Some(source)) => source.urls(),
        (true, None) if building(&action) => return Err(missing(event, "object_attributes.source")),
        (true, None) => Vec::new(),
    };
    Ok(PullRequest {
        repo,
        number,
        action,
        head_branch,
        head_commit,
        head_repo_urls,
        title: request.title.unwrap_or_default(),
        merged,
    })
}

// ---- shared ----

fn decode<T: DeserializeOwned>(event: &'static str, body: &[u8]) -> Result<T, PayloadError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let field = error.path().to_string();
        let source = error.into_inner();
        if source.is_data() && field != "." {
            PayloadError::Malformed { event, field, source }
        } else {
            PayloadError::NotJson { event, source }
        }
    })?;
    deserializer.end().map_err(|source| PayloadError::NotJson { event, source })?;
    Ok(value)
}

fn push(event: &'static str, repo: Repo, git_ref: &str, after: &str, deleted: bool) -> Result<Push, PayloadError> {
    let deleted = deleted || is_zero_hash(after);
    if deleted {
        return Ok(Push { repo, branch: None, commit: None, deleted });
    }
    let branch = match git_ref.strip_prefix("refs/heads/") {
        Some(branch) => Some(branch_name(event, "ref", Some(branch.to_string()))?),
        None => None,
    };
    let commit = commit_hash(event, "after", after.to_string())?;
    Ok(Push { repo, branch, commit: Some(commit), deleted })
}

/// Whether a request's head gets built, so that not knowing where its head lives is an error.
fn building(action: &PrAction) -> bool {
    matches!(action, PrAction::Opened | PrAction::Updated)
}

fn head_commit(event: &'static str, field: &'static str, sha: Option<String>) -> Result<String, PayloadError> {
    let sha = need_text(event, field, sha)?;
    if is_zero_hash(&sha) {
        return Err(PayloadError::Invalid { event, field, problem: "is all zeros, not a commit" });
    }
    commit_hash(event, field, sha)
}

fn commit_hash(event: &'static str, field: &'static str, sha: String) -> Result<String, PayloadError> {
    let hex = sha.bytes().all(|byte| byte.is_ascii_hexdigit());
    if hex && (sha.len() == 40 || sha.len() == 64) {
        Ok(sha)
    } else {
        Err(PayloadError::Invalid { event, field, problem: "is not a commit hash (40 or 64 hex digits)" })
    }
}

/// Git's null object id, which stands for "no commit" (a created ref's before, a deleted one's after).
fn is_zero_hash(sha: &str) -> bool {
    !sha.is_empty() && sha.bytes().all(|byte| byte == b'0')
}

/// A branch name safe to hand to git: git itself rejects control characters and spaces, and a leading
/// dash would be read as an option.
fn branch_name(event: &'static str, field: &'static str, name: Option<String>) -> Result<String, PayloadError> {
    let name = need_text(event, field, name)?;
    if name.starts_with('-') || name.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(PayloadError::Invalid { event, field, problem: "is not a branch name git accepts" });
    }
    Ok(name)
}

fn distinct_urls<const N: usize>(candidates: [&Option<String>; N]) -> Vec<String> {
    let mut urls: Vec<String> = Vec::with_capacity(N);
    for url in candidates.into_iter().flatten() {
        if !url.is_empty() && !urls.contains(url) {
            urls.push(url.clone());
        }
    }
    urls
}

fn need<T>(event: &'static str, field: &'static str, value: Option<T>) -> Result<T, PayloadError> {
    value.ok_or_else(|| missing(event, field))
}

/// A required string; an empty one counts as missing.
fn need_text(event: &'static str, field: &'static str, value: Option<String>) -> Result<String, PayloadError> {
    need(event, field, value.filter(|text| !text.is_empty()))
}

fn missing(event: &'static str, field: &'static str) -> PayloadError {
    PayloadError::Missing { event, field }
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    const GITHUB_PUSH_BODY: &str = include_str!("fixtures/github_push.json");
    const GITHUB_PULL_REQUEST_BODY: &str = include_str!("fixtures/github_pull_request.json");
    const GITLAB_PUSH_BODY: &str = include_str!("fixtures/gitlab_push.json");
    const GITLAB_MERGE_REQUEST_BODY: &str = include_str!("fixtures/gitlab_merge_request.json");
    const ZERO: &str = "0000000000000000000000000000000000000000";

    /// A fixture with some fields replaced, given as `(JSON pointer, new value)`; Null removes the field.
    fn edited(fixture: &str, edits: &[(&str, Value)]) -> Vec<u8> {
        let mut body: Value = serde_json::from_str(fixture).unwrap();
        for (pointer, value) in edits {
            let (parent, key) = pointer.rsplit_once('/').unwrap();
            let parent = body.pointer_mut(parent).unwrap_or_else(|| panic!("no {parent} in the fixture"));
            match value {
                Value::Null => {
                    parent.as_object_mut().unwrap().remove(key);
                }
                value => parent[key] = value.clone(),
            }
        }
        serde_json::to_vec(&body).unwrap()
    }

    fn github(kind: &str, body: &[u8]) -> Event {
        parse_github(kind, body).unwrap_or_else(|error| panic!("{error}"))
    }

    fn gitlab(kind: &str, body: &[u8]) -> Event {
        parse_gitlab(kind, body).unwrap_or_else(|error| panic!("{error}"))
    }

    fn github_pull_request_with(edits: &[(&str, Value)]) -> PullRequest {
        match github("pull_request", &edited(GITHUB_PULL_REQUEST_BODY, edits)) {
            Event::PullRequest(pull_request) => pull_request,
            other => panic!("not a pull request: {other:?}"),
        }
    }

    fn gitlab_merge_request_with(edits: &[(&str, Value)]) -> PullRequest {
        match gitlab("Merge Request Hook", &edited(GITLAB_MERGE_REQUEST_BODY, edits)) {
            Event::PullRequest(pull_request) => pull_request,
            other => panic!("not a merge request: {other:?}"),
        }
    }

    fn hello_world() -> Repo {
        Repo {
            urls: vec![
                "https://github.com/Codertocat/Hello-World.git".into(),
                "git@github.com:Codertocat/Hello-World.git".into(),
                "git://github.com/Codertocat/Hello-World.git".into(),
                "https://github.com/Codertocat/Hello-World".into(),
            ],
            full_name: "Codertocat/Hello-World".into(),
            default_branch: Some("master".into()),
        }
    }

    #[test]
    fn a_github_branch_push_gives_the_branch_and_its_new_head() {
        let event = github("push", GITHUB_PUSH_BODY.as_bytes());
        let expected = Push {
            repo: hello_world(),
            branch: Some("feature/Add_Login".into()),
            commit: Some("0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c".into()),
            deleted: false,
        };
        assert_eq!(event, Event::Push(expected));
    }

    #[test]
    fn a_github_tag_push_has_a_commit_but_no_branch() {
        let body = edited(GITHUB_PUSH_BODY, &[("/ref", json!("refs/tags/v1.0.0")), ("/created", json!(true))]);
        let Event::Push(push) = github("push", &body) else { panic!("not a push") };
        assert_eq!(push.branch, None);
        assert_eq!(push.commit.as_deref(), Some("0d1a26e67d8f5eaf1f6ba5c57fc3c7d91ac0fd1c"));
        assert!(!push.deleted);
    }

    #[test]
    fn a_github_branch_deletion_has_neither_branch_nor_commit() {
        let body = edited(
            GITHUB_PUSH_BODY,
            &[
                ("/after", json!(ZERO)),
                ("/deleted", json!(true)),
                ("/head_commit", json!(null)),
                ("/commits", json!([])),
            ],
        );
        let Event::Push(push) = github("push", &body) else { panic!("not a push") };
        assert_eq!((push.branch, push.commit, push.deleted), (None, None, true));
        assert_eq!(push.repo, hello_world());
    }

    #[test]
    fn github_pings_and_other_events_need_no_body() {
        assert_eq!(github("ping", b"{\"zen\": \"Design for failure.\", \"hook_id\": 1}"), Event::Ping);
        assert_eq!(github("issues", b"not even JSON"), Event::Ignored { kind: "issues".into() });
        assert_eq!(github("release", b""), Event::Ignored { kind: "release".into() });
    }

    #[test]
    fn a_github_pull_request_from_the_same_repository_has_no_head_repo_urls() {
        let pull_request = github_pull_request_with(&[]);
        let expected = PullRequest {
            repo: hello_world(),
            number: 2,
            action: PrAction::Opened,
            head_branch: "changes".into(),
            head_commit: "ec26c3e57ca3a959ca5aad62de7213c562f8c821".into(),
            head_repo_urls: vec![],
            title: "Update the README with new information.".into(),
            merged: false,
        };
        assert_eq!(pull_request, expected);
    }

    #[test]
    fn github_pull_request_actions_map_to_what_previews_do() {
        let cases = [
            ("opened", PrAction::Opened),
            ("reopened", PrAction::Opened),
            ("synchronize", PrAction::Updated),
            ("closed", PrAction::Closed),
            ("edited", PrAction::Other("edited".into())),
            ("labeled", PrAction::Other("labeled".into())),
        ];
        for (action, expected) in cases {
            assert_eq!(github_pull_request_with(&[("/action", json!(action))]).action, expected, "{action}");
        }
    }

    #[test]
    fn a_merged_github_pull_request_is_closed_and_merged() {
        let pull_request = github_pull_request_with(&[
            ("/action", json!("closed")),
            ("/pull_request/state", json!("closed")),
            ("/pull_request/merged", json!(true)),
        ]);
        assert_eq!((pull_request.action, pull_request.merged), (PrAction::Closed, true));
    }

    #[test]
    fn a_github_pull_request_from_a_fork_gives_the_forks_urls() {
        let fork = json!({
            "id": 186853261,
            "name": "Hello-World",
            "full_name": "Octocat/Hello-World",
            "fork": true,
            "html_url": "https://github.com/Octocat/Hello-World",
            "url": "https://api.github.com/repos/Octocat/Hello-World",
            "git_url": "git://github.com/Octocat/Hello-World.git",
            "ssh_url": "git@github.com:Octocat/Hello-World.git",
            "clone_url": "https://github.com/Octocat/Hello-World.git",
            "default_branch": "master"
        });
        let pull_request = github_pull_request_with(&[
            ("/action", json!("synchronize")),
            ("/pull_request/head/label", json!("Octocat:changes")),
            ("/pull_request/head/repo", fork),
        ]);
        assert_eq!(pull_request.action, PrAction::Updated);
        assert_eq!(pull_request.repo, hello_world());
        assert_eq!(
            pull_request.head_repo_urls,
            [
                "https://github.com/Octocat/Hello-World.git",
                "git@github.com:Octocat/Hello-World.git",
                "git://github.com/Octocat/Hello-World.git",
                "https://github.com/Octocat/Hello-World",
            ]
        );
    }

    #[test]
    fn a_github_pull_request_whose_fork_was_deleted_can_still_be_closed() {
        let deleted_fork = [("/pull_request/head/repo", json!(null))];
        let pull_request = github_pull_request_with(&[deleted_fork[0].clone(), ("/action", json!("closed"))]);
        assert_eq!((pull_request.action, pull_request.head_repo_urls), (PrAction::Closed, vec![]));
        let error = parse_github("pull_request", &edited(GITHUB_PULL_REQUEST_BODY, &deleted_fork)).unwrap_err();
        assert_eq!(error.to_string(), "the pull_request event has no pull_request.head.repo");
    }

    #[test]
    fn a_gitlab_push_gives_the_branch_and_every_project_url() {
        let event = gitlab("Push Hook", GITLAB_PUSH_BODY.as_bytes());
        let expected = Push {
            repo: Repo {
                urls: vec![
                    "http://example.com/mike/diaspora.git".into(),
                    "git@example.com:mike/diaspora.git".into(),
                    "http://example.com/mike/diaspora".into(),
                ],
                full_name: "mike/diaspora".into(),
                default_branch: Some("master".into()),
            },
            branch: Some("master".into()),
            commit: Some("da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into()),
            deleted: false,
        };
        assert_eq!(event, Event::Push(expected));
    }

    #[test]
    fn a_gitlab_branch_deletion_has_neither_branch_nor_commit() {
        let body = edited(
            GITLAB_PUSH_BODY,
            &[
                ("/after", json!(ZERO)),
                ("/checkout_sha", json!(null)),
                ("/commits", json!([])),
                ("/total_commits_count", json!(0)),
            ],
        );
        let Event::Push(push) = gitlab("Push Hook", &body) else { panic!("not a push") };
        assert_eq!((push.branch, push.commit, push.deleted), (None, None, true));
        assert_eq!(push.repo.full_name, "mike/diaspora");
    }

    #[test]
    fn gitlab_tag_pushes_system_hooks_and_other_events_are_ignored() {
        for kind in ["Tag Push Hook", "System Hook", "Pipeline Hook", "Note Hook"] {
            assert_eq!(gitlab(kind, GITLAB_PUSH_BODY.as_bytes()), Event::Ignored { kind: kind.into() });
        }
        let tag_ref = edited(GITLAB_PUSH_BODY, &[("/ref", json!("refs/tags/v1.0.0"))]);
        let Event::Push(push) = gitlab("Push Hook", &tag_ref) else { panic!("not a push") };
        assert_eq!(push.branch, None);
    }

    #[test]
    fn a_gitlab_merge_request_from_a_fork_gives_the_forks_urls() {
        let merge_request = gitlab_merge_request_with(&[]);
        let expected = PullRequest {
            repo: Repo {
                urls: vec![
                    "http://example.com/gitlabhq/gitlab-test.git".into(),
                    "git@example.com:gitlabhq/gitlab-test.git".into(),
                    "http://example.com/gitlabhq/gitlab-test".into(),
                ],
                full_name: "gitlabhq/gitlab-test".into(),
                default_branch: Some("master".into()),
            },
            number: 1,
            action: PrAction::Opened,
            head_branch: "ms-viewport".into(),
            head_commit: "da1560886d4f094c3e6c9ef40349f7d38b5d27d7".into(),
            head_repo_urls: vec![
                "http://example.com/contributor/gitlab-test.git".into(),
                "git@example.com:contributor/gitlab-test.git".into(),
                "http://example.com/contributor/gitlab-test".into(),
            ],
            title: "MS-Viewport".into(),
            merged: false,
        };
        assert_eq!(merge_request, expected);
    }

    #[test]
    fn a_gitlab_merge_request_within_the_project_has_no_head_repo_urls() {
        let merge_request = gitlab_merge_request_with(&[("/object_attributes/source_project_id", json!(1))]);
        assert_eq!(merge_request.head_repo_urls, Vec::<String>::new());
        // Without project ids, the source's path decides.
        let same_path = json!({ "path_with_namespace": "GitlabHQ/Gitlab-Test", "git_http_url": "http://example.com/gitlabhq/gitlab-test.git" });
        let merge_request = gitlab_merge_request_with(&[
            ("/object_attributes/source_project_id", json!(null)),
            ("/object_attributes/source", same_path),
        ]);
        assert_eq!(merge_request.head_repo_urls, Vec::<String>::new());
    }

    #[test]
    fn gitlab_merge_request_actions_map_to_what_previews_do() {
        let new_commits = Some(json!("95790bf891e76fee5e1747ab589903a6a1f80f22"));
        let cases = [
            ("open", None, PrAction::Opened),
            ("reopen", None, PrAction::Opened),
            ("update", new_commits.clone(), PrAction::Updated),
            ("update", None, PrAction::Other("update".into())),
            ("close", None, PrAction::Closed),
            ("merge", None, PrAction::Closed),
            ("approved", None, PrAction::Other("approved".into())),
        ];
        for (action, oldrev, expected) in cases {
            let mut edits = vec![("/object_attributes/action", json!(action))];
            if let Some(oldrev) = oldrev {
                edits.push(("/object_attributes/oldrev", oldrev));
            }
            assert_eq!(gitlab_merge_request_with(&edits).action, expected, "{action}");
        }
    }

    #[test]
    fn a_merged_gitlab_merge_request_is_closed_and_merged() {
        let merged = gitlab_merge_request_with(&[
            ("/object_attributes/action", json!("merge")),
            ("/object_attributes/state", json!("merged")),
        ]);
        assert_eq!((merged.action, merged.merged), (PrAction::Closed, true));
        let closed = gitlab_merge_request_with(&[
            ("/object_attributes/action", json!("close")),
            ("/object_attributes/state", json!("closed")),
        ]);
        assert_eq!((closed.action, closed.merged), (PrAction::Closed, false));
    }

    #[test]
    fn malformed_json_is_reported_with_serdes_message() {
        let error = parse_github("push", b"{\"ref\": \"refs/heads/main\",").unwrap_err();
        assert!(matches!(error, PayloadError::NotJson { event: "push", .. }), "{error:?}");
        assert_eq!(
            error.to_string(),
            "the push payload is not a JSON object: EOF while parsing a value at line 1 column 26"
        );
        for body in [&b"[]"[..], b"\"push\"", b"", b"{} trailing"] {
            let error = parse_gitlab("Push Hook", body).unwrap_err();
            assert!(matches!(error, PayloadError::NotJson { event: "Push Hook", .. }), "{error:?}");
        }
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named_with_its_path() {
        let body = edited(GITHUB_PULL_REQUEST_BODY, &[("/pull_request/head/sha", json!(42))]);
        let error = parse_github("pull_request", &body).unwrap_err();
        assert!(
            error.to_string().starts_with("the pull_request event has a malformed pull_request.head.sha: invalid type"),
            "{error}"
        );
        let body = edited(GITLAB_MERGE_REQUEST_BODY, &[("/object_attributes/iid", json!("one"))]);
        let error = parse_gitlab("Merge Request Hook", &body).unwrap_err();
        assert!(
            error.to_string().starts_with("the Merge Request Hook event has a malformed object_attributes.iid:"),
            "{error}"
        );
    }

    #[test]
    fn a_missing_field_is_named() {
        let cases: [(&str, &str, &str, &str); 9] = [
            ("github", "push", "/repository", "the push event has no repository"),
            ("github", "push", "/repository/full_name", "the push event has no repository.full_name"),
            ("github", "push", "/ref", "the push event has no ref"),
            ("github", "push", "/after", "the push event has no after"),
            ("github", "pull_request", "/pull_request/head/sha", "the pull_request event has no pull_request.head.sha"),
            ("github", "pull_request", "/action", "the pull_request event has no action"),
            ("gitlab", "Push Hook", "/project", "the Push Hook event has no project"),
            (
                "gitlab",
                "Merge Request Hook",
                "/object_attributes/last_commit",
                "the Merge Request Hook event has no object_attributes.last_commit.id",
            ),
            (
                "gitlab",
                "Merge Request Hook",
                "/object_attributes/source_branch",
                "the Merge Request Hook event has no object_attributes.source_branch",
            ),
        ];
        for (forge, kind, pointer, message) in cases {
            let error = match (forge, kind) {
                ("github", "push") => parse_github(kind, &edited(GITHUB_PUSH_BODY, &[(pointer, json!(null))])),
                ("github", _) => parse_github(kind, &edited(GITHUB_PULL_REQUEST_BODY, &[(pointer, json!(null))])),
                (_, "Push Hook") => parse_gitlab(kind, &edited(GITLAB_PUSH_BODY, &[(pointer, json!(null))])),
                _ => parse_gitlab(kind, &edited(GITLAB_MERGE_REQUEST_BODY, &[(pointer, json!(null))])),
            }
            .unwrap_err();
            assert_eq!(error.to_string(), message);
        }
        // The number may come from the pull request object alone.
        assert_eq!(github_pull_request_with(&[("/number", json!(null))]).number, 2);
    }

    #[test]
    fn commit_hashes_and_branch_names_that_git_would_misread_are_refused() {
        let bad_commit = edited(GITHUB_PUSH_BODY, &[("/after", json!("--upload-pack=touch /tmp/pwned"))]);
        assert_eq!(
            parse_github("push", &bad_commit).unwrap_err().to_string(),
            "the push event's after is not a commit hash (40 or 64 hex digits)"
        );
        let option_branch = edited(GITHUB_PULL_REQUEST_BODY, &[("/pull_request/head/ref", json!("--force"))]);
        assert_eq!(
            parse_github("pull_request", &option_branch).unwrap_err().to_string(),
            "the pull_request event's pull_request.head.ref is not a branch name git accepts"
        );
        let zero_head = edited(GITLAB_MERGE_REQUEST_BODY, &[("/object_attributes/last_commit/id", json!(ZERO))]);
        assert!(parse_gitlab("Merge Request Hook", &zero_head).is_err());
        let sha256 = "a".repeat(64);
        let sha256_push = edited(GITHUB_PUSH_BODY, &[("/after", json!(sha256))]);
        let Event::Push(push) = github("push", &sha256_push) else { panic!("not a push") };
        assert_eq!(push.commit, Some(sha256));
    }

    #[test]
    fn repo_urls_of_every_form_normalize_to_the_same_name() {
        let same = [
            "https://github.com/Codertocat/Hello-World.git",
            "https://github.com/Codertocat/Hello-World",
            "https://github.com/codertocat/hello-world/",
            "HTTPS://GitHub.com/Codertocat/Hello-World.git/",
            "http://github.com/Codertocat/Hello-World",
            "https://user:token@github.com:443/Codertocat/Hello-World.git",
            "git://github.com/Codertocat/Hello-World.git",
            "ssh://git@github.com/Codertocat/Hello-World.git",
            "ssh://git@github.com:22/Codertocat/Hello-World",
            "git+ssh://git@github.com/Codertocat/Hello-World.git",
            "git@github.com:Codertocat/Hello-World.git",
            "git@github.com:Codertocat/Hello-World",
            "github.com:Codertocat/Hello-World.git",
            "  github.com/Codertocat/Hello-World  ",
            "https://github.com/Codertocat/Hello-World.git?ref=main#readme",
        ];
        for url in same {
            assert_eq!(normalize_repo_url(url).as_deref(), Some("github.com/codertocat/hello-world"), "{url}");
        }
        assert_eq!(
            normalize_repo_url("git@gitlab.example.com:Group/Sub-Group/Project.git").as_deref(),
            Some("gitlab.example.com/group/sub-group/project")
        );
        assert_eq!(
            normalize_repo_url("ssh://git@[2001:db8::1]:2222/team/app.git").as_deref(),
            Some("[2001:db8::1]/team/app")
        );
        assert_eq!(normalize_repo_url("http://gitea:3000/team/app").as_deref(), Some("gitea/team/app"));
    }

    #[test]
    fn unparseable_repo_urls_normalize_to_none() {
        let unparseable = [
            "",
            "   ",
            "owner/repo",
            "/srv/git/repo.git",
            "file:///srv/git/repo.git",
            "ftp://example.com/owner/repo",
            "https://github.com",
            "https://github.com/",
            "https:///owner/repo",
            "https://github.com/.git",
            "https://github.com/owner/../repo",
            "git@github.com:",
            "https://github.com:notaport/owner/repo",
            "https://git hub.com/owner/repo",
            "C:\\repos\\app",
        ];
        for url in unparseable {
            assert_eq!(normalize_repo_url(url), None, "{url:?}");
        }
    }

    #[test]
    fn normalized_urls_normalize_to_themselves() {
        let normalized = normalize_repo_url("git@GitHub.com:Codertocat/Hello-World.git").unwrap();
        assert_eq!(normalize_repo_url(&normalized), Some(normalized));
    }

    #[test]
    fn branch_slugs_are_dns_label_safe() {
        let cases = [
            ("feature/Add_Login!!", "feature-add-login"),
            ("main", "main"),
            ("--Fix--the--bug--", "fix-the-bug"),
            ("release/2024.01", "release-2024-01"),
            ("dependabot/npm_and_yarn/lodash-4.17.21", "dependabot-npm-and-yarn-lodash"),
            ("a-very-long-branch-name-that-goes-on-and-on", "a-very-long-branch-name-that-g"),
            ("abcdefghijklmnopqrstuvwxyz123-/x", "abcdefghijklmnopqrstuvwxyz123"),
            ("fix/ünïcode-naïve", "fix-n-code-na-ve"),
            ("日本語", "branch"),
            ("", "branch"),
            ("///", "branch"),
        ];
        for (branch, slug) in cases {
            assert_eq!(branch_slug(branch), slug, "{branch:?}");
            assert!(slug.len() <= 30 && !slug.starts_with('-') && !slug.ends_with('-'));
            assert!(slug.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'));
        }
    }
}
