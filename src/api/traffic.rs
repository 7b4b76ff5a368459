//! `/api/stats/traffic` and its live form `/api/stats/stream` (Server-Sent
//! Events): one report built in one place, so the page, `ctl` and scrapers of
//! the JSON always see the same numbers — all read from the Prometheus registry.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::Deserialize;

use super::clients;
use super::contract::{MappingTraffic, TrafficReport, TunnelTraffic};
use super::error::{failure, success};
use super::state::AppState;
use crate::core::time::unix_now;

const DEFAULT_STREAM_INTERVAL: Duration = Duration::from_secs(3);
const MIN_STREAM_INTERVAL: Duration = Duration::from_millis(250);

pub(super) async fn traffic(State(state): State<AppState>) -> Response {
    success("ok", report(&state).await)
}

/// The traffic report, every number read from the registry.
async fn report(state: &AppState) -> TrafficReport {
    let snap = state.metrics.traffic();
    let lifetime = state.recorder.lifetime();
    let views = state.mappings.list().await;
    let mapping_count = views.len();
    let mappings: Vec<MappingTraffic> = views
        .into_iter()
        .map(|view| {
            let port = view.spec.source_port;
            let t = snap.mappings.get(&port).cloned().unwrap_or_default();
            // Never below since-start: bytes counted after the last flush are in both.
            let (lifetime_sent, lifetime_received) = lifetime.get(&port).map(|t| (t.sent, t.received)).unwrap_or_default();
            MappingTraffic {
                port,
                bytes_sent: t.bytes_sent,
                bytes_received: t.bytes_received,
                lifetime_sent: lifetime_sent.max(t.bytes_sent),
                lifetime_received: lifetime_received.max(t.bytes_received),
                last_update: t.last_update,
                active_connections: t.active_connections,
                connections_total: t.connections_total,
                connect_errors: t.connect_errors,
                target_host: view.spec.target_host,
                target_port: view.spec.target_port,
                use_tunnel: view.spec.use_tunnel,
                client: view.spec.client,
                status: view.status.into(),
                description: view.policy.description,
                bandwidth_limit: view.policy.bandwidth_limit,
                quota: view.policy.quota,
                quota_used: view.quota_used,
                quota_blocked: view.quota_blocked,
                allow: view.policy.allow,
                deny: view.policy.deny,
            }
        })
        .collect();
    TrafficReport {
        tunnel: TunnelTraffic::from(snap.tunnel()),
        clients: clients::views(state, &snap).await,
        total_sent: mappings.iter().map(|m| m.bytes_sent).sum(),
        total_received: mappings.iter().map(|m| m.bytes_received).sum(),
        lifetime_sent: mappings.iter().map(|m| m.lifetime_sent).sum(),
        lifetime_received: mappings.iter().map(|m| m.lifetime_received).sum(),
        active_connections: mappings.iter().map(|m| m.active_connections).sum(),
        mappings,
        started_at: state.metrics.started_at(),
        timestamp: unix_now(),
        mapping_count,
    }
}

#[derive(Deserialize)]
pub(super) struct StreamParams {
    interval_ms: Option<u64>,
}

/// Server-Sent Events: one `traffic` event now, then one per interval, until the
/// client leaves or the daemon stops.
pub(super) async fn stream(State(state): State<AppState>, params: Result<Query<StreamParams>, QueryRejection>) -> Response {
    let interval = match params {
        Ok(Query(StreamParams { interval_ms: Some(ms) })) => Duration::from_millis(ms).max(MIN_STREAM_INTERVAL),
        Ok(_) => DEFAULT_STREAM_INTERVAL,
        Err(e) => return failure(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let shutdown = state.shutdown.clone();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = stream::unfold((state, ticker), move |(state, mut ticker)| {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => None,
                _ = ticker.tick() => {
                    let data = report(&state).await;
                    let event = Event::default().event("traffic").json_data(&data).unwrap_or_else(|_| Event::default().comment("encode error"));
                    Some((Ok::<_, Infallible>(event), (state, ticker)))
                }
            }
        }
    });
    sse(events).into_response()
}

fn sse<S: Stream<Item = Result<Event, Infallible>> + Send + 'static>(events: S) -> impl IntoResponse {
    let mut headers = HeaderMap::new();
    // Reverse proxies (nginx) would otherwise buffer the stream.
    headers.insert("X-Accel-Buffering", header::HeaderValue::from_static("no"));
    (headers, Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
