//! Many mappings (issue 24 §5): every per-mapping series exists at its value
//! from creation, once, for every mapping; counts are exact per mapping after
//! traffic and agree with `/api/stats/traffic`; a removed mapping's series go
//! and the others' stay; `tunneld_mapping_info` escapes what the operator wrote.
//! The series are written into `/metrics` by tunneld itself (not the
//! `prometheus` crate's vectors), so these pin the exposition they must keep.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "scale-secret";

/// Bucket bounds of `tunneld_mapping_connect_duration_seconds`, as written.
const CONNECT_BOUNDS: [&str; 16] =
    ["0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10"];
/// Bucket bounds of `tunneld_mapping_connection_duration_seconds`, as written.
const DURATION_BOUNDS: [&str; 16] =
    ["0.01", "0.05", "0.1", "0.5", "1", "5", "10", "30", "60", "300", "900", "1800", "3600", "7200", "21600", "86400"];
const REASONS: [&str; 6] = ["acl", "connection_limit", "loop", "no_descriptors", "process_limit", "quota"];
const HEALTH: [&str; 6] = ["blocked", "down", "ok", "refusing", "target_failing", "waiting_for_tunnel"];

/// The sample lines of `family` (its name followed by `{` or a space, or a histogram's suffixes).
fn samples<'a>(text: &'a str, family: &str) -> Vec<&'a str> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family).is_some_and(|rest| {
                rest.starts_with('{') || rest.starts_with(' ') || ["_bucket{", "_sum{", "_count{"].iter().any(|s| rest.starts_with(s))
            })
        })
        .collect()
}

/// Asserts that `line` (a whole sample line) is in `text`.
fn has_line(text: &str, line: &str) {
    assert!(text.lines().any(|l| l == line), "{line:?} missing from /metrics");
}

const DROPPED: [&str; 4] = ["no_tunnel", "queue_full", "session_limit", "too_large"];

/// Every series of a fresh direct mapping for `protocol` on `port` to `target`,
/// as whole lines (a UDP mapping has its datagram families besides).
fn fresh_lines(port: u16, protocol: &str, target: &str) -> Vec<String> {
    let p = format!("port=\"{port}\",protocol=\"{protocol}\"");
    let mut lines = vec![
        format!("tunneld_mapping_active_connections{{{p}}} 0"),
        format!("tunneld_mapping_bytes_total{{direction=\"received\",{p}}} 0"),
        format!("tunneld_mapping_bytes_total{{direction=\"sent\",{p}}} 0"),
        format!("tunneld_mapping_connect_errors_total{{{p}}} 0"),
        format!("tunneld_mapping_connections_total{{{p}}} 0"),
        format!("tunneld_mapping_info{{client=\"\",description=\"\",mode=\"direct\",{p},target=\"{target}\"}} 1"),
        format!("tunneld_mapping_last_activity_timestamp_seconds{{{p}}} 0"),
        format!("tunneld_mapping_quota_bytes{{{p}}} 0"),
        format!("tunneld_mapping_quota_used_ratio{{{p}}} 0"),
        format!("tunneld_mapping_up{{{p}}} 1"),
    ];
    for reason in REASONS {
        lines.push(format!("tunneld_mapping_refused_total{{{p},reason=\"{reason}\"}} 0"));
    }
    for health in HEALTH {
        lines.push(format!("tunneld_mapping_health{{health=\"{health}\",{p}}} {}", u8::from(health == "ok")));
    }
    for (family, bounds) in
        [("tunneld_mapping_connect_duration_seconds", CONNECT_BOUNDS), ("tunneld_mapping_connection_duration_seconds", DURATION_BOUNDS)]
    {
        for le in bounds.iter().chain(&["+Inf"]) {
            lines.push(format!("{family}_bucket{{{p},le=\"{le}\"}} 0"));
        }
        lines.push(format!("{family}_sum{{{p}}} 0"));
        lines.push(format!("{family}_count{{{p}}} 0"));
    }
    if protocol == "udp" {
        lines.push(format!("tunneld_mapping_datagrams_total{{direction=\"received\",{p}}} 0"));
        lines.push(format!("tunneld_mapping_datagrams_total{{direction=\"sent\",{p}}} 0"));
        lines.push(format!("tunneld_mapping_udp_sessions{{{p}}} 0"));
        for reason in DROPPED {
            lines.push(format!("tunneld_mapping_dropped_datagrams_total{{{p},reason=\"{reason}\"}} 0"));
        }
    }
    lines
}

