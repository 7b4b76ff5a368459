//! Client groups: one tunneled mapping served by several real `tunneld client`
//! processes with different names. A visitor goes to a connected client of the
//! group as its balance mode says; when the serving client dies (kill -9) or its
//! link is cut, new visitors go to the others; a client whose side cannot reach
//! the target is taken out by the health check; the mapping waits only when no
//! client is left. Which client served a visitor is seen three ways: the
//! server's `tunneld_mapping_client_connections_total{port,protocol,client}`, the
//! `client` of live connections and of the connection log, and (on two hosts)
//! the target itself, which answers with the name of the host it runs on.
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::netns::{connect_in, in_namespace, link, NetNs};
use common::{create_client, echo_through, free_port, get_data, listed_mapping, loopback, post, scrape_metric, wait_for, Daemon, BIN};
use serde_json::{json, Value};

const SECRET: &str = "client-groups-secret-0123456789";

/// A server and one connected client per name, each with its own secret.
fn server_with_clients(names: &[&str]) -> (Daemon, Vec<Daemon>) {
    let server = Daemon::server(SECRET, &[]);
    let clients = names
        .iter()
        .map(|name| {
            let secret = create_client(&server, name);
            Daemon::client(&server, &secret, &["--name", name])
        })
        .collect();
    (server, clients)
}

/// Creates a tunneled mapping on `port` to `target` with `extra` fields; the mapping.
fn create_group(server: &Daemon, port: u16, target: SocketAddr, extra: Value) -> Value {
    let mut body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target.port(), "use_tunnel": true});
    body.as_object_mut().expect("an object").extend(extra.as_object().expect("an object").clone());
    let (status, answer) = post(server, "/api/mapping/create", body);
    assert_eq!(status, 200, "create the group mapping: {answer}");
    answer["data"].clone()
}

/// `tunneld_mapping_client_connections_total{port, protocol, client}` now (a
/// group's mapping is TCP).
fn served_by(server: &Daemon, port: u16, client: &str) -> f64 {
    let port = port.to_string();
    scrape_metric(server, "tunneld_mapping_client_connections_total", &[("port", &port), ("protocol", "tcp"), ("client", client)])
        .unwrap_or(-1.0)
}

/// The members of the mapping on `port` as `list` shows them: (client, connected, serving).
fn members(server: &Daemon, port: u16) -> Vec<(String, bool, bool)> {
    let mapping = listed_mapping(server, port).expect("the mapping is listed");
    mapping["members"]
        .as_array()
        .unwrap_or_else(|| panic!("members in {mapping}"))
        .iter()
        .map(|m| (m["client"].as_str().unwrap_or("?").to_string(), m["connected"] == true, m["serving"] == true))
        .collect()
}

/// The `client` of each open connection of `port`.
fn live_clients(server: &Daemon, port: u16) -> Vec<String> {
    let data = get_data(server, &format!("/api/connections?port={port}"));
    data["connections"].as_array().expect("connections").iter().map(|c| c["client"].as_str().unwrap_or("-").to_string()).collect()
}

/// A visitor that has had one echo back: connected, and served through some client.
fn open_visitor(port: u16) -> TcpStream {
    let mut visitor = TcpStream::connect(loopback(port)).expect("connect to the mapping");
    visitor.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    visitor.write_all(b"ping").expect("send");
    let mut echo = [0u8; 4];
    visitor.read_exact(&mut echo).expect("the echo");
    visitor
}

