//! One error type for the HTTP API: a status, a stable code and a message that says what to fix.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::{ToResponse, ToSchema};

use crate::command::{CommandResponse, Rejection};
use crate::controller::ProposeError;

/// The API's view of an applied command: done, or refused with the fitting status.
pub fn applied(response: CommandResponse) -> Result<(), ApiError> {
    match response {
        CommandResponse::Applied => Ok(()),
        CommandResponse::Rejected { reason: Rejection::Conflict, message } => Err(ApiError::conflict(message)),
        CommandResponse::Rejected { reason: Rejection::NotFound, message } => Err(ApiError::not_found(message)),
        CommandResponse::Rejected { reason: Rejection::Invalid, message } => Err(ApiError::validation(message)),
        CommandResponse::Batch { .. } => Err(ApiError::internal("command", "a single write was answered as a batch")),
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::CONFLICT, "conflict", message)
    }

    pub fn validation(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_leader", message)
    }

    /// A bug or a broken node, never the client's fault: logged here, not detailed to the client.
    pub fn internal(context: &str, error: impl std::fmt::Display) -> ApiError {
        tracing::error!(%error, "{context}");
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error; see the controller's log")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        (self.status, Json(body)).into_response()
    }
}

/// The body of every error answer (as [`ApiError::into_response`] writes it), for the OpenAPI
/// description.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable and machine-readable, e.g. `not_found`, `validation_failed`, `no_leader`.
    pub code: String,
    /// What went wrong and what to fix, for a person.
    pub message: String,
}

// The error answers the handlers share, each documented once (`components/responses`).

#[derive(ToResponse)]
#[response(description = "Bad input: malformed JSON, a malformed query string, or a request this route does not serve")]
pub struct BadRequest(pub ErrorBody);

#[derive(ToResponse)]
#[response(description = "No credentials, or an unknown, expired or revoked token or session")]
pub struct Unauthorized(pub ErrorBody);

#[derive(ToResponse)]
#[response(description = "The token lacks the scope, or the caller the role, that this needs")]
pub struct Forbidden(pub ErrorBody);

#[derive(ToResponse)]
#[response(description = "No such resource, or one the caller may not see")]
pub struct NotFound(pub ErrorBody);

#[derive(ToResponse)]
#[response(description = "Conflicts with the current state (e.g. the name is taken)")]
pub struct Conflict(pub ErrorBody);

#[derive(ToResponse)]
#[response(description = "The request body is larger than the API accepts (64 KiB)")]
pub struct PayloadTooLarge(pub ErrorBody);

#[derive(ToResponse)]
#[response(description = "The request body was not sent as `Content-Type: application/json`")]
pub struct UnsupportedMediaType(pub ErrorBody);

#[derive(ToResponse)]
#[response(description = "The request is well-formed but invalid; the message names the field")]
pub struct Unprocessable(pub ErrorBody);

#[derive(ToResponse)]
#[response(description = "Too many failed attempts; wait and retry")]
pub struct TooManyRequests(pub ErrorBody);

#[derive(ToResponse)]
#[response(description = "The cluster has no leader or quorum right now, or is shutting down; retry")]
pub struct Unavailable(pub ErrorBody);

impl From<ProposeError> for ApiError {
    fn from(e: ProposeError) -> ApiError {
        match e {
            ProposeError::ShuttingDown => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", e.to_string())
            }
            ProposeError::NoQuorum(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no_quorum", e.to_string()),
            ProposeError::Unconfirmed(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unconfirmed", e.to_string())
            }
            _ => ApiError::unavailable(e.to_string()),
        }
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> ApiError {
        ApiError::internal("state database error", e)
    }
}
