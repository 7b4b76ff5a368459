//! A tunneled mapping's client group at run time: which of its clients a
//! visitor goes to (the balance mode over the connected ones that pass their
//! health checks), how many of its connections each one serves now, and the
//! health checks of the target through each one.
//!
//! A mapping with one `client` is a group of one: the same code, the same
//! single choice it always had.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prometheus::IntCounter;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::core::protocol::MappingKey;
use crate::core::sync::{lock, read, write};
use crate::policy::{Balance, HealthCheck};
use crate::server::hub::TunnelHub;
use crate::store::MappingSpec;
use crate::telemetry::Metrics;

/// A mapping's group, changed live by `/api/mapping/update`.
pub(super) struct Group {
    /// Its mapping's.
    key: MappingKey,
    metrics: Arc<Metrics>,
    members: RwLock<Arc<Members>>,
    /// Whose turn is next (round robin, and ties of least connections).
    turn: AtomicUsize,
    /// Told when the group changes, so the health checks follow at once.
    changed: Notify,
}

/// The group as configured now.
pub(super) struct Members {
    pub(super) balance: Balance,
    pub(super) health_check: Option<HealthCheck>,
    /// In the order the mapping names them.
    pub(super) list: Vec<Arc<Member>>,
}

/// One client of a group.
pub(super) struct Member {
    pub(super) name: Arc<str>,
    /// This mapping's connections it serves now.
    active: AtomicUsize,
    /// While its last health check failed: why.
    failing: Mutex<Option<String>>,
    /// `tunneld_mapping_client_connections_total{port, protocol, client}`.
    visitors: IntCounter,
}

impl Member {
    /// Its last health check's failure, if the check fails now.
    pub(super) fn check_error(&self) -> Option<String> {
        lock(&self.failing).clone()
    }

    /// This mapping's connections it serves now.
    pub(super) fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// It took a visitor: counted until the returned guard drops.
    pub(super) fn serve(self: &Arc<Self>) -> Serving {
        self.visitors.inc();
        self.active.fetch_add(1, Ordering::Relaxed);
        Serving(self.clone())
    }
}

/// A visitor served through a member; its connection count drops with it.
pub(super) struct Serving(Arc<Member>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the API shows of one client of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    pub client: String,
    /// Its session is up.
    pub connected: bool,
    /// New visitors may go to it now.
    pub serving: bool,
    /// The mapping's connections it serves now.
    pub active_connections: usize,
    /// While its health check fails: why.
    pub check_error: Option<String>,
}

impl Group {
    pub(super) fn new(spec: &MappingSpec, metrics: Arc<Metrics>) -> Group {
        let group = Group {
            key: spec.key(),
            metrics,
            members: RwLock::new(Arc::new(Members { balance: spec.balance, health_check: None, list: Vec::new() })),
            turn: AtomicUsize::new(0),
            changed: Notify::new(),
        };
        group.configure(spec);
        group
    }

    /// The group as configured now.
    pub(super) fn members(&self) -> Arc<Members> {
        read(&self.members).clone()
    }

    /// Takes `spec`'s clients, balance and health check. A client that stays
    /// keeps its counts and its check's verdict; one that leaves loses its series.
    pub(super) fn configure(&self, spec: &MappingSpec) {
        let mut members = write(&self.members);
        let old = members.list.clone();
        let list = spec
            .clients
            .iter()
            .map(|name| match old.iter().find(|m| &*m.name == name.as_str()) {
                Some(kept) => kept.clone(),
                None => Arc::new(Member {
                    name: Arc::from(name.as_str()),
                    active: AtomicUsize::new(0),
                    failing: Mutex::new(None),
                    visitors: self.metrics.mapping_client(self.key, name),
                }),
            })
            .collect::<Vec<_>>();
        for gone in old.iter().filter(|m| !spec.clients.iter().any(|n| n.as_str() == &*m.name)) {
            self.metrics.remove_mapping_client(self.key, &gone.name);
        }
        if spec.health_check.is_none() {
            for member in &list {
                *lock(&member.failing) = None;
            }
        }
        *members = Arc::new(Members { balance: spec.balance, health_check: spec.health_check, list });
        drop(members);
        self.changed.notify_waiters();
    }

