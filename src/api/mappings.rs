//! `/api/mapping/*`: the operator's changes to mappings. Each handler is a thin
//! translation between the contract types and [`Mappings`]; the checks that
//! need the daemon's state (ports taken, clients known) are made there.
//!
//! [`Mappings`]: crate::server::mappings::Mappings

use axum::extract::State;
use axum::response::Response;

use super::body::JsonBody;
use super::contract::{CreateMapping, Mapping, MappingList, MappingRemoved, RemoveMapping, UpdateMapping};
use super::error::{success, ApiError};
use super::state::AppState;

pub(super) async fn create(State(state): State<AppState>, JsonBody(request): JsonBody<CreateMapping>) -> Result<Response, ApiError> {
    let view = state.mappings.create(request.into_new_mapping()).await?;
    Ok(success("mapping created", Mapping::from(view)))
}

pub(super) async fn update(State(state): State<AppState>, JsonBody(request): JsonBody<UpdateMapping>) -> Result<Response, ApiError> {
    let (key, change, group) = request.into_parts();
    // The group first: it is the part that can be refused (unknown clients),
    // and a refused request changes nothing.
    if !group.is_empty() {
        state.mappings.update_group(key, group).await?;
    }
    let view = state.mappings.update(key, change).await?;
    Ok(success("mapping updated", Mapping::from(view)))
}

pub(super) async fn remove(
    State(state): State<AppState>,
    JsonBody(RemoveMapping { port, protocol }): JsonBody<RemoveMapping>,
) -> Result<Response, ApiError> {
    // The mapping's series vanish with it: record what it moved since the last
    // flush first, and flush again after, so a new mapping on the same port
    // counts from its own zero.
    state.recorder.flush_logged().await;
    state.mappings.remove(crate::core::protocol::MappingKey { port, protocol }).await?;
    state.recorder.flush_logged().await;
    Ok(success("mapping removed", MappingRemoved { port, protocol }))
}

pub(super) async fn list(State(state): State<AppState>) -> Response {
    let mappings: Vec<Mapping> = state.mappings.list().await.into_iter().map(Mapping::from).collect();
    let count = mappings.len();
    success("ok", MappingList { mappings, count })
}
