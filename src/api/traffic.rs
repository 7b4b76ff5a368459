//! `/api/stats/traffic` and the report its live form `/api/stats/stream`
//! ([`super::stream`]) sends: one report built in one place, so the page, `ctl`
//! and scrapers of the JSON always see the same numbers — all read from the
//! Prometheus registry.

use axum::extract::State;
use axum::response::Response;

use super::clients;
use super::contract::{MappingTraffic, TrafficReport, TunnelTraffic, UdpTraffic};
use super::error::success;
use super::state::AppState;
use crate::core::time::unix_now;

pub(super) async fn traffic(State(state): State<AppState>) -> Response {
    success("ok", report(&state).await)
}

/// The traffic report, every number read from the registry.
pub(super) async fn report(state: &AppState) -> TrafficReport {
    let snap = state.metrics.traffic();
    let lifetime = state.recorder.lifetime();
    let views = state.mappings.list().await;
    let mapping_count = views.len();
    let mappings: Vec<MappingTraffic> = views
        .into_iter()
        .map(|view| {
            let port = view.spec.source_port;
            let key = view.spec.key();
            let t = snap.mappings.get(&key).cloned().unwrap_or_default();
            // Never below since-start: bytes counted after the last flush are in both.
            let (lifetime_sent, lifetime_received) = lifetime.get(&key).map(|t| (t.sent, t.received)).unwrap_or_default();
            let udp = (key.protocol == crate::core::protocol::Protocol::Udp).then(|| UdpTraffic {
                datagrams_sent: t.datagrams_sent,
                datagrams_received: t.datagrams_received,
                sessions: t.udp_sessions,
                dropped: t.dropped.clone(),
            });
            MappingTraffic {
                port,
                protocol: key.protocol,
                udp,
                bytes_sent: t.bytes_sent,
                bytes_received: t.bytes_received,
                lifetime_sent: lifetime_sent.max(t.bytes_sent),
                lifetime_received: lifetime_received.max(t.bytes_received),
                last_update: t.last_update,
                active_connections: t.active_connections,
                connections_total: t.connections_total,
                connect_errors: t.connect_errors,
                refused: t.refused,
                connect_p50_seconds: t.connect.map(|q| q.p50),
                connect_p99_seconds: t.connect.map(|q| q.p99),
                target_host: view.spec.target_host,
                target_port: view.spec.target_port,
                use_tunnel: view.spec.use_tunnel,
                client: view.spec.client,
                balance: view.spec.use_tunnel.then_some(view.spec.balance),
                clients: view.spec.clients,
                members: view.members.into_iter().map(Into::into).collect(),
                status: view.status.into(),
                health: Some(view.health.health.into()),
                health_reason: view.health.reason,
                description: view.policy.description,
                bandwidth_limit: view.policy.bandwidth_limit,
                quota: view.policy.quota,
                quota_used: view.quota_used,
                quota_blocked: view.quota_blocked,
                allow: view.policy.allow,
                deny: view.policy.deny,
                proxy_protocol: view.policy.proxy_protocol,
                source: view.spec.source,
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
