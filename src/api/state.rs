//! What every handler reads: the server role's parts and the API's settings.

use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;

use super::guard::Guard;
use crate::history::Recorder;
use crate::server::hub::TunnelHub;
use crate::server::mappings::Mappings;
use crate::telemetry::Metrics;

/// What every handler reads: the server role's parts and the API's settings.
#[derive(Clone)]
pub struct AppState {
    /// The mappings: what the mapping routes change and every report lists.
    pub mappings: Arc<Mappings>,
    /// The registry every traffic number is read from.
    pub metrics: Arc<Metrics>,
    /// The tunnel clients: who is known, who is connected.
    pub hub: Arc<TunnelHub>,
    /// Traffic history: lifetime totals and the stored buckets.
    pub recorder: Arc<Recorder>,
    /// Empty: no authentication (only allowed on loopback, see config). Swapped
    /// in place on reload.
    pub token: Arc<RwLock<Arc<str>>>,
    /// Ends long-lived responses (SSE) so a graceful shutdown does not hang.
    pub shutdown: CancellationToken,
    /// Host, Origin and CORS rules (see [`super::guard`]).
    pub guard: Arc<Guard>,
}

impl AppState {
    pub(super) fn recorder_store(&self) -> &crate::store::Store {
        self.recorder.store()
    }
}
