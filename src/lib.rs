//! tunneld: a TCP port-forwarding and reverse-tunnel daemon whose traffic you can
//! see — live per-port Prometheus counters, a JSON API and a monitor page, all read
//! from one registry.
//!
//! The modules are floors: each imports only from the floors below it, so a
//! visitor's byte goes down — accept → policy check → relay → meter → counters —
//! without coming back up. From the bottom:
//!
//! | floor | owns |
//! |---|---|
//! | [`core`] | names, time and the calendar, secrets, the token bucket, the sent/received pair |
//! | [`config`] | the configuration: defaults, file, environment, flags, validation |
//! | [`systemd`] | readiness, status, watchdog, journald |
//! | [`telemetry`] | the Prometheus registry and the data path's meters |
//! | [`net`] | sockets, the counted relay, metered streams, TLS |
//! | [`tunnel`] | the tunnel protocol both roles speak, one exchange over a data channel |
//! | [`policy`] | a mapping's caps, quota and allow/deny lists |
//! | [`store`] | SQLite: mappings, clients, history buckets, events |
//! | [`history`] | the recorder that turns counters into history |
//! | [`events`] | where events go: the log, the table, the webhook |
//! | [`server`], [`client`] | the two roles |
//! | [`api`] | the HTTP API, its contract and the monitor page |
//! | [`cli`] | the process: command line, daemon wiring, `tunneld ctl` |
#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

pub mod api;
pub mod cli;
pub(crate) mod client;
pub mod config;
pub mod core;
pub(crate) mod events;
pub mod history;
pub mod net;
pub mod policy;
pub(crate) mod server;
pub mod store;
pub(crate) mod systemd;
pub mod telemetry;
pub mod tunnel;
