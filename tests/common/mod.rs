//! Shared helpers for integration tests that drive the real `tunneld` binary.
//!
//! Readiness comes from the daemon itself: each spawned daemon gets its own
//! `NOTIFY_SOCKET` (a Unix datagram socket in a temp dir) and the helpers wait for
//! `READY=1` / `STATUS=` messages on it instead of sleeping.
//!
//! One module per concern, all re-exported here so a test file says
//! `use common::*;`:
//! - [`daemon`]: spawning servers and clients and waiting for them;
//! - [`http`]: calls to the API and the mappings and clients they create;
//! - [`net`]: targets, echo servers, visitors and free ports;
//! - [`metrics`]: scraping `/metrics`;
//! - [`files`]: config files and files of this repository;
//! - [`browser`]: headless Chromium over the DevTools pipe;
//! - [`tools`]: outside programs a test may need, skipped loudly when missing;
//! - [`systemd`]: a real systemd booted in its own namespaces, for the package;
//! - [`netns`]: network namespaces joined by veth, as separate hosts;
//! - [`udp`]: UDP echo targets, visitors and a UDP mapping's series;
//! - [`tunnel`]: TLS connections to the tunnel port from chosen sources, and the
//!   control handshake, through the crate's own types.
//!
//! Each test binary uses a subset of these, hence `dead_code` (and, for the
//! re-exports, `unused_imports`) is allowed here.
#![allow(dead_code)]

pub mod browser;
pub mod daemon;
pub mod files;
pub mod http;
pub mod metrics;
pub mod net;
pub mod netns;
pub mod strace;
pub mod systemd;
pub mod tools;
pub mod tunnel;
pub mod udp;

#[allow(unused_imports)]
pub use {daemon::*, files::*, http::*, metrics::*, net::*};

use std::time::{Duration, Instant};

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after
/// `timeout`. For conditions the daemon has no event for (a counter reaching a
/// value); never a fixed sleep.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `n` pseudo-random bytes from `seed` (xorshift: fast even unoptimised, and
/// the same seed gives the same bytes to compare against).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(n);
    out
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut v);
    v
}

/// SHA-256 of `data`, for comparing what arrived with what was sent.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Seconds since the Unix epoch, as the daemon's history and metrics timestamps
/// count them.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock after 1970").as_secs_f64()
}
