//! UDP mappings through the tunnel (issue 22 §3): datagrams stay datagrams
//! between the server and the client — QUIC datagrams (RFC 9221) on the tunnel
//! port over UDP when a TLS tunnel can reach it, else framed over a data
//! channel of the tunnel (always on a plain tunnel) — counted exactly like a
//! direct UDP mapping's, with the direct mapping's sessions, expiry, caps and
//! drops, and the transport in use shown in the log, `/api/client/list` and
//! `tunneld_tunnel_udp_transport`.
//!
//! Real UDP sockets on loopback; visitors come from 127.0.0.2/3/4 so each one's
//! replies can be told apart. The fallback is forced by reaching the server
//! through a TCP forwarder on another port: the client's QUIC attempt goes to
//! that port number over UDP, where nothing answers.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use common::udp::*;
use common::*;
use serde_json::{json, Value};

const SECRET: &str = "udp-tunnel-test-secret-0123456789";

/// A UDP mapping through the client `default`.
fn create_tunneled_udp(server: &Daemon, port: u16, target: SocketAddr) -> Value {
    let body = json!({"source_port": port, "protocol": "udp", "target_host": target.ip().to_string(),
                      "target_port": target.port(), "use_tunnel": true});
    let (status, created) = post(server, "/api/mapping/create", body);
    assert_eq!(status, 200, "{created}");
    assert_eq!(created["data"]["protocol"], "udp");
    assert_eq!(created["data"]["use_tunnel"], true, "{created}");
    created
}

/// A TLS server (the default) with `config` as its config file.
fn tls_server(config: &str) -> (tempfile::TempDir, Daemon) {
    let (dir, path) = config_file(config);
    (dir, Daemon::server(SECRET, &["--config", &path]))
}

