//! Many named clients per server: each with its own secret, mappings, traffic and
//! status; managed through the API; one leaving or being removed never touches
//! the others.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "default-client-secret";

fn client_entry(server: &Daemon, name: &str) -> Value {
    let list = get_data(server, "/api/client/list");
    list["clients"].as_array().expect("clients").iter().find(|c| c["name"] == name).cloned().unwrap_or(Value::Null)
}

/// The status of the mapping on `port` as listed; empty when there is none.
fn mapping_status(server: &Daemon, port: u16) -> String {
    let mapping = listed_mapping(server, port).unwrap_or(Value::Null);
    mapping["status"].as_str().unwrap_or_default().to_string()
}

/// A visitor streaming `total` random bytes through `port` in chunks, pausing
/// between them so the transfer is still running while the test acts; returns
/// whether what came back from the echo target matched exactly.
fn slow_echo_transfer(port: u16, total: usize, started: Arc<AtomicBool>) -> std::thread::JoinHandle<bool> {
    std::thread::spawn(move || {
        let payload = random_bytes(total);
        let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut reader = conn.try_clone().unwrap();
        let expected = sha256(&payload);
        let receiver = std::thread::spawn(move || {
            let mut got = Vec::new();
            let _ = reader.read_to_end(&mut got);
            sha256(&got) == expected
        });
        for (i, chunk) in payload.chunks(64 * 1024).enumerate() {
            if conn.write_all(chunk).is_err() {
                return false;
            }
            if i == 0 {
                started.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(30));
        }
        let _ = conn.shutdown(std::net::Shutdown::Write);
        receiver.join().unwrap_or(false)
    })
}

#[test]
fn three_named_clients_serve_their_own_mappings_and_one_leaving_touches_no_other() {
    let server = Daemon::server(SECRET, &[]);
    let office_secret = create_client(&server, "office");
    let home_secret = create_client(&server, "home");
    let _default = Daemon::client(&server, SECRET, &[]);
    let mut office = Daemon::client(&server, &office_secret, &["--name", "office"]);
    let _home = Daemon::client(&server, &home_secret, &["--name", "home"]);

    let echo = echo_server();
    let ports = [("default", free_port()), ("office", free_port()), ("home", free_port())];
    for (client, port) in ports {
        let created = create_tunneled_mapping(&server, port, echo, client);
        assert_eq!(created["client"], client, "{created}");
        assert_eq!(created["status"], "active", "{created}");
    }
    for (client, port) in ports {
        let payload = random_bytes(200_000);
        assert_eq!(sha256(&roundtrip(loopback(port), &payload)), sha256(&payload), "through {client}");
    }
    // Each client's tunnel carried its own mapping's bytes.
    let text = metrics_text(&server);
    for (client, _) in ports {
        let received = metric_value(&text, "tunneld_tunnel_bytes_total", &[("client", client), ("direction", "received")]).unwrap();
        assert!(received >= 200_000.0, "client {client} carried {received} bytes:\n{text}");
        assert_eq!(metric_value(&text, "tunneld_tunnel_connected", &[("client", client)]), Some(1.0), "{text}");
    }

    // Long transfers through the two clients that stay, while the third dies.
    let transfers: Vec<_> = [ports[0].1, ports[2].1]
        .into_iter()
        .map(|port| {
            let started = Arc::new(AtomicBool::new(false));
            (slow_echo_transfer(port, 2 * 1024 * 1024, started.clone()), started)
        })
        .collect();
    wait_for("both transfers to start", Duration::from_secs(10), || {
        transfers.iter().all(|(_, started)| started.load(Ordering::SeqCst)).then_some(())
    });
    office.kill();
    wait_for("the office mapping to wait for its client", Duration::from_secs(15), || {
        (mapping_status(&server, ports[1].1) == "waiting_for_tunnel").then_some(())
    });
    assert_eq!(mapping_status(&server, ports[0].1), "active");
    assert_eq!(mapping_status(&server, ports[2].1), "active");
    let office_entry = client_entry(&server, "office");
    assert_eq!(office_entry["connected"], false, "{office_entry}");
    assert_eq!(office_entry["peer"], Value::Null, "{office_entry}");
    let health: Value = ureq::get(&server.url("/health")).call().unwrap().into_json().unwrap();
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["reasons"].to_string().contains("tunnel client office is not connected"), "{health}");
    for (transfer, _) in transfers {
        assert!(transfer.join().unwrap(), "a visitor of another client was touched when office left");
    }
    let lost = wait_for("a client_lost event naming office", Duration::from_secs(15), || {
        let events = get_data(&server, "/api/events");
        events["events"].as_array().unwrap().iter().find(|e| e["kind"] == "client_lost").cloned()
    });
    assert_eq!(lost["client"], "office", "{lost}");
    // Visitors of the missing client are refused; the others are served.
    assert!(visit(ports[1].1, b"hello").is_empty(), "no client, no answer");

    // It comes back under its name and its mapping with it.
    let _office = Daemon::client(&server, &office_secret, &["--name", "office"]);
    wait_for("the office mapping to be active again", Duration::from_secs(15), || {
        (mapping_status(&server, ports[1].1) == "active").then_some(())
    });
    let payload = random_bytes(100_000);
    assert_eq!(roundtrip(loopback(ports[1].1), &payload), payload);
    let office_entry = client_entry(&server, "office");
    assert_eq!(office_entry["connected"], true, "{office_entry}");
    assert_eq!(office_entry["mappings"], 1, "{office_entry}");
    assert!(office_entry["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{office_entry}");
    assert!(office_entry["connected_since"].as_f64().is_some(), "{office_entry}");
}

