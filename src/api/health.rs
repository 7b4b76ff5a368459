//! `/health` and `/metrics`: what load balancers, service monitors and Prometheus
//! poll. Both answer outside the envelope, in the form their pollers expect.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::contract::{Health, HealthStatus};
use super::state::AppState;
use crate::server::mappings::{Health as MappingHealth, MappingStatus};
use crate::telemetry::Metrics;

/// `ok`, or `degraded` (still 200: the daemon runs) with a reason per problem an
/// operator should act on.
pub(super) async fn health(State(state): State<AppState>) -> Json<Health> {
    let clients = state.hub.clients();
    let tunnel_connected = clients.iter().any(|c| c.peer.is_some());
    let mut reasons = Vec::new();
    for (port, error) in state.mappings.unbound().await {
        reasons.push(format!("mapping on port {port} is not listening: {error}"));
    }
    for (port, _client, why) in state.mappings.looping().await {
        reasons.push(format!("mapping on port {port} refuses every visitor: {why}"));
    }
    let mut waiting: BTreeMap<String, (Vec<u16>, Vec<u16>)> = BTreeMap::new();
    for m in state.mappings.list().await {
        let port = m.spec.source_port;
        // Down, waiting and looping mappings are told above and below, once
        // per port or client; here what the counters of the last minutes say.
        let health = m.health.health;
        let looping = matches!(m.status, MappingStatus::Error(_));
        if matches!(health, MappingHealth::TargetFailing | MappingHealth::Blocked) || (health == MappingHealth::Refusing && !looping) {
            reasons.push(format!("mapping on port {} is {}: {}", m.spec.key(), health.as_str(), m.health.reason));
        }
        // A group with a client away still serves through the others, but
        // has lost some of its redundancy: said too, in other words.
        let away: Vec<String> = m.spec.clients.iter().filter(|c| !state.hub.connected(c)).cloned().collect();
        let waits = m.status == MappingStatus::WaitingForTunnel;
        for client in away {
            let (waiting_ports, serving_ports) = waiting.entry(client).or_default();
            if waits { waiting_ports } else { serving_ports }.push(port);
        }
    }
    for (client, (waiting_ports, serving_ports)) in waiting {
        if !waiting_ports.is_empty() {
            reasons.push(format!("tunnel client {client} is not connected; its mappings wait: {waiting_ports:?}"));
        }
        if !serving_ports.is_empty() {
            reasons.push(format!(
                "tunnel client {client} is not connected; the other clients of its groups serve the mappings {serving_ports:?}"
            ));
        }
    }
    for (client, f) in state.hub.flapping() {
        reasons.push(format!(
            "tunnel client {client} is flapping: {} and {} replaced each other {} times in the last minute (one name on two clients?)",
            f.previous, f.latest, f.replacements
        ));
    }
    if let Some(failure) = state.recorder.write_failure() {
        let for_secs = (state.recorder.now() - failure.since).max(0);
        reasons.push(format!(
            "traffic history is not being recorded (writes failing for {for_secs} s; the bytes are kept for the next write): {}",
            failure.error
        ));
    }
    let status = if reasons.is_empty() { HealthStatus::Ok } else { HealthStatus::Degraded };
    Json(Health { status, reasons, tunnel_enabled: true, tunnel_connected })
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    metrics_response(&state.metrics)
}

/// `/metrics` for both roles: the registry in Prometheus text exposition.
pub fn metrics_response(metrics: &Metrics) -> Response {
    ([(header::CONTENT_TYPE, crate::telemetry::content_type())], metrics.render()).into_response()
}
