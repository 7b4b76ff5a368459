//! Issue 19, §2 and §5: a policy edit changes only what the operator changed,
//! and the events say what happened — once, and not what did not happen.
//!
//! - An update that leaves a value as it is touches nothing and announces
//!   nothing; one crossing of the quota is one event (the highest threshold).
//! - A client lost before a server restart and back after it is recorded back;
//!   a clean stop of the server loses no client.
//! - The page's Edit-policy dialog shows stored values exactly, in a unit the
//!   operator picks, sends only what the operator changed, and closes on Esc.
//! - The Events panel is readable on a phone: messages wrap between words.
//!
//! "Nothing was announced" needs a moment after which something would have
//! been: each such test makes a second mapping cross its quota *after* the
//! update under test and waits for that event. The watcher checks every
//! mapping's quota in the same pass, so by then the update was judged.

mod common;

use std::time::Duration;

use common::{create_mapping, echo_server, echo_through, free_port, get_data, listed_mapping, post, wait_for, Daemon};
use serde_json::{json, Value};

const SECRET: &str = "operator-policy-events-secret";

/// Every recorded event, oldest first.
fn events(d: &Daemon) -> Vec<Value> {
    let mut events = get_data(d, "/api/events")["events"].as_array().cloned().unwrap_or_default();
    events.reverse();
    events
}

/// The kinds of the events about `port`, oldest first.
fn port_kinds(d: &Daemon, port: u16) -> Vec<String> {
    events(d).iter().filter(|e| e["port"] == port).map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect()
}

/// The kinds of the events about the client `name`, oldest first.
fn client_kinds(d: &Daemon, name: &str) -> Vec<String> {
    events(d).iter().filter(|e| e["client"] == name).map(|e| e["kind"].as_str().unwrap_or("").to_string()).collect()
}

/// `/api/mapping/update` with `body`; the mapping it answers with.
fn update(d: &Daemon, body: Value) -> Value {
    let (status, reply) = post(d, "/api/mapping/update", body.clone());
    assert_eq!(status, 200, "update {body}: {reply}");
    reply["data"].clone()
}

/// The policy fields of a mapping as the API shows it.
fn policy_of(mapping: &Value) -> Value {
    json!({
        "description": mapping["description"],
        "bandwidth_limit": mapping["bandwidth_limit"],
        "quota": mapping["quota"],
        "allow": mapping["allow"],
        "deny": mapping["deny"],
    })
}

/// A direct mapping to an echo server that has already moved 2 × `bytes`.
fn mapping_with_traffic(d: &Daemon, bytes: usize) -> u16 {
    let port = free_port();
    create_mapping(d, port, echo_server(), false);
    echo_through(port, bytes);
    port
}

/// Gives `port` a quota of `bytes` (alert) and waits for its quota_exhausted.
fn exhaust(d: &Daemon, port: u16, bytes: u64) {
    update(d, json!({"port": port, "quota": {"bytes": bytes, "period": "month", "action": "alert"}}));
    wait_for(&format!("quota_exhausted for port {port}"), Duration::from_secs(20), || {
        port_kinds(d, port).contains(&"quota_exhausted".to_string()).then_some(())
    });
}

/// A second mapping crosses its whole quota now; returns once that is
/// recorded: every update made before was judged by then.
fn watcher_pass(d: &Daemon) {
    let marker = mapping_with_traffic(d, 2_000);
    exhaust(d, marker, 1_000);
}

#[test]
fn one_jump_past_the_whole_quota_is_one_event() {
    let server = Daemon::server(SECRET, &[]);
    // 2.2 MB moved, then a 1 MB quota: 220 % in one step.
    let port = mapping_with_traffic(&server, 1_100_000);
    exhaust(&server, port, 1_000_000);
    let events = events(&server);
    assert_eq!(port_kinds(&server, port), ["quota_exhausted"], "one crossing, one event (no quota_warning at 220 %): {events:#?}");
    let message = events.iter().find(|e| e["port"] == port).and_then(|e| e["message"].as_str()).unwrap_or_default().to_string();
    assert!(message.contains("2200000 of 1000000 bytes"), "{message}");
}

