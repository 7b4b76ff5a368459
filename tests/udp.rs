//! UDP mappings (issue 22 §1, §2, §4, §5): `protocol: "udp"` beside TCP on the
//! same port number, direct UDP sessions with their own sockets toward the
//! target, exact counting both ways, session expiry, the session cap, oversize
//! datagrams, a spoofed-source flood, allow/deny per datagram source, the quota,
//! `ctl`, the page, and `dig` against a real `dnsmasq`.
//!
//! Real UDP sockets on loopback; visitors come from 127.0.0.2/3/4 so each one's
//! replies can be told apart.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use common::udp::*;
use common::*;
use serde_json::{json, Value};

const SECRET: &str = "udp-test-secret-0123456789";

fn create_udp(server: &Daemon, port: u16, target: SocketAddr, extra: Value) -> (u16, Value) {
    let mut body = json!({"source_port": port, "protocol": "udp", "target_host": target.ip().to_string(), "target_port": target.port()});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    post(server, "/api/mapping/create", body)
}

fn server_with(config: &str) -> (tempfile::TempDir, Daemon) {
    let (dir, path) = config_file(config);
    let server = Daemon::server(SECRET, &["--config", &path]);
    (dir, server)
}

#[test]
fn datagrams_are_counted_exactly_both_ways_and_each_visitor_gets_only_its_own_replies() {
    let server = Daemon::server(SECRET, &[]);
    let echo = udp_echo();
    let port = free_port();
    let (status, created) = create_udp(&server, port, echo, json!({}));
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["data"]["protocol"], "udp");

    let visitors: Vec<UdpSocket> = [2, 3, 4].into_iter().map(visitor).collect();
    let mut bytes = 0u64;
    let mut datagrams = 0u64;
    for round in 0..5usize {
        for (i, v) in visitors.iter().enumerate() {
            // Distinct contents and sizes per visitor and round.
            let payload: Vec<u8> = std::iter::repeat(b'a' + i as u8).take(100 * (i + 1) + round).collect();
            let reply = exchange(v, port, &payload, Duration::from_secs(5)).expect("a reply");
            assert_eq!(reply, payload, "visitor {i} gets its own datagram back, whole");
            bytes += payload.len() as u64;
            datagrams += 1;
        }
    }
    // Nothing else arrives for anyone: no visitor got another's reply.
    for v in &visitors {
        v.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        assert!(v.recv_from(&mut [0u8; 2048]).is_err(), "no stray replies");
    }
    let text = metrics_text(&server);
    let m = |name: &str, extra: &[(&str, &str)]| udp_sample(&text, name, port, extra);
    assert_eq!(m("tunneld_mapping_bytes_total", &[("direction", "sent")]) as u64, bytes);
    assert_eq!(m("tunneld_mapping_bytes_total", &[("direction", "received")]) as u64, bytes);
    assert_eq!(m("tunneld_mapping_datagrams_total", &[("direction", "sent")]) as u64, datagrams);
    assert_eq!(m("tunneld_mapping_datagrams_total", &[("direction", "received")]) as u64, datagrams);
    assert_eq!(m("tunneld_mapping_udp_sessions", &[]), 3.0, "one session per visitor address");
    assert_eq!(m("tunneld_mapping_connections_total", &[]), 3.0, "a session counts as a connection");
    assert_eq!(m("tunneld_mapping_dropped_datagrams_total", &[("reason", "too_large")]), 0.0);

    let traffic = traffic_entry(&server, port).expect("the mapping in /api/stats/traffic");
    assert_eq!(traffic["protocol"], "udp");
    assert_eq!(traffic["bytes_sent"], bytes);
    assert_eq!(traffic["udp"]["datagrams_sent"], datagrams);
    assert_eq!(traffic["udp"]["sessions"], 3);

    let open = get_data(&server, &format!("/api/connections?port={port}&protocol=udp"));
    assert_eq!(open["count"], 3, "{open}");
    let sources: Vec<String> = open["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["source"].as_str().unwrap().split(':').next().unwrap().to_string())
        .collect();
    assert_eq!(sources, ["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    for c in open["connections"].as_array().unwrap() {
        assert_eq!(c["protocol"], "udp");
        assert_eq!(c["bytes_sent"], c["bytes_received"], "{c}");
    }
    assert_eq!(get_data(&server, &format!("/api/connections?port={port}&protocol=tcp"))["count"], 0);
}

#[test]
fn idle_sessions_end_and_the_next_datagram_opens_a_new_one() {
    let (_dir, server) = server_with("[server]\nudp_session_idle_secs = 1\n");
    let echo = udp_echo();
    let port = free_port();
    assert_eq!(create_udp(&server, port, echo, json!({})).0, 200);
    let v = visitor(2);
    assert_eq!(exchange(&v, port, b"first", Duration::from_secs(5)).as_deref(), Some(&b"first"[..]));
    assert_eq!(udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]), 1.0);
    wait_for("the idle session to end", Duration::from_secs(10), || {
        (udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]) == 0.0).then_some(())
    });
    let logged = wait_for("the ended session in the connection log", Duration::from_secs(10), || {
        let log = get_data(&server, &format!("/api/connections/log?port={port}&protocol=udp"));
        (log["count"] == 1).then_some(log)
    });
    assert_eq!(logged["connections"][0]["end"], "idle_timeout", "{logged}");
    assert_eq!(logged["connections"][0]["protocol"], "udp");
    assert_eq!(logged["connections"][0]["bytes_sent"], 5);
    // The same address again: a new session, served as the first was.
    assert_eq!(exchange(&v, port, b"again", Duration::from_secs(5)).as_deref(), Some(&b"again"[..]));
    assert_eq!(udp_metric(&server, "tunneld_mapping_connections_total", port, &[]), 2.0);
}

