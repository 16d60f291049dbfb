use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/health", get(health))
}

/// What `GET /api/v1/health` answers (documentation only: the handler writes it as a value).
#[derive(Serialize, ToSchema)]
pub struct HealthView {
    /// Always `ok`: the node is up and serving HTTP.
    #[schema(example = "ok")]
    pub status: String,
}

/// Whether this node serves HTTP at all; needs no credentials.
#[utoipa::path(
    get,
    path = "/api/v1/health",
    tag = "health",
    operation_id = "health",
    responses((status = 200, description = "The node is up", body = HealthView))
)]
async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}
