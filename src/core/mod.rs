//! The bottom floor: vocabulary every layer shares — client names, the characters
//! free text may not carry, time and the
//! calendar of history periods, secrets, the token bucket that paces traffic, and
//! the sent/received pair every traffic number comes as, and the tally that turns
//! a flood of failures into a line and a summary.
//!
//! It imports nothing of this crate, so anything may import it.

pub(crate) mod calendar;
pub(crate) mod failure_log;
pub(crate) mod names;
pub mod protocol;
pub(crate) mod rate;
pub mod secret;
pub(crate) mod sync;
pub(crate) mod text;
pub(crate) mod time;
pub mod traffic;
