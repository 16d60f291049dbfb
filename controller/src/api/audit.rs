//! `GET /api/v1/audit`: who did what, when and from where, newest first.
//!
//! Cluster administrators see every entry; a project's admins and owners see that project's
//! (`?project_id=` is then required). `?limit=` (1 to 1000, default 100) and `?before=<seq>` page.

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::{Caller, Role};
use super::error::ApiError;
use super::AppState;
use crate::store::queries::AuditRow;
use crate::util::rfc3339;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/audit", get(list))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    project_id: Option<String>,
    limit: Option<u32>,
    before: Option<i64>,
}

#[derive(Serialize)]
struct AuditView {
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
