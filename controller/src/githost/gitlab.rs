//! GitLab's REST API (v4): commit statuses and merge request notes.

use http::{HeaderName, Method, Response, StatusCode};
use hyper::body::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    is_ours, request, secret_header, truncate, GitHost, GitHostError, State, StatusUpdate, GITLAB_DESCRIPTION_CHARS,
    MAX_COMMENT_PAGES,
};

const PRIVATE_TOKEN: HeaderName = HeaderName::from_static("private-token");

const PROJECT_NOT_FOUND: &str = ". GitLab answers 404 for a project the token cannot see: check the project's \
                                 path and that the token's user is a member of it";

/// The project as the API names it: its numeric ID, or its path URL-encoded (`group%2Fproject`).
fn project_id(repo: &str) -> Result<String, GitHostError> {
    if !repo.is_empty() && repo.bytes().all(|b| b.is_ascii_digit()) {
        return Ok(repo.to_owned());
    }
    let valid_segment = |segment: &str| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    };
    let segments: Vec<&str> = repo.split('/').collect();
    if segments.len() < 2 || !segments.iter().all(|s| valid_segment(s)) {
        return Err(GitHostError::InvalidInput(format!("{repo:?} is not a GitLab project path (group/project)")));
    }
    Ok(segments.join("%2F"))
}

pub(super) async fn set_status(host: &GitHost, token: &str, update: &StatusUpdate<'_>) -> Result<(), GitHostError> {
    let project = project_id(update.repo)?;
    let state = match update.state {
        State::Pending => "pending",
        State::Success => "success",
        State::Failure => "failed",
    };
    let mut body = json!({
        "state": state,
        "name": update.context,
        "description": truncate(update.description, GITLAB_DESCRIPTION_CHARS),
    });
    if let Some(url) = update.target_url {
        body["target_url"] = url.into();
    }
    let path = format!("/projects/{project}/statuses/{}", update.sha);
    match send(host, token, "set commit status", Method::POST, &path, Some(&body), PROJECT_NOT_FOUND).await {
        Ok(_) => Ok(()),
        // GitLab refuses to set a status to the state it is already in.
        Err(GitHostError::Rejected { status: StatusCode::BAD_REQUEST, message, .. })
            if message.contains("Cannot transition status") =>
        {
            tracing::debug!(%message, "GitLab commit status already in this state");
            Ok(())
        }
        Err(e) => Err(e),
    }
}

#[derive(Deserialize)]
struct Note {
    id: u64,
    #[serde(default)]
    body: String,
    /// GitLab's own notes ("added 1 commit"), never ours.
    #[serde(default)]
    system: bool,
}

pub(super) async fn upsert_comment(
    host: &GitHost,
    token: &str,
    repo: &str,
    iid: u64,
    body: &str,
) -> Result<(), GitHostError> {
    let project = project_id(repo)?;
    let not_found = ". Check that the merge request exists and that the token can see the project";
    let notes = format!("/projects/{project}/merge_requests/{iid}/notes");
    let mut page = Some(host.http.endpoint(&format!("/api/v4{notes}?sort=asc&order_by=created_at&per_page=100")));
    let mut ours = None;
    for _ in 0..MAX_COMMENT_PAGES {
        let Some(path) = page.take() else { break };
        let (answer, call) =
            send_to(host, token, "list merge request notes", Method::GET, path, None, not_found).await?;
        let listed: Vec<Note> = host.decode(&call, &answer)?;
        ours = listed.into_iter().find(|note| !note.system && is_ours(&note.body));
        if ours.is_some() {
            break;
        }
        page = host.next_page(&call, &answer)?;
    }
    let body_json = json!({ "body": body });
    match ours {
        Some(note) if note.body == body => {
            tracing::debug!(note = note.id, "merge request note already up to date");
        }
        Some(note) => {
            let path = format!("{notes}/{}", note.id);
            send(host, token, "edit merge request note", Method::PUT, &path, Some(&body_json), not_found).await?;
        }
        None => {
            send(host, token, "comment on merge request", Method::POST, &notes, Some(&body_json), not_found).await?;
        }
    }
    Ok(())
}

/// A call under `/api/v4`.
async fn send(
    host: &GitHost,
    token: &str,
    what: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
    not_found: &'static str,
) -> Result<(Response<Bytes>, String), GitHostError> {
    send_to(host, token, what, method, host.http.endpoint(&format!("/api/v4{path}")), body, not_found).await
}

/// A call to `path`, already absolute on the instance's origin.
async fn send_to(
    host: &GitHost,
    token: &str,
    what: &str,
    method: Method,
    path: String,
    body: Option<&Value>,
    not_found: &'static str,
) -> Result<(Response<Bytes>, String), GitHostError> {
    let mut req = request(method, &path, body);
    req.headers_mut().insert(PRIVATE_TOKEN, secret_header(token)?);
    host.call(what, req, not_found).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn project_paths_are_url_encoded_and_ids_kept() {
        assert_eq!(project_id("group/project").unwrap(), "group%2Fproject");
        assert_eq!(project_id("group/sub.group/my-project_2").unwrap(), "group%2Fsub.group%2Fmy-project_2");
        assert_eq!(project_id("278964").unwrap(), "278964");
        for bad in ["", "project", "group/", "group//project", "group/../x", "group/pro ject", "group/p?x"] {
            assert!(project_id(bad).is_err(), "{bad}");
        }
    }
}
