//! A mapping's health, as the operator sees it: a mapping that listens but
//! serves nobody — its target down, its quota used up, its allow list refusing
//! everyone, its client away, its port taken — must not look like a healthy one
//! anywhere: `/api/mapping/list`, `/api/stats/traffic`, `/health`, `tunneld ctl
//! list`, `/metrics`, and the monitor page's badge (in Chromium). And each one
//! recovers to `ok` when the cause goes away.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use common::browser::Browser;
use common::tools::external_tool;
use common::*;
use serde_json::{json, Value};

/// Long enough for anything the watcher (1 s ticks) and the quota check do.
const SOON: Duration = Duration::from_secs(20);

/// The mapping on `port` in both API answers that show a mapping: `(health,
/// health_reason)`, which must agree. The two are read one after the other, so
/// a mapping changing between the reads may disagree once; a disagreement that
/// lasts is the failure.
fn health(server: &Daemon, port: u16) -> (String, String) {
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let listed = listed_mapping(server, port).unwrap_or_else(|| panic!("no mapping on {port} in the list"));
        let traffic = traffic_entry(server, port).unwrap_or_else(|| panic!("no mapping on {port} in the traffic report"));
        let from = |m: &Value, field: &str| m[field].as_str().unwrap_or_else(|| panic!("{field} missing from {m}")).to_string();
        let list = (from(&listed, "health"), from(&listed, "health_reason"));
        let report = (from(&traffic, "health"), from(&traffic, "health_reason"));
        if list.0 == report.0 {
            return list;
        }
        assert!(std::time::Instant::now() < deadline, "list and traffic report disagree on :{port}: {listed} vs {traffic}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the mapping on `port` has `wanted` health; its reason.
fn wait_for_health(server: &Daemon, port: u16, wanted: &str) -> String {
    let deadline = std::time::Instant::now() + SOON;
    loop {
        let (health, reason) = health(server, port);
        if health == wanted {
            return reason;
        }
        assert!(std::time::Instant::now() < deadline, "mapping :{port} never became {wanted}; last: {health} ({reason})");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `/health`: its status and reasons.
fn daemon_health(server: &Daemon) -> (String, Vec<String>) {
    let (status, body) = http("GET", &server.url("/health"), None);
    assert_eq!(status, 200, "{body}");
    let reasons = body["reasons"].as_array().expect("reasons").iter().map(|r| r.as_str().unwrap_or("").to_string()).collect();
    (body["status"].as_str().unwrap_or("").to_string(), reasons)
}

/// `tunneld_mapping_health{port, health}` is 1 for `wanted` only (the watcher
/// exports it every second).
fn wait_for_health_metric(server: &Daemon, port: u16, wanted: &str) {
    let p = port.to_string();
    wait_for(&format!("tunneld_mapping_health{{port={p}}} = {wanted}"), SOON, || {
        let text = metrics_text(server);
        let ones: Vec<&str> = ["ok", "target_failing", "blocked", "refusing", "waiting_for_tunnel", "down"]
            .into_iter()
            .filter(|h| metric_value(&text, "tunneld_mapping_health", &[("port", &p), ("health", h)]) == Some(1.0))
            .collect();
        (ones == [wanted]).then_some(())
    });
}

/// `tunneld ctl list` against `server`: its output.
fn ctl_list(server: &Daemon) -> String {
    let (_dir, config) = config_file("");
    let out = Command::new(BIN)
        .args(["ctl", "--api", &server.url(""), "--config", &config, "list"])
        .env_remove("TUNNELD_API__TOKEN")
        .output()
        .expect("run tunneld ctl list");
    assert!(out.status.success(), "ctl list: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The row of `ctl list` for `port`, split into its columns.
fn ctl_row(listing: &str, port: u16) -> Vec<String> {
    let line = listing.lines().find(|l| l.split_whitespace().next() == Some(&port.to_string()));
    line.unwrap_or_else(|| panic!("no row for {port} in\n{listing}")).split_whitespace().map(str::to_string).collect()
}

/// A loopback port nothing listens on, below the ephemeral range (so no
/// outgoing connection of a test running beside this one takes it before it is
/// listened on again): a target that is down.
fn dead_target() -> SocketAddr {
    loopback(free_port())
}

/// An echo server on exactly `addr` (a target that comes back).
fn echo_on(addr: SocketAddr) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("rebind the target {addr}: {e}"));
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut reader = conn.try_clone().expect("clone");
                let _ = std::io::copy(&mut reader, &mut conn);
                let _ = conn.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

#[test]
fn a_mapping_whose_target_is_down_is_target_failing_everywhere_until_it_is_back() {
    let server = Daemon::server("s3cret", &[]);
    let target = dead_target();
    let port = free_port();
    create_mapping(&server, port, target, false);
    assert_eq!(health(&server, port), ("ok".to_string(), "no visitors in the last 5 minutes".to_string()));
    assert_eq!(daemon_health(&server).0, "ok");

    for _ in 0..3 {
        assert!(visit(port, b"hello").is_empty(), "a visitor of a dead target gets nothing");
    }
    let reason = wait_for_health(&server, port, "target_failing");
    assert!(reason.starts_with(&format!("3 of 3 visitors in the last 5 minutes could not reach the target {target}")), "{reason}");
    assert!(reason.contains("last error:") && reason.to_lowercase().contains("refused"), "the reason quotes the error: {reason}");
    let listed = listed_mapping(&server, port).expect("listed");
    assert_eq!(listed["status"], "active", "it listens: status stays what it was");
    let traffic = traffic_entry(&server, port).expect("traffic");
    assert_eq!(traffic["connect_errors"], 3, "{traffic}");

    let (status, reasons) = daemon_health(&server);
    assert_eq!(status, "degraded", "{reasons:?}");
    assert!(reasons.iter().any(|r| r.starts_with(&format!("mapping on port {port} is target_failing: 3 of 3 visitors"))), "{reasons:?}");

    let listing = ctl_list(&server);
    assert!(listing.lines().next().is_some_and(|h| h.contains("HEALTH")), "{listing}");
    assert!(ctl_row(&listing, port).contains(&"target_failing".to_string()), "{listing}");
    assert!(listing.contains(&format!("port {port} target_failing: 3 of 3 visitors")), "the reason is printed: {listing}");
    wait_for_health_metric(&server, port, "target_failing");

    // The target comes back: once the served visitors outnumber the failures,
    // the mapping is ok again, everywhere.
    echo_on(target);
    for _ in 0..4 {
        echo_through(port, 1000);
    }
    let reason = wait_for_health(&server, port, "ok");
    assert_eq!(reason, "4 visitors served in the last 5 minutes; 3 could not reach the target");
    assert_eq!(daemon_health(&server), ("ok".to_string(), vec![]));
    assert!(ctl_row(&ctl_list(&server), port).contains(&"ok".to_string()));
    wait_for_health_metric(&server, port, "ok");
}

#[test]
fn an_allow_list_that_refuses_everyone_is_refusing_and_a_used_up_quota_is_blocked() {
    let server = Daemon::server("s3cret", &[]);
    let echo = echo_server();

    // Every visitor here comes from 127.0.0.1, outside the allow list.
    let acl_port = free_port();
    let body = json!({"source_port": acl_port, "target_host": "127.0.0.1", "target_port": echo.port(), "allow": ["192.0.2.0/24"]});
    let (status, reply) = post(&server, "/api/mapping/create", body);
    assert_eq!(status, 200, "{reply}");
    for _ in 0..2 {
        assert!(visit(acl_port, b"hi").is_empty(), "refused");
    }
    let reason = wait_for_health(&server, acl_port, "refusing");
    assert_eq!(reason, "2 of 2 visitors in the last 5 minutes were refused: acl 2 (the allow/deny lists)");
    let traffic = traffic_entry(&server, acl_port).expect("traffic");
    assert_eq!(traffic["refused"]["acl"], 2, "{traffic}");
    assert_eq!(traffic["refused"]["connection_limit"], 0, "every reason is there: {traffic}");
    let (status, reasons) = daemon_health(&server);
    assert_eq!(status, "degraded");
    assert!(reasons.iter().any(|r| r.starts_with(&format!("mapping on port {acl_port} is refusing: 2 of 2"))), "{reasons:?}");
    assert!(ctl_row(&ctl_list(&server), acl_port).contains(&"refusing".to_string()));
    wait_for_health_metric(&server, acl_port, "refusing");

    // The operator lets everyone in: refusals under the old list no longer count.
    let (status, reply) = post(&server, "/api/mapping/update", json!({"port": acl_port, "allow": null}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["data"]["health"], "ok", "{reply}");
    echo_through(acl_port, 100);
    assert_eq!(health(&server, acl_port).0, "ok");

    // A quota of 1000 bytes a day that blocks: one visitor uses it up.
    let quota_port = free_port();
    let body = json!({"source_port": quota_port, "target_host": "127.0.0.1", "target_port": echo.port(),
                      "quota": {"bytes": 1000, "period": "day", "action": "block"}});
    let (status, reply) = post(&server, "/api/mapping/create", body);
    assert_eq!(status, 200, "{reply}");
    echo_through(quota_port, 2000);
    let reason = wait_for_health(&server, quota_port, "blocked");
    assert!(
        reason.starts_with("its quota of 1000 bytes per day is used up (")
            && reason.ends_with("bytes): new visitors are refused until the period ends"),
        "{reason}"
    );
    let (_, reasons) = daemon_health(&server);
    assert!(reasons.iter().any(|r| r.starts_with(&format!("mapping on port {quota_port} is blocked: its quota"))), "{reasons:?}");
    assert!(ctl_row(&ctl_list(&server), quota_port).contains(&"blocked".to_string()));
    wait_for_health_metric(&server, quota_port, "blocked");
    let text = metrics_text(&server);
    let quota_bytes = |port: u16| metric_value(&text, "tunneld_mapping_quota_bytes", &[("port", &port.to_string())]);
    assert_eq!(quota_bytes(quota_port), Some(1000.0), "the allowance is exported");
    assert_eq!(quota_bytes(acl_port), Some(0.0), "0: no quota");

    // A bigger quota lifts the block.
    let (status, reply) = post(
        &server,
        "/api/mapping/update",
        json!({"port": quota_port, "quota": {"bytes": 1_000_000, "period": "day", "action": "block"}}),
    );
    assert_eq!(status, 200, "{reply}");
    wait_for_health(&server, quota_port, "ok");
    assert_eq!(daemon_health(&server), ("ok".to_string(), vec![]));
}

#[test]
fn a_tunneled_mapping_waits_for_its_client_and_is_ok_once_it_is_there() {
    let server = Daemon::server("s3cret", &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    let reason = wait_for_health(&server, port, "waiting_for_tunnel");
    assert_eq!(reason, "tunnel client default is not connected: visitors are turned away until it is");
    assert!(ctl_row(&ctl_list(&server), port).contains(&"waiting_for_tunnel".to_string()));
    wait_for_health_metric(&server, port, "waiting_for_tunnel");
    assert!(visit(port, b"hi").is_empty(), "turned away");

    let _client = Daemon::client(&server, "s3cret", &[]);
    // The visitor turned away while the client was away counts as a failed
    // connect for the window: served visitors outweigh it.
    echo_through(port, 100);
    echo_through(port, 100);
    wait_for_health(&server, port, "ok");
    wait_for_health_metric(&server, port, "ok");
}

#[test]
fn a_mapping_whose_port_is_taken_is_down_until_it_is_free() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let port = free_port();
    let mut first = Daemon::server_with_state(&state, "s3cret", &[]);
    create_mapping(&first, port, echo_server(), false);
    first.terminate();

    // Another process holds the port while the daemon starts.
    let squatter = TcpListener::bind(("0.0.0.0", port)).expect("take the mapping's port");
    let server = Daemon::server_with_state(&state, "s3cret", &[]);
    let reason = wait_for_health(&server, port, "down");
    assert_eq!(reason, format!("cannot listen on port {port}: port in use by another process (retried every 5 s)"));
    assert!(ctl_row(&ctl_list(&server), port).contains(&"down".to_string()));
    assert_eq!(daemon_health(&server).0, "degraded");
    wait_for_health_metric(&server, port, "down");

    drop(squatter);
    wait_for_health(&server, port, "ok");
    wait_for_health_metric(&server, port, "ok");
    echo_through(port, 100);
}

/// What the page shows for each mapping row: its health badge.
const BADGES_JS: &str = r#"(() => [...document.querySelectorAll('[data-testid="mapping-row"]')].map((r) => {
  const badge = r.querySelector('[data-role="health"]');
  const status = r.querySelector('[data-col="status"]');
  return {
    port: Number(r.dataset.port),
    row_health: r.dataset.health || null,
    health: badge ? badge.dataset.health : null,
    text: badge ? badge.textContent.trim() : null,
    title: badge ? badge.title : null,
    green: badge ? badge.classList.contains('badge-ok') : null,
    status_text: status ? status.textContent.trim() : null,
    problems: [...r.querySelectorAll('[data-role="problems"]')].map((p) => p.textContent.trim()),
  };
}))()"#;

#[test]
fn the_page_badge_shows_health_not_just_listening() {
    let Some(chromium) = external_tool("chromium", "the_page_badge_shows_health_not_just_listening") else { return };
    let server = Daemon::server("s3cret", &[]);
    let echo = echo_server();
    let failing = free_port();
    let refusing = free_port();
    let fine = free_port();
    create_mapping(&server, failing, dead_target(), false);
    let body = json!({"source_port": refusing, "target_host": "127.0.0.1", "target_port": echo.port(), "allow": ["192.0.2.0/24"],
                      "description": "partners only"});
    assert_eq!(post(&server, "/api/mapping/create", body).0, 200);
    create_mapping(&server, fine, echo, false);
    for _ in 0..2 {
        visit(failing, b"x");
        visit(refusing, b"x");
    }
    echo_through(fine, 1000);
    wait_for_health(&server, failing, "target_failing");
    wait_for_health(&server, refusing, "refusing");

    let mut browser = Browser::launch(&chromium, &[], None);
    browser.navigate(&server.url("/api/stats/monitor?interval_ms=250"));
    browser.wait_for(
        "three rows with health badges",
        r#"document.querySelectorAll('[data-testid="mapping-row"] [data-role="health"]').length === 3"#,
    );
    let rows = browser.eval(BADGES_JS);
    let row = |port: u16| rows.as_array().and_then(|r| r.iter().find(|r| r["port"] == port).cloned()).unwrap_or_else(|| panic!("{rows}"));

    let bad = row(failing);
    assert_eq!(bad["health"], "target_failing", "{bad}");
    assert_eq!(bad["row_health"], "target_failing", "{bad}");
    assert_eq!(bad["green"], false, "a broken mapping is not green: {bad}");
    assert_eq!(bad["text"], "Target failing", "{bad}");
    assert!(bad["title"].as_str().is_some_and(|t| t.contains("could not reach the target")), "the reason is the tooltip: {bad}");
    assert!(!bad["status_text"].as_str().unwrap_or("").contains("Active"), "not 'Active': {bad}");
    assert!(bad["problems"].to_string().contains("2 connect errors"), "{bad}");

    let refused = row(refusing);
    assert_eq!(
        (refused["health"].as_str(), refused["text"].as_str(), refused["green"].as_bool()),
        (Some("refusing"), Some("Refusing"), Some(false)),
        "{refused}"
    );
    assert!(refused["problems"].to_string().contains("2 refused (acl 2)"), "{refused}");

    let ok = row(fine);
    assert_eq!((ok["health"].as_str(), ok["text"].as_str(), ok["green"].as_bool()), (Some("ok"), Some("Active"), Some(true)), "{ok}");
    assert_eq!(ok["problems"], json!([]), "nothing to report on a healthy mapping: {ok}");

    let attention = browser.eval(r#"(() => { const a = document.querySelector('[data-testid="card-mappings"] [data-role="attention"]'); return {hidden: a.hidden, text: a.textContent.trim()}; })()"#);
    assert_eq!(attention, json!({"hidden": false, "text": "2 need attention"}), "the Mappings card counts the unwell");

    for (width, height, mobile, name) in [(1440, 900, false, "health-1440.png"), (390, 844, true, "health-390.png")] {
        browser.set_viewport(width, height, mobile);
        browser.wait_for("the table laid out", "document.querySelectorAll('[data-testid=\"mapping-row\"]').length === 3");
        browser.screenshot_full_page(name);
    }
}
