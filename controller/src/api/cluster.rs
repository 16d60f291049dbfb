//! `/api/v1/cluster`: membership and join tokens.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use deployer_common::token::JoinToken;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::Caller;
use super::error::{
    applied, ApiError, BadRequest, Forbidden, NotFound, PayloadTooLarge, Unauthorized, Unavailable, Unprocessable,
    UnsupportedMediaType,
};
use super::json::ApiJson;
use super::AppState;
use crate::command::{Command, JoinTokenKind};
use crate::util::{new_id, now_ms, rfc3339};

/// Join tokens live a day unless asked otherwise, and at most 30 days.
const DEFAULT_TOKEN_TTL_S: u64 = 24 * 3600;
const MAX_TOKEN_TTL_S: u64 = 30 * 24 * 3600;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/cluster", get(cluster))
        .route("/api/v1/cluster/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/cluster/tokens/{id}", delete(revoke_token))
        .route("/api/v1/cluster/ingress-ca", get(ingress_ca))
}

#[derive(Serialize, ToSchema)]
struct ClusterView {
    leader_id: Option<u64>,
    term: u64,
    nodes: Vec<NodeView>,
}

#[derive(Serialize, ToSchema)]
struct NodeView {
    id: u64,
    addr: String,
    http_addr: String,
    voter: bool,
}

/// The CA certificate (PEM) of the ingress's default host names: trust it to reach services
/// over HTTPS at `<service>-<project>.<base domain>` (`curl --cacert`). Made on first use.
#[utoipa::path(
    get,
    path = "/api/v1/cluster/ingress-ca",
    tag = "cluster",
    operation_id = "show_ingress_ca",
    security(("bearer" = []), ("session" = [])),
    responses(
        (status = 200, description = "The ingress CA certificate", body = String, content_type = "application/x-pem-file"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    )
)]
async fn ingress_ca(State(c): State<AppState>, caller: Caller) -> Result<impl axum::response::IntoResponse, ApiError> {
    caller.require("read")?;
    let ca = crate::ingress::ingress_ca(&c)
        .await
        .map_err(|e| ApiError::unavailable(format!("the ingress CA is not available yet: {e:#}")))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/x-pem-file")], ca.cert_pem().to_string()))
}

/// The cluster's members and its current leader, as this node sees them.
#[utoipa::path(
    get,
    path = "/api/v1/cluster",
    tag = "cluster",
    operation_id = "show_cluster",
    security(("bearer" = []), ("session" = [])),
    responses(
        (status = 200, description = "Membership and leadership", body = ClusterView),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    )
)]
async fn cluster(State(c): State<AppState>, caller: Caller) -> Result<Json<ClusterView>, ApiError> {
    caller.require("read")?;
    let metrics = c.raft.metrics().borrow().clone();
    let membership = metrics.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let nodes = membership
        .nodes()
        .map(|(id, node)| NodeView {
            id: *id,
            addr: node.grpc_addr.clone(),
            http_addr: node.http_addr.clone(),
            voter: voters.contains(id),
        })
        .collect();
    Ok(Json(ClusterView { leader_id: metrics.current_leader, term: metrics.current_term, nodes }))
}

#[derive(Deserialize, ToSchema)]
#[schema(as = CreateJoinToken)]
#[serde(deny_unknown_fields)]
struct CreateToken {
    /// `agent` or `controller`: what may join with the token.
    #[schema(example = "agent", pattern = "^(agent|controller)$")]
    kind: String,
    /// Lifetime in seconds: 1 to 30 days' worth, a day by default.
    #[schema(minimum = 1, maximum = 2592000)]
    ttl_s: Option<u64>,
}

#[derive(Serialize, ToSchema)]
#[schema(as = CreatedJoinToken)]
struct CreatedToken {
    id: String,
    #[schema(value_type = String, example = "agent")]
    kind: &'static str,
    /// The join token itself; shown only here.
    token: String,
    expires_at: String,
}

