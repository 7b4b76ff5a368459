//! The API token check, one middleware in front of every `/api/*` route (and
//! `/metrics` when asked), so no handler can forget it.

use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::contract::ErrorCode;
use super::error::refusal;
use super::state::AppState;
use crate::core::secret::tokens_equal;

/// `Authorization: Bearer <token>`, `?token=` for EventSource, or a
/// `bearer.<base64url token>` WebSocket subprotocol ([`super::ws`]): browsers can
/// set no header on either. An empty configured token means no authentication
/// (allowed only on loopback, see the config).
pub(super) async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let token = state.token.read().map(|t| t.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone());
    if token.is_empty() {
        return next.run(req).await;
    }
    let from_header =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    // Percent-decoded, as browsers encode `+`, `/`, `=` in query values.
    let query: Option<Query<std::collections::HashMap<String, String>>> = Query::try_from_uri(req.uri()).ok();
    let from_query = query.as_ref().and_then(|q| q.get("token")).map(String::as_str);
    let from_subprotocol = super::ws::offered_token(req.headers());
    let accepted = match (from_header.or(from_query), &from_subprotocol) {
        (Some(given), _) => Some(tokens_equal(given, &token)),
        (None, Some(encoded)) => Some(tokens_equal(encoded, &super::ws::encode_token(&token))),
        (None, None) => None,
    };
    match accepted {
        Some(true) => next.run(req).await,
        Some(false) => refusal(StatusCode::UNAUTHORIZED, Some(ErrorCode::TokenInvalid), "invalid API token"),
        None => {
            refusal(StatusCode::UNAUTHORIZED, Some(ErrorCode::TokenRequired), "API token required: send `Authorization: Bearer <token>`")
        }
    }
}
