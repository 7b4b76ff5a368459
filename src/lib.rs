//! tunneld: a TCP port-forwarding and reverse-tunnel daemon whose traffic you can
//! see — live per-port Prometheus counters, a JSON API and a monitor page, all read
//! from one registry.
#![forbid(unsafe_code)]

pub mod alerts;
pub mod api;
pub mod client;
pub mod config;
pub mod ctl;
pub mod exchange;
pub mod forward;
pub mod history;
pub mod metered;
pub mod metrics;
pub mod policy;
pub mod protocol;
pub mod quota;
pub mod server;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod transport;