#[test]
fn the_session_cap_bounds_a_spoofed_source_flood_and_the_api_still_answers() {
    const CAP: usize = 4;
    let (_dir, server) = server_with(&format!("[server]\nmax_udp_sessions_per_mapping = {CAP}\n"));
    let echo = udp_echo();
    let port = free_port();
    assert_eq!(create_udp(&server, port, echo, json!({})).0, 200);
    // CAP visitors get sessions; the next ones' datagrams are dropped and counted.
    let first: Vec<UdpSocket> = (0..CAP).map(|_| visitor(2)).collect();
    for v in &first {
        assert!(exchange(v, port, b"hello", Duration::from_secs(5)).is_some());
    }
    let late: Vec<UdpSocket> = (0..6).map(|_| visitor(3)).collect();
    for v in &late {
        assert_eq!(exchange(v, port, b"hello", Duration::from_millis(300)), None, "no session beyond the cap");
    }
    assert_eq!(udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "session_limit")]), 6.0);

    // A flood from many source ports (what spoofed sources look like to us).
    let flooders: Vec<UdpSocket> = (0..200).map(|i| visitor(2 + (i % 3) as u8)).collect();
    for _ in 0..5 {
        for f in &flooders {
            let _ = f.send_to(&[0u8; 512], loopback(port));
        }
    }
    // What the kernel's receive buffer took of the burst is dropped and
    // counted; what it did not take never reached the daemon.
    let dropped = wait_for("the flood to be counted", Duration::from_secs(10), || {
        let n = udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "session_limit")]);
        (n >= 6.0 + 100.0).then_some(n)
    });
    assert!(dropped <= 6.0 + 1000.0, "{dropped}");
    let sessions = udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]);
    assert!(sessions <= CAP as f64, "sessions stay within the cap: {sessions}");
    let (status, _) = http("GET", &server.url("/api/mapping/list"), None);
    assert_eq!(status, 200, "the API answers during and after the flood");
    // The sessions that were admitted still work.
    assert!(exchange(&first[0], port, b"still here", Duration::from_secs(5)).is_some());
}

