//! The control-plane HTTP API (DESIGN.md section 6). Every node serves it; writes go through
//! Raft (forwarded to the leader by [`crate::controller::Controller::propose`]).

pub mod agents;
pub mod audit;
pub mod auth;
pub mod cluster;
pub mod deployments;
pub mod error;
pub mod health;
pub mod json;
pub mod openapi;
pub mod previews;
pub mod projects;
pub mod services;
pub mod users;
pub mod webhooks;

use axum::extract::DefaultBodyLimit;
use axum::Router;

use crate::controller::SharedController;

pub type AppState = SharedController;

/// Largest JSON body the API accepts.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Each route is also described in [`openapi::ApiDoc`] (annotate the handler with
/// `#[utoipa::path]` and list it there): `openapi`'s tests read the `.route(` calls of these
/// files and fail on a route the description lacks.
pub fn router(state: AppState) -> Router {
    Router::new()
        .merge(health::router())
        .merge(openapi::router())
        .merge(cluster::router())
        .merge(agents::router())
        .merge(projects::router())
        .merge(users::router())
        .merge(services::router())
        .merge(deployments::router(&state))
        .merge(audit::router())
        .merge(webhooks::router(&state))
        .merge(previews::router())
        .fallback(|| async { error::ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(state)
}
