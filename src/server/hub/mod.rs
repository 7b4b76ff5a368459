//! The server's side of the tunnel: the registry of named clients and their live
//! sessions (`registry`), each session's pool of data channels that visitors of
//! its mappings borrow (`session`), the tunnel port with its handshake and
//! defences (`accept`, `defences`), and tunneled UDP (`quic`, `udp`, `udp_links`).
//!
//! Clients are known by name, each with its own secret. One session per name: a
//! newly authenticated connection under a name replaces that name's session, so a
//! client that restarts after a crash is back in service at once instead of
//! waiting for the dead session's heartbeat timeout. Other names are untouched.
//!
//! Every connection is TLS unless `server.tls = false`; the first byte tells a TLS
//! client from a plain one, so a mismatch (or a version-1 client) gets a clear
//! answer instead of a "malformed frame". A TLS connection whose ClientHello
//! offers the ALPN protocol `tunneld-data` is a data channel and is served
//! through rustls's unbuffered API (`net::tls_channel`); a control hello on one
//! is refused, its auth having no exporter to be bound to. Data channels are
//! reused: after a clean exchange a channel goes back into the session's idle pool.

mod accept;
mod defences;
mod quic;
mod registry;
mod session;
mod udp;
mod udp_links;

pub(crate) use registry::{HubSettings, OpenError, Presence, TunnelHub};
pub(crate) use udp::{TunnelUdpSession, UdpOpenError};
