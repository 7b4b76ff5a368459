//! The bottom floor: vocabulary every layer shares — client names, time and the
//! calendar of history periods, secrets, the token bucket that paces traffic, and
//! the sent/received pair every traffic number comes as.
//!
//! It imports nothing of this crate, so anything may import it.

pub mod calendar;
pub mod names;
pub mod rate;
pub mod secret;
pub mod sync;
pub mod time;
pub mod traffic;