/// A plain (`server.tls = false`) server with `config`, and its plain client.
fn plain_pair(config: &str) -> (tempfile::TempDir, Daemon, Daemon) {
    let (dir, path) = config_file(config);
    let server = Daemon::server_env(SECRET, &["--config", &path], &[("TUNNELD_SERVER__TLS", "false")]);
    let client = Daemon::client_with_env(server.tunnel.unwrap(), SECRET, &[], &[("TUNNELD_CLIENT__TLS", "false")]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    (dir, server, client)
}

/// `udp_transport` of the client `name` in `/api/client/list`.
fn listed_transport(server: &Daemon, name: &str) -> Value {
    let list = get_data(server, "/api/client/list");
    let client = list["clients"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().unwrap_or_else(|| panic!("{list}"));
    client.get("udp_transport").cloned().unwrap_or_else(|| panic!("no udp_transport field in {client}"))
}

/// The client `default`'s `UDP` column in `tunneld ctl client list` (the
/// table's columns are aligned: read the row from where the header's `UDP` starts).
fn ctl_listed_transport(server: &Daemon) -> String {
    let out = std::process::Command::new(BIN).args(["ctl", "--api", &server.url(""), "client", "list"]).output().expect("run ctl");
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let header: Vec<char> = table.lines().next().unwrap_or_default().chars().collect();
    let column = header.windows(5).position(|w| w.iter().collect::<String>() == "  UDP").map(|at| at + 2);
    let row = table.lines().find(|l| l.starts_with("default "));
    match (column, row) {
        (Some(column), Some(row)) => row.chars().skip(column).take_while(|c| !c.is_whitespace()).collect(),
        _ => panic!("no UDP column or no default row in\n{table}"),
    }
}

/// Waits until the client `default` shows `transport` in the API and the gauge.
fn wait_for_transport(server: &Daemon, transport: &str) {
    wait_for(&format!("the client's UDP transport to be {transport}"), Duration::from_secs(20), || {
        (listed_transport(server, "default") == transport).then_some(())
    });
    let gauge = |t: &str| scrape_metric(server, "tunneld_tunnel_udp_transport", &[("client", "default"), ("transport", t)]);
    assert_eq!(gauge(transport), Some(1.0), "{}", metrics_text(server));
    let other = if transport == "quic" { "framed" } else { "quic" };
    assert_ne!(gauge(other), Some(1.0), "only one transport is in use");
}

/// Exchanges datagrams of distinct sizes from three visitors through `port`,
/// then checks every count both ways, exactly, in `/metrics` and
/// `/api/stats/traffic`.
fn counts_exactly_both_ways(server: &Daemon, port: u16, sizes: &[usize]) {
    let visitors: Vec<UdpSocket> = [2, 3, 4].into_iter().map(visitor).collect();
    let mut bytes = 0u64;
    let mut datagrams = 0u64;
    for (round, size) in sizes.iter().enumerate() {
        for (i, v) in visitors.iter().enumerate() {
            let payload: Vec<u8> = std::iter::repeat(b'a' + i as u8).take(size + i + round).collect();
            let reply = exchange(v, port, &payload, Duration::from_secs(10)).expect("a reply through the tunnel");
            assert_eq!(reply, payload, "visitor {i} gets its own datagram back, whole");
            bytes += payload.len() as u64;
            datagrams += 1;
        }
    }
    for v in &visitors {
        v.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        assert!(v.recv_from(&mut [0u8; 2048]).is_err(), "no stray replies");
    }
    let text = metrics_text(server);
    let m = |name: &str, extra: &[(&str, &str)]| udp_sample(&text, name, port, extra);
    assert_eq!(m("tunneld_mapping_bytes_total", &[("direction", "sent")]) as u64, bytes);
    assert_eq!(m("tunneld_mapping_bytes_total", &[("direction", "received")]) as u64, bytes);
    assert_eq!(m("tunneld_mapping_datagrams_total", &[("direction", "sent")]) as u64, datagrams);
    assert_eq!(m("tunneld_mapping_datagrams_total", &[("direction", "received")]) as u64, datagrams);
    assert_eq!(m("tunneld_mapping_udp_sessions", &[]), 3.0, "one session per visitor address");
    assert_eq!(m("tunneld_mapping_connections_total", &[]), 3.0, "a session counts as a connection");
    for reason in ["queue_full", "too_large", "session_limit", "no_tunnel"] {
        assert_eq!(m("tunneld_mapping_dropped_datagrams_total", &[("reason", reason)]), 0.0, "{reason}");
    }
    let traffic = traffic_entry(server, port).expect("the mapping in /api/stats/traffic");
    assert_eq!(traffic["protocol"], "udp");
    assert_eq!(traffic["bytes_sent"], bytes);
    assert_eq!(traffic["bytes_received"], bytes);
    assert_eq!(traffic["udp"]["datagrams_sent"], datagrams);
    assert_eq!(traffic["udp"]["datagrams_received"], datagrams);
    assert_eq!(traffic["udp"]["sessions"], 3);
    let open = get_data(server, &format!("/api/connections?port={port}&protocol=udp"));
    assert_eq!(open["count"], 3, "{open}");
    for c in open["connections"].as_array().unwrap() {
        assert_eq!(c["client"], "default", "{c}");
        assert_eq!(c["bytes_sent"], c["bytes_received"], "{c}");
    }
}

#[test]
fn a_plain_tunnel_carries_datagrams_framed_counted_exactly_both_ways() {
    let (_dir, server, _client) = plain_pair("");
    let echo = udp_echo();
    let port = free_port();
    create_tunneled_udp(&server, port, echo);
    // Large ones too: a framed datagram is not bound by any path MTU.
    counts_exactly_both_ways(&server, port, &[1, 100, 1400, 9000, 60_000]);
    wait_for_transport(&server, "framed");
    let logged = server.wait_for_log("udp_transport", Duration::from_secs(5));
    assert!(logged.contains("framed"), "{logged}");
}

#[test]
fn a_tls_tunnel_carries_datagrams_as_quic_datagrams_counted_exactly_both_ways() {
    let (_dir, server) = tls_server("");
    let _client = Daemon::client(&server, SECRET, &[]);
    let echo = udp_echo();
    let port = free_port();
    create_tunneled_udp(&server, port, echo);
    // Beyond what one QUIC datagram holds as well: those travel on the QUIC
    // connection's stream, whole, and count the same.
    counts_exactly_both_ways(&server, port, &[1, 64, 1000, 1200, 5000, 60_000]);
    wait_for_transport(&server, "quic");
    assert_eq!(ctl_listed_transport(&server), "quic");
    let said = server.wait_for_log("the tunnel carries UDP datagrams", Duration::from_secs(5));
    assert!(said.contains("udp_transport") && said.contains("quic"), "{said}");

    // The QUIC connection's bytes are the tunnel's wire bytes too (counted
    // every second): 1 MB each way, with QUIC's overhead on top and what the
    // exchanges above sent within the last second (at most ~0.2 MB).
    // (That a datagram that fits goes as a QUIC datagram and not on the
    // stream is tunnel::datagram's unit test.)
    let wire = |direction: &str| {
        scrape_metric(&server, "tunneld_tunnel_bytes_total", &[("client", "default"), ("direction", direction)]).expect("tunnel bytes")
    };
    let before = (wire("sent"), wire("received"));
    let v = visitor(2);
    for i in 0..1000u32 {
        let payload = [&i.to_be_bytes()[..], &[7u8; 996]].concat();
        assert_eq!(exchange(&v, port, &payload, Duration::from_secs(10)).as_deref(), Some(&payload[..]));
    }
    let grew = wait_for("1 MB each way on the tunnel's wire", Duration::from_secs(5), || {
        let grew = (wire("sent") - before.0, wire("received") - before.1);
        (grew.0 >= 1_000_000.0 && grew.1 >= 1_000_000.0).then_some(grew)
    });
    eprintln!("tunnel wire bytes for 1000 datagrams of 1000 B each way over QUIC: sent {}, received {}", grew.0, grew.1);
    assert!(grew.0 < 1_500_000.0 && grew.1 < 1_500_000.0, "QUIC's overhead on 1000 datagrams of 1 kB each way: {grew:?}");
}

#[test]
fn the_monitor_page_says_on_the_client_card_how_the_tunnel_carries_udp() {
    let Some(chromium) = common::tools::external_tool("chromium", "udp_tunnel") else { return };
    let (_dir, server) = tls_server("");
    let _client = Daemon::client(&server, SECRET, &[]);
    let mut browser = common::browser::Browser::launch(&chromium, &[], None);
    browser.navigate(&server.url("/api/stats/monitor"));
    let card = r#"document.querySelector('[data-testid="client-card"][data-name="default"]')"#;
    browser.wait_for("the connected client's card", &format!("{card}?.dataset.connected === 'true'"));
    assert_eq!(
        browser.eval(&format!("{card}.querySelector('[data-role=\"udp\"]') === null")),
        Value::Bool(true),
        "no UDP fact before a UDP session"
    );

    let echo = udp_echo();
    let port = free_port();
    create_tunneled_udp(&server, port, echo);
    assert_eq!(exchange(&visitor(2), port, b"hello", Duration::from_secs(10)).as_deref(), Some(&b"hello"[..]));
    wait_for_transport(&server, "quic");
    browser.wait_for("the UDP fact on the card", &format!("{card}.querySelector('dd[data-role=\"udp\"]') !== null"));
    let shown = browser.eval(&format!("{card}.querySelector('dd[data-role=\"udp\"]').textContent"));
    assert_eq!(shown, "QUIC datagrams");
    for (width, height, mobile) in [(1440, 900, false), (390, 844, true)] {
        browser.set_viewport(width, height, mobile);
        browser.wait_for("the new width", &format!("window.innerWidth === {width}"));
        browser.eval(&format!("{card}.scrollIntoView({{ block: 'center' }})"));
        browser.screenshot(&format!("udp-transport-card-{width}.png"));
    }
}

/// Forwards every TCP connection to `127.0.0.1:{listen}` to `to`, both ways:
/// the client reaches the tunnel through it, so its QUIC attempt goes to a
/// UDP port where nothing answers.
fn tcp_forwarder(to: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the forwarder");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(inbound) = inbound else { continue };
            let Ok(outbound) = TcpStream::connect(to) else { continue };
            let pipe = |mut from: TcpStream, mut to: TcpStream| {
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16 * 1024];
                    loop {
                        match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if to.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Write);
                })
            };
            pipe(inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
            pipe(outbound, inbound);
        }
    });
    addr
}