#[test]
fn oversize_datagrams_are_dropped_whole_and_counted_never_truncated() {
    let (_dir, server) = server_with("[server]\nmax_udp_datagram_bytes = 1000\n");
    let echo = udp_echo();
    let port = free_port();
    assert_eq!(create_udp(&server, port, echo, json!({})).0, 200);
    let v = visitor(2);
    let fits = vec![7u8; 1000];
    assert_eq!(exchange(&v, port, &fits, Duration::from_secs(5)), Some(fits.clone()));
    assert_eq!(exchange(&v, port, &[8u8; 1001], Duration::from_millis(500)), None, "a datagram one byte too large is not forwarded");
    assert_eq!(exchange(&v, port, &[9u8; 20_000], Duration::from_millis(500)), None);
    assert_eq!(udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "too_large")]), 2.0);
    assert_eq!(udp_metric(&server, "tunneld_mapping_bytes_total", port, &[("direction", "sent")]), 1000.0);
    assert_eq!(udp_metric(&server, "tunneld_mapping_bytes_total", port, &[("direction", "received")]), 1000.0);
    assert_eq!(udp_metric(&server, "tunneld_mapping_datagrams_total", port, &[("direction", "sent")]), 1.0);
}

#[test]
fn udp_and_tcp_on_the_same_port_are_two_mappings_removed_by_protocol() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    let tcp_echo = echo_server();
    let udp_target = udp_echo();
    assert_eq!(create_mapping(&server, port, tcp_echo, false)["data"]["protocol"], "tcp");
    let (status, body) = create_udp(&server, port, udp_target, json!({}));
    assert_eq!(status, 200, "{body}");
    let (status, body) = create_udp(&server, port, udp_target, json!({}));
    assert_eq!(status, 409, "the same UDP port twice: {body}");
    let list = get_data(&server, "/api/mapping/list");
    let protocols: Vec<&str> = list["mappings"].as_array().unwrap().iter().map(|m| m["protocol"].as_str().unwrap()).collect();
    assert_eq!(protocols, ["tcp", "udp"]);
    echo_through(port, 1000);
    assert!(exchange(&visitor(2), port, b"dns?", Duration::from_secs(5)).is_some());
    // Both families of series, told apart by `protocol`.
    let text = metrics_text(&server);
    let p = port.to_string();
    assert!(
        metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &p), ("protocol", "tcp"), ("direction", "sent")]) == Some(1000.0)
    );
    assert!(metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &p), ("protocol", "udp"), ("direction", "sent")]) == Some(4.0));

    let (status, removed) = post(&server, "/api/mapping/remove", json!({"port": port, "protocol": "udp"}));
    assert_eq!(status, 200, "{removed}");
    assert_eq!(removed["data"], json!({"port": port, "protocol": "udp"}));
    assert_eq!(exchange(&visitor(2), port, b"gone", Duration::from_millis(300)), None);
    echo_through(port, 100);
    // The UDP port is free the moment the removal returned, though a session was open.
    let again = visitor(2);
    assert_eq!(create_udp(&server, port, udp_target, json!({})).0, 200);
    assert!(exchange(&again, port, b"back", Duration::from_secs(5)).is_some());
    assert_eq!(post(&server, "/api/mapping/remove", json!({"port": port, "protocol": "udp"})).0, 200);
    let (status, again) = post(&server, "/api/mapping/remove", json!({"port": port, "protocol": "udp"}));
    assert_eq!(status, 404, "{again}");
    assert!(again["message"].as_str().unwrap().contains(&format!("{port}/udp")), "{again}");
    // Without a protocol: TCP, as calls made before UDP mean.
    assert_eq!(post(&server, "/api/mapping/remove", json!({"port": port})).0, 200);
    assert_eq!(mapping_count(&server), 0);
}

#[test]
fn health_checked_and_self_targeting_udp_mappings_are_refused() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    // Tunneled UDP is tests/udp_tunnel.rs's; a health check (a TCP connect) is no UDP mapping's.
    let check = json!({"use_tunnel": true, "health_check": {"interval_secs": 5, "timeout_secs": 2}});
    let (status, body) = create_udp(&server, port, udp_echo(), check);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("a UDP mapping has none"), "{body}");
    let (status, body) = create_udp(&server, port, udp_echo(), json!({"proxy_protocol": "v2"}));
    assert_eq!(status, 400, "no PROXY header on datagrams: {body}");
    let (status, body) = create_udp(&server, port, loopback(port), json!({}));
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("forward to itself"), "{body}");
    let other = free_port();
    assert_eq!(create_udp(&server, other, udp_echo(), json!({})).0, 200);
    let (status, body) = create_udp(&server, port, loopback(other), json!({}));
    assert_eq!(status, 400, "a UDP mapping to another UDP mapping of this daemon: {body}");
    // A UDP mapping may target a port only a TCP mapping has.
    let tcp_port = free_port();
    create_mapping(&server, tcp_port, echo_server(), false);
    assert_eq!(create_udp(&server, port, loopback(tcp_port), json!({})).0, 200);
    assert_eq!(mapping_count(&server), 3);
    let (status, body) = post(&server, "/api/mapping/update", json!({"port": port, "protocol": "udp", "proxy_protocol": "v1"}));
    assert_eq!(status, 400, "{body}");
}

