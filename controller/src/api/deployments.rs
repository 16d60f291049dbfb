//! Deployments: asking for one (`deploy`, `upload`), reading them and their logs, and the two
//! WebSockets that stream them live (DESIGN.md section 6).
//!
//! Both streams read this node's own copy of the state and wake on what its state machine
//! applies, so any controller serves them. A subscriber that connects mid-way first gets what
//! it missed (the log lines so far; the deployments in progress), then what follows.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, Role};
use super::error::{
    ApiError, BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable, Unprocessable,
    UnsupportedMediaType,
};
use super::json::ApiJson;
use super::services::{ServiceSpec, Source};
use super::AppState;
use crate::command::{Command, DeploymentStatus};
use crate::deploy::{DeploySource, UPLOAD_CHUNK};
use crate::store::queries::{DeploymentRow, LogRow};
use crate::store::state_machine::StateEvent;
use crate::util::{new_id, now_ms, rfc3339};

pub fn router(state: &AppState) -> Router<AppState> {
    let upload_limit = usize::try_from(state.deploys.settings.max_upload_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/api/v1/projects/{project_id}/services/{service_id}/deploy", post(deploy))
        .route(
            "/api/v1/projects/{project_id}/services/{service_id}/upload",
            post(upload).layer(DefaultBodyLimit::max(upload_limit)),
        )
        .route("/api/v1/projects/{project_id}/services/{service_id}/rollback", post(rollback))
        .route("/api/v1/projects/{project_id}/services/{service_id}/deployments", get(list))
        .route("/api/v1/deployments/{deployment_id}", get(show))
        .route("/api/v1/deployments/{deployment_id}/logs", get(logs))
        .route("/api/v1/ws/deployments/{deployment_id}/logs", get(ws_logs))
        .route("/api/v1/ws/projects/{project_id}/deployments", get(ws_project))
}

#[derive(Serialize, ToSchema)]
pub struct DeploymentView {
    id: String,
    project_id: String,
    service_id: String,
    #[schema(example = "running")]
    status: String,
    /// Times the deployment was handed to an agent.
    attempt: i64,
    agent_id: Option<String>,
    /// The image it runs, once built.
    image: Option<String>,
    /// The git commit it was built from.
    commit: Option<String>,
    /// Where it answers, once running.
    url: Option<String>,
    error: Option<String>,
    /// The branch or commit asked for.
    #[serde(rename = "ref")]
    reference: Option<String>,
    /// `git`, `image` or `upload`.
    source: String,
    created_by: String,
    /// The preview environment it belongs to (`null`: the service's own release).
    preview: Option<String>,
    created_at: String,
    started_at: Option<String>,
    finished_at: Option<String>,
}

impl From<DeploymentRow> for DeploymentView {
    fn from(d: DeploymentRow) -> DeploymentView {
        let source = match serde_json::from_str::<DeploySource>(&d.source) {
            Ok(DeploySource::Git { .. }) => "git",
            Ok(DeploySource::Image(_)) => "image",
            Ok(DeploySource::Upload { .. }) => "upload",
            Ok(DeploySource::Rollback { .. }) => "rollback",
            Err(_) => "unknown",
        };
        DeploymentView {
            id: d.id,
            project_id: d.project_id,
            service_id: d.service_id,
            status: d.status,
            attempt: d.attempt,
            agent_id: d.agent_id,
            image: d.image,
            commit: d.commit_sha,
            url: d.url,
            error: d.error,
            reference: d.reference,
            source: source.to_string(),
            preview: Some(d.preview).filter(|p| !p.is_empty()),
            created_by: d.created_by,
            created_at: rfc3339(d.created_at),
            started_at: d.started_at.map(rfc3339),
            finished_at: d.finished_at.map(rfc3339),
        }
    }
}

/// One log line, as the API and the logs WebSocket show it.
#[derive(Serialize, ToSchema)]
pub struct LogView {
    /// The line's number in the deployment's log (for `?after=`).
    n: i64,
    #[schema(example = "info")]
    level: String,
    message: String,
    timestamp: String,
    /// `schedule`, `source`, `build`, `deploy`, `health` or `run`.
    phase: String,
    step: Option<String>,
    attempt: i64,
}

impl From<LogRow> for LogView {
    fn from(l: LogRow) -> LogView {
        LogView {
            n: l.n,
            level: l.level,
            message: l.message,
            timestamp: rfc3339(l.at),
            phase: l.phase,
            step: l.step,
            attempt: l.attempt,
        }
    }
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct DeployInput {
    /// A branch or a commit (7 to 40 hex digits) of the service's repository (default: its
    /// branch's head).
    #[serde(rename = "ref")]
    #[schema(example = "main", max_length = 255)]
    reference: Option<String>,
}

/// Whether `r` names a commit rather than a branch.
pub(super) fn is_commit(r: &str) -> bool {
    (7..=40).contains(&r.len()) && r.bytes().all(|b| b.is_ascii_hexdigit())
}

pub(super) fn check_ref(r: &str) -> Result<(), ApiError> {
    if r.is_empty()
        || r.len() > 255
        || r.starts_with('-')
        || r.contains("..")
        || r.chars().any(|c| c.is_whitespace() || c.is_control() || "~^:?*[\\".contains(c))
    {
        return Err(ApiError::validation(format!("ref: {r:?} is neither a branch name nor a commit")));
    }
    Ok(())
}

async fn service_of(
    c: &AppState,
    caller: &Caller,
    project_id: &str,
    service_id: &str,
    scope: &str,
    role: Role,
) -> Result<(String, ServiceSpec), ApiError> {
    caller.require_project(c, project_id, scope, role).await?;
    let service = c
        .state
        .service(project_id, service_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no service with id {service_id} in project {project_id}")))?;
    let spec = serde_json::from_value(service.spec).map_err(|e| ApiError::internal("stored service spec", e))?;
    Ok((service.name, spec))
}

/// The service a deployment is for.
struct Target {
    project_id: String,
    service_id: String,
    name: String,
}

/// Commits a new deployment (with the id `id`) and answers it.
async fn create(
    c: &AppState,
    caller: &Caller,
    target: Target,
    id: String,
    source: DeploySource,
    reference: Option<String>,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    let action = match source {
        DeploySource::Upload { .. } => "deployment.upload",
        DeploySource::Rollback { .. } => "deployment.rollback",
        _ => "deployment.create",
    };
    let command = Command::CreateDeployment {
        id: id.clone(),
        project_id: target.project_id.clone(),
        service_id: target.service_id,
        source: serde_json::to_value(&source).map_err(|e| ApiError::internal("deployment source", e))?,
        reference,
        created_by: caller.actor(),
        preview: String::new(),
        notify: String::new(),
        at: now_ms(),
    };
    super::error::applied(c.propose(caller.audited(action, &target.name, Some(&target.project_id), command)).await?)?;
    c.deploys.wake();
    let row =
        c.state.deployment(&id).await?.ok_or_else(|| ApiError::unavailable("the deployment is not readable yet"))?;
    Ok((StatusCode::CREATED, Json(row.into())))
}

/// Deploys the service from its source: the branch's head, or the branch or commit in `ref`
/// (project developers). The deployment is `queued`; follow it with its logs.
#[utoipa::path(
    post,
    path = "/api/v1/projects/{project_id}/services/{service_id}/deploy",
    tag = "deployments",
    operation_id = "deploy_service",
    security(("bearer" = []), ("session" = [])),
    params(
        ("project_id" = String, Path, description = "The project's id"),
        ("service_id" = String, Path, description = "The service's id"),
    ),
    request_body(content = DeployInput, content_type = "application/json"),
    responses(
        (status = 201, description = "The queued deployment", body = DeploymentView,
            links(("ShowDeployment" = (operation_id = "show_deployment", parameters(("deployment_id" = "$response.body#/id")))))),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn deploy(
    State(c): State<AppState>,
    caller: Caller,
    Path((project_id, service_id)): Path<(String, String)>,
    body: Option<ApiJson<DeployInput>>,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    c.read_barrier().await?;
    let (name, spec) = service_of(&c, &caller, &project_id, &service_id, "deploy", Role::Developer).await?;
    if let Some(r) = &body.reference {
        check_ref(r)?;
    }
    let source = match spec.source {
        Source::Git { url, branch, dockerfile } => {
            let (branch, commit) = match &body.reference {
                Some(r) if is_commit(r) => (branch, Some(r.to_lowercase())),
                Some(r) => (r.clone(), None),
                None => (branch, None),
            };
            DeploySource::Git { url, branch, commit, dockerfile }
        }
        Source::Image(reference) => {
            if body.reference.is_some() {
                return Err(ApiError::validation(
                    "ref: this service runs an image; change its source.image to deploy another one",
                ));
            }
            DeploySource::Image(reference)
        }
        Source::Upload {} => {
            return Err(ApiError::validation(format!(
                "service {name} deploys uploaded sources: POST a .tar.gz to \
                 /api/v1/projects/{project_id}/services/{service_id}/upload"
            )))
        }
    };
    let target = Target { project_id, service_id, name };
    create(&c, &caller, target, new_id(), source, body.reference).await
}

/// Deploys a `.tar.gz` of the source sent as the body (project developers). The Dockerfile is
/// the service's `source.git.dockerfile` for a git service, else `Dockerfile` at the root.
#[utoipa::path(
    post,
    path = "/api/v1/projects/{project_id}/services/{service_id}/upload",
    tag = "deployments",
    operation_id = "upload_source",
    security(("bearer" = []), ("session" = [])),
    params(
        ("project_id" = String, Path, description = "The project's id"),
        ("service_id" = String, Path, description = "The service's id"),
    ),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "A gzip-compressed tar (.tar.gz) of the source tree; any Content-Type is accepted"),
    responses(
        (status = 201, description = "The queued deployment", body = DeploymentView),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 413, response = PayloadTooLarge),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn upload(
    State(c): State<AppState>,
    caller: Caller,
    Path((project_id, service_id)): Path<(String, String)>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "the upload is larger than {} bytes, this cluster's limit",
                    c.deploys.settings.max_upload_bytes
                ),
            )
        } else {
            ApiError::bad_request(format!("cannot read the upload: {e}"))
        }
    })?;
    c.read_barrier().await?;
    let (name, spec) = service_of(&c, &caller, &project_id, &service_id, "deploy", Role::Developer).await?;
    if body.len() < 18 || body[0] != 0x1f || body[1] != 0x8b {
        return Err(ApiError::bad_request("the body is not a gzip-compressed tar (.tar.gz) of the source"));
    }
    let dockerfile = match &spec.source {
        Source::Git { dockerfile, .. } => dockerfile.clone(),
        _ => "Dockerfile".to_string(),
    };
    let id = new_id();
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &body));
    let chunks = body.chunks(UPLOAD_CHUNK).count() as u32;
    // The tarball is replicated like any state, chunk by chunk, before the deployment exists.
    let stored = async {
        for (i, chunk) in body.chunks(UPLOAD_CHUNK).enumerate() {
            let command =
                Command::PutUploadChunk { upload_id: id.clone(), chunk: i as u32, data_hex: hex::encode(chunk) };
            super::error::applied(c.propose(command).await?)?;
        }
        Ok::<(), ApiError>(())
    }
    .await;
    if let Err(e) = stored {
        let _ = c.propose(Command::DropUploads { ids: vec![id] }).await;
        return Err(e);
    }
    let source = DeploySource::Upload { size: body.len() as u64, sha256: digest, chunks, dockerfile };
    let created = create(&c, &caller, Target { project_id, service_id, name }, id.clone(), source, None).await;
    if created.is_err() {
        // The chunks stored so far belong to no deployment.
        let _ = c.propose(Command::DropUploads { ids: vec![id] }).await;
    }
    created
}