#[test]
fn where_udp_to_the_tunnel_port_is_blocked_the_tls_tunnel_falls_back_to_framed() {
    let (_dir, server) = tls_server("");
    let forwarder = tcp_forwarder(server.tunnel.unwrap());
    // Nothing listens on the forwarder's port number over UDP.
    let _blocked = UdpSocket::bind(forwarder).ok();
    let pin = server.fingerprint();
    let client = Daemon::client_with(forwarder, SECRET, &["--fingerprint", &pin]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    let echo = udp_echo();
    let port = free_port();
    create_tunneled_udp(&server, port, echo);
    counts_exactly_both_ways(&server, port, &[1, 500, 1400, 4000]);
    wait_for_transport(&server, "framed");
    assert_eq!(ctl_listed_transport(&server), "framed");
    let said = client.wait_for_log("falling back to framed", Duration::from_secs(5));
    assert!(said.contains("udp_transport"), "{said}");
}

#[test]
fn framed_sessions_end_when_idle_on_both_sides_and_the_next_datagram_opens_a_new_one() {
    let (_dir, server, client) = plain_pair("[server]\nudp_session_idle_secs = 1\n");
    sessions_end_when_idle_on_both_sides(&server, &client, "framed");
}

#[test]
fn quic_sessions_end_when_idle_on_both_sides_and_the_next_datagram_opens_a_new_one() {
    let (_dir, server) = tls_server("[server]\nudp_session_idle_secs = 1\n");
    let client = Daemon::client(&server, SECRET, &[]);
    sessions_end_when_idle_on_both_sides(&server, &client, "quic");
}

/// One session through `transport`: it ends after the server's idle time, on
/// the server and (told so) on the client; the same visitor then gets a new one.
fn sessions_end_when_idle_on_both_sides(server: &Daemon, client: &Daemon, transport: &str) {
    let echo = udp_echo();
    let port = free_port();
    create_tunneled_udp(server, port, echo);
    let v = visitor(2);
    assert_eq!(exchange(&v, port, b"first", Duration::from_secs(10)).as_deref(), Some(&b"first"[..]));
    assert_eq!(udp_metric(server, "tunneld_mapping_udp_sessions", port, &[]), 1.0);
    assert_eq!(listed_transport(server, "default"), transport);
    // The client holds a socket toward the target per session; the server's
    // idle end closes it there too.
    wait_for("the client's session socket", Duration::from_secs(10), || {
        (scrape_metric(client, "tunneld_client_udp_sessions", &[]) == Some(1.0)).then_some(())
    });
    wait_for("the idle session to end on the server", Duration::from_secs(10), || {
        (udp_metric(server, "tunneld_mapping_udp_sessions", port, &[]) == 0.0).then_some(())
    });
    // Told by the server, not by its own safety net (2 × idle + 5 s later).
    wait_for("the idle session to end on the client", Duration::from_secs(3), || {
        (scrape_metric(client, "tunneld_client_udp_sessions", &[]) == Some(0.0)).then_some(())
    });
    let logged = wait_for("the ended session in the connection log", Duration::from_secs(10), || {
        let log = get_data(server, &format!("/api/connections/log?port={port}&protocol=udp"));
        (log["count"] == 1).then_some(log)
    });
    assert_eq!(logged["connections"][0]["end"], "idle_timeout", "{logged}");
    assert_eq!(logged["connections"][0]["bytes_sent"], 5);
    assert_eq!(exchange(&v, port, b"again", Duration::from_secs(10)).as_deref(), Some(&b"again"[..]));
    assert_eq!(udp_metric(server, "tunneld_mapping_connections_total", port, &[]), 2.0);
}

#[test]
fn the_session_cap_holds_through_the_tunnel() {
    const CAP: usize = 2;
    let (_dir, server, _client) = plain_pair(&format!("[server]\nmax_udp_sessions_per_mapping = {CAP}\n"));
    let echo = udp_echo();
    let port = free_port();
    create_tunneled_udp(&server, port, echo);
    let first: Vec<UdpSocket> = (0..CAP).map(|_| visitor(2)).collect();
    for v in &first {
        assert!(exchange(v, port, b"hello", Duration::from_secs(10)).is_some());
    }
    let late: Vec<UdpSocket> = (0..3).map(|_| visitor(3)).collect();
    for v in &late {
        assert_eq!(exchange(v, port, b"hello", Duration::from_millis(300)), None, "no session beyond the cap");
    }
    assert_eq!(udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "session_limit")]), 3.0);
    assert_eq!(udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]), CAP as f64);
    assert!(exchange(&first[0], port, b"still here", Duration::from_secs(10)).is_some());
}

