//! Sockets and streams: how bytes move, are counted and are protected, with no
//! idea of mappings or clients.
//!
//! - [`socket`]: listeners, accepting through descriptor exhaustion, dialing;
//! - [`descriptors`]: the share of the open-file limit outside connections may use;
//! - [`relay`]: the counted copy between two sockets and how it ends;
//! - [`splice`]: the relays' pipes, to move a mapping's bytes in the kernel (direct, or a plain tunnel's chunks);
//! - [`metered`]: a stream that counts its wire bytes into tunnel meters;
//! - [`tls`]: the tunnel's TLS identity, trust and handshake errors;
//! - [`tls_channel`]: a data channel's TLS (client or server): rustls's handshake, then its own record layer;
//! - [`transport`]: a tunnel connection, TLS or plain;
//! - [`quic`]: QUIC on the tunnel port over UDP, with the tunnel's TLS;
//! - [`udp`]: UDP sockets toward a target, read without a buffer per socket;
//! - [`proxy_header`]: the PROXY protocol header that tells a target who the visitor is.
//!
//! May import `core`, `config` and `telemetry`.

pub(crate) mod descriptors;
pub mod metered;
pub mod proxy_header;
pub(crate) mod quic;
pub(crate) mod relay;
pub(crate) mod socket;
pub(crate) mod splice;
pub mod tls;
pub mod tls_channel;
pub mod transport;
pub(crate) mod udp;
