//! `/api/stats/stream`: the traffic report as Server-Sent Events, one `traffic`
//! event on connect and then one per interval; and the feeds that stream and
//! the WebSocket ([`super::ws`]) share.
//!
//! The work is shared, not multiplied by the audience: for each interval in
//! use, one feed task builds the report once per tick and encodes it once into
//! the bytes of an SSE event (the JSON inside it is what a WebSocket sends);
//! every stream at that interval sends those same bytes (a reference-counted
//! buffer, not a copy). Only a stream's first event is built for it alone, so
//! it shows the state at the moment it connects. A feed ends with its last stream.
//!
//! Streams, SSE and WebSocket alike, are capped together ([`Streams`]); beyond
//! the cap a client gets 503 at once.
//! Intervals are whole seconds from [`MIN_STREAM_INTERVAL`] up, so streams
//! share feeds and a client cannot ask for more work than one report a second.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::Utf8Bytes;
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use axum::Extension;
use futures_util::stream::{self, Stream, StreamExt};
use serde::Deserialize;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use super::error::failure;
use super::limits::busy;
use super::state::AppState;
use super::traffic::report;
use crate::core::sync::lock;

/// The interval when the client does not ask for one.
const DEFAULT_STREAM_INTERVAL: Duration = Duration::from_secs(3);
/// The shortest interval a client may ask for (shorter asks get this).
pub(super) const MIN_STREAM_INTERVAL: Duration = Duration::from_secs(1);
/// The longest (longer asks get this).
const MAX_STREAM_INTERVAL: Duration = Duration::from_secs(3600);
/// A comment line (SSE) or a ping (WebSocket) this often keeps proxies from
/// closing a quiet stream.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The open streams and the feeds they share.
pub(crate) struct Streams {
    open: Arc<Semaphore>,
    cap: usize,
    /// One feed per interval in use (whole seconds), each the latest encoded report.
    feeds: Mutex<HashMap<u64, watch::Sender<Encoded>>>,
}

/// One traffic report, encoded once for every stream that sends it.
#[derive(Clone, Default)]
pub(super) struct Encoded {
    /// As one SSE `traffic` event.
    pub(super) event: Bytes,
    /// The JSON alone, a view into `event` (empty if the report could not be
    /// encoded): a WebSocket's text message.
    pub(super) json: Utf8Bytes,
}

/// A stream admitted under the cap: its first report (built for it alone) and
/// the feed of its interval. Holds its stream slot until dropped.
pub(super) struct Subscription {
    pub(super) first: Encoded,
    pub(super) feed: watch::Receiver<Encoded>,
    _slot: OwnedSemaphorePermit,
}

impl Streams {
    /// Room for `cap` streams at once.
    pub(super) fn new(cap: usize) -> Arc<Streams> {
        Arc::new(Streams { open: Arc::new(Semaphore::new(cap)), cap, feeds: Mutex::new(HashMap::new()) })
    }

    /// Admits one more stream at `every` seconds, or answers 503 when the
    /// most streams are open (the answer closes its connection).
    pub(super) async fn open(self: &Arc<Self>, every: u64, state: &AppState) -> Result<Subscription, Response> {
        let Ok(slot) = self.open.clone().try_acquire_owned() else {
            tracing::warn!(open = self.cap, "event stream refused: the most streams are open");
            return Err(busy(format!(
                "{} event streams are open, the most this server serves at once; close one, or poll /api/stats/traffic",
                self.cap
            )));
        };
        let mut feed = self.subscribe(every, state);
        // This stream's first report is built now; what the feed last sent is older.
        feed.borrow_and_update();
        let first = encode(state).await;
        Ok(Subscription { first, feed, _slot: slot })
    }

    /// A receiver of the feed for `every` seconds, starting one if there is none.
    fn subscribe(self: &Arc<Self>, every: u64, state: &AppState) -> watch::Receiver<Encoded> {
        let mut feeds = lock(&self.feeds);
        if let Some(feed) = feeds.get(&every) {
            return feed.subscribe();
        }
        let (feed, events) = watch::channel(Encoded::default());
        feeds.insert(every, feed.clone());
        tokio::spawn(self.clone().feed(every, feed, state.clone()));
        events
    }