#[test]
fn a_group_fails_over_at_once_when_its_serving_client_is_killed_and_waits_only_when_all_are_gone() {
    let (server, mut clients) = server_with_clients(&["office-a", "office-b"]);
    let target = common::echo_server();
    let port = free_port();
    let created = create_group(&server, port, target, json!({"clients": ["office-a", "office-b"]}));
    assert_eq!(created["client"], "office-a", "the old field names the first client: {created}");
    assert_eq!(created["clients"], json!(["office-a", "office-b"]), "{created}");
    assert_eq!(created["balance"], "failover", "failover is the default: {created}");
    assert_eq!(served_by(&server, port, "office-b"), 0.0, "each client's series exists from the start");

    // Failover: the first client in list order serves every visitor.
    for _ in 0..5 {
        echo_through(port, 2000);
    }
    let held = open_visitor(port);
    assert_eq!(live_clients(&server, port), ["office-a"], "a live connection names the client that serves it");
    assert_eq!((served_by(&server, port, "office-a"), served_by(&server, port, "office-b")), (6.0, 0.0));
    assert_eq!(members(&server, port), [("office-a".into(), true, true), ("office-b".into(), true, false)]);
    drop(held);
    // Its exchange ends once office-a relays the target's EOF back: stopped
    // before that, office-a would hold it open, and the wait below would see
    // two connections (or this one instead of the caught visitor).
    wait_for("the held visitor's connection to close", Duration::from_secs(10), || live_clients(&server, port).is_empty().then_some(()));

    // A visitor that office-a took but had not answered yet when it died (it
    // is stopped, then killed) goes to office-b instead of failing.
    clients[0].signal("STOP");
    let caught = std::thread::spawn(move || common::roundtrip(loopback(port), b"caught in the middle"));
    wait_for("the visitor to wait for office-a's answer", Duration::from_secs(10), || {
        (live_clients(&server, port) == ["office-a"]).then_some(())
    });
    // kill -9 the serving client: the very next visitor is served by the other.
    clients[0].kill();
    let killed = Instant::now();
    echo_through(port, 2000);
    eprintln!("first visitor after kill -9 served in {:?}", killed.elapsed());
    assert_eq!(caught.join().expect("the caught visitor"), b"caught in the middle", "retried through office-b");
    assert_eq!(served_by(&server, port, "office-b"), 2.0, "the caught visitor and the one after the kill went through office-b");
    let held = open_visitor(port);
    assert_eq!(live_clients(&server, port), ["office-b"]);
    drop(held);
    let mapping = listed_mapping(&server, port).expect("listed");
    assert_eq!((mapping["status"].as_str(), mapping["health"].as_str()), (Some("active"), Some("ok")), "one client left: {mapping}");
    assert_eq!(members(&server, port), [("office-a".into(), false, false), ("office-b".into(), true, true)]);
    // The log names who served each visitor too.
    let logged = wait_for("the connection log to have the visitors", Duration::from_secs(10), || {
        let rows = get_data(&server, &format!("/api/connections/log?port={port}&limit=100"));
        let rows = rows["connections"].as_array().cloned().unwrap_or_default();
        (rows.len() >= 9).then_some(rows)
    });
    let by = |name: &str| logged.iter().filter(|r| r["client"] == name).count();
    assert_eq!((by("office-a"), by("office-b")), (6, 3), "{logged:?}");
    // Degraded, not waiting: the group lost a client but still serves.
    let (_, health) = common::http("GET", &server.url("/health"), None);
    let reasons = health["reasons"].to_string();
    assert!(reasons.contains("office-a is not connected; the other clients of its groups serve"), "{health}");

    // Only with every client gone does the mapping wait for a tunnel.
    clients[1].kill();
    wait_for("the mapping to wait for a tunnel", Duration::from_secs(10), || {
        let m = listed_mapping(&server, port)?;
        (m["status"] == "waiting_for_tunnel" && m["health"] == "waiting_for_tunnel").then_some(())
    });
    let mapping = listed_mapping(&server, port).expect("listed");
    assert!(mapping["health_reason"].as_str().is_some_and(|r| r.contains("office-a or office-b")), "{mapping}");
}

