//! Events an operator should hear about — quota thresholds, a mapping that cannot
//! bind its port, a tunnel client lost and back — and where they go: the log,
//! the bounded event table behind `/api/events`, and, when `alerts.webhook_url`
//! is set, a JSON POST per event.
//!
//! Nothing here runs on the data path (the server's watcher decides what is an
//! event); webhook deliveries run on their own task, in order, with retries and
//! backoff, fed through a bounded queue that drops (and counts) rather than ever
//! making anyone wait.
//!
//! May import `core`, `telemetry` and `store`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::store::events::{Event, EventKind};
use crate::store::Store;
use crate::telemetry::Metrics;

/// Events waiting for the webhook; beyond this they are dropped and counted.
const WEBHOOK_QUEUE: usize = 1_000;
/// Attempts per event, with backoff doubling from [`FIRST_RETRY`].
const WEBHOOK_ATTEMPTS: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// Where events go.
pub(crate) struct Events {
    store: Store,
    metrics: Arc<Metrics>,
    webhook: Option<mpsc::Sender<Event>>,
}

impl Events {
    /// Starts the webhook sender when `webhook_url` is set; it ends with `shutdown`.
    pub(crate) fn new(store: Store, metrics: Arc<Metrics>, webhook_url: &str, shutdown: CancellationToken) -> Arc<Events> {
        let webhook = (!webhook_url.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            tokio::spawn(deliver(webhook_url.to_string(), rx, metrics.clone(), shutdown));
            tx
        });
        Arc::new(Events { store, metrics, webhook })
    }

    /// Logs, stores and (if configured) queues `event` for the webhook.
    pub(crate) async fn emit(&self, kind: EventKind, port: Option<u16>, client: Option<&str>, message: String) {
        let event = Event { time: crate::core::time::unix_now(), kind, port, client: client.map(str::to_string), message };
        // An absent port or client is left out, not shown as `None`.
        warn!(kind = %event.kind, port = event.port, client = event.client.as_deref(), message = %event.message, "event");
        if let Err(e) = self.store.add_event(event.clone()).await {
            warn!(error = %e, kind = kind.as_str(), "cannot store the event");
        }
        if let Some(tx) = &self.webhook {
            if tx.try_send(event).is_err() {
                self.metrics.webhook_failed();
                warn!(kind = kind.as_str(), "webhook queue full; event not sent");
            }
        }
    }
}

/// Posts each event in order; an event that still fails after every retry is
/// logged and counted, and the next one is tried.
async fn deliver(url: String, mut queue: mpsc::Receiver<Event>, metrics: Arc<Metrics>, shutdown: CancellationToken) {
    let agent = ureq::AgentBuilder::new().timeout(WEBHOOK_TIMEOUT).build();
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            event = queue.recv() => match event { Some(e) => e, None => return },
        };
        let mut delay = FIRST_RETRY;
        for attempt in 1..=WEBHOOK_ATTEMPTS {
            let (agent, url, body) = (agent.clone(), url.clone(), serde_json::to_value(&event).unwrap_or_default());
            let sent = tokio::task::spawn_blocking(move || agent.post(&url).send_json(body).map(|_| ()).map_err(delivery_error)).await;
            let error = match sent {
                Ok(Ok(())) => break,
                Ok(Err(e)) => e,
                Err(e) => e.to_string(),
            };
            metrics.webhook_failed();
            if attempt == WEBHOOK_ATTEMPTS {
                warn!(kind = %event.kind, attempts = attempt, error, "webhook delivery failed; event dropped (it stays in /api/events)");
                break;
            }
            warn!(kind = %event.kind, attempt, retry_in_secs = delay.as_secs(), error, "webhook delivery failed; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            delay *= 2;
        }
    }
}

/// What went wrong, without the URL: ureq's own message starts with it, and the
/// URL may carry the receiver's key.
fn delivery_error(error: ureq::Error) -> String {
    match error {
        ureq::Error::Status(status, _) => format!("the receiver answered HTTP {status}"),
        ureq::Error::Transport(transport) => {
            let mut text = transport.kind().to_string();
            if let Some(message) = transport.message() {
                text = format!("{text}: {message}");
            }
            if let Some(source) = std::error::Error::source(&transport) {
                text = format!("{text}: {source}");
            }
            text
        }
    }
}
