//! Turns changes in the server's live state into events: quota thresholds,
//! mappings that lose or regain their port, tunnel clients lost and back.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::hub::{Presence, TunnelHub};
use super::mappings::Mappings;
use super::quotas::QuotaTracker;
use crate::events::Events;
use crate::history::Recorder;
use crate::store::events::EventKind;

/// How often the watcher looks at quotas and listeners.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Watches quotas and mapping listeners once a second, and tunnel clients as
/// their sessions begin and end, and turns changes into events.
pub(crate) struct Watcher {
    pub mappings: Arc<Mappings>,
    pub hub: Arc<TunnelHub>,
    pub recorder: Arc<Recorder>,
    pub events: Arc<Events>,
}

impl Watcher {
    pub(crate) async fn run(self, shutdown: CancellationToken) {
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
                            self.events.emit(EventKind::ClientLost, None, Some(&client), format!("tunnel client {client} disconnected")).await;
                            lost.insert(client);
                        }
                        Ok(Presence { client, connected: true }) => {
                            // A client on this host turns a tunneled target on one of
                            // this daemon's own listeners into a loop: said once, here.
                            let peer = self.hub.peer_on_this_host(&client);
                            for (port, looped_client, reason) in self.mappings.looping().await {
                                if let Some(peer) = peer.filter(|_| looped_client == client) {
                                    warn!(port, client = %client, %peer, %reason, "tunneled mapping refuses every visitor: it would forward to itself");
                                }
                            }
                            if lost.remove(&client) {
                                info!(client = %client, "tunnel client back");
                                self.events.emit(EventKind::ClientBack, None, Some(&client), format!("tunnel client {client} is back")).await;
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
                    self.events
                        .emit(EventKind::MappingDown, Some(*port), None, format!("mapping on port {port} cannot listen: {why}"))
                        .await;
                }
            }
            for port in down.keys().filter(|p| !now_down.contains_key(p)) {
                if policies.iter().any(|p| p.port == *port) {
                    self.events.emit(EventKind::MappingUp, Some(*port), None, format!("mapping on port {port} listens again")).await;
                }
            }
            down = now_down;
            self.mappings.sample_health().await;

            // A removed client is gone on purpose: created again, it is new, not back.
            let known: BTreeSet<String> = self.hub.clients().into_iter().map(|c| c.name).collect();
            lost.retain(|name| known.contains(name));
        }
    }
}
