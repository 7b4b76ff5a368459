//! The HTTP API: mapping and client management, traffic stats (JSON, SSE,
//! WebSocket, history), events, health, `/metrics` and the monitor page.
//!
//! Every `/api/*` answer uses the `{success, message, data}` envelope — errors
//! included, even for unknown routes and wrong methods — so scripts can always
//! parse the body. What each route takes and answers is written down once, as
//! types, in [`contract`]; this file only serves and routes, and each resource's
//! handlers have a file of their own.
//!
//! May import every layer below: the server role's state is what it shows.

mod assets;
mod auth;
mod body;
mod clients;
mod connections;
pub mod contract;
mod error;
mod events;
pub(crate) mod guard;
mod health;
mod history;
mod limits;
mod mappings;
mod state;
mod stream;
mod traffic;
mod ws;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path};
use axum::http::StatusCode;
use axum::middleware;
use axum::routing::{get, post};
use axum::{Extension, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::net::socket;
use auth::require_token;
pub(crate) use body::from_value;
use error::failure;
pub use health::metrics_response;
pub use state::AppState;

/// A client must send its request head within this time, or the connection is
/// closed: idle or slow connections cannot accumulate.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// API connections open at once: an eighth of the descriptor limit, at most 128.
/// Beyond it new ones wait in the listen backlog (costing no descriptor) until
/// one closes, so the API can never starve the forwarders of descriptors.
/// [`limits`] shares them out so `/health` and `/metrics` always find one.
fn max_api_connections() -> usize {
    let limit = socket::descriptor_limit().unwrap_or(u64::MAX);
    (limit / 8).clamp(4, 128) as usize
}

/// Connections beyond [`max_api_connections`], taken only while all of those
/// are open, for `/health` and `/metrics` alone: connections that send nothing
/// (or a head a byte at a time) can fill the others for a header timeout each,
/// these only for [`RESERVE_HEADER_READ_TIMEOUT`], one request each.
const RESERVE_CONNECTIONS: usize = 4;
/// The head timeout on a reserve connection: a poller sends its head at once.
const RESERVE_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves the API on `listener` until `shutdown`, then lets open requests finish.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) -> std::io::Result<()> {
    use hyper::service::Service as _;
    let app = router(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_api_connections()));
    let reserve = Arc::new(tokio::sync::Semaphore::new(RESERVE_CONNECTIONS));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let slot = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot.map(|slot| (slot, false)),
            slot = reserve.clone().acquire_owned() => slot.map(|slot| (slot, true)),
        };
        let Ok((mut slot, mut reserved)) = slot else { break };
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = socket::accept(&listener, || {}) => accepted,
        };
        // A reserve slot taken while the budget was full; it may have room by now.
        if reserved {
            if let Ok(ordinary) = slots.clone().try_acquire_owned() {
                (slot, reserved) = (ordinary, false);
            }
        }
        let app = hyper_util::service::TowerToHyperService::new(app.clone());
        let held = ws::HeldConnection::new(slot, connections.token());
        let request_held = held.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            if reserved {
                req.extensions_mut().insert(limits::ReserveConnection);
            }
            req.extensions_mut().insert(request_held.clone());
            app.call(req)
        });
        let stop = shutdown.clone();
        connections.spawn(async move {
            // A WebSocket this connection becomes holds it on past this task.
            let _held = held;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new());
            if reserved {
                http.header_read_timeout(RESERVE_HEADER_READ_TIMEOUT).keep_alive(false);
            } else {
                http.header_read_timeout(HEADER_READ_TIMEOUT);
            }
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service).with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// Every route, behind the guard (and the token where it applies), each kind
/// within its share of the connections ([`limits`]).
pub fn router(state: AppState) -> Router {
    let (requests, streams, _reserve) = limits::shares(max_api_connections());
    let authenticated = Router::new()
        .route("/api/mapping/create", post(mappings::create))
        .route("/api/mapping/remove", post(mappings::remove))
        .route("/api/mapping/update", post(mappings::update))
        .route("/api/mapping/list", get(mappings::list))
        .route("/api/stats/traffic", get(traffic::traffic))
        .route("/api/stats/stream", get(stream::stream))
        .route("/api/stats/ws", get(ws::websocket))
        .route("/api/stats/history", get(history::history))
        .route("/api/stats/report", get(history::report))
        .route("/api/events", get(events::list))
        .route("/api/connections", get(connections::list))
        .route("/api/connection/close", post(connections::close))
        .route("/api/connections/log", get(connections::log))
        .route("/api/stats/sources", get(connections::sources))
        .route("/api/client/create", post(clients::create))
        .route("/api/client/remove", post(clients::remove))
        .route("/api/client/list", get(clients::list))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    // Open by default (scrapers); behind the token when the operator asks.
    let mut metrics_route = Router::new().route("/metrics", get(health::metrics));
    if state.guard.metrics_token_required {
        metrics_route = metrics_route.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    }
    Router::new()
        .merge(authenticated)
        // The page itself is public: it asks for the token and sends it on.
        .route("/api/stats/monitor", get(assets::monitor_page))
        .route("/assets/{*path}", get(|Path(path): Path<String>| async move { assets::asset(&path) }))
        .route("/health", get(health::health))
        .merge(metrics_route)
        .fallback(|| async { failure(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async { failure(StatusCode::METHOD_NOT_ALLOWED, "method not allowed for this route") })
        .layer(DefaultBodyLimit::max(body::MAX_BODY))
        .layer(middleware::from_fn_with_state(state.guard.clone(), guard::check))
        .layer(Extension(stream::Streams::new(streams)))
        .layer(middleware::from_fn_with_state(limits::RequestSlots::new(requests), limits::admit))
        .with_state(state)
}
