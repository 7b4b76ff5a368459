//! What every mapping task and visitor needs: the shared services, the
//! settings, and the two shutdown phases.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::net::descriptors::DescriptorBudget;
use crate::server::hub::TunnelHub;
use crate::store::Store;
use crate::telemetry::Metrics;

/// How mappings behave, from `server.*` and the daemon's own ports.
pub struct Settings {
    pub bind_addr: IpAddr,
    /// The API's and the tunnel's own ports: never mappable.
    pub reserved_ports: Vec<(u16, &'static str)>,
    pub connect_timeout: Duration,
    /// `server.max_connections_per_mapping`.
    pub max_connections: usize,
    /// `server.idle_timeout_secs`.
    pub idle_timeout: Duration,
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
    pub(super) mapped_ports: RwLock<BTreeSet<u16>>,
    /// The descriptors all visitors of all mappings may hold together.
    pub(super) descriptors: DescriptorBudget,
}