#[test]
fn allow_and_deny_are_checked_per_datagram_source() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    let (status, body) = create_udp(&server, port, udp_echo(), json!({"deny": ["127.0.0.3"]}));
    assert_eq!(status, 200, "{body}");
    assert!(exchange(&visitor(2), port, b"let in", Duration::from_secs(5)).is_some());
    let denied = visitor(3);
    for _ in 0..3 {
        assert_eq!(exchange(&denied, port, b"keep out", Duration::from_millis(300)), None);
    }
    assert_eq!(udp_metric(&server, "tunneld_mapping_refused_total", port, &[("reason", "acl")]), 3.0, "each refused datagram counts");
    assert_eq!(udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]), 1.0, "a refused source gets no session");
    assert_eq!(udp_metric(&server, "tunneld_mapping_bytes_total", port, &[("direction", "sent")]), 6.0);
    // Changed live: now only 127.0.0.3 is let in.
    let (status, body) =
        post(&server, "/api/mapping/update", json!({"port": port, "protocol": "udp", "deny": null, "allow": ["127.0.0.3/32"]}));
    assert_eq!(status, 200, "{body}");
    assert!(exchange(&denied, port, b"now in", Duration::from_secs(5)).is_some());
    assert_eq!(exchange(&visitor(4), port, b"not listed", Duration::from_millis(300)), None);
}

#[test]
fn a_used_up_blocking_quota_drops_datagrams() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    let quota = json!({"quota": {"bytes": 1000, "period": "day", "action": "block"}});
    assert_eq!(create_udp(&server, port, udp_echo(), quota).0, 200);
    let v = visitor(2);
    assert!(exchange(&v, port, &[1u8; 600], Duration::from_secs(5)).is_some(), "1,200 bytes both ways: past the quota");
    wait_for("the quota to block the mapping", Duration::from_secs(10), || {
        listed_udp(&server, port).filter(|m| m["quota_blocked"] == true)
    });
    assert_eq!(exchange(&v, port, &[2u8; 10], Duration::from_millis(300)), None);
    assert!(udp_metric(&server, "tunneld_mapping_refused_total", port, &[("reason", "quota")]) >= 1.0);
}

fn listed_udp(server: &Daemon, port: u16) -> Option<Value> {
    get_data(server, "/api/mapping/list")["mappings"]
        .as_array()?
        .iter()
        .find(|m| m["source_port"] == port && m["protocol"] == "udp")
        .cloned()
}

