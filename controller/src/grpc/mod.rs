//! The controller's gRPC services, all on the `--grpc` port with mutual TLS.

pub use deployer_common::grpc_client as client;
pub mod cluster_service;
pub mod raft_service;

use deployer_common::pki::{identity_of_cert_der, ClusterCa, Identity};
use deployer_common::token::hash_secret;

use crate::command::JoinTokenKind;
use crate::controller::Controller;
use crate::store::queries::JoinTokenRow;
use crate::util::{now_ms, rfc3339};

/// The cluster identity of the caller, from its client certificate (already verified against
/// the cluster CA by the TLS layer).
pub fn peer_identity<T>(request: &tonic::Request<T>) -> Result<Identity, tonic::Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate from the cluster CA is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("a client certificate from the cluster CA is required"))?;
    identity_of_cert_der(leaf.as_ref())
        .map_err(|e| tonic::Status::permission_denied(format!("client certificate has no valid identity: {e}")))
}

/// Only other controllers may call.
pub fn require_controller<T>(request: &tonic::Request<T>) -> Result<u64, tonic::Status> {
    match peer_identity(request)? {
        Identity::Controller(id) => Ok(id),
        other => Err(tonic::Status::permission_denied(format!("{} is not a controller identity", other.uri()))),
    }
}

/// The join token whose secret is `secret`, if it is known, current and of `kind`; otherwise
/// the refusal to answer, saying why.
pub async fn valid_join_token(
    c: &Controller,
    secret: &str,
    kind: JoinTokenKind,
) -> Result<JoinTokenRow, tonic::Status> {
    let hash = hash_secret(secret);
    let lookup = || async {
        c.state
            .join_token_by_hash(&hash)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("state unavailable: {e}")))
    };
    let token = match lookup().await? {
        Some(token) => token,
        None => {
            // This node may not have applied the token's creation yet: catch up, look again.
            c.read_barrier().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            lookup()
                .await?
                .ok_or_else(|| tonic::Status::permission_denied("the join token is not known to this cluster"))?
        }
    };
    if token.revoked_at.is_some() {
        return Err(tonic::Status::permission_denied("the join token has been revoked"));
    }
    if token.expires_at <= now_ms() {
        return Err(tonic::Status::permission_denied(format!(
            "the join token expired at {}",
            rfc3339(token.expires_at)
        )));
    }
    if token.kind != Some(kind) {
        return Err(tonic::Status::permission_denied(match kind {
            JoinTokenKind::Controller => "the join token is not a controller token",
            JoinTokenKind::Agent => "the join token is not an agent token (create one with kind \"agent\")",
        }));
    }
    Ok(token)
}

/// The cluster CA with its key unsealed, and its certificate as PEM.
pub async fn cluster_ca(c: &Controller) -> Result<(ClusterCa, String), tonic::Status> {
    let row = c
        .state
        .cluster_ca()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("state unavailable: {e}")))?
        .ok_or_else(|| tonic::Status::unavailable("the cluster is not initialized yet"))?;
    let unsealed = c.key.open(&row.ca_key_sealed, b"ca-key").ok().and_then(|k| String::from_utf8(k).ok());
    let key = unsealed.ok_or_else(|| tonic::Status::internal("cannot unseal the cluster CA"))?;
    let ca = ClusterCa::from_pem(&row.ca_cert_pem, &key)
        .map_err(|_| tonic::Status::internal("cannot load the cluster CA"))?;
    Ok((ca, row.ca_cert_pem))
}
