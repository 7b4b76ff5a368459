//! `/api/stats/ws`: the traffic report over a WebSocket, the same JSON as the
//! SSE stream ([`super::stream`]) sends in its `data:` lines, one text message
//! on connect and then one per interval (`?interval_ms=`, as for the stream).
//!
//! It shares the stream's feeds and counts against the same cap: a WebSocket
//! is a stream that happens to use another framing. The rules a browser page
//! cannot get round are enforced before the upgrade, by the same middlewares
//! as every route:
//!
//! - the `Origin` of a handshake must be the API's own or in `api.cors_origins`
//!   ([`super::guard`], 403), since no CORS check protects a WebSocket;
//! - the token ([`super::auth`], 401): a browser cannot set `Authorization` on a
//!   WebSocket, so it offers the subprotocols `tunneld` and
//!   `bearer.<the token, base64url without padding>`; the server selects
//!   `tunneld` and never echoes the token back.
//!
//! The client has nothing to say: what it sends is read (so pings are answered
//! and a close is seen) and dropped, and a message over [`MAX_INCOMING`] closes
//! the socket. A slow reader gets the latest report, not a backlog: the feed
//! keeps only the newest, and a send that cannot finish in [`SEND_TIMEOUT`]
//! ends the socket. When the daemon stops, each socket is closed with a close
//! frame (`1001 going away`), and the API waits for that ([`HeldConnection`]).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use base64::Engine as _;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::error::failure;
use super::state::AppState;
use super::stream::{interval_secs, StreamParams, Streams, Subscription, KEEP_ALIVE};

/// The subprotocol a browser offers and the server selects: not a secret.
pub(super) const SUBPROTOCOL: &str = "tunneld";
/// The subprotocol carrying the token: this, then the token in base64url
/// (subprotocol names allow no `/`, `+`, `=` and the like, a token may).
const TOKEN_SUBPROTOCOL_PREFIX: &str = "bearer.";
/// The largest message (or frame) a client may send; beyond it the socket is
/// closed (`1009`). Control frames are at most 125 bytes.
const MAX_INCOMING: usize = 4096;
/// How long one message may take to be written before the client counts as
/// gone: a reader that stops reading holds its slot no longer than this.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the server waits for a client's answer to its close frame.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The token a WebSocket handshake offers in a `bearer.` subprotocol, still
/// encoded (padding removed), if it offers one.
pub(super) fn offered_token(headers: &HeaderMap) -> Option<String> {
    offered_subprotocols(headers).find_map(|p| p.strip_prefix(TOKEN_SUBPROTOCOL_PREFIX).map(|t| t.trim_end_matches('=').to_string()))
}

/// `token` as a client puts it in the subprotocol: base64url, no padding.
pub(super) fn encode_token(token: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
}