#[test]
fn ctl_creates_lists_and_removes_udp_mappings_by_protocol() {
    let server = Daemon::server(SECRET, &[]);
    let (_dir, config) = config_file("");
    let port = free_port();
    let target = udp_echo();
    let ctl = |args: &[&str]| {
        let out = Command::new(BIN).arg("ctl").arg("--api").arg(server.url("")).arg("--config").arg(&config).args(args).output().unwrap();
        assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let p = port.to_string();
    ctl(&["create", &p, &target.to_string(), "--protocol", "udp"]);
    let list = ctl(&["list"]);
    assert!(list.lines().next().unwrap().contains("PROTO"), "{list}");
    let row = list.lines().find(|l| l.starts_with(&p)).unwrap_or_else(|| panic!("{list}"));
    assert!(row.split_whitespace().nth(1) == Some("udp"), "{row}");
    // A session is a connection: `ctl conns` lists it, on the UDP port.
    assert!(exchange(&visitor(2), port, b"hello", Duration::from_secs(5)).is_some());
    let conns = ctl(&["conns"]);
    assert!(conns.lines().any(|l| l.split_whitespace().nth(1) == Some(&format!("{port}/udp")) && l.contains("127.0.0.2:")), "{conns}");
    let removed = ctl(&["remove", &p, "--protocol", "udp"]);
    assert!(removed.contains(&format!("{port}/udp")), "{removed}");
    assert_eq!(mapping_count(&server), 0);
}

#[test]
fn dig_resolves_through_a_direct_udp_mapping_to_dnsmasq() {
    let test = "dig_resolves_through_a_direct_udp_mapping_to_dnsmasq";
    let (Some(dnsmasq), Some(dig)) = (common::tools::external_tool("dnsmasq", test), common::tools::external_tool("dig", test)) else {
        return;
    };
    let mut dns = DnsMasq::start(&dnsmasq);
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    assert_eq!(create_udp(&server, port, loopback(dns.port), json!({})).0, 200);
    let answer = dns.resolve_through(&dig, port, Duration::from_secs(10));
    assert_eq!(answer, DnsMasq::ANSWER);
    assert!(udp_metric(&server, "tunneld_mapping_datagrams_total", port, &[("direction", "received")]) >= 1.0);
}

#[test]
fn the_page_shows_a_udp_badge_and_sessions_beside_the_tcp_mapping_of_the_same_port() {
    let Some(chromium) = common::tools::external_tool("chromium", "udp page") else { return };
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    assert_eq!(create_udp(&server, port, udp_echo(), json!({"description": "DNS"})).0, 200);
    echo_through(port, 2000);
    let visitors = [visitor(2), visitor(3)];
    for v in &visitors {
        assert!(exchange(v, port, &[5u8; 300], Duration::from_secs(5)).is_some());
    }
    let mut browser = common::browser::Browser::launch(&chromium, &[], None);
    browser.navigate(&server.url("/api/stats/monitor"));
    let udp_row = format!(r#"document.querySelector('[data-testid="mapping-row"][data-port="{port}"][data-protocol="udp"]')"#);
    let tcp_row = format!(r#"document.querySelector('[data-testid="mapping-row"][data-port="{port}"][data-protocol="tcp"]')"#);
    browser.wait_for("both rows", &format!("{udp_row} !== null && {tcp_row} !== null"));
    browser.wait_for("the UDP row's sessions", &format!(r#"{udp_row}.querySelector('[data-role="open-conns"]').textContent === '2'"#));
    let shown = browser.eval(&format!(
        r#"(() => {{
            const udp = {udp_row}, tcp = {tcp_row};
            const badge = udp.querySelector('[data-role="protocol"]');
            return {{
                badge: badge && badge.textContent,
                tcp_badge: tcp.querySelector('[data-role="protocol"]') !== null,
                open_label: udp.querySelector('[data-col="open"]').dataset.label,
                tcp_open_label: tcp.querySelector('[data-col="open"]').dataset.label,
                sessions_word: udp.querySelector('[data-role="udp-sessions"]').textContent,
                sent: udp.querySelector('[data-col="sent"]').dataset.bytes,
            }};
        }})()"#
    ));
    assert_eq!(shown["badge"], "UDP", "{shown}");
    assert_eq!(shown["tcp_badge"], false, "{shown}");
    assert_eq!(shown["open_label"], "Sessions", "{shown}");
    assert_eq!(shown["tcp_open_label"], "Open", "{shown}");
    assert_eq!(shown["sessions_word"], "sessions", "{shown}");
    assert_eq!(shown["sent"], "600", "{shown}");
    for (width, height, mobile) in [(1440, 900, false), (390, 844, true)] {
        browser.set_viewport(width, height, mobile);
        browser.wait_for("the new width", &format!("window.innerWidth === {width}"));
        browser.eval(&format!("{udp_row}.scrollIntoView({{block: 'center'}})"));
        browser.screenshot(&format!("udp-mapping-{width}.png"));
    }
}

#[test]
fn history_and_reports_keep_udp_and_tcp_on_one_port_apart() {
    let (_dir, server) = server_with("[history]\ninterval_secs = 1\n");
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    assert_eq!(create_udp(&server, port, udp_echo(), json!({})).0, 200);
    echo_through(port, 3000);
    let v = visitor(2);
    for _ in 0..4 {
        assert!(exchange(&v, port, &[3u8; 250], Duration::from_secs(5)).is_some());
    }
    let flushed_after = unix_now();
    wait_for_history_flush(&server, flushed_after);
    let sent = |protocol: &str| {
        let h = get_data(&server, &format!("/api/stats/history?port={port}&protocol={protocol}&step=minute"));
        h["points"].as_array().unwrap().iter().map(|p| p["bytes_sent"].as_u64().unwrap()).sum::<u64>()
    };
    // Flushed or not yet, the history shows every byte; within a flush or two, exactly.
    let both = wait_for("the history of both mappings", Duration::from_secs(10), || {
        let both = (sent("udp"), sent("tcp"));
        (both == (1000, 3000)).then_some(both)
    });
    assert_eq!(both, (1000, 3000));
    let h = get_data(&server, &format!("/api/stats/history?port={port}&step=minute"));
    assert_eq!(h["points"].as_array().unwrap().iter().map(|p| p["bytes_sent"].as_u64().unwrap()).sum::<u64>(), 3000, "no protocol: TCP");
    let report = get_data(&server, "/api/stats/report?period=day");
    let rows: Vec<(u64, String, u64)> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["port"].as_u64().unwrap(), r["protocol"].as_str().unwrap().to_string(), r["bytes_sent"].as_u64().unwrap()))
        .collect();
    assert_eq!(rows, [(u64::from(port), "tcp".to_string(), 3000), (u64::from(port), "udp".to_string(), 1000)], "{report}");
    let traffic: Vec<Value> = get_data(&server, "/api/stats/traffic")["mappings"].as_array().unwrap().clone();
    let lifetime: Vec<(String, u64)> =
        traffic.iter().map(|m| (m["protocol"].as_str().unwrap().to_string(), m["lifetime_sent"].as_u64().unwrap())).collect();
    assert_eq!(lifetime, [("tcp".to_string(), 3000), ("udp".to_string(), 1000)]);
}

