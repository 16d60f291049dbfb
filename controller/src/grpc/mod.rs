//! The controller's gRPC services, all on the `--grpc` port with mutual TLS.

pub use deployer_common::grpc_client as client;
pub mod cluster_service;
pub mod raft_service;

use deployer_common::pki::{identity_of_cert_der, Identity};

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
