//! A JSON body extractor whose rejections are API errors with our shape and fitting statuses.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // Parse to a value first: serde would also fill a struct from an array of its fields.
        match axum::Json::<serde_json::Value>::from_request(req, state).await {
            Ok(axum::Json(v)) => {
                if !v.is_object() {
                    return Err(ApiError::validation("the request body must be a JSON object"));
                }
                // The error names the field it is about, e.g. `resources.cpu_millis: invalid type`.
                serde_path_to_error::deserialize(v).map(ApiJson).map_err(|e| {
                    let path = e.path().to_string();
                    let inner = e.into_inner();
                    if path == "." {
                        ApiError::validation(format!("invalid request body: {inner}"))
                    } else {
                        ApiError::validation(format!("invalid request body: {path}: {inner}"))
                    }
                })
            }
            Err(rejection) => Err(match &rejection {
                JsonRejection::JsonDataError(e) => {
                    ApiError::validation(format!("invalid request body: {}", e.body_text()))
                }
                JsonRejection::JsonSyntaxError(e) => {
                    ApiError::bad_request(format!("malformed JSON: {}", e.body_text()))
                }
                JsonRejection::MissingJsonContentType(_) => ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    "send the body as JSON with Content-Type: application/json",
                ),
                _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    format!("the request body is larger than {} bytes", super::BODY_LIMIT),
                ),
                _ => ApiError::bad_request(rejection.body_text()),
            }),
        }
    }
}

/// An optional JSON body: none at all (empty) is `None`; anything else must be valid.
impl<S, T> axum::extract::OptionalFromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Option<Self>, Self::Rejection> {
        let (parts, body) = req.into_parts();
        let bytes = axum::body::to_bytes(body, super::BODY_LIMIT).await.map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the request body is larger than {} bytes", super::BODY_LIMIT),
            )
        })?;
        if bytes.is_empty() {
            return Ok(None);
        }
        let req = Request::from_parts(parts, axum::body::Body::from(bytes));
        <ApiJson<T> as FromRequest<S>>::from_request(req, state).await.map(Some)
    }
}