#[test]
fn round_robin_and_least_connections_share_visitors_among_three_clients() {
    let names = ["east", "west", "north"];
    let (server, _clients) = server_with_clients(&names);
    let target = common::echo_server();
    let port = free_port();
    create_group(&server, port, target, json!({"clients": names, "balance": "round_robin"}));

    // Round robin: each visitor goes to the next client in turn.
    for _ in 0..30 {
        echo_through(port, 1000);
    }
    for name in names {
        assert_eq!(served_by(&server, port, name), 10.0, "round robin gives each of three clients a third of 30 visitors");
    }

    // Least connections: held visitors spread so no client has more open than another.
    let (status, answer) = post(&server, "/api/mapping/update", json!({"port": port, "balance": "least_connections"}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["balance"], "least_connections", "{answer}");
    let held: Vec<TcpStream> = (0..6).map(|_| open_visitor(port)).collect();
    let live = live_clients(&server, port);
    for name in names {
        assert_eq!(live.iter().filter(|c| *c == name).count(), 2, "6 open visitors, 2 per client: {live:?}");
    }
    let mapping = listed_mapping(&server, port).expect("listed");
    for m in mapping["members"].as_array().expect("members") {
        assert_eq!((m["active_connections"].as_u64(), m["serving"].as_bool()), (Some(2), Some(true)), "{mapping}");
    }
    // With east's two closed, the next two visitors go to east.
    let data = get_data(&server, &format!("/api/connections?port={port}"));
    let east: Vec<u64> = data["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|c| c["client"] == "east")
        .filter_map(|c| c["id"].as_u64())
        .collect();
    assert_eq!(east.len(), 2, "{data}");
    for id in east {
        let (status, answer) = post(&server, "/api/connection/close", json!({"id": id}));
        assert_eq!(status, 200, "{answer}");
    }
    wait_for("east's visitors to be closed", Duration::from_secs(10), || (live_clients(&server, port).len() == 4).then_some(()));
    let before = served_by(&server, port, "east");
    let _more: Vec<TcpStream> = (0..2).map(|_| open_visitor(port)).collect();
    assert_eq!(served_by(&server, port, "east"), before + 2.0, "the client with the fewest open connections takes the next ones");
    drop(held);
}

#[test]
fn group_requests_are_checked_listed_for_old_callers_updated_live_and_survive_a_restart() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut server = Daemon::server_with_state(state.path(), SECRET, &[]);
    for name in ["alpha", "beta"] {
        create_client(&server, name);
    }
    let target = common::echo_server();
    let tunneled = |port: u16, extra: Value| {
        let mut body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target.port(), "use_tunnel": true});
        body.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        body
    };
    let port = free_port();
    for (body, needle) in [
        (tunneled(port, json!({"clients": []})), "at least one"),
        (tunneled(port, json!({"clients": ["alpha", "beta", "alpha"]})), "\"alpha\" twice"),
        (tunneled(port, json!({"clients": ["alpha"], "balance": "random"})), "round_robin"),
        (tunneled(port, json!({"clients": ["alpha", "nobody"]})), "nobody"),
        (tunneled(port, json!({"client": "beta", "clients": ["alpha", "beta"]})), "disagree"),
        (tunneled(port, json!({"clients": ["alpha"], "health_check": {"interval_secs": 0, "timeout_secs": 1}})), "interval_secs"),
        (tunneled(port, json!({"clients": ["alpha"], "health_check": {"interval_secs": 2, "timeout_secs": 5}})), "must not be longer"),
        (json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target.port(), "clients": ["alpha"]}), "only a tunneled"),
        (
            json!({"source_port": port, "target_host": "127.0.0.1", "target_port": target.port(), "balance": "round_robin"}),
            "only a tunneled",
        ),
    ] {
        let (status, answer) = post(&server, "/api/mapping/create", body.clone());
        assert_eq!(status, 400, "{body} -> {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| m.contains(needle)), "{body}: expected {needle:?} in {answer}");
    }
    assert!(listed_mapping(&server, port).is_none(), "nothing refused was created");

    // The one-client form is a group of one, listed both ways.
    let created = create_group(&server, port, target, json!({"client": "alpha"}));
    assert_eq!((created["client"].clone(), created["clients"].clone()), (json!("alpha"), json!(["alpha"])), "{created}");
    let direct_port = free_port();
    let direct = common::create_mapping(&server, direct_port, target, false);
    assert_eq!((direct["data"]["client"].clone(), direct["data"]["clients"].clone()), (Value::Null, json!([])), "{direct}");
    assert_eq!(direct["data"]["balance"], Value::Null, "{direct}");

    // Updated live: clients, balance and health check; a refused update changes nothing.
    let update = json!({"port": port, "clients": ["beta", "alpha"], "balance": "round_robin", "health_check": {"interval_secs": 5, "timeout_secs": 2}});
    let (status, answer) = post(&server, "/api/mapping/update", update);
    assert_eq!(status, 200, "{answer}");
    let m = &answer["data"];
    assert_eq!(
        (m["client"].clone(), m["clients"].clone(), m["balance"].clone()),
        (json!("beta"), json!(["beta", "alpha"]), json!("round_robin"))
    );
    assert_eq!(m["health_check"], json!({"interval_secs": 5, "timeout_secs": 2}));
    for (body, status_wanted, needle) in [
        (json!({"port": port, "clients": ["alpha", "ghost"], "description": "x"}), 400, "ghost"),
        (json!({"port": port, "clients": []}), 400, "at least one"),
        (json!({"port": direct_port, "clients": ["alpha"]}), 400, "direct"),
    ] {
        let (status, answer) = post(&server, "/api/mapping/update", body.clone());
        assert_eq!(status, status_wanted, "{body} -> {answer}");
        assert!(answer["message"].as_str().is_some_and(|m| m.contains(needle)), "{body}: {answer}");
    }
    let m = listed_mapping(&server, port).expect("listed");
    assert_eq!((m["clients"].clone(), m["description"].clone()), (json!(["beta", "alpha"]), Value::Null), "unchanged: {m}");
    let (status, answer) = post(&server, "/api/mapping/update", json!({"port": port, "health_check": null}));
    assert_eq!((status, answer["data"]["health_check"].clone()), (200, Value::Null), "null removes the check: {answer}");
    let (status, answer) =
        post(&server, "/api/mapping/update", json!({"port": port, "health_check": {"interval_secs": 3, "timeout_secs": 1}}));
    assert_eq!(status, 200, "{answer}");

    // A client of a group cannot be removed while the group names it.
    let (status, answer) = post(&server, "/api/client/remove", json!({"name": "alpha"}));
    assert_eq!(status, 409, "{answer}");
    assert!(answer["message"].to_string().contains(&port.to_string()), "{answer}");

    // `ctl list` shows the group, and `ctl create` makes one.
    let ctl = |args: &[&str]| {
        let out = Command::new(BIN)
            .arg("ctl")
            .arg("--api")
            .arg(server.url(""))
            .args(args)
            .env_remove("TUNNELD_API__TOKEN")
            .output()
            .expect("ctl");
        assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let ctl_port = free_port();
    let target_arg = format!("127.0.0.1:{}", target.port());
    let made = ctl(&[
        "create",
        &ctl_port.to_string(),
        &target_arg,
        "--tunnel",
        "--client",
        "alpha",
        "--client",
        "beta",
        "--balance",
        "least_connections",
    ]);
    assert!(made.contains("tunnel:alpha,beta least_connections"), "{made}");
    let listed = ctl(&["list"]);
    assert!(listed.contains("tunnel:beta,alpha round_robin"), "{listed}");

    // Stored: a restart brings the group back as it was.
    let tunnel = server.tunnel.expect("tunnel");
    assert_eq!(server.terminate().code(), Some(0));
    let server = Daemon::server_restarted(state.path(), tunnel, SECRET);
    let m = listed_mapping(&server, port).expect("restored");
    assert_eq!((m["clients"].clone(), m["balance"].clone()), (json!(["beta", "alpha"]), json!("round_robin")), "{m}");
    assert_eq!(m["health_check"], json!({"interval_secs": 3, "timeout_secs": 1}), "{m}");
    assert_eq!(m["status"], "waiting_for_tunnel", "no client of the group is connected: {m}");
    let m = listed_mapping(&server, ctl_port).expect("restored");
    assert_eq!(m["clients"], json!(["alpha", "beta"]), "{m}");
}

// ---- two hosts: each client on a host of its own, the server on a third ----

/// A server host and two client hosts, each joined to the server's by a veth
/// pair, the server's tunnel on an address both reach (routed over each link).
struct Hosts {
    server_host: NetNs,
    /// (namespace, the server-side interface of its link)
    clients: Vec<(NetNs, String)>,
}

const TUNNEL_ADDR: &str = "10.231.0.1";

fn hosts(test: &str, n: usize) -> Option<Hosts> {
    let server_host = NetNs::create(test)?;
    nsenter(&server_host, &["ip", "addr", "add", &format!("{TUNNEL_ADDR}/32"), "dev", "lo"]);
    let mut clients = Vec::new();
    for i in 1..=n {
        let host = NetNs::create(test)?;
        let (on_server, _) = link(&server_host, &format!("10.231.{i}.1/30"), &host, &format!("10.231.{i}.2/30"));
        nsenter(&host, &["ip", "route", "add", &format!("{TUNNEL_ADDR}/32"), "via", &format!("10.231.{i}.1")]);
        clients.push((host, on_server));
    }
    Some(Hosts { server_host, clients })
}

fn nsenter(ns: &NetNs, args: &[&str]) {
    let out = Command::new("nsenter").arg(format!("--net={}", ns.path().display())).arg("--").args(args).output().expect("nsenter");
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A `tunneld client` named `name` on `host`, connected to `server`.
fn client_on(host: &NetNs, server: &Daemon, name: &str, secret: &str) -> Daemon {
    let mut wrapper = host.wrapper();
    // The helper passes no name: the environment does (TUNNELD_CLIENT__NAME).
    wrapper.extend(["env".to_string(), format!("TUNNELD_CLIENT__NAME={name}")]);
    let client = Daemon::client_wrapped(&wrapper, server, secret);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    client
}

/// A target on 127.0.0.1:`port` inside `ns` that answers each visitor with
/// `tag` and then echoes: the visitor learns which host's client dialed it.
fn tagged_target_in(ns: &Path, port: u16, tag: u8) {
    let listener: TcpListener = in_namespace(ns, move || TcpListener::bind(("127.0.0.1", port)).expect("bind the target"));
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                if stream.write_all(&[tag]).is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// One visitor of the mapping at `mapping` inside `ns`: the tag of the target
/// that answered, or `None` if it was not served within `timeout`.
fn tag_of_visit(ns: &Path, mapping: SocketAddr, timeout: Duration) -> Option<u8> {
    let mut visitor = connect_in(ns, mapping).ok()?;
    visitor.set_read_timeout(Some(timeout)).ok()?;
    let mut tag = [0u8; 1];
    visitor.read_exact(&mut tag).ok()?;
    Some(tag[0])
}

fn api_in(ns: &Path, server: &Daemon, method: &'static str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = server.url(path);
    in_namespace(ns, move || common::http(method, &url, body.map(|b| b.to_string()).as_deref()))
}

const MAPPING_PORT: u16 = 7100;
const TARGET_PORT: u16 = 7200;

#[test]
fn a_client_whose_side_cannot_reach_the_target_gets_no_visitors_once_its_health_check_fails() {
    let test = "a_client_whose_side_cannot_reach_the_target_gets_no_visitors_once_its_health_check_fails";
    let Some(h) = hosts(test, 2) else { return };
    let on_server = h.server_host.path();
    let tunnel: SocketAddr = format!("{TUNNEL_ADDR}:9000").parse().expect("address");
    let server = Daemon::server_wrapped(&h.server_host.wrapper(), tunnel, SECRET, &[]);
    let mut secrets = Vec::new();
    for name in ["reach", "lost"] {
        let (status, answer) = api_in(&on_server, &server, "POST", "/api/client/create", Some(json!({"name": name})));
        assert_eq!(status, 200, "{answer}");
        secrets.push(answer["data"]["secret"].as_str().expect("secret").to_string());
    }
    let _reach = client_on(&h.clients[0].0, &server, "reach", &secrets[0]);
    let _lost = client_on(&h.clients[1].0, &server, "lost", &secrets[1]);
    // The target runs on the first client's host only.
    tagged_target_in(&h.clients[0].0.path(), TARGET_PORT, b'R');
    let body = json!({"source_port": MAPPING_PORT, "target_host": "127.0.0.1", "target_port": TARGET_PORT, "use_tunnel": true,
                      "clients": ["reach", "lost"], "balance": "round_robin"});
    let (status, answer) = api_in(&on_server, &server, "POST", "/api/mapping/create", Some(body));
    assert_eq!(status, 200, "{answer}");
    let mapping: SocketAddr = format!("127.0.0.1:{MAPPING_PORT}").parse().expect("address");

    // Without a check, round robin sends every other visitor to the client that cannot reach it.
    let tags: Vec<Option<u8>> = (0..4).map(|_| tag_of_visit(&on_server, mapping, Duration::from_secs(5))).collect();
    assert_eq!(tags.iter().filter(|t| t.is_none()).count(), 2, "half of the visitors fail without a health check: {tags:?}");

    // With one, the failing client is taken out and every visitor is served.
    let body = json!({"port": MAPPING_PORT, "health_check": {"interval_secs": 1, "timeout_secs": 1}});
    let (status, answer) = api_in(&on_server, &server, "POST", "/api/mapping/update", Some(body));
    assert_eq!(status, 200, "{answer}");
    let checked = Instant::now();
    let member = wait_for("the check to take the client out", Duration::from_secs(10), || {
        let (_, list) = api_in(&on_server, &server, "GET", "/api/mapping/list", None);
        let m = list["data"]["mappings"].as_array()?.iter().find(|m| m["source_port"] == MAPPING_PORT)?.clone();
        let lost = m["members"].as_array()?.iter().find(|c| c["client"] == "lost")?.clone();
        (lost["check_error"].is_string() && lost["serving"] == false).then_some(lost)
    });
    eprintln!("health check took the client out after {:?}: {member}", checked.elapsed());
    let tags: Vec<Option<u8>> = (0..10).map(|_| tag_of_visit(&on_server, mapping, Duration::from_secs(5))).collect();
    assert!(tags.iter().all(|t| *t == Some(b'R')), "every visitor is served by the client that reaches the target: {tags:?}");

    // The target comes up on the other side too: the next check lets that client back in.
    tagged_target_in(&h.clients[1].0.path(), TARGET_PORT, b'L');
    wait_for("the check to let the client back", Duration::from_secs(10), || {
        let (_, list) = api_in(&on_server, &server, "GET", "/api/mapping/list", None);
        let m = list["data"]["mappings"].as_array()?.iter().find(|m| m["source_port"] == MAPPING_PORT)?.clone();
        m["members"].as_array()?.iter().all(|c| c["serving"] == true && c["check_error"].is_null()).then_some(())
    });
    let tags: Vec<Option<u8>> = (0..4).map(|_| tag_of_visit(&on_server, mapping, Duration::from_secs(5))).collect();
    assert!(tags.contains(&Some(b'L')) && tags.contains(&Some(b'R')), "both clients serve again: {tags:?}");
}

const HEARTBEAT_SECS: u64 = 1;

#[test]
fn a_cut_link_moves_new_visitors_to_the_other_client_within_three_heartbeats() {
    let test = "a_cut_link_moves_new_visitors_to_the_other_client_within_three_heartbeats";
    let Some(h) = hosts(test, 2) else { return };
    let on_server = h.server_host.path();
    let tunnel: SocketAddr = format!("{TUNNEL_ADDR}:9000").parse().expect("address");
    let heartbeat = HEARTBEAT_SECS.to_string();
    let server =
        Daemon::server_wrapped(&h.server_host.wrapper(), tunnel, SECRET, &[("TUNNELD_SERVER__HEARTBEAT_INTERVAL_SECS", &heartbeat)]);
    let mut running = Vec::new();
    for (i, (name, tag)) in [("first", b'1'), ("second", b'2')].into_iter().enumerate() {
        let (status, answer) = api_in(&on_server, &server, "POST", "/api/client/create", Some(json!({"name": name})));
        assert_eq!(status, 200, "{answer}");
        let secret = answer["data"]["secret"].as_str().expect("secret").to_string();
        running.push(client_on(&h.clients[i].0, &server, name, &secret));
        // Each client's host has its own target, on the same address.
        tagged_target_in(&h.clients[i].0.path(), TARGET_PORT, tag);
    }
    let body = json!({"source_port": MAPPING_PORT, "target_host": "127.0.0.1", "target_port": TARGET_PORT, "use_tunnel": true,
                      "clients": ["first", "second"]});
    let (status, answer) = api_in(&on_server, &server, "POST", "/api/mapping/create", Some(body));
    assert_eq!(status, 200, "{answer}");
    let mapping: SocketAddr = format!("127.0.0.1:{MAPPING_PORT}").parse().expect("address");
    for _ in 0..3 {
        assert_eq!(tag_of_visit(&on_server, mapping, Duration::from_secs(5)), Some(b'1'), "failover: the first client serves");
    }

    // Pull the first client's cable (both processes keep running).
    let cut = Instant::now();
    h.server_host.set_link(&h.clients[0].1, false);
    let served = wait_for("a visitor served by the second client", Duration::from_secs(20), || {
        (tag_of_visit(&on_server, mapping, Duration::from_millis(500)) == Some(b'2')).then(|| cut.elapsed())
    });
    let limit = Duration::from_secs(3 * HEARTBEAT_SECS) + Duration::from_secs(1);
    eprintln!("link cut: first visitor served by the other client after {served:?} (heartbeat {HEARTBEAT_SECS} s)");
    assert!(served <= limit, "new visitors must reach the other client within three heartbeat intervals: {served:?}");
    let (_, list) = api_in(&on_server, &server, "GET", "/api/mapping/list", None);
    let m = list["data"]["mappings"][0].clone();
    assert_eq!(m["status"], "active", "the group still serves: {m}");
    for _ in 0..3 {
        assert_eq!(tag_of_visit(&on_server, mapping, Duration::from_secs(5)), Some(b'2'));
    }
}

#[test]
fn the_monitor_page_shows_each_mappings_clients_and_which_serve() {
    let test = "the_monitor_page_shows_each_mappings_clients_and_which_serve";
    let Some(chromium) = common::tools::external_tool("chromium", test) else { return };
    let (server, mut clients) = server_with_clients(&["office-a", "office-b", "office-c"]);
    let target = common::echo_server();
    let (failover, balanced) = (free_port(), free_port());
    create_group(&server, failover, target, json!({"clients": ["office-a", "office-b"], "description": "ssh, failover"}));
    create_group(&server, balanced, target, json!({"clients": ["office-a", "office-b", "office-c"], "balance": "round_robin"}));
    echo_through(failover, 1000);
    clients[0].kill();
    wait_for("office-a to be seen gone", Duration::from_secs(10), || {
        members(&server, failover).iter().any(|(name, connected, _)| name == "office-a" && !connected).then_some(())
    });

    let mut browser = common::browser::Browser::launch(&chromium, &[], None);
    browser.set_viewport(1440, 900, false);
    browser.navigate(&server.url("/api/stats/monitor"));
    let state = |port: u16, client: &str| {
        format!(
            r#"document.querySelector('[data-testid="mapping-row"][data-port="{port}"] [data-role="group-member"][data-client="{client}"]').dataset.state"#
        )
    };
    browser.wait_for("the group of the failover mapping", &format!("{} === 'serving'", state(failover, "office-b")));
    for (port, client, wanted) in [
        (failover, "office-a", "away"),
        (failover, "office-b", "serving"),
        (balanced, "office-a", "away"),
        (balanced, "office-b", "serving"),
        (balanced, "office-c", "serving"),
    ] {
        assert_eq!(browser.eval(&state(port, client)), json!(wanted), "{client} on :{port}");
    }
    let balance =
        format!(r#"document.querySelector('[data-testid="mapping-row"][data-port="{balanced}"] [data-role="group"]').textContent"#);
    assert!(browser.eval(&balance).as_str().is_some_and(|t| t.contains("round robin")), "{}", browser.eval(&balance));
    browser.eval(&format!(
        r#"document.querySelector('[data-testid="mapping-row"][data-port="{failover}"]').scrollIntoView({{block: 'center'}})"#
    ));
    browser.screenshot("client-groups-desktop.png");
    // Three clients' names wrap inside the Mode cell: the table needs no
    // sideways scrolling at 1440 px, as without groups.
    let overflow = browser.eval("(() => { const w = document.querySelector('.table-wrap'); return w.scrollWidth - w.clientWidth; })()");
    assert_eq!(overflow, json!(0), "the mapping table scrolls sideways at 1440 px");
    browser.set_viewport(390, 844, true);
    browser.wait_for("the phone layout", "window.innerWidth === 390");
    browser.eval(&format!(
        r#"document.querySelector('[data-testid="mapping-row"][data-port="{failover}"]').scrollIntoView({{block: 'start'}})"#
    ));
    browser.screenshot("client-groups-phone.png");
}
