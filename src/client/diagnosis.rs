//! Why this client cannot connect, said the same way in its log, its systemd
//! `STATUS=` and its `/metrics`.
//!
//! Each failed attempt is a [`ConnectFailure`]: a reason (the `reason` label of
//! `tunneld_client_connect_failures_total`) and words an operator can act on.
//! Once the server throttles this address it refuses attempts unheard — no
//! certificate to check, no secret to try — so a throttled attempt says how long
//! the server refuses it *and* what the last attempt it did answer failed for:
//! a wrong fingerprint stays "pin mismatch" for as long as it is wrong, instead
//! of turning into "throttled" after the burst.

use std::time::Duration;

use crate::telemetry::connect_failure::{THROTTLED, UNREACHABLE};

/// One failed attempt to connect: what it ran into.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct ConnectFailure {
    /// A `telemetry::connect_failure` reason.
    pub(super) reason: &'static str,
    pub(super) message: String,
    /// Throttled: how long the server said it refuses this address (absent
    /// from servers that do not say).
    pub(super) retry_after: Option<Duration>,
}

impl ConnectFailure {
    pub(super) fn new(reason: &'static str, message: impl Into<String>) -> ConnectFailure {
        ConnectFailure { reason, message: message.into(), retry_after: None }
    }

    pub(super) fn throttled(message: impl Into<String>, retry_after: Option<Duration>) -> ConnectFailure {
        ConnectFailure { reason: THROTTLED, message: message.into(), retry_after }
    }
}

/// What the client knows about why it is not connected, across attempts.
#[derive(Default)]
pub(super) struct Diagnosis {
    /// The last failure the server answered (not a throttled refusal, not an
    /// unreachable address): what is wrong on this side, as far as it knows.
    cause: Option<(&'static str, String)>,
}

/// One failed attempt as the client reports it.
pub(super) struct Report {
    /// The reason the attempt ran into.
    pub(super) attempt: &'static str,
    /// What is wrong: the attempt's reason, or while throttled the cause found before.
    pub(super) cause: &'static str,
    /// For the log and `STATUS=`.
    pub(super) message: String,
    /// Wait at least this long before the next attempt: the server refuses
    /// this address until then.
    pub(super) retry_after: Option<Duration>,
}

impl Diagnosis {
    /// Connected: the causes found before no longer hold.
    pub(super) fn connected(&mut self) {
        self.cause = None;
    }

    /// Takes in a failed attempt and says what is wrong.
    pub(super) fn failed(&mut self, failure: &ConnectFailure) -> Report {
        let attempt = failure.reason;
        let retry_after = failure.retry_after;
        if attempt != THROTTLED {
            if attempt != UNREACHABLE {
                self.cause = Some((attempt, failure.message.clone()));
            }
            return Report { attempt, cause: attempt, message: failure.message.clone(), retry_after };
        }
        let (cause, message) = match &self.cause {
            Some((cause, why)) => (*cause, format!("{}; the last attempt the server answered failed: {why}", failure.message)),
            None => (
                THROTTLED,
                format!(
                    "{} (this client's own attempts did not fail: if its name, secret and fingerprint are right, another \
                     program at the same address is failing to authenticate)",
                    failure.message
                ),
            ),
        };
        Report { attempt, cause, message, retry_after }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::connect_failure::{AUTH_REFUSED, PIN_MISMATCH};

    #[test]
    fn a_throttled_attempt_keeps_the_cause_the_server_last_answered_with() {
        let mut d = Diagnosis::default();
        let pin = d.failed(&ConnectFailure::new(PIN_MISMATCH, "fingerprint sha256:aa does not match the pinned sha256:bb"));
        assert_eq!((pin.attempt, pin.cause), (PIN_MISMATCH, PIN_MISMATCH));
        let throttled = d.failed(&ConnectFailure::throttled("refused for 12 s", Some(Duration::from_secs(12))));
        assert_eq!((throttled.attempt, throttled.cause), (THROTTLED, PIN_MISMATCH));
        assert!(throttled.message.contains("refused for 12 s") && throttled.message.contains("does not match the pinned"));
        assert_eq!(throttled.retry_after, Some(Duration::from_secs(12)));
        // An unreachable server says nothing about the pin: the cause stays.
        d.failed(&ConnectFailure::new(UNREACHABLE, "connection refused"));
        assert_eq!(d.failed(&ConnectFailure::throttled("refused", None)).cause, PIN_MISMATCH);
        d.failed(&ConnectFailure::new(AUTH_REFUSED, "wrong secret"));
        assert_eq!(d.failed(&ConnectFailure::throttled("refused", None)).cause, AUTH_REFUSED);
        d.connected();
        let stranger = d.failed(&ConnectFailure::throttled("refused", None));
        assert_eq!(stranger.cause, THROTTLED);
        assert!(stranger.message.contains("another program"), "{}", stranger.message);
    }
}
