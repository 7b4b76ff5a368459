//! A mapping's health: besides whether it listens (its status), whether it is
//! doing its job — judged from its own counters over the last [`WINDOW`], so the
//! page, `ctl`, `/health` and `tunneld_mapping_health` say what the Prometheus
//! counters would say over the same minutes.
//!
//! The counters only grow; the window is the difference between their value
//! now and a sample of them taken [`WINDOW`] ago (the watcher samples every
//! [`SAMPLE_EVERY`]). A verdict therefore follows a change at once (a failed
//! connect counts the moment it happens) and forgets it after the window.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::core::sync::lock;
use crate::telemetry::{health_state, refused_reason, MappingMetrics};

/// How far back a mapping's visitors count towards its health: as long as the
/// `rate(...[5m])` of the alert rules, so the page and the alerts agree.
pub(crate) const WINDOW: Duration = Duration::from_secs(300);
/// How often the counters are sampled: the window is `WINDOW` to within this.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

/// A mapping's health (the API's `health`): what an operator should look at,
/// in the order it is judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Its port cannot be bound: it serves nobody.
    Down,
    /// Tunneled, and its client is not connected: visitors are turned away.
    WaitingForTunnel,
    /// Its quota is used up and its action is `block`.
    Blocked,
    /// At least half of the window's admitted visitors could not reach the target.
    TargetFailing,
    /// At least half of the window's visitors were refused (allow/deny lists,
    /// limits), or every visitor is (a loop).
    Refusing,
    /// Nothing to act on.
    Ok,
}

impl Health {
    /// The wire and label form (`tunneld_mapping_health{health}`).
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Down => health_state::DOWN,
            Health::WaitingForTunnel => health_state::WAITING_FOR_TUNNEL,
            Health::Blocked => health_state::BLOCKED,
            Health::TargetFailing => health_state::TARGET_FAILING,
            Health::Refusing => health_state::REFUSING,
            Health::Ok => health_state::OK,
        }
    }
}

/// A mapping's health and why, in words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingHealth {
    /// The verdict.
    pub health: Health,
    /// Why, for a person: what happened in the window, or what is wrong now.
    pub reason: String,
}

/// The counters health is judged from, at one moment.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Counts {
    /// Visitors admitted (`connections_total`).
    admitted: u64,
    /// Admitted visitors whose target could not be reached (`connect_errors_total`).
    failed: u64,
    /// Visitors refused, per reason of [`refused_reason::ALL`].
    refused: [u64; 6],
}

impl Counts {
    fn read(metrics: &MappingMetrics) -> Counts {
        Counts { admitted: metrics.connections.get(), failed: metrics.connect_errors.get(), refused: metrics.refused_counts() }
    }

    /// What happened between `earlier` and `self`.
    fn since(&self, earlier: &Counts) -> Counts {
        let mut refused = [0; 6];
        for (i, slot) in refused.iter_mut().enumerate() {
            *slot = self.refused[i].saturating_sub(earlier.refused[i]);
        }
        Counts { admitted: self.admitted.saturating_sub(earlier.admitted), failed: self.failed.saturating_sub(earlier.failed), refused }
    }
}

/// One mapping's counters and their samples over the window, and the last
/// connect error in words.
pub(super) struct HealthWindow {
    metrics: MappingMetrics,
    samples: Mutex<Samples>,
    last_error: Mutex<Option<String>>,
}

/// A window's samples: when one was last due, and those that differ from the
/// one before them. A sample equal to the one before it would change no
/// verdict (the window's base is the newest sample at or before its start, and
/// the two hold the same counts), so an idle mapping keeps one sample, not the
/// window's thirty.
struct Samples {
    taken: Instant,
    kept: VecDeque<(Instant, Counts)>,
}

/// What the mapping is besides its counters, for [`HealthWindow::judge`].
pub(super) struct Condition<'a> {
    pub(super) port: u16,
    /// Why its port cannot be bound, if it cannot.
    pub(super) bind_error: Option<&'a str>,
    /// Tunneled with its client away: the client's name.
    pub(super) client_away: Option<&'a str>,
    /// Its quota blocks visitors now: why, in words.
    pub(super) quota_blocked: Option<String>,
    /// It refuses every visitor because it would forward to itself: why.
    pub(super) looping: Option<&'a str>,
    /// `host:port`.
    pub(super) target: String,
}