#[test]
fn policy_updates_that_change_nothing_touch_nothing_and_announce_nothing() {
    let server = Daemon::server(SECRET, &[]);
    let port = mapping_with_traffic(&server, 1_100_000);
    update(
        &server,
        json!({"port": port, "description": "office SSH", "bandwidth_limit": 1_000_000,
               "allow": ["10.0.0.0/8", "127.0.0.0/8"], "deny": ["10.9.9.9/32"]}),
    );
    exhaust(&server, port, 1_000_000);
    let before = policy_of(&listed_mapping(&server, port).expect("the mapping"));
    let updates_logged = |d: &Daemon| d.log().matches("mapping policy updated").count();
    let logged = updates_logged(&server);

    // Every field sent with the value it has (what a form that sends it all
    // sends): nothing changes, nothing is stored or logged as an update.
    let mut same = before.clone();
    same["port"] = json!(port);
    assert_eq!(policy_of(&update(&server, same)), before);
    assert_eq!(update(&server, json!({"port": port})).get("quota"), before.get("quota"));
    assert_eq!(updates_logged(&server), logged, "an update that changes nothing is not an update");

    // One field changed: only that one.
    let changed = policy_of(&update(&server, json!({"port": port, "description": "office SSH (new)"})));
    let mut expected = before.clone();
    expected["description"] = json!("office SSH (new)");
    assert_eq!(changed, expected, "the other fields are untouched");
    assert_eq!(changed["bandwidth_limit"], 1_000_000);
    assert_eq!(changed["quota"]["bytes"], 1_000_000);
    assert_eq!(updates_logged(&server), logged + 1);

    // A quota changed to one that still leaves the mapping past 100 % (as the
    // page's lossy GiB field did: 300,000,000 saved as 299,573,969) crosses
    // no threshold: nothing is announced again.
    update(&server, json!({"port": port, "quota": {"bytes": 999_999, "period": "month", "action": "alert"}}));
    update(&server, json!({"port": port, "quota": {"bytes": 1_000_000, "period": "month", "action": "alert"}}));
    watcher_pass(&server);
    assert_eq!(port_kinds(&server, port), ["quota_exhausted"], "announced once: {:#?}", events(&server));
    assert_eq!(policy_of(&listed_mapping(&server, port).unwrap()), expected);
}

#[test]
fn a_client_lost_before_a_restart_and_back_after_it_is_recorded_back() {
    let mut server = Daemon::server(SECRET, &[]);
    let mut client = Daemon::client(&server, SECRET, &[]);
    client.kill();
    wait_for("client_lost", Duration::from_secs(20), || (client_kinds(&server, "default") == ["client_lost"]).then_some(()));
    server.terminate();

    let state_dir = server.state_dir.clone();
    let server = Daemon::server_restarted(&state_dir, server.tunnel.unwrap(), SECRET);
    let _client = Daemon::client(&server, SECRET, &[]);
    wait_for("client_back after the restart", Duration::from_secs(20), || {
        (client_kinds(&server, "default") == ["client_lost", "client_back"]).then_some(())
    });
}

#[test]
fn a_clean_stop_is_not_a_client_loss() {
    let mut server = Daemon::server(SECRET, &[]);
    let mut client = Daemon::client(&server, SECRET, &[]);
    let connected = |d: &Daemon| get_data(d, "/api/client/list")["clients"][0]["connected"] == json!(true);
    assert!(connected(&server));
    assert!(server.terminate().success());

    // What the stopped server recorded, read from its store by the next one.
    let state_dir = server.state_dir.clone();
    let server = Daemon::server_restarted(&state_dir, server.tunnel.unwrap(), SECRET);
    assert_eq!(client_kinds(&server, "default"), Vec::<String>::new(), "a shutdown is not a loss: {:#?}", events(&server));
    client.wait_for_notify("STATUS=connected", Duration::from_secs(30));
    wait_for("the client back on the new server", Duration::from_secs(20), || connected(&server).then_some(()));

    // A real loss now is recorded, once; nothing before it said "lost".
    client.kill();
    wait_for("client_lost", Duration::from_secs(20), || {
        client_kinds(&server, "default").last().map(|k| k == "client_lost").and_then(|l| l.then_some(()))
    });
    assert_eq!(client_kinds(&server, "default"), ["client_lost"], "{:#?}", events(&server));
}
