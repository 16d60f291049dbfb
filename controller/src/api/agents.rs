//! `/api/v1/agents`: the agent registry, with the leader's live view of each agent.

use std::collections::{BTreeMap, HashMap};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{applied, ApiError, Forbidden, NotFound, Unauthorized, Unavailable};
use super::AppState;
use crate::agents::{live_view, ContainerView, LiveView, MetricsView};
use crate::command::Command;
use crate::store::queries::AgentRow;
use crate::util::{now_ms, rfc3339};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/agents", get(list)).route("/api/v1/agents/{id}", get(show).delete(revoke))
}

#[derive(Serialize, ToSchema)]
struct CapacityView {
    cpu_millis: i64,
    memory_bytes: i64,
}

#[derive(Serialize, ToSchema)]
struct AgentView {
    id: String,
    hostname: String,
    /// `ready`, `down` or `draining`.
    #[schema(example = "ready")]
    status: String,
    labels: BTreeMap<String, String>,
    version: String,
    /// Whether the agent is in session with the leader right now (`null` when the leader could
    /// not be asked).
    connected: Option<bool>,
    last_seen: String,
    created_at: String,
    capacity: CapacityView,
    /// Where its ingress answers plain HTTP (`host:port`; `null` when it runs none).
    ingress: Option<String>,
    /// Its ingress's HTTPS port (`null`: none).
    ingress_https_port: Option<u16>,
    /// The latest heartbeat's host metrics (`null` before the first one, or when the leader
    /// could not be asked).
    metrics: Option<MetricsOut>,
    #[schema(value_type = Vec<AgentContainer>)]
    containers: Vec<ContainerView>,
    /// Recent samples, oldest first (only on `GET /api/v1/agents/{id}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    history: Option<Vec<MetricsOut>>,
}

/// One container on an agent, from its latest heartbeat: the schema of
/// [`crate::agents::ContainerView`] (documentation only; a test keeps the two alike).
#[derive(Serialize, ToSchema)]
pub struct AgentContainer {
    pub id: String,
    pub name: String,
    pub project: String,
    pub service: String,
    pub deployment: String,
    pub cpu_percent: f64,
    pub memory_used_bytes: u64,
    pub memory_limit_bytes: u64,
}

#[derive(Serialize, ToSchema)]
#[schema(as = AgentMetrics)]
struct MetricsOut {
    at: String,
    cpu_percent: f64,
    load1: f64,
    load5: f64,
    load15: f64,
    memory_used_bytes: u64,
    memory_total_bytes: u64,
    disk_used_bytes: u64,
    disk_total_bytes: u64,
    net_rx_bytes: u64,
    net_tx_bytes: u64,
}

impl From<MetricsView> for MetricsOut {
    fn from(m: MetricsView) -> MetricsOut {
        MetricsOut {
            at: rfc3339(m.at),
            cpu_percent: m.cpu_percent,
            load1: m.load1,
            load5: m.load5,
            load15: m.load15,
            memory_used_bytes: m.memory_used_bytes,
            memory_total_bytes: m.memory_total_bytes,
            disk_used_bytes: m.disk_used_bytes,
            disk_total_bytes: m.disk_total_bytes,
            net_rx_bytes: m.net_rx_bytes,
            net_tx_bytes: m.net_tx_bytes,
        }
    }
}

fn view(row: AgentRow, live: Option<&HashMap<String, LiveView>>, with_history: bool) -> AgentView {
    let entry = live.and_then(|l| l.get(&row.id));
    let last_seen = entry.and_then(|e| e.last_seen).map_or(row.last_seen, |l| l.max(row.last_seen));
    AgentView {
        connected: live.map(|_| entry.is_some_and(|e| e.connected)),
        last_seen: rfc3339(last_seen),
        created_at: rfc3339(row.created_at),
        capacity: CapacityView { cpu_millis: row.cpu_millis, memory_bytes: row.memory_bytes },
        ingress: Some(row.ingress).filter(|i| !i.is_empty()),
        ingress_https_port: u16::try_from(row.ingress_https_port).ok().filter(|p| *p != 0),
        metrics: entry.and_then(|e| e.metrics.clone()).map(MetricsOut::from),
        containers: entry.map(|e| e.containers.clone()).unwrap_or_default(),
        history: with_history
            .then(|| entry.map(|e| e.history.iter().cloned().map(MetricsOut::from).collect()).unwrap_or_default()),
        id: row.id,
        hostname: row.hostname,
        status: row.status,
        labels: row.labels,
        version: row.version,
    }
}

/// Every agent that has joined and is not revoked, with the leader's live view of each.
#[utoipa::path(
    get,
    path = "/api/v1/agents",
    tag = "agents",
    operation_id = "list_agents",
    security(("bearer" = []), ("session" = [])),
    responses(
        (status = 200, description = "The agents", body = Vec<AgentView>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    )
)]
async fn list(State(c): State<AppState>, caller: Caller) -> Result<Json<Vec<AgentView>>, ApiError> {
    caller.require("read")?;
    c.read_barrier().await?;
    let rows = c.state.agents().await?;
    let live = live_view(&c, None).await;
    Ok(Json(rows.into_iter().map(|row| view(row, live.as_ref(), false)).collect()))
}

/// One agent, with its recent metrics history.
#[utoipa::path(
    get,
    path = "/api/v1/agents/{id}",
    tag = "agents",
    operation_id = "show_agent",
    security(("bearer" = []), ("session" = [])),
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn show(State(c): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<Json<AgentView>, ApiError> {
    caller.require("read")?;
    c.read_barrier().await?;
    let row = c
        .state
        .agent(&id)
        .await?
        .filter(|a| a.revoked_at.is_none())
        .ok_or_else(|| ApiError::not_found(format!("no agent with id {id}")))?;
    let live = live_view(&c, Some(&id)).await;
    Ok(Json(view(row, live.as_ref(), true)))
}

/// Revokes the agent: its session ends at once and its certificate is refused from now on.
#[utoipa::path(
    delete,
    path = "/api/v1/agents/{id}",
    tag = "agents",
    operation_id = "revoke_agent",
    security(("bearer" = []), ("session" = [])),
    params(("id" = String, Path, description = "The agent's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn revoke(State(c): State<AppState>, caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.require_cluster_admin()?;
    let command = Command::RevokeAgent { id: id.clone(), at: now_ms() };
    applied(c.propose(caller.audited("agent.revoke", &id, None, command)).await?)?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use utoipa::PartialSchema;

    use super::*;

    /// The documented container schema names exactly the fields a `ContainerView` is sent with.
    #[test]
    fn container_schema_matches_container_view() {
        let sent = serde_json::to_value(ContainerView::default()).expect("serialize");
        let mut sent: Vec<String> = sent.as_object().expect("object").keys().cloned().collect();
        let schema = serde_json::to_value(AgentContainer::schema()).expect("schema");
        let mut documented: Vec<String> =
            schema["properties"].as_object().expect("properties").keys().cloned().collect();
        sent.sort();
        documented.sort();
        assert_eq!(sent, documented);
    }
}