#[test]
fn the_bandwidth_cap_paces_datagrams_whole() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    // 20,000 B/s per direction: 60,000 bytes take about 3 s (the bucket keeps 0.1 s of burst).
    assert_eq!(create_udp(&server, port, udp_echo(), json!({"bandwidth_limit": 20_000})).0, 200);
    let v = visitor(2);
    let started = std::time::Instant::now();
    for i in 0..30u8 {
        let payload = vec![i; 2000];
        assert_eq!(exchange(&v, port, &payload, Duration::from_secs(5)), Some(payload), "datagram {i} whole");
    }
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(2500), "60,000 bytes at 20,000 B/s took {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    assert_eq!(udp_metric(&server, "tunneld_mapping_bytes_total", port, &[("direction", "sent")]), 60_000.0);
}

#[test]
fn the_config_file_declares_udp_and_tcp_on_one_port() {
    let port = free_port();
    let udp_target = udp_echo();
    let tcp_target = echo_server();
    let (_dir, server) = server_with(&format!(
        "[[mappings]]\nsource_port = {port}\nprotocol = \"udp\"\ntarget_host = \"127.0.0.1\"\ntarget_port = {}\n\n\
         [[mappings]]\nsource_port = {port}\ntarget_host = \"127.0.0.1\"\ntarget_port = {}\n",
        udp_target.port(),
        tcp_target.port()
    ));
    let list = get_data(&server, "/api/mapping/list");
    let declared: Vec<(&str, &str)> =
        list["mappings"].as_array().unwrap().iter().map(|m| (m["protocol"].as_str().unwrap(), m["source"].as_str().unwrap())).collect();
    assert_eq!(declared, [("tcp", "config"), ("udp", "config")]);
    assert!(exchange(&visitor(2), port, b"declared", Duration::from_secs(5)).is_some());
    echo_through(port, 10);
    // The API may not remove what the file declares, UDP or TCP.
    assert_eq!(post(&server, "/api/mapping/remove", json!({"port": port, "protocol": "udp"})).0, 409);
}

