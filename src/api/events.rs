//! `GET /api/events`: the event log (quota thresholds, mappings down and up,
//! clients lost and back), newest first.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::Response;
use serde::Deserialize;

use super::contract::{Event, EventList};
use super::error::{success, ApiError};
use super::state::AppState;

/// Events shown when `?limit=` is not given.
const DEFAULT_LIMIT: u32 = 100;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsParams {
    limit: Option<u32>,
    /// The API token may come as `?token=` (see the auth middleware).
    #[serde(rename = "token")]
    _token: Option<String>,
}

/// Recent events, newest first (`?limit=`, default 100, at most the 1,000 kept).
pub(super) async fn list(State(state): State<AppState>, params: Result<Query<EventsParams>, QueryRejection>) -> Result<Response, ApiError> {
    let Query(EventsParams { limit, .. }) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = limit.unwrap_or(DEFAULT_LIMIT).clamp(1, crate::store::events::KEEP as u32);
    let events: Vec<Event> = state
        .recorder_store()
        .events(limit)
        .await
        .map_err(|e| ApiError::internal(format!("cannot read events: {e}")))?
        .into_iter()
        .map(Event::from)
        .collect();
    let count = events.len();
    Ok(success("ok", EventList { events, count }))
}
