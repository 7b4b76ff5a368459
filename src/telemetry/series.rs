//! A mapping's series: every per-mapping family's value held as plain atomics
//! in one allocation per mapping, and written straight into the text
//! exposition.
//!
//! Why not the `prometheus` crate's vectors: each of their series is a separate
//! allocation carrying its own copy of the family's description (name, HELP)
//! and its label pairs, and every scrape turns each series into protobuf
//! messages before writing text. A mapping has 23 series and two histograms,
//! so with 2,000 idle mappings those copies were most of the server's memory,
//! and a scrape or a traffic report built about 100,000 messages. Here a
//! mapping costs one block of counters, and reading it back allocates nothing
//! per series. Names, HELP, label order, escaping and values are those the
//! crate wrote; only the order of a family's series differs (by port number
//! here, by label text there), which the text format leaves open.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use super::families::{
    dropped_reason, health_state, refused_reason, relay_path, Family, CONNECTION_DURATION_BUCKETS, DIRECTION, LATENCY_BUCKETS,
    MAPPING_ACTIVE, MAPPING_BYTES, MAPPING_CONNECTIONS, MAPPING_CONNECTION_DURATION, MAPPING_CONNECT_DURATION, MAPPING_CONNECT_ERRORS,
    MAPPING_DATAGRAMS, MAPPING_DROPPED_DATAGRAMS, MAPPING_HEALTH, MAPPING_INFO, MAPPING_LAST_ACTIVITY, MAPPING_QUOTA_BYTES,
    MAPPING_QUOTA_USED, MAPPING_REFUSED, MAPPING_RELAYED, MAPPING_UDP_SESSIONS, MAPPING_UP, RECEIVED, SENT,
};
use super::reservoir::Reservoir;
use crate::core::protocol::{MappingKey, Protocol};
use crate::core::sync::lock;

/// A counter: only grows.
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// Adds `n`.
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The count now.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge of whole numbers.
#[derive(Default)]
pub struct IntGauge(AtomicI64);