impl HealthWindow {
    pub(super) fn new(metrics: MappingMetrics) -> HealthWindow {
        let now = Instant::now();
        let samples = Mutex::new(Samples { taken: now, kept: VecDeque::new() });
        let window = HealthWindow { metrics, samples, last_error: Mutex::new(None) };
        window.restart(now);
        window
    }

    /// Forgets what happened so far: the window starts now (a changed policy
    /// makes earlier refusals say nothing about the new one).
    pub(super) fn restart(&self, now: Instant) {
        let mut samples = lock(&self.samples);
        samples.taken = now;
        samples.kept.clear();
        samples.kept.push_back((now, Counts::read(&self.metrics)));
        *lock(&self.last_error) = None;
    }

    /// Takes a sample when the last one is [`SAMPLE_EVERY`] old, and drops the
    /// ones the window no longer needs (all but the newest at or before its start).
    pub(super) fn sample(&self, now: Instant) {
        let mut samples = lock(&self.samples);
        if samples.kept.is_empty() || now.duration_since(samples.taken) >= SAMPLE_EVERY {
            samples.taken = now;
            let counts = Counts::read(&self.metrics);
            if samples.kept.back().map_or(true, |(_, last)| *last != counts) {
                samples.kept.push_back((now, counts));
            }
        }
        let kept = &mut samples.kept;
        let start = now.checked_sub(WINDOW);
        while kept.len() > 1 && start.is_some_and(|start| kept[1].0 <= start) {
            kept.pop_front();
        }
    }

    /// A visitor's target could not be reached: why, for the reason text.
    pub(super) fn connect_failed(&self, error: &str) {
        *lock(&self.last_error) = Some(error.to_string());
    }

    /// What happened in the window, up to now.
    fn recent(&self) -> Counts {
        let now = Counts::read(&self.metrics);
        let samples = lock(&self.samples);
        samples.kept.front().map_or(now, |(_, base)| now.since(base))
    }

    /// The mapping's health now.
    pub(super) fn judge(&self, condition: Condition) -> MappingHealth {
        let last_error = lock(&self.last_error).clone();
        verdict(condition, self.recent(), last_error.as_deref())
    }
}

/// "the last 5 minutes"
fn window_words() -> String {
    format!("the last {} minutes", WINDOW.as_secs() / 60)
}