#[test]
fn datagrams_for_a_client_that_is_not_connected_are_dropped_and_counted_no_tunnel() {
    let (_dir, path) = config_file("");
    let server = Daemon::server_env(SECRET, &["--config", &path], &[("TUNNELD_SERVER__TLS", "false")]);
    let echo = udp_echo();
    let port = free_port();
    create_tunneled_udp(&server, port, echo);
    let v = visitor(2);
    for _ in 0..3 {
        assert_eq!(exchange(&v, port, b"anyone?", Duration::from_millis(200)), None);
    }
    let no_tunnel = || udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "no_tunnel")]);
    assert_eq!(no_tunnel(), 3.0);
    assert_eq!(udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]), 0.0, "no session without a tunnel");
    assert_eq!(listed_transport(&server, "default"), Value::Null, "not connected: no transport");
    assert_eq!(ctl_listed_transport(&server), "-");

    // A client comes: served. It goes: dropped again, its sessions with it.
    let mut client = Daemon::client_with_env(server.tunnel.unwrap(), SECRET, &[], &[("TUNNELD_CLIENT__TLS", "false")]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    assert_eq!(exchange(&v, port, b"hello", Duration::from_secs(10)).as_deref(), Some(&b"hello"[..]));
    assert_eq!(listed_transport(&server, "default"), "framed");
    client.kill();
    wait_for("the client's session to end", Duration::from_secs(20), || {
        (listed_transport(&server, "default") == Value::Null).then_some(())
    });
    wait_for("the tunneled session to end with the tunnel", Duration::from_secs(10), || {
        (udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]) == 0.0).then_some(())
    });
    assert_eq!(exchange(&v, port, b"gone?", Duration::from_millis(200)), None);
    assert_eq!(no_tunnel(), 4.0);
    assert_eq!(
        scrape_metric(&server, "tunneld_tunnel_udp_transport", &[("client", "default"), ("transport", "framed")]).unwrap_or(0.0),
        0.0
    );
}

