//! Events an operator should hear about — quota thresholds, a mapping that cannot
//! bind its port, a tunnel client lost and back — and where they go: the log,
//! the bounded event table behind `/api/events`, and, when `alerts.webhook_url`
//! is set, a JSON POST per event.
//!
//! Nothing here runs on the data path. The [`Watcher`] polls the live state once
//! a second; webhook deliveries run on their own task, in order, with retries and
//! backoff, fed through a bounded queue that drops (and counts) rather than ever
//! making anyone wait.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::history::Recorder;
use crate::metrics::Metrics;
use crate::quota::QuotaTracker;
use crate::server::mappings::Mappings;
use crate::server::tunnel::{Presence, TunnelHub};
use crate::store::events::Event;
use crate::store::Store;

/// Events waiting for the webhook; beyond this they are dropped and counted.
const WEBHOOK_QUEUE: usize = 1_000;
/// Attempts per event, with backoff doubling from [`FIRST_RETRY`].
const WEBHOOK_ATTEMPTS: u32 = 5;
const FIRST_RETRY: Duration = Duration::from_secs(1);
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the watcher looks at quotas, listeners and the tunnel.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

pub mod kind {
    pub const QUOTA_WARNING: &str = "quota_warning";
    pub const QUOTA_EXHAUSTED: &str = "quota_exhausted";
    pub const QUOTA_RESET: &str = "quota_reset";
    pub const MAPPING_DOWN: &str = "mapping_down";
    pub const MAPPING_UP: &str = "mapping_up";
    pub const CLIENT_LOST: &str = "client_lost";
    pub const CLIENT_BACK: &str = "client_back";
}

/// Where events go.
pub struct Events {
    store: Store,
    metrics: Arc<Metrics>,
    webhook: Option<mpsc::Sender<Event>>,
}

impl Events {
    /// Starts the webhook sender when `webhook_url` is set; it ends with `shutdown`.
    pub fn new(store: Store, metrics: Arc<Metrics>, webhook_url: &str, shutdown: CancellationToken) -> Arc<Events> {
        let webhook = (!webhook_url.is_empty()).then(|| {
            let (tx, rx) = mpsc::channel(WEBHOOK_QUEUE);
            tokio::spawn(deliver(webhook_url.to_string(), rx, metrics.clone(), shutdown));
            tx
        });
        Arc::new(Events { store, metrics, webhook })
    }

    /// Logs, stores and (if configured) queues `event` for the webhook.
    pub async fn emit(&self, kind: &str, port: Option<u16>, client: Option<&str>, message: String) {
        let event = Event { time: crate::metrics::unix_now(), kind: kind.into(), port, client: client.map(str::to_string), message };
        warn!(kind = %event.kind, port = ?event.port, client = ?event.client, message = %event.message, "event");
        if let Err(e) = self.store.add_event(event.clone()).await {
            warn!(error = %e, kind, "cannot store the event");
        }
        if let Some(tx) = &self.webhook {
            if tx.try_send(event).is_err() {
                self.metrics.webhook_failed();
                warn!(kind, "webhook queue full; event not sent");
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
            let sent = tokio::task::spawn_blocking(move || agent.post(&url).send_json(body).map(|_| ()).map_err(|e| e.to_string())).await;
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

/// Watches quotas and mapping listeners once a second, and tunnel clients as
/// their sessions begin and end, and turns changes into events.
pub struct Watcher {
    pub mappings: Arc<Mappings>,
    pub hub: Arc<TunnelHub>,
    pub recorder: Arc<Recorder>,
    pub events: Arc<Events>,
}

impl Watcher {
    pub async fn run(self, shutdown: CancellationToken) {
        let mut quotas = QuotaTracker::default();
        let mut down: BTreeMap<u16, String> = BTreeMap::new();
        let mut presence = self.hub.presence();
        // Clients whose loss was announced: their return is announced too.
        let mut lost: BTreeSet<String> = BTreeSet::new();
        let mut ticker = tokio::time::interval(WATCH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
                change = presence.recv() => {
                    match change {
                        Ok(Presence { client, connected: false }) => {
                            self.events.emit(kind::CLIENT_LOST, None, Some(&client), format!("tunnel client {client} disconnected")).await;
                            lost.insert(client);
                        }
                        Ok(Presence { client, connected: true }) => {
                            if lost.remove(&client) {
                                info!(client = %client, "tunnel client back");
                                self.events.emit(kind::CLIENT_BACK, None, Some(&client), format!("tunnel client {client} is back")).await;
                            }
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                            warn!(missed, "client presence changes came faster than events could be stored; some were not recorded");
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    }
                    continue;
                }
            }
            let policies = self.mappings.policies().await;
            for notice in quotas.check(&self.recorder, &policies).await {
                self.events.emit(notice.kind, Some(notice.port), None, notice.message).await;
            }

            let now_down: BTreeMap<u16, String> = self.mappings.unbound().await.into_iter().collect();
            for (port, why) in &now_down {
                if !down.contains_key(port) {
                    self.events.emit(kind::MAPPING_DOWN, Some(*port), None, format!("mapping on port {port} cannot listen: {why}")).await;
                }
            }
            for port in down.keys().filter(|p| !now_down.contains_key(p)) {
                if policies.iter().any(|p| p.port == *port) {
                    self.events.emit(kind::MAPPING_UP, Some(*port), None, format!("mapping on port {port} listens again")).await;
                }
            }
            down = now_down;

            // A removed client is gone on purpose: created again, it is new, not back.
            let known: BTreeSet<String> = self.hub.clients().into_iter().map(|c| c.name).collect();
            lost.retain(|name| known.contains(name));
        }
    }
}
