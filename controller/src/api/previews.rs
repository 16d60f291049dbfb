//! Preview environments: every service of a project deployed again from a pull request's (or a
//! branch's) head, at `<service>-<project>-<key>.<base domain>`. Opened, moved and closed by git
//! webhooks (see [`super::webhooks`]) or by hand here; torn down by the leader
//! ([`crate::deploy::previews`]).

use std::collections::BTreeSet;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, Role};
use super::error::{
    applied, ApiError, BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    Unprocessable, UnsupportedMediaType,
};
use super::json::ApiJson;
use super::services::{ServiceSpec, Source};
use super::AppState;
use crate::command::Command;
use crate::deploy::DeploySource;
use crate::store::queries::PreviewRow;
use crate::util::{new_id, now_ms, rfc3339};
use crate::webhooks::payload;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/projects/{project_id}/previews", get(list).post(create))
        .route("/api/v1/projects/{project_id}/previews/settings", put(settings))
        .route("/api/v1/projects/{project_id}/previews/{key}", delete(remove))
}

/// A preview environment.
#[derive(Serialize, ToSchema)]
pub struct PreviewView {
    id: String,
    /// `pr-<n>` for a pull or merge request, else the branch's slug.
    #[schema(example = "pr-12")]
    key: String,
    /// `github`, `gitlab` or `api`.
    origin: String,
    /// The pull or merge request.
    number: Option<i64>,
    branch: String,
    commit: Option<String>,
    /// `active`, `destroying` (being torn down: see `teardown_error` for what is left) or
    /// `destroyed`.
    #[schema(example = "active")]
    status: String,
    /// Destroyed at this time unless a push comes first.
    expires_at: String,
    /// Why the teardown is not finished yet (it is tried again until it succeeds).
    teardown_error: Option<String>,
    /// Where each service of the project answers in this preview.
    hosts: Vec<String>,
    created_at: String,
    updated_at: String,
    destroyed_at: Option<String>,
}

impl PreviewView {
    fn new(row: PreviewRow, services: &[String], project: &str, c: &AppState) -> PreviewView {
        let hosts = if row.status == "destroyed" {
            Vec::new()
        } else {
            services.iter().map(|s| c.ingress.default_host(s, project, &row.key)).collect()
        };
        PreviewView {
            id: row.id,
            key: row.key,
            origin: row.origin,
            number: row.number,
            branch: row.branch,
            commit: Some(row.commit_sha).filter(|c| !c.is_empty()),
            status: row.status,
            expires_at: rfc3339(row.expires_at),
            teardown_error: row.teardown_error,
            hosts,
            created_at: rfc3339(row.created_at),
            updated_at: rfc3339(row.updated_at),
            destroyed_at: row.destroyed_at.map(rfc3339),
        }
    }
}

/// The command that opens preview `key` of a project (or moves it to a new head), with one
/// deployment per service. Services built from the repository `repo` (normalized URLs;
/// `None`: every git service) build `branch` at `commit`; other git services their own branch;
/// image services their image. Upload services have no source to preview and are left out.
#[allow(clippy::too_many_arguments)]
pub(super) async fn open_command(
    c: &AppState,
    project_id: &str,
    key: &str,
    origin: &str,
    number: Option<u64>,
    branch: &str,
    commit: Option<&str>,
    repo: Option<&BTreeSet<String>>,
    created_by: &str,
    notify: Option<crate::deploy::Notify>,
) -> Result<Command, ApiError> {
    let at = now_ms();
    let mut deployments = Vec::new();
    for service in c.state.services(project_id).await? {
        let spec: ServiceSpec =
            serde_json::from_value(service.spec).map_err(|e| ApiError::internal("stored service spec", e))?;
        let source = match spec.source {
            Source::Git { url, branch: own, dockerfile } => {
                let previewed =
                    repo.is_none_or(|repo| payload::normalize_repo_url(&url).is_some_and(|u| repo.contains(&u)));
                if previewed {
                    DeploySource::Git {
                        url,
                        branch: branch.to_string(),
                        commit: commit.map(str::to_lowercase),
                        dockerfile,
                    }
                } else {
                    DeploySource::Git { url, branch: own, commit: None, dockerfile }
                }
            }
            Source::Image(image) => DeploySource::Image(image),
            Source::Upload {} => continue,
        };
        deployments.push(Command::CreateDeployment {
            id: new_id(),
            project_id: project_id.to_string(),
            service_id: service.id,
            source: serde_json::to_value(&source).map_err(|e| ApiError::internal("deployment source", e))?,
            reference: match &source {
                DeploySource::Git { commit: Some(commit), .. } => Some(commit.clone()),
                DeploySource::Git { branch, .. } => Some(branch.clone()),
                _ => None,
            },
            created_by: created_by.to_string(),
            preview: key.to_string(),
            // Only the deployments built from the request's repository report to it.
            notify: match (&source, &notify) {
                (DeploySource::Git { commit: Some(_), .. }, Some(n)) => n.json(),
                _ => String::new(),
            },
            at,
        });
    }
    Ok(Command::PutPreview {
        id: new_id(),
        project_id: project_id.to_string(),
        key: key.to_string(),
        origin: origin.to_string(),
        number,
        branch: branch.to_string(),
        commit: commit.unwrap_or_default().to_string(),
        expires_at: at + c.deploys.settings.preview_ttl.as_millis() as i64,
        deployments,
        at,
    })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// At most this many (default 50, at most 200).
    limit: Option<u32>,
}