#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
struct RollbackInput {
    /// The deployment whose image to run again (default: the newest one before the current
    /// release that ran healthy).
    deployment_id: Option<String>,
}

/// Runs the image of an earlier deployment again, without a build (project developers): the
/// named one, or the newest that ran healthy before the current release. It is a new
/// deployment, placed on the agent that built the image.
#[utoipa::path(
    post,
    path = "/api/v1/projects/{project_id}/services/{service_id}/rollback",
    tag = "deployments",
    operation_id = "rollback_service",
    security(("bearer" = []), ("session" = [])),
    params(
        ("project_id" = String, Path, description = "The project's id"),
        ("service_id" = String, Path, description = "The service's id"),
    ),
    request_body(content = RollbackInput, content_type = "application/json"),
    responses(
        (status = 201, description = "The queued deployment", body = DeploymentView),
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
async fn rollback(
    State(c): State<AppState>,
    caller: Caller,
    Path((project_id, service_id)): Path<(String, String)>,
    body: Option<ApiJson<RollbackInput>>,
) -> Result<(StatusCode, Json<DeploymentView>), ApiError> {
    let body = body.map(|b| b.0).unwrap_or_default();
    c.read_barrier().await?;
    let (name, _) = service_of(&c, &caller, &project_id, &service_id, "deploy", Role::Developer).await?;
    // The service's own releases: a preview's are not rolled back to.
    let mut history = c.state.deployments_of_service(&service_id, 1000, None).await?;
    history.retain(|d| d.preview.is_empty());
    let target = match &body.deployment_id {
        Some(id) => {
            let d = history.iter().find(|d| &d.id == id).ok_or_else(|| {
                ApiError::validation(format!("deployment_id: {id} is not a deployment of service {name}"))
            })?;
            if d.healthy_at.is_none() {
                return Err(ApiError::validation(format!(
                    "deployment_id: deployment {id} never ran healthy ({}); roll back to one that did",
                    d.status
                )));
            }
            d
        }
        None => {
            // The newest healthy one that is not the release running now.
            let current = history.iter().find(|d| d.status() == DeploymentStatus::Running).map(|d| d.seq);
            history
                .iter()
                .filter(|d| d.healthy_at.is_some() && Some(d.seq) != current)
                .find(|d| current.is_none_or(|seq| d.seq < seq))
                .ok_or_else(|| {
                    ApiError::conflict(format!(
                        "service {name} has no earlier deployment that ran healthy to roll back to"
                    ))
                })?
        }
    };
    let (Some(image), Some(agent)) = (target.image.clone(), target.agent_id.clone()) else {
        return Err(ApiError::conflict(format!("deployment {} has no image to run again", target.id)));
    };
    let source = DeploySource::Rollback { image, of: target.id.clone(), agent };
    let reference = Some(target.id.clone());
    create(&c, &caller, Target { project_id, service_id, name }, new_id(), source, reference).await
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// How many deployments, 1 to 1000 (default 50).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The id of the last deployment of the previous page.
    before: Option<String>,
}

/// The service's deployments, newest first (project viewers).
#[utoipa::path(
    get,
    path = "/api/v1/projects/{project_id}/services/{service_id}/deployments",
    tag = "deployments",
    operation_id = "list_deployments",
    security(("bearer" = []), ("session" = [])),
    params(
        ("project_id" = String, Path, description = "The project's id"),
        ("service_id" = String, Path, description = "The service's id"),
        ListQuery,
    ),
    responses(
        (status = 200, description = "Deployments, newest first", body = Vec<DeploymentView>),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn list(
    State(c): State<AppState>,
    caller: Caller,
    Path((project_id, service_id)): Path<(String, String)>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<DeploymentView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    c.read_barrier().await?;
    service_of(&c, &caller, &project_id, &service_id, "read", Role::Viewer).await?;
    let limit = query.limit.unwrap_or(50);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation("limit must be between 1 and 1000"));
    }
    if let Some(before) = &query.before {
        if c.state.deployment(before).await?.is_none_or(|d| d.service_id != service_id) {
            return Err(ApiError::validation(format!(
                "before must be the id of a listed deployment; there is no deployment {before} of this service"
            )));
        }
    }
    let rows = c.state.deployments_of_service(&service_id, limit, query.before.as_deref()).await?;
    Ok(Json(rows.into_iter().map(DeploymentView::from).collect()))
}

