//! Server and client on two network hosts (namespaces joined by a veth pair,
//! `common::netns`): the client reaches only the server's tunnel port, the target
//! exists only on the client's side, and a cut of the link (not a killed process)
//! is detected by heartbeats on both sides and healed by the client alone.
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::netns::{connect_in, echo_in, echo_target_in, in_namespace, link, NetNs};
use common::Daemon;
use serde_json::json;

const SECRET: &str = "two-hosts-secret-0123456789";
const HEARTBEAT_SECS: u64 = 2;

/// A sample of a daemon's `/metrics`, read inside its namespace.
fn metric_in(ns: &Path, daemon: &Daemon, name: &'static str, labels: &'static [(&'static str, &'static str)]) -> Option<f64> {
    let url = daemon.url("/metrics");
    in_namespace(ns, move || {
        let text = ureq::get(&url).call().ok()?.into_string().ok()?;
        common::metric_value(&text, name, labels)
    })
}

#[test]
fn server_and_client_on_two_hosts_survive_a_cut_of_the_link() {
    let test = "server_and_client_on_two_hosts_survive_a_cut_of_the_link";
    let Some(server_host) = NetNs::create(test) else { return };
    let Some(client_host) = NetNs::create(test) else { return };
    let (server_link, _) = link(&server_host, "10.213.0.1/30", &client_host, "10.213.0.2/30");
    let (on_server, on_client) = (server_host.path(), client_host.path());

    let tunnel: SocketAddr = "10.213.0.1:9000".parse().expect("address");
    let heartbeat = HEARTBEAT_SECS.to_string();
    let server = Daemon::server_wrapped(&server_host.wrapper(), tunnel, SECRET, &[("TUNNELD_SERVER__HEARTBEAT_INTERVAL_SECS", &heartbeat)]);
    let client = Daemon::client_wrapped(&client_host.wrapper(), &server, SECRET);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));

    // The target exists on the client's side only; the server's API (on its
    // loopback) is out of the client's reach.
    let target = echo_target_in(&on_client);
    assert!(connect_in(&on_server, target).is_err(), "the target is reachable from the server's host");
    let api_port = server.http.port();
    for api in [SocketAddr::from(([10, 213, 0, 1], api_port)), SocketAddr::from(([127, 0, 0, 1], api_port))] {
        assert!(connect_in(&on_client, api).is_err(), "the server's API is reachable from the client's host at {api}");
    }

    // A tunneled mapping, created through the API on the server's host.
    let create = server.url("/api/mapping/create");
    let body = json!({"source_port": 7001, "target_host": "127.0.0.1", "target_port": target.port(), "use_tunnel": true}).to_string();
    let (status, answer) = in_namespace(&on_server, move || common::http("POST", &create, Some(&body)));
    assert_eq!(status, 200, "{answer}");
    let mapping: SocketAddr = "127.0.0.1:7001".parse().expect("address");
    echo_in(&on_server, mapping, 256 << 10);

    // A visitor in flight across the cut.
    let mut in_flight = connect_in(&on_server, mapping).expect("connect the visitor in flight");
    in_flight.write_all(&[7u8; 1000]).expect("send");
    let mut first = [0u8; 1000];
    in_flight.read_exact(&mut first).expect("the first echo of the visitor in flight");

    // Cut the link: both sides see the silence within three heartbeat intervals.
    let cut = Instant::now();
    server_host.set_link(&server_link, false);
    // The last heartbeat heard came at most one interval before the cut; the
    // slack covers reading the metric.
    let limit = Duration::from_secs(3 * HEARTBEAT_SECS) + Duration::from_secs(1);
    let server_saw = common::wait_for("the server to drop the silent client", limit * 2, || {
        (metric_in(&on_server, &server, "tunneld_tunnel_connected", &[("client", "default")]) == Some(0.0)).then(|| cut.elapsed())
    });
    let client_saw = common::wait_for("the client to drop the silent server", limit * 2, || {
        (metric_in(&on_client, &client, "tunneld_tunnel_connected", &[("client", "default")]) == Some(0.0)).then(|| cut.elapsed())
    });
    eprintln!("link cut detected: server after {server_saw:?}, client after {client_saw:?} (heartbeat {HEARTBEAT_SECS} s)");
    assert!(
        server_saw <= limit && client_saw <= limit,
        "a cut must be seen within three heartbeat intervals: server {server_saw:?}, client {client_saw:?}"
    );

    // The visitor in flight is reset, not left hanging.
    in_flight.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut rest = [0u8; 16];
    match in_flight.read(&mut rest) {
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        other => panic!("the visitor in flight should get a reset when its tunnel is cut, got {other:?}"),
    }

    // Plug the link back: the client reconnects by itself and traffic flows again.
    server_host.set_link(&server_link, true);
    let plugged = Instant::now();
    client.wait_for_notify("STATUS=connected", Duration::from_secs(60));
    eprintln!("reconnected {:?} after the link came back", plugged.elapsed());
    echo_in(&on_server, mapping, 64 << 10);

    // The counters on both sides agree with what moved.
    let moved = ((256 << 10) + 1000 + (64 << 10)) as f64;
    for direction in ["sent", "received"] {
        let labels: &'static [(&str, &str)] =
            if direction == "sent" { &[("port", "7001"), ("direction", "sent")] } else { &[("port", "7001"), ("direction", "received")] };
        let counted = common::wait_for("the server's mapping counters", Duration::from_secs(10), || {
            metric_in(&on_server, &server, "tunneld_mapping_bytes_total", labels).filter(|v| *v == moved)
        });
        assert_eq!(counted, moved);
    }
    let wire = |ns: &Path, d: &Daemon, direction: &'static str| -> f64 {
        let labels: &'static [(&str, &str)] = if direction == "sent" {
            &[("client", "default"), ("direction", "sent")]
        } else {
            &[("client", "default"), ("direction", "received")]
        };
        metric_in(ns, d, "tunneld_tunnel_bytes_total", labels).unwrap_or(0.0)
    };
    let (server_sent, server_received) = (wire(&on_server, &server, "sent"), wire(&on_server, &server, "received"));
    let (client_sent, client_received) = (wire(&on_client, &client, "sent"), wire(&on_client, &client, "received"));
    eprintln!("tunnel wire bytes: server sent {server_sent} / client received {client_received}; client sent {client_sent} / server received {server_received}");
    // Wire bytes carry every user byte plus framing and TLS; what one side sent
    // into the cut never arrived, so the receiver counts at most what was sent.
    assert!(client_received >= moved && client_received <= server_sent, "server sent {server_sent}, client received {client_received}");
    assert!(server_received >= moved && server_received <= client_sent, "client sent {client_sent}, server received {server_received}");
}