/// Creates `n` direct mappings to `target` on distinct free ports: a port drawn
/// twice, or taken meanwhile by another test, is answered 409 and another is drawn.
fn map_many(server: &Daemon, target: std::net::SocketAddr, n: usize) -> Vec<u16> {
    map_many_of(server, "tcp", target, n)
}

/// As [`map_many`], for `protocol`.
fn map_many_of(server: &Daemon, protocol: &str, target: std::net::SocketAddr, n: usize) -> Vec<u16> {
    let mut ports = Vec::with_capacity(n);
    while ports.len() < n {
        let port = free_port();
        let body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target.port(), "protocol": protocol});
        match post(server, "/api/mapping/create", body) {
            (200, _) => ports.push(port),
            (409, _) => continue,
            (status, answer) => panic!("create mapping on {port}: {status} {answer}"),
        }
    }
    ports
}

/// Waits until no mapping of `ports` has an open connection; the exposition then.
fn settled(server: &Daemon, ports: &[u16]) -> String {
    wait_for("every connection closed", Duration::from_secs(20), || {
        let text = metrics_text(server);
        ports
            .iter()
            .all(|p| metric_value(&text, "tunneld_mapping_active_connections", &[("port", &p.to_string())]) == Some(0.0))
            .then_some(text)
    })
}

#[test]
fn every_series_of_many_fresh_mappings_exists_once_at_its_starting_value() {
    let server = Daemon::server(SECRET, &[]);
    let target = echo_server();
    let ports = map_many(&server, target, 60);
    let udp_ports = map_many_of(&server, "udp", target, 5);
    let text = wait_for("every mapping up", Duration::from_secs(20), || {
        let text = metrics_text(&server);
        let up = |ports: &[u16], protocol| {
            ports
                .iter()
                .all(|p| metric_value(&text, "tunneld_mapping_up", &[("port", &p.to_string()), ("protocol", protocol)]) == Some(1.0))
        };
        (up(&ports, "tcp") && up(&udp_ports, "udp")).then_some(text)
    });
    for (ports, protocol) in [(&ports, "tcp"), (&udp_ports, "udp")] {
        for port in ports {
            for line in fresh_lines(*port, protocol, &target.to_string()) {
                has_line(&text, &line);
            }
        }
    }
    // Each family once (one HELP, one TYPE), with exactly its series per mapping.
    let n = ports.len() + udp_ports.len();
    for (family, kind, per_mapping) in [
        ("tunneld_mapping_active_connections", "gauge", 1),
        ("tunneld_mapping_bytes_total", "counter", 2),
        ("tunneld_mapping_connect_duration_seconds", "histogram", 19),
        ("tunneld_mapping_connect_errors_total", "counter", 1),
        ("tunneld_mapping_connection_duration_seconds", "histogram", 19),
        ("tunneld_mapping_connections_total", "counter", 1),
        ("tunneld_mapping_health", "gauge", 6),
        ("tunneld_mapping_info", "gauge", 1),
        ("tunneld_mapping_last_activity_timestamp_seconds", "gauge", 1),
        ("tunneld_mapping_quota_bytes", "gauge", 1),
        ("tunneld_mapping_quota_used_ratio", "gauge", 1),
        ("tunneld_mapping_refused_total", "counter", 6),
        ("tunneld_mapping_up", "gauge", 1),
    ] {
        assert_eq!(text.matches(&format!("# TYPE {family} {kind}\n")).count(), 1, "{family}'s TYPE once");
        assert_eq!(text.matches(&format!("# HELP {family} ")).count(), 1, "{family}'s HELP once");
        assert_eq!(samples(&text, family).len(), per_mapping * n, "{family}: {per_mapping} series for each of {n} mappings");
    }
    // The UDP families: the UDP mappings' only.
    let n = udp_ports.len();
    for (family, kind, per_mapping) in [
        ("tunneld_mapping_datagrams_total", "counter", 2),
        ("tunneld_mapping_dropped_datagrams_total", "counter", 4),
        ("tunneld_mapping_udp_sessions", "gauge", 1),
    ] {
        assert_eq!(text.matches(&format!("# TYPE {family} {kind}\n")).count(), 1, "{family}'s TYPE once");
        assert_eq!(text.matches(&format!("# HELP {family} ")).count(), 1, "{family}'s HELP once");
        let lines = samples(&text, family);
        assert_eq!(lines.len(), per_mapping * n, "{family}: {per_mapping} series for each of {n} UDP mappings");
        assert!(lines.iter().all(|l| l.contains("protocol=\"udp\"")), "{family} only for UDP mappings: {lines:?}");
    }
}

