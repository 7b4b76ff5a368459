//! Traffic history: the recorder that turns the registry's live counters into
//! minute, hour and day buckets that outlive the process.
//!
//! May import `core`, `config`, `telemetry` and `store`.

pub(crate) mod connection_log;
mod recorder;

pub use recorder::{system_clock, Clock, Recorder};
