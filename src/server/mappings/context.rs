//! What every mapping task and visitor needs: the shared services, the
//! settings, and the two shutdown phases.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::core::failure_log::{FailureLog, Summary};
use crate::core::sync::lock;
use crate::net::descriptors::DescriptorBudget;
use crate::net::splice::Pipes;
use crate::server::connections::Connections;
use crate::server::hub::TunnelHub;
use crate::store::Store;
use crate::telemetry::Metrics;

/// Refused visitors beyond the first of a port and reason are logged as one
/// summary per this interval.
pub(super) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// Refused visitors by port and reason, with the last one's error.
pub(super) type RefusalLog = FailureLog<(u16, &'static str), String>;

/// How mappings behave, from `server.*` and the daemon's own ports.
pub(crate) struct Settings {
    pub bind_addr: IpAddr,
    /// The API's and the tunnel's own ports: never mappable.
    pub reserved_ports: Vec<(u16, &'static str)>,
    pub connect_timeout: Duration,
    /// `server.max_connections_per_mapping`.
    pub max_connections: usize,
    /// `server.idle_timeout_secs`.
    pub idle_timeout: Duration,
    /// `server.udp_session_idle_secs`: a UDP session this long without a
    /// datagram either way ends.
    pub udp_session_idle: Duration,
    /// `server.max_udp_sessions_per_mapping`.
    pub max_udp_sessions: usize,
    /// `server.max_udp_datagram_bytes`.
    pub max_udp_datagram: usize,
}

/// What every mapping task needs.
pub(super) struct Ctx {
    pub(super) store: Store,
    pub(super) metrics: Arc<Metrics>,
    pub(super) hub: Arc<TunnelHub>,
    pub(super) settings: Settings,
    /// Shutdown, phase 1: listeners close.
    pub(super) stop_accepting: CancellationToken,
    /// Shutdown, phase 2: open connections are cut.
    pub(super) abort: CancellationToken,
    pub(super) connections: TaskTracker,
    /// Every mapped port, kept by the registry as mappings come and go: what
    /// each visitor of a tunneled mapping is checked against (see
    /// `Ctx::tunnel_loop`) without the registry's lock.
    pub(super) mapped_ports: RwLock<BTreeSet<crate::core::protocol::MappingKey>>,
    /// The descriptors all visitors of all mappings may hold together.
    pub(super) descriptors: DescriptorBudget,
    /// The pipes direct visitors' relays splice through, out of `descriptors`.
    pub(super) pipes: Pipes,
    /// Refused visitors, for the log: a target that is down refuses every
    /// visitor, and one line each would bury everything else.
    pub(super) refusals: Mutex<RefusalLog>,
    /// Every open visitor connection, and the log of ended ones.
    pub(super) live: Arc<Connections>,
}

impl Ctx {
    /// Counts a refused visitor of `port` for the log; `true` when it is the
    /// first of its port and `reason` in the interval, to be logged in full by
    /// the caller. The rest are summarised by [`Ctx::summarise_refusals`].
    pub(super) fn first_refusal(&self, port: u16, reason: &'static str, error: &str) -> bool {
        lock(&self.refusals).record((port, reason), error.to_string(), Instant::now())
    }

    /// Logs, once per interval, how many visitors each port refused for each
    /// reason beyond the one logged in full, until the listeners close.
    pub(super) async fn summarise_refusals(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REFUSAL_LOG_INTERVAL / 4);
        loop {
            tokio::select! {
                _ = self.stop_accepting.cancelled() => return,
                _ = tick.tick() => {}
            }
            let summaries = lock(&self.refusals).drain(Instant::now());
            log_refusals(summaries);
        }
    }

    /// At shutdown: what the interval counted so far, so no count is lost.
    pub(super) fn flush_refusals(&self) {
        let summaries = lock(&self.refusals).flush(Instant::now());
        log_refusals(summaries);
    }
}

fn log_refusals(summaries: Vec<Summary<(u16, &'static str), String>>) {
    for s in summaries {
        let ((port, reason), count) = (s.key, s.count);
        warn!(port, reason, count, last_error = %s.last, interval_secs = REFUSAL_LOG_INTERVAL.as_secs(), "more visitors refused on this port");
    }
}