    /// Builds the report every `every` seconds for all of this interval's
    /// streams, until the last one leaves or the daemon stops.
    async fn feed(self: Arc<Self>, every: u64, feed: watch::Sender<Encoded>, state: AppState) {
        let mut ticker = tokio::time::interval(Duration::from_secs(every));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // immediate: each stream's first event is its own
        loop {
            tokio::select! {
                _ = state.shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            {
                // Decided under the lock `subscribe` takes: a stream joining now
                // either finds this feed running or starts a new one.
                let mut feeds = lock(&self.feeds);
                if feed.receiver_count() == 0 {
                    feeds.remove(&every);
                    return;
                }
            }
            feed.send_replace(encode(&state).await);
        }
        lock(&self.feeds).remove(&every);
    }
}

/// What an SSE event carrying the report starts with; the JSON follows.
const EVENT_HEAD: &str = "event: traffic\ndata: ";

/// The traffic report as one SSE event and as JSON, ready to send.
async fn encode(state: &AppState) -> Encoded {
    match serde_json::to_string(&report(state).await) {
        // Compact JSON has no line breaks, so it is one `data:` line.
        Ok(json) => {
            let event = Bytes::from(format!("{EVENT_HEAD}{json}\n\n"));
            let json = event.slice(EVENT_HEAD.len()..EVENT_HEAD.len() + json.len());
            // A slice of a String at char boundaries: valid UTF-8, checked once here.
            Encoded { json: Utf8Bytes::try_from(json).unwrap_or_default(), event }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot encode the traffic report");
            Encoded { event: Bytes::from_static(b": encode error\n\n"), json: Utf8Bytes::default() }
        }
    }
}

#[derive(Deserialize)]
pub(super) struct StreamParams {
    pub(super) interval_ms: Option<u64>,
}

/// The stream's interval in whole seconds: asked for in milliseconds, rounded
/// up, held between the minimum and the maximum.
pub(super) fn interval_secs(asked_ms: Option<u64>) -> u64 {
    let asked = asked_ms.map_or(DEFAULT_STREAM_INTERVAL, Duration::from_millis);
    asked.clamp(MIN_STREAM_INTERVAL, MAX_STREAM_INTERVAL).as_millis().div_ceil(1000) as u64
}

/// Server-Sent Events: one `traffic` event now, then one per interval, until the
/// client leaves or the daemon stops.
pub(super) async fn stream(
    State(state): State<AppState>,
    Extension(streams): Extension<Arc<Streams>>,
    params: Result<Query<StreamParams>, QueryRejection>,
) -> Response {
    let every = match params {
        Ok(Query(StreamParams { interval_ms })) => interval_secs(interval_ms),
        Err(e) => return failure(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let subscription = match streams.open(every, &state).await {
        Ok(subscription) => subscription,
        Err(refused) => return refused,
    };
    let first = subscription.first.event.clone();
    let mut keep_alive = tokio::time::interval_at(tokio::time::Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    keep_alive.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let open = Open { subscription, keep_alive, shutdown: state.shutdown.clone() };
    let body = stream::once(async move { Ok::<_, Infallible>(first) }).chain(open.into_events());
    let mut response = Response::new(Body::from_stream(body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Reverse proxies (nginx) would otherwise buffer the stream.
    headers.insert("X-Accel-Buffering", HeaderValue::from_static("no"));
    response
}

/// One open stream after its first event; holds its stream slot until the
/// client leaves.
struct Open {
    subscription: Subscription,
    keep_alive: tokio::time::Interval,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Open {
    /// The feed's events as they come, a keep-alive comment when it is quiet,
    /// until the daemon stops.
    fn into_events(self) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        stream::unfold(self, |mut open| async move {
            let next = tokio::select! {
                _ = open.shutdown.cancelled() => return None,
                changed = open.subscription.feed.changed() => match changed {
                    Ok(()) => open.subscription.feed.borrow_and_update().event.clone(),
                    Err(_) => return None, // the feed ended: the daemon stops
                },
                _ = open.keep_alive.tick() => Bytes::from_static(b":\n\n"),
            };
            Some((Ok(next), open))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_are_whole_seconds_within_bounds() {
        assert_eq!(interval_secs(None), 3);
        assert_eq!(interval_secs(Some(0)), 1);
        assert_eq!(interval_secs(Some(250)), 1);
        assert_eq!(interval_secs(Some(1000)), 1);
        assert_eq!(interval_secs(Some(1001)), 2);
        assert_eq!(interval_secs(Some(u64::MAX)), 3600);
    }
}
