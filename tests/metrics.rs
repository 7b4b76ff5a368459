//! Live traffic metrics: exact per-mapping counts in both modes, live movement
//! during a transfer, series lifecycle, the JSON view agreeing with `/metrics`,
//! and the exposition passing `promtool check metrics`.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::json;

const SECRET: &str = "metrics-secret";

fn port_metric(d: &Daemon, name: &str, port: u16, direction: Option<&str>) -> Option<f64> {
    let p = port.to_string();
    let mut labels = vec![("port", p.as_str())];
    if let Some(dir) = direction {
        labels.push(("direction", dir));
    }
    scrape_metric(d, name, &labels)
}

/// A target that reads and discards everything, never replying or closing.
fn sink_target() -> SocketAddr {
    target(|mut conn| {
        let _ = std::io::copy(&mut conn, &mut std::io::sink());
    })
}

/// A target that reads until EOF, then sends [`REPLY`] bytes and closes.
fn replying_target() -> SocketAddr {
    target(|mut conn| {
        let _ = std::io::copy(&mut conn, &mut std::io::sink());
        let _ = conn.write_all(&vec![b'r'; REPLY]);
    })
}

const REPLY: usize = 2_500_007;

fn counters_move_while_the_transfer_runs(use_tunnel: bool) {
    let (server, _client) = server_and_client(SECRET, use_tunnel);
    let port = free_port();
    create_mapping(&server, port, sink_target(), use_tunnel);
    assert_eq!(port_metric(&server, "tunneld_mapping_bytes_total", port, Some("sent")), Some(0.0), "series exist at 0 from creation");

    let mut visitor = TcpStream::connect(("127.0.0.1", port)).unwrap();
    const CHUNK: usize = 4 << 20;
    for step in 1..=3 {
        visitor.write_all(&vec![0x5a; CHUNK]).unwrap();
        let want = (step * CHUNK) as f64;
        // The connection stays open: counting at close (frp's way) would show 0.
        wait_for(&format!("sent counter at {want} mid-transfer"), Duration::from_secs(20), || {
            (port_metric(&server, "tunneld_mapping_bytes_total", port, Some("sent")) == Some(want)).then_some(())
        });
        let entry = traffic_entry(&server, port).expect("mapping in traffic JSON");
        assert_eq!(entry["bytes_sent"].as_f64(), Some(want), "JSON reads the same counter");
        assert_eq!(entry["active_connections"], 1);
    }
    drop(visitor);
    wait_for("active connections back to 0", Duration::from_secs(10), || {
        (port_metric(&server, "tunneld_mapping_active_connections", port, None) == Some(0.0)).then_some(())
    });
}

#[test]
fn direct_counters_move_while_a_long_transfer_runs() {
    counters_move_while_the_transfer_runs(false);
}

#[test]
fn tunneled_counters_move_while_a_long_transfer_runs() {
    counters_move_while_the_transfer_runs(true);
}

/// N bytes up, M different bytes down: both directions exact, in `/metrics` and
/// JSON, and for tunnels the wire counters of server and client mirror each other.
fn exact_asymmetric_counts(use_tunnel: bool) {
    const UP: usize = 1_000_003;
    const DOWN: usize = REPLY;
    let (server, client) = server_and_client(SECRET, use_tunnel);
    let port = free_port();
    create_mapping(&server, port, replying_target(), use_tunnel);
    let reply = roundtrip(loopback(port), &vec![b'u'; UP]);
    assert_eq!(reply.len(), DOWN);

    let text = wait_for("connection closed", Duration::from_secs(10), || {
        let t = metrics_text(&server);
        (metric_value(&t, "tunneld_mapping_active_connections", &[("port", &port.to_string())]) == Some(0.0)).then_some(t)
    });
    let p = port.to_string();
    assert_eq!(metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &p), ("direction", "sent")]), Some(UP as f64));
    assert_eq!(metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &p), ("direction", "received")]), Some(DOWN as f64));
    let entry = traffic_entry(&server, port).unwrap();
    assert_eq!(entry["bytes_sent"], UP);
    assert_eq!(entry["bytes_received"], DOWN);

    if let Some(client) = client {
        let tunnel = |d: &Daemon, dir: &str| scrape_metric(d, "tunneld_tunnel_bytes_total", &[("direction", dir)]).unwrap();
        // Heartbeats may be in flight at any instant, so wait for a quiet moment
        // where each side's "sent" equals the other's "received".
        wait_for("server and client wire counters to mirror each other", Duration::from_secs(10), || {
            let (ss, sr, cs, cr) =
                (tunnel(&server, "sent"), tunnel(&server, "received"), tunnel(&client, "sent"), tunnel(&client, "received"));
            (ss == cr && sr == cs).then_some(())
        });
        let server_sent = tunnel(&server, "sent");
        assert!(server_sent > UP as f64, "wire bytes {server_sent} include payload {UP} plus framing");
        let traffic = get_data(&server, "/api/stats/traffic");
        assert!(traffic["tunnel"]["bytes_received"].as_f64().unwrap() > DOWN as f64);
    }
}

#[test]
fn direct_counts_are_exact_in_both_directions() {
    exact_asymmetric_counts(false);
}

#[test]
fn tunneled_counts_are_exact_in_both_directions_and_wire_counters_agree() {
    exact_asymmetric_counts(true);
}