    /// Drops every member's series: the mapping is gone.
    pub(super) fn remove_series(&self) {
        for member in &self.members().list {
            self.metrics.remove_mapping_client(self.key, &member.name);
        }
    }

    /// The members that may take a new visitor now, best first: the connected
    /// ones that pass their health checks (when none does, every connected
    /// one: the target may be down for all, and they say why), ordered by the
    /// balance mode. Empty when none is connected.
    pub(super) fn eligible(&self, hub: &TunnelHub) -> Vec<Arc<Member>> {
        let members = self.members();
        let connected: Vec<Arc<Member>> = members.list.iter().filter(|m| hub.connected(&m.name)).cloned().collect();
        let passing: Vec<Arc<Member>> = connected.iter().filter(|m| lock(&m.failing).is_none()).cloned().collect();
        let order = if passing.is_empty() { connected } else { passing };
        self.ordered(members.balance, order)
    }

    fn ordered(&self, balance: Balance, mut order: Vec<Arc<Member>>) -> Vec<Arc<Member>> {
        if order.len() < 2 || balance == Balance::Failover {
            return order;
        }
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % order.len();
        order.rotate_left(start);
        if balance == Balance::LeastConnections {
            // Stable: among equals, whose turn it is comes first.
            order.sort_by_key(|m| m.active());
        }
        order
    }

    /// Where a visitor is sent, in the order to try: [`Group::eligible`], or
    /// with none connected the first member, whose absence the visitor's error
    /// then names, as a mapping with one client always did.
    pub(super) fn candidates(&self, hub: &TunnelHub) -> Vec<Arc<Member>> {
        // A group of one has one choice, made as it always was: no lookups.
        if let [only] = self.members().list.as_slice() {
            return vec![only.clone()];
        }
        let eligible = self.eligible(hub);
        if eligible.is_empty() {
            return self.members().list.first().cloned().into_iter().collect();
        }
        eligible
    }

    /// Each member as the API shows it.
    pub(super) fn view(&self, hub: &TunnelHub) -> Vec<MemberView> {
        let members = self.members();
        let eligible: Vec<Arc<Member>> = {
            let connected: Vec<Arc<Member>> = members.list.iter().filter(|m| hub.connected(&m.name)).cloned().collect();
            let passing: Vec<Arc<Member>> = connected.iter().filter(|m| lock(&m.failing).is_none()).cloned().collect();
            if passing.is_empty() {
                connected
            } else {
                passing
            }
        };
        // Failover: only the first eligible one takes visitors.
        let serving = |m: &Arc<Member>| match members.balance {
            Balance::Failover => eligible.first().is_some_and(|first| Arc::ptr_eq(first, m)),
            _ => eligible.iter().any(|e| Arc::ptr_eq(e, m)),
        };
        members
            .list
            .iter()
            .map(|m| MemberView {
                client: m.name.to_string(),
                connected: hub.connected(&m.name),
                serving: serving(m),
                active_connections: m.active(),
                check_error: m.check_error(),
            })
            .collect()
    }