impl IntGauge {
    /// Sets it to `v`.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes one away.
    pub fn dec(&self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A gauge of any real number (its bits in an atomic).
#[derive(Default)]
pub struct Gauge(AtomicU64);

impl Gauge {
    /// Sets it to `v`.
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }

    /// The value now.
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

/// Bucket bounds per histogram: both of a mapping's have this many.
const BUCKETS: usize = 16;

/// A histogram over fixed bounds: how many observations fell at or below each
/// bound (not cumulative here; the exposition sums them), how many in all, and
/// their sum.
pub(crate) struct Histogram {
    bounds: &'static [f64; BUCKETS],
    counts: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum: Gauge,
}

impl Histogram {
    fn new(bounds: &'static [f64; BUCKETS]) -> Histogram {
        Histogram { bounds, counts: Default::default(), count: AtomicU64::new(0), sum: Gauge::default() }
    }

    /// Counts `v` (seconds). The total goes first, so a concurrent read never
    /// sees the buckets add up to more than it.
    pub(crate) fn observe(&self, v: f64) {
        self.count.fetch_add(1, Ordering::SeqCst);
        if let Some(bucket) = self.bounds.iter().position(|bound| v <= *bound) {
            self.counts[bucket].fetch_add(1, Ordering::SeqCst);
        }
        let _ = self.sum.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |bits| Some((f64::from_bits(bits) + v).to_bits()));
    }
}

/// Every series of one mapping.
pub struct MappingSeries {
    key: MappingKey,
    /// `tunneld_mapping_bytes_total{direction="sent"}`: visitor to target.
    pub sent: Counter,
    /// `tunneld_mapping_bytes_total{direction="received"}`: target to visitor.
    pub received: Counter,
    pub(crate) connections: Counter,
    pub(crate) active: IntGauge,
    pub(crate) last_activity: Gauge,
    pub(crate) connect_errors: Counter,
    pub(crate) refused_connection_limit: Counter,
    pub(crate) refused_no_descriptors: Counter,
    pub(crate) refused_acl: Counter,
    pub(crate) refused_quota: Counter,
    pub(crate) refused_process_limit: Counter,
    pub(crate) refused_loop: Counter,
    /// `tunneld_mapping_quota_used_ratio`.
    pub(crate) quota_used: Gauge,
    /// `tunneld_mapping_quota_bytes`: the allowance, 0 without a quota.
    pub(crate) quota_bytes: IntGauge,
    /// `tunneld_mapping_up`: 1 while listening.
    pub(crate) up: IntGauge,
    /// `tunneld_mapping_health`: the index in [`health_state::ALL`] of the one at 1.
    health: AtomicU8,
    /// `tunneld_mapping_info`'s labels besides the port: target, mode, client, description.
    info: Mutex<[Box<str>; 4]>,
    /// `tunneld_mapping_connect_duration_seconds`.
    pub(crate) connect_duration: Histogram,
    /// `tunneld_mapping_connection_duration_seconds`.
    pub(crate) connection_duration: Histogram,
    /// Recent connect times, for the API's quantiles (empty until the first).
    pub(crate) connect_samples: Reservoir,
    /// A UDP mapping's datagram, session and drop counters (a TCP mapping's
    /// stay at 0 and are not exposed).
    pub(crate) udp: UdpMetrics,
    /// `tunneld_mapping_relayed_connections_total`, per path of
    /// [`relay_path::ALL`] in that order: shown once non-zero, so a mapping
    /// that relays none (a UDP one) shows none.
    relayed: [Counter; 2],
}

/// A UDP mapping's own series.
#[derive(Default)]
pub struct UdpMetrics {
    /// `tunneld_mapping_datagrams_total{direction="sent"}`: visitor to target.
    pub(crate) datagrams_sent: Counter,
    /// `tunneld_mapping_datagrams_total{direction="received"}`: target to visitor.
    pub(crate) datagrams_received: Counter,
    /// `tunneld_mapping_udp_sessions`.
    pub(crate) sessions: IntGauge,
    pub(crate) dropped_queue_full: Counter,
    pub(crate) dropped_too_large: Counter,
    pub(crate) dropped_session_limit: Counter,
    pub(crate) dropped_no_tunnel: Counter,
}

impl UdpMetrics {
    /// Datagrams dropped so far, per reason of [`dropped_reason::ALL`], in that order.
    pub(crate) fn dropped_counts(&self) -> [u64; 4] {
        [&self.dropped_queue_full, &self.dropped_too_large, &self.dropped_session_limit, &self.dropped_no_tunnel].map(|c| c.get())
    }
}

/// A mapping's series, shared by everything that counts for it: its listener,
/// its visitors' meters, its health window, the quota check and the registry.
#[derive(Clone)]
pub struct MappingMetrics(pub(super) Arc<MappingSeries>);

impl std::ops::Deref for MappingMetrics {
    type Target = MappingSeries;

    fn deref(&self) -> &MappingSeries {
        &self.0
    }
}

impl MappingSeries {
    pub(super) fn new(key: MappingKey, info: [&str; 4]) -> MappingSeries {
        MappingSeries {
            key,
            sent: Counter::default(),
            received: Counter::default(),
            connections: Counter::default(),
            active: IntGauge::default(),
            last_activity: Gauge::default(),
            connect_errors: Counter::default(),
            refused_connection_limit: Counter::default(),
            refused_no_descriptors: Counter::default(),
            refused_acl: Counter::default(),
            refused_quota: Counter::default(),
            refused_process_limit: Counter::default(),
            refused_loop: Counter::default(),
            quota_used: Gauge::default(),
            quota_bytes: IntGauge::default(),
            up: IntGauge::default(),
            health: AtomicU8::new(health_index(health_state::OK)),
            info: Mutex::new(info.map(Box::from)),
            connect_duration: Histogram::new(LATENCY_BUCKETS),
            connection_duration: Histogram::new(CONNECTION_DURATION_BUCKETS),
            connect_samples: Reservoir::default(),
            udp: UdpMetrics::default(),
            relayed: Default::default(),
        }
    }

