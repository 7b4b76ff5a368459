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

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        debug!(error = %e, "sd_notify failed");
    }
}

/// `READY=1` with a status line; sent once every listener is bound.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping: draining connections")]);
}

pub fn reloading() {
    notify(&[NotifyState::Reloading, NotifyState::Status("reloading configuration")]);
}

/// Sends `WATCHDOG=1` at half of `WATCHDOG_USEC` from a task on the main runtime:
/// if the runtime wedges, the pings stop and systemd restarts the service.
pub fn spawn_watchdog() {
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let period = Duration::from_micros(usec / 2);
    debug!(period_ms = period.as_millis() as u64, "watchdog enabled");
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            notify(&[NotifyState::Watchdog]);
        }
    });
}

/// Lets a reload change the log level without restarting.
pub type LogHandle = reload::Handle<EnvFilter, Registry>;

/// Sets up logging: journald (structured fields kept) when stderr is connected to
/// the journal, human-readable stderr otherwise. `RUST_LOG` overrides `level`.
pub fn init_logging(level: &str) -> LogHandle {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if stderr_is_journal() {
        match tracing_journald::layer() {
            Ok(journald) => {
                registry.with(journald).init();
                return handle;
            }
            Err(e) => eprintln!("journald unavailable ({e}); logging to stderr"),
        }
    }
    registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init();
    handle
}

/// Applies a new level from a reloaded config, unless `RUST_LOG` pins it.
pub fn set_log_level(handle: &LogHandle, level: &str) {
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