#[test]
fn counts_stay_exact_per_mapping_among_many_and_a_removed_one_goes_alone() {
    let server = Daemon::server(SECRET, &[]);
    let target = echo_server();
    let ports = map_many(&server, target, 40);
    // The first ten carry traffic: mapping i echoes i + 1 connections of 1000 + i bytes.
    let used = &ports[..10];
    for (i, port) in used.iter().enumerate() {
        for _ in 0..=i {
            echo_through(*port, 1000 + i);
        }
    }
    let text = settled(&server, &ports);
    let traffic = get_data(&server, "/api/stats/traffic");
    let entry = |port: u16| -> Value {
        traffic["mappings"].as_array().unwrap().iter().find(|m| m["port"] == port).cloned().unwrap_or_else(|| panic!("{port} in traffic"))
    };
    for (i, port) in ports.iter().enumerate() {
        let p = port.to_string();
        let (conns, bytes) = match i < used.len() {
            true => (i as u64 + 1, (i as u64 + 1) * (1000 + i as u64)),
            false => (0, 0),
        };
        let value = |name: &str, labels: &[(&str, &str)]| {
            let mut all = vec![("port", p.as_str())];
            all.extend_from_slice(labels);
            metric_value(&text, name, &all).unwrap_or_else(|| panic!("{name} {all:?} missing"))
        };
        assert_eq!(value("tunneld_mapping_bytes_total", &[("direction", "sent")]), bytes as f64, "port {port} sent");
        assert_eq!(value("tunneld_mapping_bytes_total", &[("direction", "received")]), bytes as f64, "port {port} received");
        assert_eq!(value("tunneld_mapping_connections_total", &[]), conns as f64, "port {port} connections");
        for family in ["tunneld_mapping_connect_duration_seconds", "tunneld_mapping_connection_duration_seconds"] {
            assert_eq!(value(&format!("{family}_count"), &[]), conns as f64, "{family} of port {port}");
            assert_eq!(value(&format!("{family}_bucket"), &[("le", "+Inf")]), conns as f64, "{family} of port {port}");
        }
        assert_eq!(value("tunneld_mapping_last_activity_timestamp_seconds", &[]) > 0.0, conns > 0, "port {port} last activity");
        assert_eq!(value("tunneld_mapping_connect_errors_total", &[]), 0.0);
        let json = entry(*port);
        assert_eq!((json["bytes_sent"].as_u64(), json["bytes_received"].as_u64()), (Some(bytes), Some(bytes)), "JSON of {port}");
        assert_eq!(json["connections_total"].as_u64(), Some(conns), "JSON of {port}");
        assert_eq!(json["active_connections"], 0);
        assert_eq!(
            json["refused"],
            json!({"acl": 0, "connection_limit": 0, "loop": 0, "no_descriptors": 0, "process_limit": 0, "quota": 0})
        );
        assert_eq!(json["connect_p50_seconds"].is_number(), conns > 0, "JSON of {port}: {json}");
    }
    let sum: u64 = used.iter().enumerate().map(|(i, _)| (i as u64 + 1) * (1000 + i as u64)).sum();
    assert_eq!(traffic["total_sent"].as_u64(), Some(sum));
    assert_eq!(traffic["total_received"].as_u64(), Some(sum));

    let (gone, kept) = (ports[3], ports[4]);
    let (status, answer) = post(&server, "/api/mapping/remove", json!({ "port": gone }));
    assert_eq!(status, 200, "{answer}");
    let text = metrics_text(&server);
    let label = format!("port=\"{gone}\"");
    assert!(!text.lines().any(|l| l.contains(&label)), "the removed mapping's series are gone");
    assert_eq!(
        metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &kept.to_string()), ("direction", "sent")]),
        Some(5.0 * 1004.0)
    );
    assert_eq!(samples(&text, "tunneld_mapping_up").len(), ports.len() - 1);
}

