//! `/api/v1/projects`: the first replicated resource.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::Caller;
use super::error::{applied, ApiError};
use super::json::ApiJson;
use super::AppState;
use crate::command::Command;
use crate::store::queries::Project;
use crate::util::{new_id, now_ms, rfc3339};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/projects", get(list).post(create))
        .route("/api/v1/projects/{id}", get(show).delete(remove))
}

#[derive(Serialize)]
pub struct ProjectView {
    id: String,
    name: String,
    created_at: String,
}

impl From<Project> for ProjectView {
    fn from(p: Project) -> ProjectView {
        ProjectView { id: p.id, name: p.name, created_at: rfc3339(p.created_at) }
    }
}

/// Names become DNS labels in host names: lowercase letters, digits and `-`, 1 to 40
/// characters, starting and ending with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 40 {
        return Err(format!("name must be 1 to 40 characters long (got {})", name.len()));
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err("name may contain only lowercase letters, digits and '-'".into());
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err("name must start and end with a letter or digit".into());
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateProject {
    name: String,
}

async fn create(
    State(c): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateProject>,
) -> Result<(StatusCode, Json<ProjectView>), ApiError> {
    caller.require("write")?;
    validate_name(&body.name).map_err(ApiError::validation)?;
    let project = Project { id: new_id(), name: body.name, created_at: now_ms() };
    let command =
        Command::CreateProject { id: project.id.clone(), name: project.name.clone(), created_at: project.created_at };
    applied(c.propose(command).await?)?;
    Ok((StatusCode::CREATED, Json(project.into())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<u32>,
    before: Option<String>,
}

async fn list(
    State(c): State<AppState>,
    caller: Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<ProjectView>>, ApiError> {
    caller.require("read")?;
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::validation("limit must be between 1 and 1000"));
    }
    c.read_barrier().await?;
    if let Some(before) = &query.before {
        if c.state.project(before).await?.is_none() {
            return Err(ApiError::bad_request(format!(
                "before must be the id of a listed project; there is no project {before}"
            )));
        }
    }
    let projects = c.state.projects(limit, query.before.as_deref()).await?;
    Ok(Json(projects.into_iter().map(ProjectView::from).collect()))
}

async fn show(
    State(c): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ProjectView>, ApiError> {
    caller.require("read")?;
    c.read_barrier().await?;
    let project = c.state.project(&id).await?.ok_or_else(|| ApiError::not_found(format!("no project with id {id}")))?;
    Ok(Json(project.into()))
}

async fn remove(State(c): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.require("admin")?;
    applied(c.propose(Command::DeleteProject { id }).await?)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::validate_name;

    #[test]
    fn names_are_dns_labels() {
        for ok in ["a", "web", "my-app-2", &"a".repeat(40)] {
            assert!(validate_name(ok).is_ok(), "{ok} should be valid");
        }
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", "ü", &"a".repeat(41)] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