#[test]
fn a_removed_mapping_disappears_from_both_views() {
    let server = Daemon::server(SECRET, &[]);
    let (keep, gone) = (free_port(), free_port());
    let echo = echo_server();
    create_mapping(&server, keep, echo, false);
    create_mapping(&server, gone, echo, false);
    roundtrip(loopback(gone), b"some bytes");
    assert!(metrics_text(&server).contains(&format!("port=\"{gone}\"")));

    let (status, _) = post(&server, "/api/mapping/remove", json!({"port": gone}));
    assert_eq!(status, 200);
    let text = metrics_text(&server);
    assert!(!text.contains(&format!("port=\"{gone}\"")), "no series left for the removed port:\n{text}");
    assert!(text.contains(&format!("port=\"{keep}\"")));
    assert!(traffic_entry(&server, gone).is_none());
    assert!(traffic_entry(&server, keep).is_some());
}

#[test]
fn traffic_json_has_every_documented_field_with_its_type() {
    let server = Daemon::server(SECRET, &[]);
    let _client = Daemon::client(&server, SECRET, &[]);
    let echo = echo_server();
    let (a, b) = (free_port(), free_port());
    create_mapping(&server, a.max(b), echo, true);
    create_mapping(&server, a.min(b), echo, false);
    roundtrip(loopback(a.min(b)), b"x");

    let (status, body) = http("GET", &server.url("/api/stats/traffic"), None);
    assert_eq!(status, 200);
    assert_eq!(body["success"], true);
    assert!(body["message"].is_string());
    let data = &body["data"];
    let tunnel = &data["tunnel"];
    assert!(tunnel["bytes_sent"].is_u64() && tunnel["bytes_received"].is_u64(), "{tunnel}");
    assert!(tunnel["last_update"].is_number(), "tunnel has carried frames: {tunnel}");
    assert_eq!(tunnel["connected"], true);
    assert!(tunnel["connected_since"].is_number());
    assert!(data["total_sent"].is_u64() && data["total_received"].is_u64());
    let now = data["timestamp"].as_f64().expect("timestamp is a number");
    assert!(now > 1_600_000_000.0);

    let mappings = data["mappings"].as_array().expect("mappings array");
    let ports: Vec<u64> = mappings.iter().map(|m| m["port"].as_u64().unwrap()).collect();
    assert_eq!(ports, vec![a.min(b) as u64, a.max(b) as u64], "sorted by port");
    let used = &mappings[0];
    assert_eq!(used["bytes_sent"], 1);
    assert_eq!(used["bytes_received"], 1);
    let last = used["last_update"].as_f64().expect("last_update is when bytes moved");
    assert!(last <= now && last > now - 60.0);
    assert!(mappings[1]["last_update"].is_null(), "never used: null, not now");
    for m in mappings {
        for key in ["bytes_sent", "bytes_received", "active_connections", "connections_total", "connect_errors", "target_port"] {
            assert!(m[key].is_u64(), "{key} in {m}");
        }
        assert!(m["target_host"].is_string() && m["use_tunnel"].is_boolean() && m["status"].is_string());
    }
    let total: u64 = mappings.iter().map(|m| m["bytes_sent"].as_u64().unwrap()).sum();
    assert_eq!(data["total_sent"], total);
}

#[test]
fn metrics_endpoints_have_the_right_content_type_and_pass_promtool() {
    let server = Daemon::server(SECRET, &[]);
    let client = Daemon::client(&server, SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    roundtrip(loopback(port), b"traffic");

    for d in [&server, &client] {
        let resp = ureq::get(&d.url("/metrics")).call().unwrap();
        assert!(resp.content_type().starts_with("text/plain"), "{}", resp.content_type());
        assert!(resp.header("Content-Type").unwrap_or_default().contains("version=0.0.4"));
    }
    let client_text = metrics_text(&client);
    assert_eq!(metric_value(&client_text, "tunneld_tunnel_connected", &[]), Some(1.0));
    assert!(metric_value(&client_text, "tunneld_tunnel_bytes_total", &[("direction", "received")]).unwrap() > 7.0);
    assert!(metric_value(&client_text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);

    let Some(promtool) = tools::external_tool("promtool", "metrics_endpoints_pass_promtool") else { return };
    for d in [&server, &client] {
        let mut child = std::process::Command::new(&promtool)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(metrics_text(d).as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let mut report = String::from_utf8_lossy(&out.stdout).to_string();
        report.push_str(&String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics complains:\n{report}");
    }
}

#[test]
fn concurrent_connections_on_one_port_add_up_exactly() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    let addr: SocketAddr = loopback(port);
    let sizes: Vec<usize> = (0..20).map(|i| 10_000 + i * 7_919).collect();
    let workers: Vec<_> = sizes
        .iter()
        .map(|&n| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                c.write_all(&vec![1u8; n]).unwrap();
                c.shutdown(std::net::Shutdown::Write).unwrap();
                let mut back = Vec::new();
                c.read_to_end(&mut back).unwrap();
                assert_eq!(back.len(), n);
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let expected: usize = sizes.iter().sum();
    wait_for("every connection counted", Duration::from_secs(10), || {
        let e = traffic_entry(&server, port)?;
        (e["active_connections"] == 0).then_some(())
    });
    let e = traffic_entry(&server, port).unwrap();
    assert_eq!(e["bytes_sent"], expected);
    assert_eq!(e["bytes_received"], expected);
    assert_eq!(e["connections_total"], 20);
}
