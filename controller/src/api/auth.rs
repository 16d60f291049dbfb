//! Bearer-token authentication. A token is looked up by its sha256; the token itself is never
//! stored. (Users, sessions and per-project roles come with the API issue.)

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use deployer_common::token::hash_secret;

use super::error::ApiError;
use super::AppState;
use crate::util::now_ms;

#[derive(Debug, Clone)]
pub struct Caller {
    pub token_id: String,
    pub name: String,
    pub scopes: Vec<String>,
}

impl Caller {
    /// `admin` implies every scope; `write` implies `deploy` and `read`; `deploy` implies `read`.
    pub fn require(&self, scope: &str) -> Result<(), ApiError> {
        let implied: &[&str] = match scope {
            "read" => &["read", "deploy", "write", "admin"],
            "deploy" => &["deploy", "write", "admin"],
            "write" => &["write", "admin"],
            _ => &["admin"],
        };
        if self.scopes.iter().any(|s| implied.contains(&s.as_str())) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!("this token lacks the \"{scope}\" scope")))
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("send an API token as \"Authorization: Bearer <token>\""))?;
        let value =
            header.to_str().map_err(|_| ApiError::unauthorized("the Authorization header is not valid text"))?;
        let token = value
            .strip_prefix("Bearer ")
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("the Authorization header must be \"Bearer <token>\""))?;
        let hash = hash_secret(token);
        let row = match state.api_token(&hash).await? {
            Some(row) => row,
            None => {
                // This node may lag behind the cluster (just joined, or restarted): catch up
                // before calling a token unknown.
                state.read_barrier().await?;
                state.api_token(&hash).await?.ok_or_else(|| ApiError::unauthorized("the API token is not valid"))?
            }
        };
        if row.revoked_at.is_some() {
            return Err(ApiError::unauthorized("the API token has been revoked"));
        }
        if row.expires_at.is_some_and(|e| e <= now_ms()) {
            return Err(ApiError::unauthorized("the API token has expired"));
        }
        Ok(Caller { token_id: row.id, name: row.name, scopes: row.scopes })
    }
}