#[test]
fn mapping_info_escapes_the_description_and_follows_its_changes() {
    let server = Daemon::server(SECRET, &[]);
    let target = echo_server();
    let port = free_port();
    let (status, answer) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target.port(), "description": r#"say "hi" \ bye"#}),
    );
    assert_eq!(status, 200, "{answer}");
    let info = |description: &str| {
        format!(
            r#"tunneld_mapping_info{{client="",description="{description}",mode="direct",port="{port}",protocol="tcp",target="{target}"}} 1"#
        )
    };
    has_line(&metrics_text(&server), &info(r#"say \"hi\" \\ bye"#));
    let (status, answer) = post(&server, "/api/mapping/update", json!({"port": port, "description": "plain"}));
    assert_eq!(status, 200, "{answer}");
    let text = metrics_text(&server);
    has_line(&text, &info("plain"));
    assert_eq!(samples(&text, "tunneld_mapping_info").len(), 1, "the old labels are gone");
}

/// The daemon's anonymous resident memory (heap, stacks), in KiB.
fn rss_anon_kib(d: &Daemon) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).expect("/proc/PID/status");
    status.lines().find_map(|l| l.strip_prefix("RssAnon:")?.trim().strip_suffix("kB")?.trim().parse().ok()).expect("RssAnon")
}

/// RssAnon once two readings 200 ms apart agree within 64 KiB (there is no
/// signal for "the allocator is done"; this polls, it does not wait blind).
fn settled_rss_kib(d: &Daemon) -> u64 {
    let mut last = rss_anon_kib(d);
    wait_for("RSS to settle", Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(200));
        let now = rss_anon_kib(d);
        let settled = now.abs_diff(last) <= 64;
        last = now;
        settled.then_some(now)
    })
}

/// An idle direct mapping costs at most 12 KiB of the daemon's memory (issue
/// 24's target is 8 KiB in a release build). Measured here: about 5 KiB; 34 KiB
/// before the mappings' series were held as atomics (each series of the
/// `prometheus` crate's vectors carried its own copy of its family's HELP).
#[test]
fn an_idle_mapping_costs_little_memory() {
    const MAPPINGS: usize = 300;
    let server = Daemon::server(SECRET, &[]);
    let target = echo_server();
    // The API's and the exposition's code paths run once before the baseline.
    map_many(&server, target, 1);
    metrics_text(&server);
    get_data(&server, "/api/stats/traffic");
    let before = settled_rss_kib(&server);
    let ports = map_many(&server, target, MAPPINGS);
    wait_for("every mapping up", Duration::from_secs(20), || {
        let text = metrics_text(&server);
        ports.iter().all(|p| metric_value(&text, "tunneld_mapping_up", &[("port", &p.to_string())]) == Some(1.0)).then_some(())
    });
    let after = settled_rss_kib(&server);
    let per_mapping = after.saturating_sub(before) as f64 / MAPPINGS as f64;
    assert!(per_mapping <= 12.0, "{per_mapping:.1} KiB per idle mapping ({before} KiB before {MAPPINGS} mappings, {after} KiB after)");
}
