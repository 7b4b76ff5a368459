//! `/api/client/*`: the named tunnel clients, and how each is shown (here too
//! for the traffic report, which lists them the same way).

use axum::extract::State;
use axum::response::Response;

use super::body::JsonBody;
use super::contract::{Client, ClientCreated, ClientList, ClientRemoved, CreateClient, RemoveClient, Source};
use super::error::{success, ApiError};
use super::state::AppState;
use crate::telemetry::TrafficSnapshot;

pub(super) async fn create(
    State(state): State<AppState>,
    JsonBody(CreateClient { name }): JsonBody<CreateClient>,
) -> Result<Response, ApiError> {
    let secret = state.mappings.create_client(&name).await?;
    Ok(success(
        "client created; its secret is shown only now: give it to the client (client.secret) with client.name set to this name",
        ClientCreated { name, secret },
    ))
}

pub(super) async fn remove(
    State(state): State<AppState>,
    JsonBody(RemoveClient { name, force }): JsonBody<RemoveClient>,
) -> Result<Response, ApiError> {
    // The client's tunnel series vanish with it: record what it moved first.
    state.recorder.flush_logged().await;
    let mappings_waiting = state.mappings.remove_client(&name, force).await?;
    state.recorder.flush_logged().await;
    Ok(success("client removed", ClientRemoved { name, mappings_waiting }))
}

pub(super) async fn list(State(state): State<AppState>) -> Response {
    let clients = views(&state, &state.metrics.traffic()).await;
    let count = clients.len();
    success("ok", ClientList { clients, count })
}

/// Every client as the API shows it: who is connected from where, since when,
/// what crossed its tunnel, and how many mappings it serves.
pub(super) async fn views(state: &AppState, snap: &TrafficSnapshot) -> Vec<Client> {
    let per_client = state.mappings.mappings_per_client().await;
    let declared = state.mappings.declared_clients();
    state
        .hub
        .clients()
        .into_iter()
        .map(|c| {
            let traffic = snap.clients.get(&c.name).cloned().unwrap_or_default();
            let mappings = per_client.get(&c.name).copied().unwrap_or(0);
            Client {
                connected: c.peer.is_some(),
                peer: c.peer,
                connected_since: c.connected_since,
                bytes_sent: traffic.bytes_sent,
                bytes_received: traffic.bytes_received,
                last_update: traffic.last_update,
                rtt_seconds: traffic.rtt.filter(|_| c.peer.is_some()),
                udp_transport: c.udp_transport.map(str::to_string),
                mappings,
                source: if declared.contains(&c.name) { Source::Config } else { Source::Api },
                name: c.name,
            }
        })
        .collect()
}