#[test]
fn a_flood_faster_than_the_target_is_taken_fills_a_bounded_queue_and_the_rest_is_dropped_and_counted() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    // 2,000 B/s toward the target: what a flood sends faster than that waits in
    // the session's queue (at most 2,048 datagrams); the rest is dropped.
    assert_eq!(create_udp(&server, port, udp_echo(), json!({"bandwidth_limit": 2000})).0, 200);
    let v = visitor(2);
    assert!(exchange(&v, port, &[1u8; 100], Duration::from_secs(5)).is_some(), "the session is open");
    for _ in 0..4000 {
        let _ = v.send_to(&[2u8; 1000], loopback(port));
        // Paced a little, so the kernel's buffer hands the daemon what it was sent.
        std::thread::sleep(Duration::from_micros(50));
    }
    let dropped = wait_for("the overflow to be counted", Duration::from_secs(10), || {
        let n = udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "queue_full")]);
        (n >= 1000.0).then_some(n)
    });
    let sent = udp_metric(&server, "tunneld_mapping_datagrams_total", port, &[("direction", "sent")]);
    assert!(sent < 300.0, "the cap let through only what it allows: {sent} datagrams");
    assert!(dropped + sent <= 4001.0, "nothing counted twice: {dropped} dropped, {sent} sent");
    assert_eq!(udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]), 1.0);
    let (status, _) = http("GET", &server.url("/api/mapping/list"), None);
    assert_eq!(status, 200);
}

#[test]
fn a_direct_udp_mapping_takes_no_client_group_and_a_tcp_group_on_its_port_is_its_own() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    let check = json!({"interval_secs": 5, "timeout_secs": 2});
    for (extra, why) in [
        (json!({"client": "default"}), "use_tunnel"),
        (json!({"clients": ["default"]}), "use_tunnel"),
        (json!({"balance": "round_robin"}), "only a tunneled mapping"),
        (json!({"use_tunnel": true, "health_check": check}), "a UDP mapping has none"),
    ] {
        let (status, body) = create_udp(&server, port, udp_echo(), extra.clone());
        assert_eq!(status, 400, "{extra}: {body}");
        assert!(body["message"].as_str().unwrap().contains(why), "{extra}: {body}");
    }
    assert_eq!(create_udp(&server, port, udp_echo(), json!({})).0, 200);
    let (status, body) = post(&server, "/api/mapping/update", json!({"port": port, "protocol": "udp", "balance": "round_robin"}));
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap().contains("is direct"), "{body}");

    // TCP on the same port number: a tunneled group, whose series say tcp.
    let tcp = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": 9, "use_tunnel": true, "clients": ["default"]});
    assert_eq!(post(&server, "/api/mapping/create", tcp).0, 200);
    let p = port.to_string();
    let served = |protocol: &str| {
        scrape_metric(&server, "tunneld_mapping_client_connections_total", &[("port", &p), ("protocol", protocol), ("client", "default")])
    };
    assert_eq!(served("tcp"), Some(0.0), "a group's clients have a series from the start, labelled tcp");
    assert_eq!(served("udp"), None, "the UDP mapping has no group");
    let (status, body) = post(&server, "/api/mapping/update", json!({"port": port, "balance": "round_robin"}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["balance"], "round_robin");
    let udp = listed_udp(&server, port).expect("the UDP mapping stays");
    assert_eq!(
        (udp["use_tunnel"].clone(), udp["clients"].clone(), udp["balance"].clone()),
        (json!(false), json!([]), Value::Null),
        "{udp}"
    );
}

#[test]
fn the_config_file_may_not_give_a_udp_mapping_a_health_check() {
    let group = "use_tunnel = true\nhealth_check = { interval_secs = 5, timeout_secs = 2 }";
    let (_guard, path) = config_file(&format!(
        "[[mappings]]\nsource_port = {}\nprotocol = \"udp\"\ntarget_host = \"127.0.0.1\"\ntarget_port = 53\n{group}\n",
        free_port()
    ));
    let check = Command::new(BIN).args(["check-config", "--config", &path, "server"]).output().expect("run check-config");
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("mappings[0]") && stderr.contains("a UDP mapping has none"), "{stderr}");
}
