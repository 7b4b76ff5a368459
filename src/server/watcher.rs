//! Turns changes in the server's live state into events: quota thresholds,
//! mappings that lose or regain their port, tunnel clients lost and back.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::hub::{Presence, TunnelHub};
use super::mappings::Mappings;
use super::quotas::QuotaTracker;
use crate::core::protocol::MappingKey;
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
    /// The hub's [`TunnelHub::presence`], taken before the tunnel port serves,
    /// so the first clients of a restarted server are seen too.
    pub presence: tokio::sync::broadcast::Receiver<Presence>,
    pub recorder: Arc<Recorder>,
    pub events: Arc<Events>,
}

impl Watcher {
    pub(crate) async fn run(mut self, shutdown: CancellationToken) {
        let mut quotas = QuotaTracker::default();
        let mut down: BTreeMap<MappingKey, String> = BTreeMap::new();
        let mut ticker = tokio::time::interval(WATCH_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
                change = self.presence.recv() => {
                    match change {
                        Ok(Presence { client, connected: false }) => {
                            self.events.emit(EventKind::ClientLost, None, Some(&client), format!("tunnel client {client} disconnected")).await;
                        }
                        Ok(Presence { client, connected: true }) => {
                            // A client on this host turns a tunneled target on one of
                            // this daemon's own listeners into a loop: said once, here.
                            let peer = self.hub.peer_on_this_host(&client);
                            for (port, looped_client, reason) in self.mappings.looping().await {
                                if let Some(peer) = peer.filter(|_| looped_client == client) {
                                    warn!(port = port.port, protocol = %port.protocol, client = %client, %peer, %reason, "tunneled mapping refuses every visitor: it would forward to itself");
                                }
                            }
                            // Whose loss was recorded — by this process or one
                            // before a restart — is back, and that is recorded too.
                            match self.recorder.store().last_presence(&client).await {
                                Ok(Some(EventKind::ClientLost)) => {
                                    info!(client = %client, "tunnel client back");
                                    self.events.emit(EventKind::ClientBack, None, Some(&client), format!("tunnel client {client} is back")).await;
                                }
                                Ok(_) => {}
                                Err(e) => warn!(client = %client, error = %e, "cannot read the recorded client events; a return is not recorded"),
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

            let now_down: BTreeMap<MappingKey, String> = self.mappings.unbound().await.into_iter().collect();
            for (key, why) in &now_down {
                if !down.contains_key(key) {
                    self.events
                        .emit(EventKind::MappingDown, Some(key.port), None, format!("mapping on port {key} cannot listen: {why}"))
                        .await;
                }
            }
            for key in down.keys().filter(|p| !now_down.contains_key(p)) {
                if policies.iter().any(|p| p.key == *key) {
                    self.events.emit(EventKind::MappingUp, Some(key.port), None, format!("mapping on port {key} listens again")).await;
                }
            }
            down = now_down;
            self.mappings.sample_health().await;
        }
    }
}