    /// A connection's relay (direct, or a tunneled exchange) starts on `path`
    /// (one of [`relay_path::ALL`]).
    pub(crate) fn relaying(&self, path: &str) {
        if let Some(i) = relay_path::ALL.iter().position(|p| *p == path) {
            self.relayed[i].inc();
        }
    }

    /// Replaces `tunneld_mapping_info`'s labels (the description changed).
    pub(crate) fn set_info(&self, info: [&str; 4]) {
        *lock(&self.info) = info.map(Box::from);
    }

    /// `tunneld_mapping_health`: 1 for `state` (one of [`health_state::ALL`]), 0 for the others.
    pub(crate) fn set_health(&self, state: &str) {
        self.health.store(health_index(state), Ordering::Relaxed);
    }

    /// Visitors refused so far, per reason of [`refused_reason::ALL`], in that order.
    pub(crate) fn refused_counts(&self) -> [u64; 6] {
        self.refused().map(|c| c.get())
    }

    /// The refusal counters in the order of [`refused_reason::ALL`].
    fn refused(&self) -> [&Counter; 6] {
        [
            &self.refused_connection_limit,
            &self.refused_no_descriptors,
            &self.refused_acl,
            &self.refused_quota,
            &self.refused_process_limit,
            &self.refused_loop,
        ]
    }

    /// The mapping these series are labelled with (`port`, `protocol`).
    pub(crate) fn key(&self) -> MappingKey {
        self.key
    }