/// The project's previews, newest first, destroyed ones included (project viewers).
#[utoipa::path(
    get,
    path = "/api/v1/projects/{project_id}/previews",
    tag = "previews",
    operation_id = "list_previews",
    security(("bearer" = []), ("session" = [])),
    params(("project_id" = String, Path, description = "The project's id"), ListQuery),
    responses(
        (status = 200, description = "The previews", body = Vec<PreviewView>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn list(
    State(c): State<AppState>,
    caller: Caller,
    Path(project_id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<Json<Vec<PreviewView>>, ApiError> {
    c.read_barrier().await?;
    caller.require_project(&c, &project_id, "read", Role::Viewer).await?;
    let limit = query.limit.unwrap_or(50).clamp(1, 200);
    let project = c.state.project(&project_id).await?.map(|p| p.name).unwrap_or_default();
    let services: Vec<String> = c.state.services(&project_id).await?.into_iter().map(|s| s.name).collect();
    let rows = c.state.previews(&project_id, limit).await?;
    Ok(Json(rows.into_iter().map(|row| PreviewView::new(row, &services, &project, &c)).collect()))
}

/// A preview of a branch, made by hand.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateInput {
    /// The branch every git service of the project builds.
    #[schema(example = "feature/login")]
    branch: String,
    /// A commit of that branch (default: its head).
    commit: Option<String>,
}

/// Opens (or moves) the preview of a branch: every git service of the project builds it, at
/// `<service>-<project>-<branch slug>` (project developers).
#[utoipa::path(
    post,
    path = "/api/v1/projects/{project_id}/previews",
    tag = "previews",
    operation_id = "create_preview",
    security(("bearer" = []), ("session" = [])),
    params(("project_id" = String, Path, description = "The project's id")),
    request_body(content = CreateInput, content_type = "application/json"),
    responses(
        (status = 201, description = "The preview; its deployments are queued", body = PreviewView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn create(
    State(c): State<AppState>,
    caller: Caller,
    Path(project_id): Path<String>,
    ApiJson(input): ApiJson<CreateInput>,
) -> Result<(StatusCode, Json<PreviewView>), ApiError> {
    caller.require_project(&c, &project_id, "deploy", Role::Developer).await?;
    super::deployments::check_ref(&input.branch)
        .map_err(|_| ApiError::validation(format!("branch: {:?} is not a branch name", input.branch)))?;
    if let Some(commit) = &input.commit {
        if !super::deployments::is_commit(commit) {
            return Err(ApiError::validation("commit: 7 to 40 hex digits"));
        }
    }
    if c.state.previews_enabled(&project_id).await? == Some(false) {
        return Err(ApiError::validation("previews are turned off for this project (PUT .../previews/settings)"));
    }
    let key = payload::branch_slug(&input.branch);
    let command = open_command(
        &c,
        &project_id,
        &key,
        "api",
        None,
        &input.branch,
        input.commit.as_deref(),
        None,
        &caller.actor(),
        None,
    )
    .await?;
    applied(c.propose(caller.audited("preview.create", &key, Some(&project_id), command)).await?)?;
    c.deploys.wake();
    let row = c
        .state
        .live_preview(&project_id, &key)
        .await?
        .ok_or_else(|| ApiError::unavailable("the preview is not readable yet"))?;
    let project = c.state.project(&project_id).await?.map(|p| p.name).unwrap_or_default();
    let services: Vec<String> = c.state.services(&project_id).await?.into_iter().map(|s| s.name).collect();
    Ok((StatusCode::CREATED, Json(PreviewView::new(row, &services, &project, &c))))
}

/// Destroys a preview: its hosts stop answering at once, and its containers, images and sources
/// are removed from every agent (project developers). It shows `destroying` until they all are.
#[utoipa::path(
    delete,
    path = "/api/v1/projects/{project_id}/previews/{key}",
    tag = "previews",
    operation_id = "delete_preview",
    security(("bearer" = []), ("session" = [])),
    params(
        ("project_id" = String, Path, description = "The project's id"),
        ("key" = String, Path, description = "The preview's key (pr-<n>, or a branch's slug)"),
    ),
    responses(
        (status = 202, description = "Being torn down"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn remove(
    State(c): State<AppState>,
    caller: Caller,
    Path((project_id, key)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require_project(&c, &project_id, "deploy", Role::Developer).await?;
    let command = Command::DestroyPreview {
        project_id: project_id.clone(),
        key: key.clone(),
        reason: format!("deleted by {}", caller.actor()),
        at: now_ms(),
    };
    applied(c.propose(caller.audited("preview.delete", &key, Some(&project_id), command)).await?)?;
    Ok(StatusCode::ACCEPTED)
}

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SettingsInput {
    /// Whether pull and merge requests get preview environments (on by default).
    enabled: bool,
}

/// Turns the project's preview environments on or off (project admins). Previews already open
/// stay until closed or expired.
#[utoipa::path(
    put,
    path = "/api/v1/projects/{project_id}/previews/settings",
    tag = "previews",
    operation_id = "set_preview_settings",
    security(("bearer" = []), ("session" = [])),
    params(("project_id" = String, Path, description = "The project's id")),
    request_body(content = SettingsInput, content_type = "application/json"),
    responses(
        (status = 204, description = "Set"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn settings(
    State(c): State<AppState>,
    caller: Caller,
    Path(project_id): Path<String>,
    ApiJson(input): ApiJson<SettingsInput>,
) -> Result<StatusCode, ApiError> {
    caller.require_project(&c, &project_id, "admin", Role::Admin).await?;
    let command = Command::SetPreviewsEnabled { project_id: project_id.clone(), enabled: input.enabled };
    applied(c.propose(caller.audited("preview.settings", &project_id, Some(&project_id), command)).await?)?;
    Ok(StatusCode::NO_CONTENT)
}