#[test]
fn a_valid_name_with_another_clients_secret_is_refused() {
    let server = Daemon::server(SECRET, &[]);
    let _office_secret = create_client(&server, "office");
    let home_secret = create_client(&server, "home");
    let impostor = Daemon::client_unconnected(&server, &home_secret, &["--name", "office"]);
    impostor.wait_for_log("unknown client name or wrong secret", Duration::from_secs(20));
    // The server's secret is `default`'s, not anyone else's.
    let as_default_secret = Daemon::client_unconnected(&server, SECRET, &["--name", "home"]);
    let unknown = Daemon::client_unconnected(&server, &home_secret, &["--name", "nobody"]);
    for refused in [&as_default_secret, &unknown] {
        refused.wait_for_log("unknown client name or wrong secret", Duration::from_secs(20));
    }
    let text = metrics_text(&server);
    assert!(metric_value(&text, "tunneld_tunnel_sessions_total", &[("result", "auth_failed")]).unwrap() >= 3.0, "{text}");
    assert_eq!(metric_value(&text, "tunneld_tunnel_sessions_total", &[("result", "ok")]), Some(0.0), "{text}");
    for name in ["office", "home"] {
        assert_eq!(client_entry(&server, name)["connected"], false);
    }
    assert!(!text.contains("client=\"nobody\""), "an unknown name creates no series:\n{text}");
}