    fn is_udp(&self) -> bool {
        self.key.protocol == Protocol::Udp
    }
}

fn health_index(state: &str) -> u8 {
    health_state::ALL.iter().position(|s| *s == state).unwrap_or(0) as u8
}

/// One per-mapping family: its schema and how to write every mapping's samples.
struct Written {
    family: &'static Family,
    kind: &'static str,
    /// Whether a mapping has samples in this family: one that none has is
    /// not shown at all.
    shown: fn(&MappingSeries) -> bool,
    samples: fn(&mut Lines, &[MappingMetrics]),
}

fn always(_: &MappingSeries) -> bool {
    true
}

fn udp(m: &MappingSeries) -> bool {
    m.is_udp()
}

fn has_relayed(m: &MappingSeries) -> bool {
    m.relayed.iter().any(|c| c.get() > 0)
}

/// Every per-mapping family this module holds (`tunneld_mapping_client_connections_total`,
/// per client of a group, stays a `prometheus` vector), sorted by name as the
/// registry's own families are. Labels are written sorted by name, as
/// Prometheus clients write them; `le` last.
static FAMILIES: [Written; 17] = [
    Written {
        family: &MAPPING_ACTIVE,
        kind: "gauge",
        shown: always,
        samples: |o, all| each(o, all, |o, m| o.sample("", m.key, "", Int(m.active.get()))),
    },
    Written {
        family: &MAPPING_BYTES,
        kind: "counter",
        shown: always,
        samples: |o, all| {
            let (received, sent) = (format!("{DIRECTION}=\"{RECEIVED}\","), format!("{DIRECTION}=\"{SENT}\","));
            each(o, all, |o, m| {
                o.labelled("", &received, m.key, "", Uint(m.received.get()));
                o.labelled("", &sent, m.key, "", Uint(m.sent.get()));
            })
        },
    },
    Written {
        family: &MAPPING_CONNECT_DURATION,
        kind: "histogram",
        shown: always,
        samples: |o, all| histograms(o, all, |m| &m.connect_duration),
    },
    Written {
        family: &MAPPING_CONNECT_ERRORS,
        kind: "counter",
        shown: always,
        samples: |o, all| each(o, all, |o, m| o.sample("", m.key, "", Uint(m.connect_errors.get()))),
    },
    Written {
        family: &MAPPING_CONNECTION_DURATION,
        kind: "histogram",
        shown: always,
        samples: |o, all| histograms(o, all, |m| &m.connection_duration),
    },
    Written {
        family: &MAPPING_CONNECTIONS,
        kind: "counter",
        shown: always,
        samples: |o, all| each(o, all, |o, m| o.sample("", m.key, "", Uint(m.connections.get()))),
    },
    Written {
        family: &MAPPING_DATAGRAMS,
        kind: "counter",
        shown: udp,
        samples: |o, all| {
            let (received, sent) = (format!("{DIRECTION}=\"{RECEIVED}\","), format!("{DIRECTION}=\"{SENT}\","));
            each_udp(o, all, |o, m, udp| {
                o.labelled("", &received, m.key, "", Uint(udp.datagrams_received.get()));
                o.labelled("", &sent, m.key, "", Uint(udp.datagrams_sent.get()));
            })
        },
    },
    Written {
        family: &MAPPING_DROPPED_DATAGRAMS,
        kind: "counter",
        shown: udp,
        samples: |o, all| {
            let (order, labels) = by_name(&dropped_reason::ALL);
            each_udp(o, all, |o, m, udp| {
                let counts = udp.dropped_counts();
                for (i, label) in order.iter().zip(&labels) {
                    o.sample("", m.key, label, Uint(counts[*i]));
                }
            })
        },
    },
    Written {
        family: &MAPPING_HEALTH,
        kind: "gauge",
        shown: always,
        samples: |o, all| {
            let labels: Vec<String> = health_state::ALL.iter().map(|state| format!("health=\"{state}\",")).collect();
            each(o, all, |o, m| {
                let now = usize::from(m.health.load(Ordering::Relaxed));
                for (i, label) in labels.iter().enumerate() {
                    o.labelled("", label, m.key, "", Uint(u64::from(i == now)));
                }
            })
        },
    },
    Written {
        family: &MAPPING_INFO,
        kind: "gauge",
        shown: always,
        samples: |o, all| {
            each(o, all, |o, m| {
                let info = lock(&m.info);
                let before = format!(
                    "client=\"{}\",description=\"{}\",mode=\"{}\",",
                    escape(&info[2], true),
                    escape(&info[3], true),
                    escape(&info[1], true)
                );
                let after = format!(",target=\"{}\"", escape(&info[0], true));
                o.labelled("", &before, m.key, &after, Uint(1));
            })
        },
    },
    Written {
        family: &MAPPING_LAST_ACTIVITY,
        kind: "gauge",
        shown: always,
        samples: |o, all| each(o, all, |o, m| o.sample("", m.key, "", Real(m.last_activity.get()))),
    },
    Written {
        family: &MAPPING_QUOTA_BYTES,
        kind: "gauge",
        shown: always,
        samples: |o, all| each(o, all, |o, m| o.sample("", m.key, "", Int(m.quota_bytes.get()))),
    },
    Written {
        family: &MAPPING_QUOTA_USED,
        kind: "gauge",
        shown: always,
        samples: |o, all| each(o, all, |o, m| o.sample("", m.key, "", Real(m.quota_used.get()))),
    },
    Written {
        family: &MAPPING_REFUSED,
        kind: "counter",
        shown: always,
        samples: |o, all| {
            let (order, labels) = by_name(&refused_reason::ALL);
            each(o, all, |o, m| {
                let counts = m.refused_counts();
                for (i, label) in order.iter().zip(&labels) {
                    o.sample("", m.key, label, Uint(counts[*i]));
                }
            })
        },
    },
    Written {
        family: &MAPPING_RELAYED,
        kind: "counter",
        shown: has_relayed,
        samples: |o, all| {
            let labels: Vec<String> = relay_path::ALL.iter().map(|path| format!("path=\"{path}\",")).collect();
            for m in all {
                // By path's name, as the label values sort ("copy" before "splice").
                for i in [1, 0] {
                    let n = m.relayed[i].get();
                    if n > 0 {
                        o.labelled("", &labels[i], m.key, "", Uint(n));
                    }
                }
            }
        },
    },
    Written {
        family: &MAPPING_UDP_SESSIONS,
        kind: "gauge",
        shown: udp,
        samples: |o, all| each_udp(o, all, |o, m, udp| o.sample("", m.key, "", Int(udp.sessions.get()))),
    },
    Written {
        family: &MAPPING_UP,
        kind: "gauge",
        shown: always,
        samples: |o, all| each(o, all, |o, m| o.sample("", m.key, "", Int(m.up.get()))),
    },
];

fn each(out: &mut Lines, all: &[MappingMetrics], mut write: impl FnMut(&mut Lines, &MappingSeries)) {
    for m in all {
        write(out, m);
    }
}

/// The indices of `reasons` in the order of their names (as the label values
/// sort), with each one's `,reason="…"` label.
fn by_name<const N: usize>(reasons: &[&str; N]) -> ([usize; N], Vec<String>) {
    let mut order: [usize; N] = std::array::from_fn(|i| i);
    order.sort_unstable_by_key(|i| reasons[*i]);
    let labels = order.iter().map(|i| format!(",reason=\"{}\"", reasons[*i])).collect();
    (order, labels)
}

/// As [`each`], over the UDP mappings only.
fn each_udp(out: &mut Lines, all: &[MappingMetrics], mut write: impl FnMut(&mut Lines, &MappingSeries, &UdpMetrics)) {
    for m in all.iter().filter(|m| m.is_udp()) {
        write(out, m, &m.udp);
    }
}

/// The per-mapping families' names, in the order [`write_family`] takes them.
pub(super) fn family_names() -> impl Iterator<Item = &'static str> {
    FAMILIES.iter().map(|w| w.family.name())
}

