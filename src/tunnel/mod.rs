//! The tunnel between the roles: its messages, typed per direction and phase;
//! their framing; the HMAC handshake; the control channel's heartbeat loop that
//! both roles run; and one visitor's exchange over a pooled data channel, the
//! same code on both ends.
//!
//! May import `core`, `config`, `telemetry` and `net`.

pub mod auth;
pub(crate) mod control;
pub(crate) mod datagram;
pub(crate) mod exchange;
pub mod frame;
pub(crate) mod handshake;
pub mod message;
