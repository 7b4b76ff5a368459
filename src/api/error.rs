//! How handlers answer: a success envelope with typed data, or an [`ApiError`]
//! that becomes a failure envelope with the right status. Kept in one place so
//! every route, the fallbacks and the middlewares answer in the same shape.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::contract::{Envelope, ErrorCode};
use crate::server::mappings::MappingError;

/// `200` with `{success: true, message, data}`.
pub(crate) fn success<T: Serialize>(message: &str, data: T) -> Response {
    Json(Envelope::success(message, data)).into_response()
}

/// `status` with `{success: false, message}`.
pub(crate) fn failure(status: StatusCode, message: impl Into<String>) -> Response {
    refusal(status, None, message)
}

/// `status` with `{success: false, message, code}`: a refusal programs tell
/// apart by `code`.
pub(crate) fn refusal(status: StatusCode, code: Option<ErrorCode>, message: impl Into<String>) -> Response {
    (status, Json(Envelope::<()>::refusal(code, message))).into_response()
}

/// A request that cannot be served: its status and the message for the envelope.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
    /// The envelope's `code`, for refusals a client may act on.
    pub(crate) code: Option<ErrorCode>,
}

impl ApiError {
    /// `status` with `message` and no code.
    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into(), code: None }
    }

    /// 400: the request itself is wrong; `message` says how.
    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    /// 500: the daemon failed (logged once, when answered).
    pub(crate) fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Every 500 is logged once, here: the caller only sees the envelope.
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "API request failed");
        }
        refusal(self.status, self.code, self.message)
    }
}

impl From<MappingError> for ApiError {
    fn from(e: MappingError) -> ApiError {
        let (status, code) = match &e {
            MappingError::Invalid(_) => (StatusCode::BAD_REQUEST, None),
            MappingError::NamesUnknownClient(_) => (StatusCode::BAD_REQUEST, Some(ErrorCode::UnknownClient)),
            MappingError::Conflict(_) => (StatusCode::CONFLICT, None),
            MappingError::ClientInUse { .. } => (StatusCode::CONFLICT, Some(ErrorCode::ClientInUse)),
            MappingError::NotFound(_) => (StatusCode::NOT_FOUND, None),
            MappingError::UnknownClient(_) => (StatusCode::NOT_FOUND, Some(ErrorCode::UnknownClient)),
            MappingError::Declared { .. } => (StatusCode::CONFLICT, Some(ErrorCode::DeclaredInConfig)),
            MappingError::Store { .. } => (StatusCode::INTERNAL_SERVER_ERROR, None),
        };
        ApiError { status, message: e.to_string(), code }
    }
}
