//! `/api/v1/projects`: the first replicated resource.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::auth::{Caller, Role};
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
        .route("/api/v1/projects/{id}/collaborators", get(list_collaborators).post(add_collaborator))
        .route("/api/v1/projects/{id}/collaborators/{user_id}", axum::routing::delete(remove_collaborator))
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
    let command = Command::CreateProject {
        id: project.id.clone(),
        name: project.name.clone(),
        created_at: project.created_at,
        // The maker owns the project (cluster administrators own every project anyway).
        owner: caller.user.as_ref().filter(|u| !u.admin).map(|u| u.id.clone()),
    };
    applied(c.propose(caller.audited("project.create", &project.name, Some(&project.id), command)).await?)?;
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
    // Cluster administrators see every project; others the ones they collaborate on.
    let member =
        if caller.user.as_ref().is_none_or(|u| u.admin) { None } else { caller.user.as_ref().map(|u| u.id.as_str()) };
    let projects = c.state.projects(limit, query.before.as_deref(), member).await?;
    Ok(Json(projects.iter().cloned().map(ProjectView::from).collect()))
}

async fn show(
    State(c): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ProjectView>, ApiError> {
    c.read_barrier().await?;
    let (project, _) = caller.require_project(&c, &id, "read", Role::Viewer).await?;
    Ok(Json(project.into()))
}

async fn remove(State(c): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    c.read_barrier().await?;
    let (project, _) = caller.require_project(&c, &id, "write", Role::Owner).await?;
    let command = Command::DeleteProject { id: id.clone() };
    applied(c.propose(caller.audited("project.delete", &project.name, Some(&id), command)).await?)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize)]
struct CollaboratorView {
    user_id: String,
    email: String,
    role: String,
}

async fn list_collaborators(
    State(c): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Vec<CollaboratorView>>, ApiError> {
    c.read_barrier().await?;
    caller.require_project(&c, &id, "read", Role::Viewer).await?;
    let rows = c.state.collaborators(&id).await?;
    Ok(Json(rows.into_iter().map(|(u, role)| CollaboratorView { user_id: u.id, email: u.email, role }).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddCollaborator {
    email: String,
    role: String,
}

async fn add_collaborator(
    State(c): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<AddCollaborator>,
) -> Result<(StatusCode, Json<CollaboratorView>), ApiError> {
    c.read_barrier().await?;
    let (project, mine) = caller.require_project(&c, &id, "write", Role::Admin).await?;
    let role = Role::parse(&body.role)
        .ok_or_else(|| ApiError::validation("role must be one of viewer, developer, admin, owner"))?;
    if role > mine {
        return Err(ApiError::forbidden(format!("you cannot grant the {} role, which is above yours", role.as_str())));
    }
    let (user, _) = c
        .state
        .user_by_email(body.email.trim())
        .await?
        .ok_or_else(|| ApiError::validation(format!("no user with email {}", body.email.trim())))?;
    if let Some(current) = c.state.collaborator_role(&id, &user.id).await?.and_then(|r| Role::parse(&r)) {
        if current > mine {
            return Err(ApiError::forbidden(format!(
                "{} is {} of this project, above your role",
                user.email,
                current.as_str()
            )));
        }
    }
    let command = Command::SetCollaborator {
        project_id: id.clone(),
        user_id: user.id.clone(),
        role: role.as_str().into(),
        at: now_ms(),
    };
    let target = format!("{}:{}", user.email, role.as_str());
    applied(c.propose(caller.audited("collaborator.set", &target, Some(&project.id), command)).await?)?;
    Ok((
        StatusCode::CREATED,
        Json(CollaboratorView { user_id: user.id, email: user.email, role: role.as_str().into() }),
    ))
}

async fn remove_collaborator(
    State(c): State<AppState>,
    caller: Caller,
    Path((id, user_id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    c.read_barrier().await?;
    let (project, mine) = caller.require_project(&c, &id, "write", Role::Admin).await?;
    let current = c
        .state
        .collaborator_role(&id, &user_id)
        .await?
        .and_then(|r| Role::parse(&r))
        .ok_or_else(|| ApiError::not_found(format!("user {user_id} is not a collaborator of this project")))?;
    if current > mine {
        return Err(ApiError::forbidden(format!("that user is {} of this project, above your role", current.as_str())));
    }
    let command = Command::RemoveCollaborator { project_id: id.clone(), user_id: user_id.clone() };
    applied(c.propose(caller.audited("collaborator.remove", &user_id, Some(&project.id), command)).await?)?;
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