    /// With a health check configured: dials the target through each connected
    /// member every interval, until `cancel`. A member whose dial fails takes
    /// no visitors until one succeeds; changes are logged once each.
    pub(super) async fn run_health_checks(self: Arc<Self>, hub: Arc<TunnelHub>, host: String, port: u16, cancel: CancellationToken) {
        loop {
            let members = self.members();
            let changed = self.changed.notified();
            let Some(check) = members.health_check else {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = changed => continue,
                }
            };
            let timeout = Duration::from_secs(check.timeout_secs);
            let group = &self;
            let probes = members.list.iter().map(|member| {
                let (hub, host) = (hub.clone(), host.clone());
                async move {
                    if !hub.connected(&member.name) {
                        return;
                    }
                    let verdict = match tokio::time::timeout(timeout, hub.probe(&member.name, &host, port)).await {
                        Ok(result) => result.err(),
                        Err(_) => Some(format!("no answer within {} s", check.timeout_secs)),
                    };
                    group.record_check(member, verdict, &host, port);
                }
            });
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = futures_util::future::join_all(probes) => {}
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = changed => {}
                _ = tokio::time::sleep(Duration::from_secs(check.interval_secs)) => {}
            }
        }
    }

    fn record_check(&self, member: &Member, verdict: Option<String>, host: &str, target_port: u16) {
        let mut failing = lock(&member.failing);
        match (&*failing, &verdict) {
            (None, Some(error)) => warn!(
                port = self.key.port,
                client = %member.name,
                target = %format!("{host}:{target_port}"),
                %error,
                "health check failed: this client of the group gets no visitors until a check succeeds"
            ),
            (Some(_), None) => {
                info!(port = self.key.port, client = %member.name, "health check passes again: this client of the group takes visitors")
            }
            _ => {}
        }
        *failing = verdict;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::protocol::Protocol;

    fn group(names: &[&str], balance: Balance) -> Group {
        let spec = MappingSpec {
            source_port: 4000,
            protocol: Protocol::Tcp,
            target_host: "10.0.0.5".into(),
            target_port: 22,
            use_tunnel: true,
            client: names.first().map(|n| n.to_string()),
            clients: names.iter().map(|n| n.to_string()).collect(),
            balance,
            health_check: None,
            created_at: 0,
            source: crate::store::Source::Api,
        };
        Group::new(&spec, Arc::new(Metrics::new()))
    }

    fn picks(g: &Group, balance: Balance, n: usize) -> Vec<String> {
        (0..n).map(|_| g.ordered(balance, g.members().list.clone())[0].name.to_string()).collect()
    }

    #[test]
    fn failover_keeps_list_order_and_round_robin_takes_turns() {
        let g = group(&["a", "b", "c"], Balance::Failover);
        assert_eq!(picks(&g, Balance::Failover, 3), ["a", "a", "a"]);
        assert_eq!(picks(&g, Balance::RoundRobin, 6), ["a", "b", "c", "a", "b", "c"]);
    }

    #[test]
    fn least_connections_prefers_the_idlest_and_takes_turns_among_equals() {
        let g = group(&["a", "b", "c"], Balance::LeastConnections);
        let members = g.members();
        let held: Vec<Serving> = vec![members.list[0].serve(), members.list[0].serve(), members.list[1].serve()];
        assert_eq!(picks(&g, Balance::LeastConnections, 2), ["c", "c"]);
        drop(held);
        let even = picks(&g, Balance::LeastConnections, 3);
        assert!(even.contains(&"a".to_string()) && even.contains(&"b".to_string()) && even.contains(&"c".to_string()), "{even:?}");
    }

    #[test]
    fn a_client_that_stays_in_a_changed_group_keeps_its_counts_and_one_that_leaves_loses_its_series() {
        let metrics = Arc::new(Metrics::new());
        let mut spec = MappingSpec {
            source_port: 4001,
            protocol: Protocol::Tcp,
            target_host: "10.0.0.5".into(),
            target_port: 22,
            use_tunnel: true,
            client: Some("a".into()),
            clients: vec!["a".into(), "b".into()],
            balance: Balance::Failover,
            health_check: None,
            created_at: 0,
            source: crate::store::Source::Api,
        };
        let g = Group::new(&spec, metrics.clone());
        let _open = g.members().list[0].serve();
        spec.clients = vec!["c".into(), "a".into()];
        g.configure(&spec);
        let members = g.members();
        assert_eq!(members.list.iter().map(|m| m.name.to_string()).collect::<Vec<_>>(), ["c", "a"]);
        assert_eq!(members.list[1].active(), 1, "a keeps its open connection");
        let text = metrics.render();
        assert!(text.contains(r#"tunneld_mapping_client_connections_total{client="a",port="4001",protocol="tcp"} 1"#), "{text}");
        assert!(!text.contains(r#"client="b",port="4001""#), "b's series went with it");
    }
}