/// Writes the family `index` of [`family_names`]: HELP, TYPE and every mapping's
/// samples; nothing when no mapping has the family (as the registry leaves
/// out a vector without series).
pub(super) fn write_family(out: &mut String, index: usize, mappings: &[MappingMetrics]) {
    let Written { family, kind, shown, samples } = &FAMILIES[index];
    if !mappings.iter().any(|m| shown(m)) {
        return;
    }
    let name = family.name();
    let _ = writeln!(out, "# HELP {name} {}", escape(&family.help(), false));
    let _ = writeln!(out, "# TYPE {name} {kind}");
    samples(&mut Lines { out, name }, mappings);
}

fn histograms(out: &mut Lines, all: &[MappingMetrics], of: fn(&MappingSeries) -> &Histogram) {
    let Some(first) = all.first() else { return };
    let les: Vec<String> = of(first).bounds.iter().map(|bound| format!(",le=\"{bound}\"")).collect();
    for m in all {
        histogram(out, m.key, of(m), &les);
    }
}

/// One histogram's samples; `les` its bounds as `,le="…"` labels.
fn histogram(out: &mut Lines, key: MappingKey, h: &Histogram, les: &[String]) {
    let mut cumulative = 0;
    for (le, count) in les.iter().zip(&h.counts) {
        cumulative += count.load(Ordering::SeqCst);
        out.sample("_bucket", key, le, Uint(cumulative));
    }
    let total = h.count.load(Ordering::SeqCst).max(cumulative);
    out.sample("_bucket", key, ",le=\"+Inf\"", Uint(total));
    out.sample("_sum", key, "", Real(h.sum.get()));
    out.sample("_count", key, "", Uint(total));
}

/// A sample's value.
enum Value {
    Uint(u64),
    Int(i64),
    Real(f64),
}
use Value::{Int, Real, Uint};