#[test]
fn removing_a_client_closes_its_session_and_its_connections_within_a_second() {
    let server = Daemon::server(SECRET, &[]);
    let office_secret = create_client(&server, "office");
    let office = Daemon::client(&server, &office_secret, &["--name", "office"]);
    let _default = Daemon::client(&server, SECRET, &[]);
    let echo = echo_server();
    let (office_port, default_port) = (free_port(), free_port());
    create_tunneled_mapping(&server, office_port, echo, "office");
    create_tunneled_mapping(&server, default_port, echo, "default");

    // A visitor in the middle of an exchange through office.
    let mut visitor = TcpStream::connect(("127.0.0.1", office_port)).unwrap();
    visitor.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    visitor.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    visitor.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");

    let (status, body) = post(&server, "/api/client/remove", json!({"name": "office"}));
    assert_eq!(status, 409, "in use by a mapping: {body}");
    assert!(body["message"].as_str().unwrap().contains(&office_port.to_string()), "{body}");
    assert_eq!(client_entry(&server, "office")["connected"], true, "a refused removal changes nothing");

    let removed_at = Instant::now();
    let (status, body) = post(&server, "/api/client/remove", json!({"name": "office", "force": true}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["mappings_waiting"], json!([office_port]), "{body}");
    // The visitor's connection is cut, not left to finish.
    visitor.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut rest = Vec::new();
    let ended = visitor.read_to_end(&mut rest);
    assert!(
        !matches!(&ended, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "the visitor's connection was still open a second after the removal"
    );
    // The client's session is gone within the same second.
    let gone = office.wait_for_notify("STATUS=disconnected", Duration::from_secs(1));
    assert!(gone.contains("disconnected"), "{gone}");
    assert!(removed_at.elapsed() < Duration::from_secs(2), "took {:?}", removed_at.elapsed());

    assert_eq!(client_entry(&server, "office"), Value::Null, "removed from the list");
    assert_eq!(mapping_status(&server, office_port), "waiting_for_tunnel");
    let text = metrics_text(&server);
    assert!(!text.contains("client=\"office\"}") && !text.contains("client=\"office\",direction"), "series removed:\n{text}");
    // It cannot come back with its old secret.
    office.wait_for_log("unknown client name or wrong secret", Duration::from_secs(20));
    // The other client never noticed.
    let payload = random_bytes(50_000);
    assert_eq!(roundtrip(loopback(default_port), &payload), payload);
    // Created again under the same name, with a new secret, it serves the mapping.
    let new_secret = create_client(&server, "office");
    assert_ne!(new_secret, office_secret);
    let _office = Daemon::client(&server, &new_secret, &["--name", "office"]);
    wait_for("the office mapping to be active again", Duration::from_secs(15), || {
        (mapping_status(&server, office_port) == "active").then_some(())
    });
    assert_eq!(roundtrip(loopback(office_port), b"again"), b"again");
}

#[test]
fn creating_and_removing_clients_while_traffic_flows_loses_no_bytes() {
    let server = Daemon::server(SECRET, &[]);
    let _default = Daemon::client(&server, SECRET, &[]);
    let port = free_port();
    create_tunneled_mapping(&server, port, echo_server(), "default");
    let started = Arc::new(AtomicBool::new(false));
    let total = 4 * 1024 * 1024;
    let transfer = slow_echo_transfer(port, total, started.clone());
    wait_for("the transfer to start", Duration::from_secs(10), || started.load(Ordering::SeqCst).then_some(()));
    // Clients come and go, some of them connected, while the bytes flow.
    let mut rounds = 0;
    while !transfer.is_finished() || rounds < 3 {
        let name = format!("churn-{rounds}");
        let secret = create_client(&server, &name);
        if rounds % 2 == 0 {
            let churn = Daemon::client(&server, &secret, &["--name", &name]);
            let (status, body) = post(&server, "/api/client/remove", json!({"name": name}));
            assert_eq!(status, 200, "{body}");
            churn.wait_for_notify("STATUS=disconnected", Duration::from_secs(5));
        } else {
            let (status, body) = post(&server, "/api/client/remove", json!({"name": name}));
            assert_eq!(status, 200, "{body}");
        }
        rounds += 1;
    }
    assert!(transfer.join().unwrap(), "the default client's visitor got every byte back, in order");
    let text = metrics_text(&server);
    let port_label = port.to_string();
    for direction in ["sent", "received"] {
        let counted = metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &port_label), ("direction", direction)]);
        assert_eq!(counted, Some(total as f64), "{direction}: counted to the byte");
    }
    let clients = get_data(&server, "/api/client/list");
    assert_eq!(clients["count"], 1, "only default is left: {clients}");
}

