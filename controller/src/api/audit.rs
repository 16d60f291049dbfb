//! `GET /api/v1/audit`: who did what, when and from where, newest first.
//!
//! Cluster administrators see every entry; a project's admins and owners see that project's
//! (`?project_id=` is then required). `?limit=` (1 to 1000, default 100) and `?before=<seq>` page.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, Role};
use super::error::{ApiError, BadRequest, Forbidden, NotFound, Unauthorized, Unavailable, Unprocessable};
use super::AppState;
use crate::store::queries::AuditRow;
use crate::util::rfc3339;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/audit", get(list))
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    /// Only this project's entries (required unless the caller is a cluster administrator).
    project_id: Option<String>,
    /// How many entries, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only entries older than this `seq`, for the next page.
    before: Option<i64>,
}

#[derive(Serialize, ToSchema)]
struct AuditView {
    /// Increases with each entry; page with `?before=`.
    seq: i64,
    id: String,
    at: String,
    actor: String,
    action: String,
    target: String,
    project_id: Option<String>,
    source: String,
}

impl From<AuditRow> for AuditView {
    fn from(a: AuditRow) -> AuditView {
        AuditView {
            seq: a.seq,
            id: a.id,
            at: rfc3339(a.at),
            actor: a.actor,
            action: a.action,
            target: a.target,
            project_id: a.project_id,
            source: a.source,
        }
    }
}

/// Who did what, when and from where, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/audit",
    tag = "audit",
    operation_id = "list_audit",
    security(("bearer" = []), ("session" = [])),
    params(AuditQuery),
    responses(
        (status = 200, description = "Audit entries, newest first", body = Vec<AuditView>),
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
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditView>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation("limit must be between 1 and 1000"));
    }
    c.read_barrier().await?;
    if !caller.is_cluster_admin() {
        let Some(project_id) = &query.project_id else {
            return Err(ApiError::forbidden(
                "only cluster administrators may read the whole audit log; project admins add ?project_id=",
            ));
        };
        caller.require_project(&c, project_id, "admin", Role::Admin).await?;
    }
    let rows = c.state.audit(query.project_id.as_deref(), limit, query.before).await?;
    Ok(Json(rows.into_iter().map(AuditView::from).collect()))
}