/// Sample lines of one family, written without the formatting machinery for
/// the parts that repeat (a scrape of 2,000 mappings is 120,000 lines).
struct Lines<'a> {
    out: &'a mut String,
    name: &'a str,
}

impl Lines<'_> {
    /// `name{port="…",protocol="…"after} value`.
    fn sample(&mut self, suffix: &str, key: MappingKey, after: &str, value: Value) {
        self.labelled(suffix, "", key, after, value);
    }

    /// `name{before port="…",protocol="…"after} value`: `before` ends with a
    /// comma, `after` starts with one, both already escaped. (`protocol` sorts
    /// right after `port` among every family's label names.)
    fn labelled(&mut self, suffix: &str, before: &str, key: MappingKey, after: &str, value: Value) {
        let out = &mut *self.out;
        out.push_str(self.name);
        out.push_str(suffix);
        out.push('{');
        out.push_str(before);
        out.push_str("port=\"");
        push_uint(out, u64::from(key.port));
        out.push_str("\",protocol=\"");
        out.push_str(key.protocol.as_str());
        out.push('"');
        out.push_str(after);
        out.push_str("} ");
        match value {
            Uint(v) => push_uint(out, v),
            Int(v) if v < 0 => {
                out.push('-');
                push_uint(out, v.unsigned_abs());
            }
            Int(v) => push_uint(out, v.unsigned_abs()),
            Real(v) => {
                let _ = write!(out, "{v}");
            }
        }
        out.push('\n');
    }
}

/// `v` in decimal.
fn push_uint(out: &mut String, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for d in &digits[at..] {
        out.push(char::from(*d));
    }
}

/// The text format's escaping: backslash and line feed, and in label values the double quote.
fn escape(v: &str, quote: bool) -> std::borrow::Cow<'_, str> {
    let special = |c: char| c == '\\' || c == '\n' || (quote && c == '"');
    if !v.contains(special) {
        return v.into();
    }
    let mut escaped = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            c if special(c) => {
                escaped.push('\\');
                escaped.push(c);
            }
            c => escaped.push(c),
        }
    }
    escaped.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_families_are_sorted_by_name() {
        let names: Vec<_> = family_names().collect();
        let mut sorted = names.clone();
        sorted.sort_unstable();
        assert_eq!(names, sorted);
    }

    #[test]
    fn label_values_are_escaped_as_the_text_format_says() {
        assert_eq!(escape(r#"a "b" \ c"#, true), r#"a \"b\" \\ c"#);
        assert_eq!(escape("line\nbreak", false), "line\\nbreak");
        assert_eq!(escape(r#"say "hi""#, false), r#"say "hi""#);
    }

    #[test]
    fn a_histogram_counts_at_or_below_each_bound() {
        let h = Histogram::new(LATENCY_BUCKETS);
        for v in [0.0001, 0.0002, 3.0, 11.0] {
            h.observe(v);
        }
        let mut out = String::new();
        let les: Vec<String> = LATENCY_BUCKETS.iter().map(|bound| format!(",le=\"{bound}\"")).collect();
        histogram(&mut Lines { out: &mut out, name: "x" }, MappingKey::tcp(1), &h, &les);
        for line in [
            r#"x_bucket{port="1",protocol="tcp",le="0.0001"} 1"#,
            r#"x_bucket{port="1",protocol="tcp",le="0.00025"} 2"#,
            r#"x_bucket{port="1",protocol="tcp",le="2.5"} 2"#,
            r#"x_bucket{port="1",protocol="tcp",le="5"} 3"#,
            r#"x_bucket{port="1",protocol="tcp",le="10"} 3"#,
            r#"x_bucket{port="1",protocol="tcp",le="+Inf"} 4"#,
            r#"x_sum{port="1",protocol="tcp"} 14.0003"#,
            r#"x_count{port="1",protocol="tcp"} 4"#,
        ] {
            assert!(out.lines().any(|l| l == line), "{line} missing from\n{out}");
        }
    }
}
