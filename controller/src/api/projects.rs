//! `/api/v1/projects`: the first replicated resource.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::{Caller, Role};
use super::error::{
    applied, ApiError, BadRequest, Conflict, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable,
    Unprocessable, UnsupportedMediaType,
};
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

#[derive(Serialize, ToSchema)]
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateProject {
    /// A DNS label: lowercase letters, digits and `-`, 1 to 40 characters.
    #[schema(example = "shop", pattern = "^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")]
    name: String,
}

/// Creates a project; a user who creates one owns it.
#[utoipa::path(
    post,
    path = "/api/v1/projects",
    tag = "projects",
    operation_id = "create_project",
    security(("bearer" = []), ("session" = [])),
    request_body(content = CreateProject, content_type = "application/json"),
    responses(
        (
            status = 201,
            description = "The new project",
            body = ProjectView,
            links(
                ("ShowProject" = (operation_id = "show_project", parameters(("id" = "$response.body#/id")))),
                ("DeleteProject" = (operation_id = "delete_project", parameters(("id" = "$response.body#/id")))),
                (
                    "ListCollaborators" = (
                        operation_id = "list_collaborators",
                        parameters(
                            ("id" = "$response.body#/id"),
                        )
                    )
                ),
                ("AddCollaborator" = (operation_id = "add_collaborator", parameters(("id" = "$response.body#/id")))),
                ("ListServices" = (operation_id = "list_services", parameters(("project_id" = "$response.body#/id")))),
                (
                    "CreateService" = (
                        operation_id = "create_service",
                        parameters(
                            ("project_id" = "$response.body#/id"),
                        )
                    )
                ),
                ("ListAudit" = (operation_id = "list_audit", parameters(("project_id" = "$response.body#/id")))),
            ),
        ),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    /// How many projects, 1 to 1000 (default 100).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// The id of the last project of the previous page.
    before: Option<String>,
}

/// The projects the caller may see, newest first.
#[utoipa::path(
    get,
    path = "/api/v1/projects",
    tag = "projects",
    operation_id = "list_projects",
    security(("bearer" = []), ("session" = [])),
    params(ListQuery),
    responses(
        (status = 200, description = "Projects, newest first", body = Vec<ProjectView>),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
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

/// One project.
#[utoipa::path(
    get,
    path = "/api/v1/projects/{id}",
    tag = "projects",
    operation_id = "show_project",
    security(("bearer" = []), ("session" = [])),
    params(("id" = String, Path, description = "The project's id")),
    responses(
        (status = 200, description = "The project", body = ProjectView),
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
) -> Result<Json<ProjectView>, ApiError> {
    c.read_barrier().await?;
    let (project, _) = caller.require_project(&c, &id, "read", Role::Viewer).await?;
    Ok(Json(project.into()))
}

/// Deletes a project and everything in it (its owners).
#[utoipa::path(
    delete,
    path = "/api/v1/projects/{id}",
    tag = "projects",
    operation_id = "delete_project",
    security(("bearer" = []), ("session" = [])),
    params(("id" = String, Path, description = "The project's id")),
    responses(
        (status = 204, description = "Deleted"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 409, response = Conflict),
        (status = 503, response = Unavailable),
    )
)]
async fn remove(State(c): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    c.read_barrier().await?;
    let (project, _) = caller.require_project(&c, &id, "write", Role::Owner).await?;
    let command = Command::DeleteProject { id: id.clone() };
    applied(c.propose(caller.audited("project.delete", &project.name, Some(&id), command)).await?)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, ToSchema)]
struct CollaboratorView {
    user_id: String,
    email: String,
    #[schema(value_type = Role)]
    role: String,
}

/// The project's collaborators and their roles.
#[utoipa::path(
    get,
    path = "/api/v1/projects/{id}/collaborators",
    tag = "projects",
    operation_id = "list_collaborators",
    security(("bearer" = []), ("session" = [])),
    params(("id" = String, Path, description = "The project's id")),
    responses(
        (status = 200, description = "The collaborators", body = Vec<CollaboratorView>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
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

#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct AddCollaborator {
    /// An existing user's email address.
    #[schema(example = "ada@example.com")]
    email: String,
    /// No higher than the caller's own role.
    #[schema(value_type = Role)]
    role: String,
}

/// Adds a user to the project with a role, or changes their role (project admins).
#[utoipa::path(
    post,
    path = "/api/v1/projects/{id}/collaborators",
    tag = "projects",
    operation_id = "add_collaborator",
    security(("bearer" = []), ("session" = [])),
    params(("id" = String, Path, description = "The project's id")),
    request_body(content = AddCollaborator, content_type = "application/json"),
    responses(
        (
            status = 201,
            description = "The collaborator and their role",
            body = CollaboratorView,
            links(
                (
                    "RemoveCollaborator" = (
                        operation_id = "remove_collaborator",
                        parameters(
                            ("id" = "$request.path.id"),
                            ("user_id" = "$response.body#/user_id"),
                        )
                    )
                ),
            ),
        ),
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

/// Removes a collaborator from the project (project admins).
#[utoipa::path(
    delete,
    path = "/api/v1/projects/{id}/collaborators/{user_id}",
    tag = "projects",
    operation_id = "remove_collaborator",
    security(("bearer" = []), ("session" = [])),
    params(
        ("id" = String, Path, description = "The project's id"),
        ("user_id" = String, Path, description = "The collaborator's user id"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
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