/// Every subprotocol the handshake offers (comma-separated, over any number
/// of header lines).
fn offered_subprotocols(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// Keeps an API connection counted — its slot in the connection budget, and
/// the API's shutdown waiting for it — while any clone lives: the task serving
/// the connection holds one, and a WebSocket the connection is upgraded to
/// takes another, since the upgrade ends the serving task but not the socket.
#[derive(Clone)]
pub(crate) struct HeldConnection(
    #[allow(dead_code)] // held, never read
    Arc<Held>,
);

/// What a [`HeldConnection`] keeps until its last clone is dropped.
struct Held {
    _slot: OwnedSemaphorePermit,
    _tracked: TaskTrackerToken,
}

impl HeldConnection {
    pub(super) fn new(slot: OwnedSemaphorePermit, tracked: TaskTrackerToken) -> HeldConnection {
        HeldConnection(Arc::new(Held { _slot: slot, _tracked: tracked }))
    }
}

/// The handshake: the interval, the cap, the subprotocol; then the socket.
/// Origin and token were checked by the middlewares before this runs.
pub(super) async fn websocket(
    State(state): State<AppState>,
    Extension(streams): Extension<Arc<Streams>>,
    held: Option<Extension<HeldConnection>>,
    headers: HeaderMap,
    params: Result<Query<StreamParams>, QueryRejection>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let every = match params {
        Ok(Query(params)) => interval_secs(params.interval_ms),
        Err(e) => return failure(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(e) => {
            let status = e.status();
            return failure(status, format!("{}: /api/stats/ws is a WebSocket (or see /api/stats/stream)", e.body_text()));
        }
    };
    // A browser fails a handshake whose answer selects none of the offered
    // subprotocols, and the token's must never be the one echoed back.
    if offered_token(&headers).is_some() && !offered_subprotocols(&headers).any(|p| p == SUBPROTOCOL) {
        return failure(
            StatusCode::BAD_REQUEST,
            format!("offer the subprotocol {SUBPROTOCOL:?} beside the {TOKEN_SUBPROTOCOL_PREFIX}<token> one"),
        );
    }
    let subscription = match streams.open(every, &state).await {
        Ok(subscription) => subscription,
        Err(refused) => return refused,
    };
    let shutdown = state.shutdown.clone();
    upgrade
        .protocols([SUBPROTOCOL])
        .max_message_size(MAX_INCOMING)
        .max_frame_size(MAX_INCOMING)
        .read_buffer_size(MAX_INCOMING)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| async move {
            let _held = held;
            push(socket, subscription, shutdown).await;
        })
        .into_response()
}

/// How a push loop ended, and so how the socket is closed.
enum End {
    /// The client closed, or the connection is gone: nothing more to send.
    Gone,
    /// The server closes with this code and reason.
    Close(u16, &'static str),
}

/// Sends the first report, then the feed's, until the client leaves or the
/// daemon stops; then closes the socket.
async fn push(mut socket: WebSocket, mut subscription: Subscription, shutdown: CancellationToken) {
    let first = subscription.first.json.clone();
    let feed = &mut subscription.feed;
    let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut outgoing = Some(Message::Text(first));
    let end = loop {
        if let Some(message) = outgoing.take() {
            match tokio::time::timeout(SEND_TIMEOUT, socket.send(message)).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => break End::Gone,
                Err(_) => {
                    tracing::debug!("WebSocket reader too slow: closed");
                    break End::Gone;
                }
            }
        }
        outgoing = tokio::select! {
            _ = shutdown.cancelled() => break End::Close(close_code::AWAY, "the server is shutting down"),
            changed = feed.changed() => match changed {
                Ok(()) => {
                    let json = feed.borrow_and_update().json.clone();
                    (!json.is_empty()).then_some(Message::Text(json))
                }
                Err(_) => break End::Close(close_code::AWAY, "the server is shutting down"),
            },
            _ = keep_alive.tick() => Some(Message::Ping(Bytes::new())),
            // Read only to answer pings (the library queues the pong and sends it
            // on the next read or write) and to see a close or an oversized message.
            incoming = socket.recv() => match incoming {
                None | Some(Ok(Message::Close(_))) => break End::Gone,
                Some(Ok(_)) => None,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "WebSocket client sent too much or broke the protocol: closed");
                    break End::Close(close_code::SIZE, "this socket only sends; messages to it are limited");
                }
            },
        };
    };
    match end {
        // A close from the client is answered by the library on the next
        // write; flush it out.
        End::Gone => {
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, futures_util::SinkExt::close(&mut socket)).await;
        }
        End::Close(code, reason) => {
            let frame = Message::Close(Some(CloseFrame { code, reason: reason.into() }));
            let closed = async {
                if socket.send(frame).await.is_ok() {
                    // The client answers with its own close frame, then the connection ends.
                    while let Some(Ok(message)) = socket.recv().await {
                        if matches!(message, Message::Close(_)) {
                            break;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, closed).await;
        }
    }
    drop(subscription);
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn offering(lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_str(line).unwrap());
        }
        headers
    }

    #[test]
    fn the_token_is_found_in_any_offered_subprotocol_and_compared_encoded() {
        let token = "a/b+c=d-0123456789ü";
        let encoded = encode_token(token);
        assert!(encoded.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'), "{encoded}");
        let headers = offering(&["tunneld", &format!("other, bearer.{encoded}")]);
        assert_eq!(offered_token(&headers), Some(encoded.clone()));
        assert_eq!(offered_subprotocols(&headers).collect::<Vec<_>>(), ["tunneld", "other", &format!("bearer.{encoded}")]);
        // Padding, which a browser cannot send, is tolerated from other clients.
        assert_eq!(offered_token(&offering(&[&format!("tunneld, bearer.{encoded}==")])), Some(encoded));
        assert_eq!(offered_token(&offering(&["tunneld"])), None);
    }
}
