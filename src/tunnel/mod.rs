//! The tunnel between the roles: the wire protocol (frames, messages, the
//! HMAC handshake) and one visitor's exchange over a pooled data channel, the
//! same code on both ends.
//!
//! May import `core`, `config`, `telemetry` and `net`.

pub mod exchange;
pub mod protocol;