/// Why visitors were refused, in words, most first: `acl 7 (not on the allow
/// list or on the deny list), connection_limit 2`.
fn refusal_words(refused: &[u64; 6]) -> String {
    let mut parts: Vec<(u64, &str)> = refused_reason::ALL.iter().zip(refused).filter(|(_, n)| **n > 0).map(|(r, n)| (*n, *r)).collect();
    parts.sort_by_key(|(n, _)| std::cmp::Reverse(*n));
    parts
        .iter()
        .map(|(n, reason)| {
            let why = match *reason {
                refused_reason::ACL => "the allow/deny lists",
                refused_reason::QUOTA => "the quota is used up",
                refused_reason::CONNECTION_LIMIT => "server.max_connections_per_mapping reached",
                refused_reason::NO_DESCRIPTORS => "out of file descriptors",
                refused_reason::PROCESS_LIMIT => "all visitors' share of the descriptors in use",
                refused_reason::LOOP => "it would forward to itself",
                _ => "",
            };
            format!("{reason} {n} ({why})")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The rules, in order: what cannot serve at all (down, client away, quota
/// blocked, a loop), then what the window's visitors found.
fn verdict(c: Condition, recent: Counts, last_error: Option<&str>) -> MappingHealth {
    let verdict = |health, reason: String| MappingHealth { health, reason };
    if let Some(error) = c.bind_error {
        return verdict(Health::Down, format!("cannot listen on port {}: {error} (retried every 5 s)", c.port));
    }
    if let Some(client) = c.client_away {
        return verdict(Health::WaitingForTunnel, format!("tunnel client {client} is not connected: visitors are turned away until it is"));
    }
    if let Some(why) = c.quota_blocked {
        return verdict(Health::Blocked, why);
    }
    if let Some(why) = c.looping {
        return verdict(Health::Refusing, format!("refusing every visitor: {why}"));
    }
    let refused: u64 = recent.refused.iter().sum();
    let visitors = recent.admitted + refused;
    let window = window_words();
    if recent.failed > 0 && recent.failed * 2 >= recent.admitted {
        let error = last_error.map(|e| format!("; last error: {e}")).unwrap_or_default();
        return verdict(
            Health::TargetFailing,
            format!("{} of {} visitors in {window} could not reach the target {}{error}", recent.failed, recent.admitted, c.target),
        );
    }
    if refused > 0 && refused >= recent.admitted {
        return verdict(
            Health::Refusing,
            format!("{refused} of {visitors} visitors in {window} were refused: {}", refusal_words(&recent.refused)),
        );
    }
    let mut reason = match visitors {
        0 => format!("no visitors in {window}"),
        _ => format!("{} visitors served in {window}", recent.admitted - recent.failed),
    };
    if recent.failed > 0 {
        reason.push_str(&format!("; {} could not reach the target", recent.failed));
    }
    if refused > 0 {
        reason.push_str(&format!("; {refused} refused: {}", refusal_words(&recent.refused)));
    }
    verdict(Health::Ok, reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn condition() -> Condition<'static> {
        Condition { port: 8080, bind_error: None, client_away: None, quota_blocked: None, looping: None, target: "10.0.0.1:80".into() }
    }

    fn counts(admitted: u64, failed: u64, acl: u64) -> Counts {
        Counts { admitted, failed, refused: [0, 0, acl, 0, 0, 0] }
    }

    #[test]
    fn the_worst_thing_wins_and_each_says_why() {
        let down = verdict(Condition { bind_error: Some("port in use by another process"), ..condition() }, counts(5, 5, 5), None);
        assert_eq!(down.health, Health::Down);
        assert!(down.reason.contains("port in use"), "{}", down.reason);
        let away =
            verdict(Condition { client_away: Some("office"), quota_blocked: Some("q".into()), ..condition() }, counts(0, 0, 0), None);
        assert_eq!((away.health, away.reason.contains("office")), (Health::WaitingForTunnel, true), "{}", away.reason);
        let blocked = verdict(Condition { quota_blocked: Some("quota used up".into()), ..condition() }, counts(1, 1, 0), None);
        assert_eq!((blocked.health, blocked.reason.as_str()), (Health::Blocked, "quota used up"));
        let looping = verdict(Condition { looping: Some("target is this port"), ..condition() }, counts(0, 0, 0), None);
        assert_eq!(looping.health, Health::Refusing);
    }

    #[test]
    fn the_window_decides_between_failing_refusing_and_ok() {
        let failing = verdict(condition(), counts(3, 3, 0), Some("connection refused"));
        assert_eq!(failing.health, Health::TargetFailing);
        assert!(
            failing.reason.starts_with("3 of 3 visitors in the last 5 minutes could not reach the target 10.0.0.1:80"),
            "{}",
            failing.reason
        );
        assert!(failing.reason.ends_with("last error: connection refused"), "{}", failing.reason);
        assert_eq!(verdict(condition(), counts(4, 2, 0), None).health, Health::TargetFailing, "half is failing");
        assert_eq!(verdict(condition(), counts(5, 2, 0), None).health, Health::Ok, "most were served");
        let refusing = verdict(condition(), counts(0, 0, 7), None);
        assert_eq!(refusing.health, Health::Refusing);
        assert_eq!(refusing.reason, "7 of 7 visitors in the last 5 minutes were refused: acl 7 (the allow/deny lists)");
        assert_eq!(verdict(condition(), counts(3, 0, 2), None).health, Health::Ok, "most were admitted");
        let quiet = verdict(condition(), Counts::default(), None);
        assert_eq!((quiet.health, quiet.reason.as_str()), (Health::Ok, "no visitors in the last 5 minutes"));
    }

    #[test]
    fn counts_leave_the_window_after_it() {
        let metrics = crate::telemetry::Metrics::new().add_mapping(crate::core::protocol::MappingKey::tcp(1), ["t:1", "direct", "", ""]);
        let window = HealthWindow::new(metrics.clone());
        let start = Instant::now();
        window.restart(start);
        metrics.connect_errors.inc();
        metrics.connections.inc();
        assert_eq!(window.recent(), counts(1, 1, 0), "counted at once");
        window.sample(start + SAMPLE_EVERY);
        window.sample(start + WINDOW + SAMPLE_EVERY);
        assert_eq!(window.recent(), Counts::default(), "forgotten a window later");
        metrics.refused_acl.inc();
        window.restart(start + WINDOW * 2);
        assert_eq!(window.recent(), Counts::default(), "a restart starts from now");
    }
}
