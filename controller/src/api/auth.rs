//! Who is calling, and what they may do.
//!
//! A caller authenticates with a bearer API token or the dashboard's session cookie; either is
//! looked up by its sha256 (never a password hash per request). A token acts as the user who
//! made it, limited to its scopes; a session acts as its user with every scope. The cluster's
//! first admin token belongs to no user and is a cluster administrator.
//!
//! Scopes (`read` < `deploy` < `write` < `admin`) limit what kind of call a token may make;
//! project roles (`viewer` < `developer` < `admin` < `owner`) limit what a user may do to a
//! project. Both must allow a call. A project the caller may not see answers 404, an action
//! beyond the caller's role or scope 403.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use deployer_common::token::hash_secret;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ApiError;
use super::AppState;
use crate::command::{AuditEntry, Command};
use crate::controller::Controller;
use crate::store::queries::{Project, UserRow};
use crate::util::{new_id, now_ms};

/// The dashboard's session cookie.
pub const SESSION_COOKIE: &str = "deployer_session";

pub const SCOPES: [&str; 4] = ["read", "deploy", "write", "admin"];

/// A user's role on a project, weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Developer,
    Admin,
    Owner,
}

impl Role {
    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "developer" => Some(Role::Developer),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Credential {
    Token { id: String, name: String },
    Session { id: String, token_hash: String },
}

#[derive(Debug, Clone)]
pub struct Caller {
    pub credential: Credential,
    /// `None` for the cluster's first admin token.
    pub user: Option<UserRow>,
    pub scopes: Vec<String>,
    /// The client's address, for the audit log.
    pub source: String,
}

impl Caller {
    /// `admin` implies every scope; `write` implies `deploy` and `read`; `deploy` implies `read`.
    pub fn has_scope(&self, scope: &str) -> bool {
        let implied: &[&str] = match scope {
            "read" => &["read", "deploy", "write", "admin"],
            "deploy" => &["deploy", "write", "admin"],
            "write" => &["write", "admin"],
            _ => &["admin"],
        };
        self.scopes.iter().any(|s| implied.contains(&s.as_str()))
    }

    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        if self.has_scope(scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("this token lacks the \"{scope}\" scope")))
        }
    }

    /// A cluster administrator: the first admin token, or an admin user (with the admin scope).
    pub fn is_cluster_admin(&self) -> bool {
        self.has_scope("admin") && self.user.as_ref().is_none_or(|u| u.admin)
    }

    pub fn require_cluster_admin(&self) -> Result<(), ApiError> {
        self.require("admin")?;
        if self.is_cluster_admin() {
            Ok(())
        } else {
            Err(ApiError::forbidden("only cluster administrators may do this"))
        }
    }

    /// The caller's role on `project_id`: cluster administrators own every project. A project
    /// the caller is not a collaborator of is "not found".
    pub async fn project_role(&self, c: &Controller, project_id: &str) -> Result<(Project, Role), ApiError> {
        let not_found = || ApiError::not_found(format!("no project with id {project_id}"));
        let project = c.state.project(project_id).await?.ok_or_else(not_found)?;
        if self.user.as_ref().is_none_or(|u| u.admin) {
            return Ok((project, Role::Owner));
        }
        let user = self.user.as_ref().ok_or_else(not_found)?;
        let role = c.state.collaborator_role(project_id, &user.id).await?.and_then(|r| Role::parse(&r));
        Ok((project, role.ok_or_else(not_found)?))
    }

    /// The project, if the caller may act on it with `scope` and at least `role`.
    pub async fn require_project(
        &self,
        c: &Controller,
        project_id: &str,
        scope: &str,
        role: Role,
    ) -> Result<(Project, Role), ApiError> {
        let (project, has) = self.project_role(c, project_id).await?;
        self.require(scope)?;
        if has < role {
            return Err(ApiError::forbidden(format!(
                "this needs the {} role on project {}; you are {}",
                role.as_str(),
                project.name,
                has.as_str()
            )));
        }
        Ok((project, has))
    }

    /// How the audit log names the caller.
    pub fn actor(&self) -> String {
        match (&self.user, &self.credential) {
            (Some(u), _) => format!("user:{}", u.email),
            (None, Credential::Token { name, .. }) => format!("token:{name}"),
            (None, Credential::Session { id, .. }) => format!("session:{id}"),
        }
    }

    /// `command`, to be recorded in the audit log as `action` on `target` once applied.
    pub fn audited(&self, action: &str, target: &str, project_id: Option<&str>, command: Command) -> Command {
        Command::Audited {
            entry: AuditEntry {
                id: new_id(),
                at: now_ms(),
                actor: self.actor(),
                action: action.to_string(),
                target: target.to_string(),
                project_id: project_id.map(str::to_string),
                source: self.source.clone(),
            },
            command: Box::new(command),
        }
    }
}

/// The value of cookie `name` in the request, if any.
pub fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    parts
        .headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
}

/// The client's IP address ("unknown" when the server was not told).
pub struct ClientAddr(pub String);

fn client_addr(parts: &Parts) -> String {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

impl<S: Send + Sync> FromRequestParts<S> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(client_addr(parts)))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let source = client_addr(parts);
        if let Some(header) = parts.headers.get(axum::http::header::AUTHORIZATION) {
            let value =
                header.to_str().map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
            let token = value
                .strip_prefix("Bearer ")
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .ok_or_else(|| ApiError::unauthorized("the Authorization header must be \"Bearer <token>\""))?;
            return token_caller(state, token, source).await;
        }
        if let Some(value) = cookie(parts, SESSION_COOKIE).filter(|v| !v.is_empty()) {
            return session_caller(state, value, source).await;
        }
        Err(ApiError::unauthorized(
            "send an API token as \"Authorization: Bearer <token>\", or log in (POST /api/v1/auth/login)",
        ))
    }
}

async fn token_caller(c: &Controller, token: &str, source: String) -> Result<Caller, ApiError> {
    let hash = hash_secret(token);
    let row = match c.api_token(&hash).await? {
        Some(row) => row,
        None => {
            // This node may lag behind the cluster (just joined, or restarted): catch up
            // before calling a token unknown.
            c.read_barrier().await?;
            c.api_token(&hash).await?.ok_or_else(|| ApiError::unauthorized("the API token is not valid"))?
        }
    };
    if row.revoked_at.is_some() {
        return Err(ApiError::unauthorized("the API token has been revoked"));
    }
    if row.expires_at.is_some_and(|e| e <= now_ms()) {
        return Err(ApiError::unauthorized("the API token has expired; create a new one"));
    }
    Ok(Caller {
        credential: Credential::Token { id: row.id, name: row.name },
        user: row.user,
        scopes: row.scopes,
        source,
    })
}

async fn session_caller(c: &Controller, value: &str, source: String) -> Result<Caller, ApiError> {
    let hash = hash_secret(value);
    let row = match c.session(&hash).await? {
        Some(row) => row,
        None => {
            c.read_barrier().await?;
            c.session(&hash).await?.ok_or_else(|| ApiError::unauthorized("the session is not valid; log in again"))?
        }
    };
    if row.revoked_at.is_some() || row.expires_at <= now_ms() {
        return Err(ApiError::unauthorized("the session has ended; log in again"));
    }
    Ok(Caller {
        credential: Credential::Session { id: row.id, token_hash: hash },
        user: Some(row.user),
        scopes: SCOPES.iter().map(|s| s.to_string()).collect(),
        source,
    })
}
