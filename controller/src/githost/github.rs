//! GitHub's REST API: commit statuses and issue comments (a pull request is an issue).

use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    is_ours, request, secret_header, truncate, Auth, GitHost, GitHostError, State, StatusUpdate,
    GITHUB_DESCRIPTION_CHARS, MAX_COMMENT_PAGES,
};

const API_VERSION: HeaderName = HeaderName::from_static("x-github-api-version");
const API_VERSION_VALUE: HeaderValue = HeaderValue::from_static("2022-11-28");
const MEDIA_TYPE: HeaderValue = HeaderValue::from_static("application/vnd.github+json");

const REPO_NOT_FOUND: &str = ". GitHub answers 404 for a repository the credentials cannot see: check the \
                              repository's name and that the credentials have access to it";

/// A repository on GitHub: `owner/name`.
pub(super) struct Repo<'a> {
    pub owner: &'a str,
    pub name: &'a str,
}

impl<'a> Repo<'a> {
    pub(super) fn parse(repo: &'a str) -> Result<Repo<'a>, GitHostError> {
        let valid = |part: &str| {
            !part.is_empty()
                && part.len() <= 100
                && part != "."
                && part != ".."
                && part.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        };
        match repo.split_once('/') {
            Some((owner, name)) if valid(owner) && valid(name) => Ok(Repo { owner, name }),
            _ => Err(GitHostError::InvalidInput(format!("{repo:?} is not a GitHub repository (owner/name)"))),
        }
    }
}

pub(super) async fn set_status(host: &GitHost, update: &StatusUpdate<'_>) -> Result<(), GitHostError> {
    let repo = Repo::parse(update.repo)?;
    let state = match update.state {
        State::Pending => "pending",
        State::Success => "success",
        State::Failure => "failure",
    };
    let mut body = json!({
        "state": state,
        "description": truncate(update.description, GITHUB_DESCRIPTION_CHARS),
        "context": update.context,
    });
    if let Some(url) = update.target_url {
        body["target_url"] = url.into();
    }
    let path = format!("/repos/{}/{}/statuses/{}", repo.owner, repo.name, update.sha);
    send(host, &repo, "set commit status", Method::POST, &path, Some(&body), REPO_NOT_FOUND).await?;
    Ok(())
}

#[derive(Deserialize)]
struct IssueComment {
    id: u64,
    #[serde(default)]
    body: Option<String>,
}

pub(super) async fn upsert_comment(host: &GitHost, repo: &str, number: u64, body: &str) -> Result<(), GitHostError> {
    let repo = Repo::parse(repo)?;
    let not_found = ". Check that the pull request exists and that the credentials can see the repository";
    let mut page = Some(format!("/repos/{}/{}/issues/{number}/comments?per_page=100", repo.owner, repo.name));
    let mut ours = None;
    for _ in 0..MAX_COMMENT_PAGES {
        let Some(path) = page.take() else { break };
        let (answer, call) =
            send_to(host, &repo, "list pull request comments", Method::GET, path, None, not_found).await?;
        let comments: Vec<IssueComment> = host.decode(&call, &answer)?;
        ours = comments.into_iter().find(|c| c.body.as_deref().is_some_and(is_ours));
        if ours.is_some() {
            break;
        }
        page = host.next_page(&call, &answer)?;
    }
    let body_json = json!({ "body": body });
    match ours {
        Some(comment) if comment.body.as_deref() == Some(body) => {
            tracing::debug!(comment = comment.id, "pull request comment already up to date");
        }
        Some(comment) => {
            let path = format!("/repos/{}/{}/issues/comments/{}", repo.owner, repo.name, comment.id);
            send(host, &repo, "edit pull request comment", Method::PATCH, &path, Some(&body_json), not_found).await?;
        }
        None => {
            let path = format!("/repos/{}/{}/issues/{number}/comments", repo.owner, repo.name);
            send(host, &repo, "comment on pull request", Method::POST, &path, Some(&body_json), not_found).await?;
        }
    }
    Ok(())
}

/// A call under the API root, authenticated for `repo`.
async fn send(
    host: &GitHost,
    repo: &Repo<'_>,
    what: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
    not_found: &'static str,
) -> Result<(Response<Bytes>, String), GitHostError> {
    send_to(host, repo, what, method, host.http.endpoint(path), body, not_found).await
}

/// A call to `path` (already absolute on the API's origin), authenticated for `repo`.
async fn send_to(
    host: &GitHost,
    repo: &Repo<'_>,
    what: &str,
    method: Method,
    path: String,
    body: Option<&Value>,
    not_found: &'static str,
) -> Result<(Response<Bytes>, String), GitHostError> {
    let token = match &host.auth {
        Auth::GithubToken(token) => token.clone(),
        Auth::GithubApp(app) => app.installation_token(host, repo).await?,
        Auth::GitlabToken(_) => unreachable!("GitLab credentials are not used with GitHub's API"),
    };
    let mut req = request(method, &path, body);
    with_github_headers(req.headers_mut(), &token)?;
    let result = host.call(what, req, not_found).await;
    if let (Auth::GithubApp(app), Err(e)) = (&host.auth, &result) {
        if e.status() == Some(StatusCode::UNAUTHORIZED) {
            app.forget_token(repo).await;
        }
    }
    result
}

/// GitHub's headers: the bearer token (a token, an installation token or an App's JWT), the
/// media type and the API version this client was written against.
pub(super) fn with_github_headers(headers: &mut http::HeaderMap, bearer: &str) -> Result<(), GitHostError> {
    headers.insert(AUTHORIZATION, secret_header(&format!("Bearer {bearer}"))?);
    headers.insert(ACCEPT, MEDIA_TYPE);
    headers.insert(API_VERSION, API_VERSION_VALUE);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_are_owner_slash_name() {
        let repo = Repo::parse("acme-inc/web.site_2").unwrap();
        assert_eq!((repo.owner, repo.name), ("acme-inc", "web.site_2"));
        for bad in ["acme", "acme/", "/web", "acme/web/extra", "acme/..", "acme/we b", "acme/web?x", "a%2Fb/c"] {
            assert!(Repo::parse(bad).is_err(), "{bad}");
        }
    }
}
