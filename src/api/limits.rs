//! How the API's connections are shared, so no kind of client can hold them all.
//!
//! The connection budget (see `max_api_connections` in the module root) is
//! split three ways:
//!
//! - a **reserve** that only `/health` and `/metrics` may use: they are what
//!   load balancers, service monitors and Prometheus poll, and must answer
//!   while everything else is busy;
//! - **streams** (`/api/stats/stream`, `/api/stats/ws`): long-lived by design,
//!   so counted apart and capped together (see [`super::stream`]);
//! - **requests**: every other route, each holding a slot while it reads its
//!   body and runs, at most [`BODY_READ_TIMEOUT`](super::body::BODY_READ_TIMEOUT)
//!   for the body and [`REQUEST_TIMEOUT`] in all.
//!
//! A request beyond its share is answered at once with 503 and the connection
//! closed, instead of waiting: a waiting request would hold its connection,
//! which is the slot the reserve keeps free. A request head must arrive within
//! the header timeout of the module root, idle keep-alive connections included;
//! while connections that have sent no head yet fill the budget, the accept
//! loop has a few more for `/health` and `/metrics` ([`ReserveConnection`]).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::Semaphore;

use super::error::failure;

/// The longest a request may take from its head to its answer (streams: to
/// their first byte). Past it the client gets 503 and its connection back; the
/// work itself is not cut off halfway (a mapping half created would be worse)
/// and still counts against the requests' share until it ends.
pub(super) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// What a refused client is told to wait before trying again (seconds).
const RETRY_AFTER_SECS: &str = "1";

/// The routes the reserve is kept for.
fn reserved_route(path: &str) -> bool {
    matches!(path, "/health" | "/metrics")
}

/// Streams are admitted (and counted) by their own handler.
fn stream_route(path: &str) -> bool {
    matches!(path, "/api/stats/stream" | "/api/stats/ws")
}

/// The shares of `connections` slots: `(requests, streams, reserve)`, each at
/// least one. With 128 connections: 88 requests, 32 streams, 8 reserved.
pub(super) fn shares(connections: usize) -> (usize, usize, usize) {
    let reserve = (connections / 16).clamp(1, 8);
    let streams = (connections / 4).clamp(1, 32);
    let requests = connections.saturating_sub(reserve + streams).max(1);
    (requests, streams, reserve)
}

/// Marks a request that came on one of the reserve connections the accept
/// loop keeps beyond the budget: only `/health` and `/metrics` are served there.
#[derive(Clone, Copy)]
pub(crate) struct ReserveConnection;

/// The requests' share of the API's connections (see the module doc).
pub(crate) struct RequestSlots {
    free: Arc<Semaphore>,
    total: usize,
}

impl RequestSlots {
    pub(super) fn new(total: usize) -> Arc<RequestSlots> {
        Arc::new(RequestSlots { free: Arc::new(Semaphore::new(total)), total })
    }
}

/// 503 with `Retry-After`, and the connection closed after it: a refused
/// client keeps no slot.
pub(super) fn busy(message: String) -> Response {
    let mut response = failure(StatusCode::SERVICE_UNAVAILABLE, message);
    let headers = response.headers_mut();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECS));
    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Admits a request to its share and bounds how long it may take (see the
/// module doc). Applied to every route, outside the others.
pub(crate) async fn admit(State(slots): State<Arc<RequestSlots>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if req.extensions().get::<ReserveConnection>().is_some() && !reserved_route(path) {
        return busy("every API connection is open; this one was kept for /health and /metrics: try again".into());
    }
    let slot = if reserved_route(path) || stream_route(path) {
        None
    } else {
        match slots.free.clone().try_acquire_owned() {
            Ok(slot) => Some(slot),
            Err(_) => {
                tracing::warn!(path, in_progress = slots.total, "API request refused: every request slot is taken");
                return busy(format!("the API is busy: {} requests are in progress, the most it serves at once; try again", slots.total));
            }
        }
    };
    // Run apart, so a timeout answers the client without cancelling the work
    // halfway; the slot is held until the work ends.
    let work = tokio::spawn(async move {
        let _slot = slot;
        next.run(req).await
    });
    match tokio::time::timeout(REQUEST_TIMEOUT, work).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => {
            tracing::error!(error = %e, "API request handler failed");
            failure(StatusCode::INTERNAL_SERVER_ERROR, "the request failed inside the daemon (see its log)")
        }
        Err(_) => {
            tracing::warn!(timeout_secs = REQUEST_TIMEOUT.as_secs(), "API request took too long; answered 503, the work goes on");
            busy(format!("the request took longer than {} s; it may still complete, check before repeating it", REQUEST_TIMEOUT.as_secs()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_share_has_a_slot_and_together_they_fit() {
        for connections in [1, 4, 8, 16, 64, 128] {
            let (requests, streams, reserve) = shares(connections);
            assert!(requests >= 1 && streams >= 1 && reserve >= 1, "{connections}");
            if connections >= 4 {
                assert_eq!(requests + streams + reserve, connections, "{connections}");
            }
        }
        assert_eq!(shares(128), (88, 32, 8));
    }
}