#[test]
fn dig_resolves_through_a_tunneled_udp_mapping_to_dnsmasq() {
    let test = "dig_resolves_through_a_tunneled_udp_mapping_to_dnsmasq";
    let (Some(dnsmasq), Some(dig)) = (common::tools::external_tool("dnsmasq", test), common::tools::external_tool("dig", test)) else {
        return;
    };
    let mut dns = DnsMasq::start(&dnsmasq);
    let (_dir, server) = tls_server("");
    let _client = Daemon::client(&server, SECRET, &[]);
    let port = free_port();
    create_tunneled_udp(&server, port, loopback(dns.port));
    let answer = dns.resolve_through(&dig, port, Duration::from_secs(15));
    assert_eq!(answer, DnsMasq::ANSWER);
    assert!(udp_metric(&server, "tunneld_mapping_datagrams_total", port, &[("direction", "received")]) >= 1.0);
}

#[test]
fn a_tunneled_udp_mapping_that_would_come_back_to_itself_through_a_client_here_drops_its_datagrams() {
    let (_dir, path) = config_file("");
    let server = Daemon::server_env(SECRET, &["--config", &path], &[("TUNNELD_SERVER__TLS", "false")]);
    let port = free_port();
    // No client yet: nothing says where the target is; created.
    create_tunneled_udp(&server, port, loopback(port));
    let client = Daemon::client_with_env(server.tunnel.unwrap(), SECRET, &[], &[("TUNNELD_CLIENT__TLS", "false")]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    // The client runs on this host, and its target is the mapping's own port.
    let v = visitor(2);
    assert_eq!(exchange(&v, port, b"round and round", Duration::from_millis(300)), None);
    assert_eq!(udp_metric(&server, "tunneld_mapping_refused_total", port, &[("reason", "loop")]), 1.0);
    assert_eq!(udp_metric(&server, "tunneld_mapping_datagrams_total", port, &[("direction", "sent")]), 0.0);
    assert_eq!(udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]), 0.0);
}

