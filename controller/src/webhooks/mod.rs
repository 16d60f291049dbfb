//! Git webhooks, without I/O: checking that a delivery comes from the forge ([`verify`]) and reading
//! what a deploy needs from its body ([`payload`]). The HTTP endpoint that receives deliveries, looks
//! up secrets and projects, and creates deployments lives in the API.
//!
//! GitHub signs the raw body with HMAC-SHA256 (`X-Hub-Signature-256`); GitLab and the generic deploy
//! hook send a shared token (`X-Gitlab-Token`). Both are compared in constant time. Verify the
//! signature on the raw bytes before parsing them: the parsers trust their input's origin, not its
//! shape.

pub mod payload;
pub mod verify;
