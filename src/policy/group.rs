//! A client group: the tunnel clients that serve one tunneled mapping, how its
//! visitors are shared among them, and the optional active check of the target
//! through each one. Stored with the mapping and changed live, like its policy.

use serde::{Deserialize, Serialize};

/// Most clients in one group: a group is for redundancy, not a fleet.
pub(super) const MAX_GROUP_CLIENTS: usize = 32;
/// Bounds of a health check's interval and timeout, in seconds.
const MAX_CHECK_SECS: u64 = 3600;

/// How a group's visitors are shared among its connected clients.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    /// The first connected client in list order serves every visitor; the
    /// next one takes over when it drops.
    #[default]
    Failover,
    /// Each visitor goes to the next connected client in turn.
    RoundRobin,
    /// Each visitor goes to the connected client with the fewest open
    /// connections of this mapping (ties taken in turn).
    LeastConnections,
}

impl Balance {
    /// The wire form.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::Failover => "failover",
            Balance::RoundRobin => "round_robin",
            Balance::LeastConnections => "least_connections",
        }
    }
}

/// The server dials the target through each client of the group every
/// `interval_secs`; a client whose dial fails (or takes longer than
/// `timeout_secs`) gets no visitors until one succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Seconds between checks (1–3600).
    pub interval_secs: u64,
    /// Seconds a check may take (1–3600, at most `interval_secs`).
    pub timeout_secs: u64,
}

impl HealthCheck {
    /// Why these values are not acceptable, or `None`.
    pub fn invalid(&self) -> Option<String> {
        let in_range = |v: u64| (1..=MAX_CHECK_SECS).contains(&v);
        if !in_range(self.interval_secs) {
            return Some(format!("health_check.interval_secs must be between 1 and {MAX_CHECK_SECS}; got {}", self.interval_secs));
        }
        if !in_range(self.timeout_secs) {
            return Some(format!("health_check.timeout_secs must be between 1 and {MAX_CHECK_SECS}; got {}", self.timeout_secs));
        }
        if self.timeout_secs > self.interval_secs {
            return Some(format!(
                "health_check.timeout_secs ({}) must not be longer than interval_secs ({})",
                self.timeout_secs, self.interval_secs
            ));
        }
        None
    }
}

/// Why `clients` is not an acceptable group, or `None`: not empty, at most
/// [`MAX_GROUP_CLIENTS`], no name twice. (Whether each name is a known client
/// is the server's to check.)
pub fn invalid_group(clients: &[String]) -> Option<String> {
    if clients.is_empty() {
        return Some("clients must name at least one tunnel client".into());
    }
    if clients.len() > MAX_GROUP_CLIENTS {
        return Some(format!("clients may name at most {MAX_GROUP_CLIENTS} tunnel clients; got {}", clients.len()));
    }
    for (i, name) in clients.iter().enumerate() {
        if clients[..i].contains(name) {
            return Some(format!("clients names {name:?} twice"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_non_empty_lists_of_distinct_names() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(invalid_group(&names(&["a", "b"])), None);
        assert!(invalid_group(&[]).unwrap().contains("at least one"));
        assert!(invalid_group(&names(&["a", "b", "a"])).unwrap().contains("\"a\" twice"));
        let many: Vec<String> = (0..33).map(|i| format!("c{i}")).collect();
        assert!(invalid_group(&many).unwrap().contains("at most 32"));
    }

    #[test]
    fn health_checks_have_sane_bounds() {
        assert_eq!(HealthCheck { interval_secs: 5, timeout_secs: 2 }.invalid(), None);
        assert!(HealthCheck { interval_secs: 0, timeout_secs: 1 }.invalid().unwrap().contains("interval_secs"));
        assert!(HealthCheck { interval_secs: 5, timeout_secs: 0 }.invalid().unwrap().contains("timeout_secs"));
        assert!(HealthCheck { interval_secs: 2, timeout_secs: 5 }.invalid().unwrap().contains("must not be longer"));
        let wire: Balance = serde_json::from_str("\"least_connections\"").unwrap();
        assert_eq!(wire, Balance::LeastConnections);
        assert!(serde_json::from_str::<Balance>("\"random\"").unwrap_err().to_string().contains("round_robin"));
    }
}
