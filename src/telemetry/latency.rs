//! How long things take: a visitor's connect to its target and its whole
//! connection (histograms per mapping), and the tunnel's heartbeat round trip
//! (a histogram and the latest value per client). The connect times also go
//! to the mapping's reservoir, for the API's quantiles (`reservoir`).

use std::time::{Duration, Instant};

use prometheus::{Gauge, Histogram};

use super::series::MappingMetrics;

/// One admitted visitor, from accept until it is dropped: it is counted in
/// `tunneld_mapping_active_connections` meanwhile, its connect time is recorded
/// when its target answers ([`Visit::target_answered`]), and how long it lasted
/// when it ends — however it ends.
pub struct Visit {
    pub(super) mapping: MappingMetrics,
    pub(super) started: Instant,
}

impl Visit {
    /// The target answered: directly, the TCP connect completed; through the
    /// tunnel, the client's `connect_result` arrived. Called once per visitor.
    pub(crate) fn target_answered(&self) {
        let now = Instant::now();
        let seconds = now.duration_since(self.started).as_secs_f64();
        self.mapping.connect_duration.observe(seconds);
        self.mapping.connect_samples.record(now, seconds);
    }
}

impl Drop for Visit {
    fn drop(&mut self) {
        self.mapping.active.dec();
        self.mapping.connection_duration.observe(self.started.elapsed().as_secs_f64());
    }
}

/// Where one side of a client's tunnel records its heartbeat round trips.
#[derive(Clone)]
pub struct RoundTrips {
    pub(super) histogram: Histogram,
    pub(super) last: Gauge,
}

impl RoundTrips {
    /// A heartbeat's echo came back after `rtt`.
    pub(crate) fn record(&self, rtt: Duration) {
        let seconds = rtt.as_secs_f64();
        self.histogram.observe(seconds);
        self.last.set(seconds);
    }
}