#[test]
fn clients_are_validated_listed_with_their_traffic_and_restored_after_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let server = Daemon::server_with_state(state.path(), SECRET, &[]);
    for (body, status, needle) in [
        (json!({"name": ""}), 400, "1 to 64"),
        (json!({"name": "Office"}), 400, "a-z, 0-9"),
        (json!({"name": "a b"}), 400, "a-z, 0-9"),
        (json!({"name": "x".repeat(65)}), 400, "1 to 64"),
        (json!({"name": 7}), 400, "must be a string"),
        (json!({}), 400, "missing field `name`"),
        (json!({"name": "ok", "secret": "mine"}), 400, "unknown field `secret`"),
        (json!({"name": "default"}), 409, "already exists"),
    ] {
        let (got, reply) = post(&server, "/api/client/create", body.clone());
        assert_eq!(got, status, "{body} -> {reply}");
        assert!(reply["message"].as_str().unwrap_or_default().contains(needle), "{body} -> {reply}");
    }
    let lab_secret = create_client(&server, "lab-2");
    let (status, reply) = post(&server, "/api/client/create", json!({"name": "lab-2"}));
    assert_eq!(status, 409, "{reply}");
    let (status, reply) = post(&server, "/api/client/remove", json!({"name": "default"}));
    assert_eq!(status, 400, "{reply}");
    let (status, reply) = post(&server, "/api/client/remove", json!({"name": "nobody"}));
    assert_eq!(status, 404, "{reply}");

    let echo = echo_server();
    let port = free_port();
    let body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(), "use_tunnel": true, "client": "nobody"});
    let (status, reply) = post(&server, "/api/mapping/create", body);
    assert_eq!(status, 400, "{reply}");
    assert!(reply["message"].as_str().unwrap().contains("client"), "{reply}");
    let body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(), "client": "lab-2"});
    let (status, reply) = post(&server, "/api/mapping/create", body);
    assert_eq!(status, 400, "a direct mapping has no client: {reply}");
    let direct_port = free_port();
    let direct = create_mapping(&server, direct_port, echo, false);
    assert_eq!(direct["data"]["client"], Value::Null, "{direct}");
    let tunneled = create_tunneled_mapping(&server, port, echo, "lab-2");
    assert_eq!(tunneled["status"], "waiting_for_tunnel", "{tunneled}");

    // A known client's series exist at 0 before it ever connects.
    let text = metrics_text(&server);
    assert_eq!(metric_value(&text, "tunneld_tunnel_connected", &[("client", "lab-2")]), Some(0.0), "{text}");
    assert_eq!(metric_value(&text, "tunneld_tunnel_bytes_total", &[("client", "lab-2"), ("direction", "sent")]), Some(0.0));
    assert_eq!(
        metric_value(&text, "tunneld_mapping_info", &[("port", &port.to_string()), ("mode", "tunnel"), ("client", "lab-2")]),
        Some(1.0),
        "{text}"
    );

    {
        let _lab = Daemon::client(&server, &lab_secret, &["--name", "lab-2"]);
        let payload = random_bytes(30_000);
        assert_eq!(roundtrip(loopback(port), &payload), payload);
        let list = get_data(&server, "/api/client/list");
        assert_eq!(list["count"], 2, "{list}");
        assert!(!list.to_string().contains(&lab_secret), "a secret is never shown again: {list}");
        let lab = client_entry(&server, "lab-2");
        assert_eq!(lab["connected"], true, "{lab}");
        assert_eq!(lab["mappings"], 1, "{lab}");
        assert!(lab["bytes_received"].as_u64().unwrap() >= 30_000, "{lab}");

        // The traffic report: its tunnel block is the sum over the clients.
        let traffic = get_data(&server, "/api/stats/traffic");
        let clients = traffic["clients"].as_array().expect("clients in the traffic report");
        for field in ["bytes_sent", "bytes_received"] {
            let sum: u64 = clients.iter().map(|c| c[field].as_u64().unwrap()).sum();
            // The two reads are a moment apart; heartbeats may add a few bytes.
            let tunnel = traffic["tunnel"][field].as_u64().unwrap();
            assert_eq!(tunnel, sum, "{field}: {traffic}");
        }
        assert_eq!(traffic["tunnel"]["connected"], true);
        let row = traffic["mappings"].as_array().unwrap().iter().find(|m| m["port"] == port).unwrap().clone();
        assert_eq!(row["client"], "lab-2", "{row}");
        assert!(!server.log().contains(&lab_secret), "secrets never reach the log");
    }

    // Restarted on the same state: the client and its mapping are back, and the
    // client authenticates with the secret it was given before.
    let tunnel = server.tunnel.unwrap();
    drop(server);
    let server = Daemon::server_restarted(state.path(), tunnel, SECRET);
    assert_eq!(client_entry(&server, "lab-2")["mappings"], 1);
    let _lab = Daemon::client(&server, &lab_secret, &["--name", "lab-2"]);
    wait_for("the restored mapping to be active", Duration::from_secs(15), || (mapping_status(&server, port) == "active").then_some(()));
    assert_eq!(roundtrip(loopback(port), b"restored"), b"restored");
}

#[test]
fn a_client_name_is_checked_before_the_client_starts() {
    let out = std::process::Command::new(BIN)
        .args([
            "client",
            "--server",
            "127.0.0.1:9",
            "--secret",
            "s",
            "--name",
            "Bad Name",
            "--fingerprint",
            &format!("sha256:{}", "0".repeat(64)),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("client.name"), "{stderr}");
}

#[test]
fn a_second_process_under_a_name_replaces_only_that_clients_session() {
    let server = Daemon::server(SECRET, &[]);
    let office_secret = create_client(&server, "office");
    let _default = Daemon::client(&server, SECRET, &[]);
    let _first = Daemon::client(&server, &office_secret, &["--name", "office"]);
    let default_peer = client_entry(&server, "default")["peer"].clone();
    let first_peer = client_entry(&server, "office")["peer"].clone();
    let _second = Daemon::client(&server, &office_secret, &["--name", "office"]);
    let replaced = wait_for("the replacement to be counted", Duration::from_secs(15), || {
        let text = metrics_text(&server);
        metric_value(&text, "tunneld_tunnel_sessions_total", &[("result", "replaced")]).filter(|v| *v >= 1.0)
    });
    assert!(replaced >= 1.0);
    let log = server.log();
    let warning = log.lines().find(|l| l.contains("replaces the connected one")).unwrap_or_else(|| panic!("{log}"));
    assert!(warning.contains("client=office") && warning.contains(first_peer.as_str().unwrap()), "{warning}");
    let office = client_entry(&server, "office");
    assert_eq!(office["connected"], true, "{office}");
    assert_ne!(office["peer"], first_peer, "the replaced connection is gone: {office}");
    assert_eq!(client_entry(&server, "default")["peer"], default_peer, "another client's session is untouched");
}