#[test]
fn a_stalled_tunnel_fills_bounded_queues_and_the_rest_is_dropped_and_counted_queue_full() {
    let (_dir, server, client) = plain_pair("");
    let echo = udp_echo();
    let port = free_port();
    create_tunneled_udp(&server, port, echo);
    let v = visitor(2);
    assert!(exchange(&v, port, b"open", Duration::from_secs(10)).is_some(), "the session is open");
    // The client stops reading: the tunnel's socket buffers fill, then the
    // link's queue, then the session's; nothing more is held.
    client.signal("STOP");
    const FLOOD: usize = 20_000;
    for _ in 0..FLOOD {
        let _ = v.send_to(&[3u8; 1000], loopback(port));
        std::thread::sleep(Duration::from_micros(20));
    }
    let dropped = wait_for("the overflow to be counted", Duration::from_secs(20), || {
        let n = udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "queue_full")]);
        (n >= 5000.0).then_some(n)
    });
    let sent = udp_metric(&server, "tunneld_mapping_datagrams_total", port, &[("direction", "sent")]);
    eprintln!("stalled tunnel: {sent} datagrams taken, {dropped} dropped as queue_full, of {FLOOD} sent");
    assert!(dropped + sent <= (FLOOD + 1) as f64, "nothing counted twice: {dropped} dropped, {sent} sent");
    assert!(sent < 15_000.0, "a stalled tunnel took {sent} datagrams: held without bound?");
    let (status, _) = http("GET", &server.url("/api/mapping/list"), None);
    assert_eq!(status, 200, "the API answers");
    client.signal("CONT");
    // What was held goes through once the client reads again; the session still works.
    let v2 = visitor(3);
    assert_eq!(exchange(&v2, port, b"after", Duration::from_secs(10)).as_deref(), Some(&b"after"[..]));
}

#[test]
fn a_client_group_serves_each_session_through_its_chosen_member_and_fails_over() {
    let (_dir, server) = tls_server("");
    let mut clients: Vec<Daemon> = ["office-a", "office-b"]
        .iter()
        .map(|name| {
            let secret = create_client(&server, name);
            Daemon::client(&server, &secret, &["--name", name])
        })
        .collect();
    let echo = udp_echo();
    let port = free_port();
    let body = json!({"source_port": port, "protocol": "udp", "target_host": "127.0.0.1", "target_port": echo.port(),
                      "use_tunnel": true, "clients": ["office-a", "office-b"]});
    let (status, created) = post(&server, "/api/mapping/create", body);
    assert_eq!(status, 200, "{created}");
    let p = port.to_string();
    let served = |client: &str| {
        scrape_metric(&server, "tunneld_mapping_client_connections_total", &[("port", &p), ("protocol", "udp"), ("client", client)])
    };
    // Failover: the first client serves every session while it is there.
    let first = visitor(2);
    assert_eq!(exchange(&first, port, b"one", Duration::from_secs(10)).as_deref(), Some(&b"one"[..]));
    assert_eq!((served("office-a"), served("office-b")), (Some(1.0), Some(0.0)));
    let open = get_data(&server, &format!("/api/connections?port={port}&protocol=udp"));
    assert_eq!(open["connections"][0]["client"], "office-a", "{open}");
    assert_eq!(listed_transport(&server, "office-a"), "quic");
    assert_eq!(listed_transport(&server, "office-b"), Value::Null, "no session through it yet");

    // office-a goes: its session ends with its tunnel; the next one goes through office-b.
    clients[0].kill();
    wait_for("office-a's session to end", Duration::from_secs(20), || {
        (udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]) == 0.0).then_some(())
    });
    assert_eq!(exchange(&first, port, b"two", Duration::from_secs(10)).as_deref(), Some(&b"two"[..]));
    assert_eq!((served("office-a"), served("office-b")), (Some(1.0), Some(1.0)));
    assert_eq!(listed_transport(&server, "office-b"), "quic");
    assert_eq!(udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "no_tunnel")]), 0.0);
}
