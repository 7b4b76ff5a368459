//! systemd integration: readiness and status notifications, the watchdog, and
//! logging to journald when stderr is the journal.
//!
//! All notifications are no-ops when `NOTIFY_SOCKET` is unset, so the same binary
//! runs unchanged in a terminal, a container or a test.

use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

mod journal;

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line; sent once every listener is bound.
pub(crate) fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub(crate) fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

pub(crate) fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping: draining connections")]);
}

/// `RELOADING=1` (with `MONOTONIC_USEC`, which `Type=notify-reload` requires);
/// the role sends `READY=1` when done.
pub(crate) fn reloading() {
    match NotifyState::monotonic_usec_now() {
        Ok(now) => notify(&[NotifyState::Reloading, now, NotifyState::Status("reloading configuration")]),
        Err(_) => notify(&[NotifyState::Reloading, NotifyState::Status("reloading configuration")]),
    }
}

/// Sends `WATCHDOG=1` at half of `WATCHDOG_USEC` from a task on the main runtime:
/// if the runtime wedges, the pings stop and systemd restarts the service.
pub(crate) fn spawn_watchdog() {
    let Some(usec) = watchdog_usec() else { return };
    let period = Duration::from_micros(usec / 2);
    debug!(period_ms = period.as_millis() as u64, "watchdog enabled");
    tokio::spawn(ping_every(period, || notify(&[NotifyState::Watchdog])));
}

/// `WATCHDOG_USEC`, as `sd_watchdog_enabled(3)` reads it: `WATCHDOG_PID`, when
/// present, must be this process (a forked helper must not ping for its parent);
/// when absent the watchdog is ours.
fn watchdog_usec() -> Option<u64> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then_some(usec)
}

/// Calls `ping` every `period`, for as long as the runtime it runs on makes
/// progress — which is the point: a runtime whose threads are all stuck cannot
/// run this task, the pings stop, and systemd's watchdog fires.
async fn ping_every(period: Duration, ping: impl Fn()) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        ping();
    }
}

/// Lets a reload change the log level without restarting.
pub(crate) type LogHandle = reload::Handle<EnvFilter, Registry>;

/// Sets up logging: journald when stderr is connected to the journal (the
/// message text carries the fields, and each is a journal field too),
/// human-readable stderr otherwise. `RUST_LOG` overrides `level`.
pub(crate) fn init_logging(level: &str) -> LogHandle {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        match journal::JournalLayer::new() {
            Ok(journald) => {
                registry.with(journald).init();
                return handle;
            }
            Err(e) => eprintln!("journald unavailable ({e}); logging to stderr"),
        }
    }
    // Colours only for a person at a terminal, not in files or pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi)).init();
    handle
}

/// Applies a new level from a reloaded config, unless `RUST_LOG` pins it.
pub(crate) fn set_log_level(handle: &LogHandle, level: &str) {
    if std::env::var_os("RUST_LOG").is_some() {
        return;
    }
    match EnvFilter::try_new(level) {
        Ok(filter) => {
            if let Err(e) = handle.reload(filter) {
                warn!(error = %e, "could not change the log level");
            }
        }
        Err(e) => warn!(level, error = %e, "ignoring invalid log level"),
    }
}

/// systemd sets `JOURNAL_STREAM=dev:ino` for the stream it connects stderr to;
/// only when stderr is still that stream (not redirected by a wrapper) do we log
/// natively to the journal.
fn stderr_is_journal() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let Some(expected) = std::env::var("JOURNAL_STREAM").ok() else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    let Ok(meta) = std::fs::File::from(fd).metadata() else {
        return false;
    };
    expected == format!("{}:{}", meta.dev(), meta.ino())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn watchdog_pings_stop_while_the_runtime_is_stuck() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let pings = Arc::new(AtomicUsize::new(0));
        let counter = pings.clone();
        runtime.block_on(async move {
            tokio::spawn(ping_every(Duration::from_millis(10), move || {
                counter.fetch_add(1, Ordering::SeqCst);
            }));
            tokio::time::sleep(Duration::from_millis(100)).await;
            let before = pings.load(Ordering::SeqCst);
            assert!(before >= 3, "pings while healthy: {before}");
            // Wedge the only runtime thread, as a deadlocked or busy-looping task would.
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(pings.load(Ordering::SeqCst), before, "no ping may be sent while the runtime is stuck");
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(pings.load(Ordering::SeqCst) > before, "pings resume when the runtime does");
        });
    }
}