/// A deployment the caller may read.
async fn readable(c: &AppState, caller: &Caller, id: &str) -> Result<DeploymentRow, ApiError> {
    let not_found = || ApiError::not_found(format!("no deployment with id {id}"));
    let row = c.state.deployment(id).await?.ok_or_else(not_found)?;
    // A deployment of a project the caller may not see does not exist for them.
    match caller.require_project(c, &row.project_id, "read", Role::Viewer).await {
        Err(e) if e.status() == StatusCode::NOT_FOUND => Err(not_found()),
        Err(e) => Err(e),
        Ok(_) => Ok(row),
    }
}

/// One deployment (project viewers).
#[utoipa::path(
    get,
    path = "/api/v1/deployments/{deployment_id}",
    tag = "deployments",
    operation_id = "show_deployment",
    security(("bearer" = []), ("session" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id")),
    responses(
        (status = 200, description = "The deployment", body = DeploymentView),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn show(
    State(c): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeploymentView>, ApiError> {
    c.read_barrier().await?;
    Ok(Json(readable(&c, &caller, &id).await?.into()))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogsQuery {
    /// Only lines numbered above this (default 0: from the start).
    #[param(minimum = 0)]
    after: Option<i64>,
    /// At most this many lines, 1 to 10000 (default 1000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<u32>,
}

/// The deployment's log lines, oldest first (project viewers).
#[utoipa::path(
    get,
    path = "/api/v1/deployments/{deployment_id}/logs",
    tag = "deployments",
    operation_id = "deployment_logs",
    security(("bearer" = []), ("session" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id"), LogsQuery),
    responses(
        (status = 200, description = "Log lines, oldest first", body = Vec<LogView>),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn logs(
    State(c): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    query: Result<Query<LogsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<LogView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(1000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::validation("limit must be between 1 and 10000"));
    }
    if query.after.is_some_and(|a| a < 0) {
        return Err(ApiError::validation("after must be 0 or more"));
    }
    c.read_barrier().await?;
    readable(&c, &caller, &id).await?;
    let rows = c.state.deployment_logs(&id, query.after.unwrap_or(0), limit).await?;
    Ok(Json(rows.into_iter().map(LogView::from).collect()))
}

/// Live log lines of a deployment over a WebSocket: every line so far, then each new one as it
/// is committed, as `{"level","message","timestamp","phase","step"}`. The server closes the
/// socket (code 1000) once the deployment has ended and its last line was sent.
#[utoipa::path(
    get,
    path = "/api/v1/ws/deployments/{deployment_id}/logs",
    tag = "deployments",
    operation_id = "ws_deployment_logs",
    security(("bearer" = []), ("session" = [])),
    params(("deployment_id" = String, Path, description = "The deployment's id")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn ws_logs(
    State(c): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = websocket(ws)?;
    c.read_barrier().await?;
    readable(&c, &caller, &id).await?;
    let events = c.events.subscribe();
    Ok(ws.on_upgrade(move |socket| stream_logs(c, id, socket, events)))
}

/// What the logs WebSocket sends for a line.
#[derive(Serialize)]
struct WsLine<'a> {
    level: &'a str,
    message: &'a str,
    timestamp: String,
    phase: &'a str,
    step: Option<&'a str>,
}

async fn send_json(socket: &mut WebSocket, value: &impl Serialize) -> bool {
    match serde_json::to_string(value) {
        Ok(text) => socket.send(Message::Text(text.into())).await.is_ok(),
        Err(_) => false,
    }
}

/// Sends the lines after `*last`; false when the socket is gone.
async fn send_new_lines(c: &AppState, id: &str, last: &mut i64, socket: &mut WebSocket) -> bool {
    loop {
        let Ok(rows) = c.state.deployment_logs(id, *last, 500).await else { return false };
        let more = rows.len() == 500;
        for row in rows {
            let line = WsLine {
                level: &row.level,
                message: &row.message,
                timestamp: rfc3339(row.at),
                phase: &row.phase,
                step: row.step.as_deref(),
            };
            if !send_json(socket, &line).await {
                return false;
            }
            *last = row.n;
        }
        if !more {
            return true;
        }
    }
}

/// Ping interval of the WebSockets, so proxies keep them open.
const WS_PING: std::time::Duration = std::time::Duration::from_secs(20);

/// The client's side of a stream: waits for what the client sends (ignored) or the next ping.
/// False once the socket is closed or broken. Cancel-safe: a stream waits on it beside its events.
async fn tend(socket: &mut WebSocket, ping: &mut tokio::time::Interval) -> bool {
    tokio::select! {
        incoming = socket.recv() => matches!(incoming, Some(Ok(message)) if !matches!(message, Message::Close(_))),
        _ = ping.tick() => socket.send(Message::Ping(Bytes::new())).await.is_ok(),
    }
}

/// The upgrade of a WebSocket route, or a 400 saying that only WebSockets are served there.
fn websocket(
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<WebSocketUpgrade, ApiError> {
    ws.map_err(|e| ApiError::bad_request(format!("this route speaks WebSocket only: {}", e.body_text())))
}

async fn stream_logs(c: AppState, id: String, mut socket: WebSocket, mut events: broadcast::Receiver<StateEvent>) {
    let mut last = 0i64;
    let mut ping = tokio::time::interval(WS_PING);
    loop {
        // Read the status first: lines committed before an end are all there when it is seen.
        let ended = match c.state.deployment(&id).await {
            Ok(Some(d)) => !matches!(d.status(), DeploymentStatus::Queued) && !d.status().in_progress(),
            _ => true,
        };
        if !send_new_lines(&c, &id, &mut last, &mut socket).await {
            return;
        }
        if ended {
            let frame = CloseFrame { code: 1000, reason: "the deployment ended".into() };
            let _ = socket.send(Message::Close(Some(frame))).await;
            return;
        }
        // Wait for something about this deployment (or a lag, after which everything is re-read).
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Ok(StateEvent::DeploymentLogs { id: d, .. } | StateEvent::DeploymentChanged { id: d, .. }) if d == id => break,
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                alive = tend(&mut socket, &mut ping) => if !alive {
                    return;
                },
            }
        }
    }
}

/// Live deployment events of a project over a WebSocket (project viewers): first one event for
/// each deployment in progress, then an event whenever a deployment changes status or logs a
/// line: `{"type":"deployment.started"|"deployment.progress"|"deployment.completed"|
/// "deployment.failed","deploymentId","serviceId","data":{"progress","message","logs","error"}}`.
#[utoipa::path(
    get,
    path = "/api/v1/ws/projects/{project_id}/deployments",
    tag = "deployments",
    operation_id = "ws_project_deployments",
    security(("bearer" = []), ("session" = [])),
    params(("project_id" = String, Path, description = "The project's id")),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol"),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn ws_project(
    State(c): State<AppState>,
    caller: Caller,
    Path(project_id): Path<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let ws = websocket(ws)?;
    c.read_barrier().await?;
    caller.require_project(&c, &project_id, "read", Role::Viewer).await?;
    let events = c.events.subscribe();
    Ok(ws.on_upgrade(move |socket| stream_project(c, project_id, socket, events)))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WsEvent<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    deployment_id: &'a str,
    service_id: &'a str,
    data: WsEventData<'a>,
}

#[derive(Serialize)]
struct WsEventData<'a> {
    /// 0 to 100.
    progress: u8,
    message: String,
    logs: Vec<WsLine<'a>>,
    error: Option<&'a str>,
}

/// Event type and progress of a status.
fn event_of(status: DeploymentStatus) -> (&'static str, u8) {
    match status {
        DeploymentStatus::Queued => ("deployment.started", 0),
        DeploymentStatus::Building => ("deployment.progress", 30),
        DeploymentStatus::Deploying => ("deployment.progress", 70),
        DeploymentStatus::Running => ("deployment.completed", 100),
        DeploymentStatus::Failed | DeploymentStatus::Cancelled | DeploymentStatus::Superseded => {
            ("deployment.failed", 100)
        }
    }
}

/// What the project stream knows of one deployment.
struct Seen {
    status: String,
    last_line: i64,
}

/// Sends what changed about deployment `id` since `seen`; false when the socket is gone.
/// `live`: the deployment's change happened while the stream was open (not one found in
/// progress when it opened).
async fn send_project_event(
    c: &AppState,
    project_id: &str,
    id: &str,
    seen: &mut HashMap<String, Seen>,
    socket: &mut WebSocket,
    live: bool,
) -> bool {
    let Ok(Some(d)) = c.state.deployment(id).await else { return true };
    if d.project_id != project_id {
        return true;
    }
    let first_sight = !seen.contains_key(&d.id);
    let entry = seen.entry(d.id.clone()).or_insert(Seen { status: String::new(), last_line: 0 });
    let Ok(rows) = c.state.deployment_logs(id, entry.last_line, 1000).await else { return false };
    let changed = entry.status != d.status;
    if !changed && rows.is_empty() {
        return true;
    }
    let status = d.status();
    // A deployment created while the stream is open is announced as started even when the
    // stream reads it only after an agent took it (the state is read when the event is handled,
    // and the scheduler can be quicker): each new deployment begins with `deployment.started`.
    if live && first_sight && status != DeploymentStatus::Queued {
        let (kind, progress) = event_of(DeploymentStatus::Queued);
        let started = WsEvent {
            kind,
            deployment_id: &d.id,
            service_id: &d.service_id,
            data: WsEventData { progress, message: "deployment queued".to_string(), logs: Vec::new(), error: None },
        };
        if !send_json(socket, &started).await {
            return false;
        }
    }
    let (kind, progress) = if changed { event_of(status) } else { ("deployment.progress", event_of(status).1) };
    let logs: Vec<WsLine> = rows
        .iter()
        .map(|row| WsLine {
            level: &row.level,
            message: &row.message,
            timestamp: rfc3339(row.at),
            phase: &row.phase,
            step: row.step.as_deref(),
        })
        .collect();
    let message = match rows.last() {
        Some(row) if !changed => row.message.clone(),
        _ => format!("deployment {}", d.status),
    };
    let event = WsEvent {
        kind,
        deployment_id: &d.id,
        service_id: &d.service_id,
        data: WsEventData {
            progress,
            message,
            logs,
            error: if status == DeploymentStatus::Running { None } else { d.error.as_deref() },
        },
    };
    if !send_json(socket, &event).await {
        return false;
    }
    entry.status = d.status.clone();
    if let Some(row) = rows.last() {
        entry.last_line = row.n;
    }
    true
}

async fn stream_project(
    c: AppState,
    project_id: String,
    mut socket: WebSocket,
    mut events: broadcast::Receiver<StateEvent>,
) {
    let mut seen: HashMap<String, Seen> = HashMap::new();
    let mut ping = tokio::time::interval(WS_PING);
    // What the subscriber missed: the deployments of the project still in progress.
    let Ok(active) = c.state.active_deployments().await else { return };
    for d in active.iter().filter(|d| d.project_id == project_id) {
        if !send_project_event(&c, &project_id, &d.id, &mut seen, &mut socket, false).await {
            return;
        }
    }
    loop {
        tokio::select! {
            event = events.recv() => {
                let id = match event {
                    // Only this project's: other projects' builds cost this stream nothing.
                    Ok(
                        StateEvent::DeploymentChanged { id, project_id: p }
                        | StateEvent::DeploymentLogs { id, project_id: p, .. },
                    ) if p == project_id => id,
                    Ok(_) => continue,
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Re-read every deployment this stream follows.
                        let ids: Vec<String> = seen.keys().cloned().collect();
                        for id in ids {
                            if !send_project_event(&c, &project_id, &id, &mut seen, &mut socket, true).await {
                                return;
                            }
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if !send_project_event(&c, &project_id, &id, &mut seen, &mut socket, true).await {
                    return;
                }
            }
            alive = tend(&mut socket, &mut ping) => if !alive {
                return;
            },
        }
    }
}