/// Creates a join token for an agent or a controller (cluster administrators).
#[utoipa::path(
    post,
    path = "/api/v1/cluster/tokens",
    tag = "cluster",
    operation_id = "create_join_token",
    security(("bearer" = []), ("session" = [])),
    request_body(content = CreateToken, content_type = "application/json"),
    responses(
        (
            status = 201,
            description = "The token, shown once",
            body = CreatedToken,
            links(
                ("RevokeJoinToken" = (operation_id = "revoke_join_token", parameters(("id" = "$response.body#/id")))),
            ),
        ),
        (status = 400, response = BadRequest),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 413, response = PayloadTooLarge),
        (status = 415, response = UnsupportedMediaType),
        (status = 422, response = Unprocessable),
        (status = 503, response = Unavailable),
    )
)]
async fn create_token(
    State(c): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<CreateToken>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    caller.require_cluster_admin()?;
    let kind = JoinTokenKind::parse(&body.kind)
        .ok_or_else(|| ApiError::validation("kind must be \"controller\" or \"agent\""))?;
    let ttl_s = body.ttl_s.unwrap_or(DEFAULT_TOKEN_TTL_S);
    if ttl_s == 0 || ttl_s > MAX_TOKEN_TTL_S {
        return Err(ApiError::validation(format!("ttl_s must be between 1 and {MAX_TOKEN_TTL_S} seconds")));
    }
    c.read_barrier().await?;
    let ca = c
        .state
        .cluster_ca()
        .await?
        .ok_or_else(|| ApiError::unavailable("the cluster is still initializing; retry shortly"))?;
    let fingerprint = deployer_common::pki::fingerprint_of_pem(&ca.ca_cert_pem)
        .map_err(|e| ApiError::internal("cluster CA certificate is unreadable", e))?;
    let token = JoinToken::new(fingerprint);
    let now = now_ms();
    let id = new_id();
    let expires_at = now + (ttl_s as i64) * 1000;
    applied(
        c.propose(caller.audited(
            "join_token.create",
            &id,
            None,
            Command::CreateJoinToken {
                id: id.clone(),
                kind,
                secret_hash: token.secret_hash(),
                created_at: now,
                expires_at,
            },
        ))
        .await?,
    )?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken { id, kind: kind.as_str(), token: token.to_string(), expires_at: rfc3339(expires_at) }),
    ))
}

#[derive(Serialize, ToSchema)]
#[schema(as = JoinTokenView)]
struct TokenView {
    id: String,
    /// `agent`, `controller`, or `unknown` for a kind this version does not know.
    #[schema(value_type = String, example = "agent")]
    kind: &'static str,
    created_at: String,
    expires_at: String,
    revoked_at: Option<String>,
}

/// Every join token, revoked and expired ones included (cluster administrators).
#[utoipa::path(
    get,
    path = "/api/v1/cluster/tokens",
    tag = "cluster",
    operation_id = "list_join_tokens",
    security(("bearer" = []), ("session" = [])),
    responses(
        (status = 200, description = "The join tokens (never their secrets)", body = Vec<TokenView>),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 503, response = Unavailable),
    )
)]
async fn list_tokens(State(c): State<AppState>, caller: Caller) -> Result<Json<Vec<TokenView>>, ApiError> {
    caller.require_cluster_admin()?;
    c.read_barrier().await?;
    let tokens = c.state.join_tokens().await?;
    Ok(Json(
        tokens
            .into_iter()
            .map(|t| TokenView {
                id: t.id,
                kind: t.kind.map(JoinTokenKind::as_str).unwrap_or("unknown"),
                created_at: rfc3339(t.created_at),
                expires_at: rfc3339(t.expires_at),
                revoked_at: t.revoked_at.map(rfc3339),
            })
            .collect(),
    ))
}

/// Revokes a join token: nothing can join with it any more (cluster administrators).
#[utoipa::path(
    delete,
    path = "/api/v1/cluster/tokens/{id}",
    tag = "cluster",
    operation_id = "revoke_join_token",
    security(("bearer" = []), ("session" = [])),
    params(("id" = String, Path, description = "The join token's id")),
    responses(
        (status = 204, description = "Revoked"),
        (status = 401, response = Unauthorized),
        (status = 403, response = Forbidden),
        (status = 404, response = NotFound),
        (status = 503, response = Unavailable),
    )
)]
async fn revoke_token(
    State(c): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require_cluster_admin()?;
    let command = Command::RevokeJoinToken { id: id.clone(), at: now_ms() };
    applied(c.propose(caller.audited("join_token.revoke", &id, None, command)).await?)?;
    Ok(StatusCode::NO_CONTENT)
}
