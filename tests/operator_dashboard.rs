//! `grafana/tunneld.json` as an operator meets it: provisioned from a file (no
//! import-time `${DS_PROMETHEUS}`), its mapping panels at the top — health,
//! refused visitors by reason, connect errors, quota (only mappings that have
//! one), listening — webhook failures, one bar per day for the daily totals, no
//! red DOWN for a client nothing waits for, a link to the monitor page, and
//! every metric it queries one that a live server and client really export.
//! (`tests/prometheus_e2e.rs` runs each query through a real Prometheus.)

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{json, Value};

fn dashboard() -> (String, Value) {
    let text = read_repo_file("grafana/tunneld.json");
    let dash = serde_json::from_str(&text).expect("grafana/tunneld.json is JSON");
    (text, dash)
}

fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        out.push(panel);
        out.extend(panel["panels"].as_array().into_iter().flatten());
    }
    out
}

fn exprs(panel: &Value) -> Vec<&str> {
    panel["targets"].as_array().into_iter().flatten().filter_map(|t| t["expr"].as_str()).collect()
}

fn panel<'a>(dash: &'a Value, title_start: &str) -> &'a Value {
    panels(dash)
        .into_iter()
        .find(|p| p["title"].as_str().is_some_and(|t| t.starts_with(title_start)))
        .unwrap_or_else(|| panic!("no panel titled {title_start:?}…"))
}

/// The panels whose queries contain `fragment`.
fn querying<'a>(dash: &'a Value, fragment: &str) -> Vec<&'a Value> {
    panels(dash).into_iter().filter(|p| exprs(p).iter().any(|e| e.contains(fragment))).collect()
}

#[test]
fn every_panel_uses_the_data_source_variable_so_file_provisioning_works() {
    let (text, dash) = dashboard();
    assert!(!text.contains("DS_PROMETHEUS"), "the import-only ${{DS_PROMETHEUS}} is gone");
    assert!(dash.get("__inputs").is_none(), "no import inputs");
    let variables = dash["templating"]["list"].as_array().expect("variables");
    let source = &variables[0];
    assert_eq!(source["type"], "datasource", "{source}");
    assert_eq!(source["query"], "prometheus", "{source}");
    let uid = format!("${{{}}}", source["name"].as_str().expect("a name"));
    for var in variables.iter().filter(|v| v["type"] == "query") {
        assert_eq!(var["datasource"]["uid"], uid.as_str(), "variable {}", var["name"]);
    }
    for p in panels(&dash).into_iter().filter(|p| p["type"] != "row") {
        assert_eq!(p["datasource"], json!({"type": "prometheus", "uid": uid}), "panel {}", p["title"]);
        for t in p["targets"].as_array().expect("targets") {
            assert_eq!(t["datasource"], json!({"type": "prometheus", "uid": uid}), "panel {} target", p["title"]);
        }
    }
}

#[test]
fn the_mapping_panels_are_at_the_top_and_show_health_refusals_errors_quota_and_webhooks() {
    let (_, dash) = dashboard();
    let y = |p: &Value| p["gridPos"]["y"].as_i64().expect("y");
    let traffic_row = panels(&dash).into_iter().find(|p| p["type"] == "row" && p["title"] == "Traffic").map(y).expect("Traffic row");
    let handshakes = y(panel(&dash, "Handshakes by result"));
    for title in [
        "Mapping health now",
        "Mappings by health",
        "Mappings listening",
        "Quota used",
        "Refused visitors",
        "Target connect errors",
        "Webhook failures",
    ] {
        let p = panel(&dash, title);
        assert!(y(p) < handshakes && y(p) < traffic_row, "{title} sits at y {} (handshakes at {handshakes}): it belongs at the top", y(p));
    }

    let health = querying(&dash, "tunneld_mapping_health{");
    assert!(health.iter().any(|p| p["type"] == "table"), "a table of each mapping's health now");
    let table = panel(&dash, "Mapping health now");
    let mapped = table["fieldConfig"]["overrides"].to_string();
    for state in ["ok", "target_failing", "blocked", "refusing", "waiting_for_tunnel", "down"] {
        assert!(mapped.contains(&format!("\"{state}\"")), "health {state} has a colour: {mapped}");
    }
    assert!(mapped.contains("/api/stats/monitor"), "the table links each server's monitor page");

    let refused = panel(&dash, "Refused visitors");
    assert!(exprs(refused).iter().any(|e| e.contains("tunneld_mapping_refused_total") && e.contains("by (instance, reason)")), "by reason");
    assert!(!querying(&dash, "tunneld_mapping_connect_errors_total").is_empty());
    assert!(exprs(panel(&dash, "Webhook failures")).iter().any(|e| e.contains("tunneld_alert_webhook_failures_total")));

    // Only mappings that have a quota: its allowance is above 0.
    let quota = exprs(panel(&dash, "Quota used"))[0];
    assert!(quota.contains("tunneld_mapping_quota_used_ratio") && quota.contains("and on (instance, port, protocol)"), "{quota}");
    assert!(quota.contains("tunneld_mapping_quota_bytes") && quota.contains("> 0"), "{quota}");

    // The listening stat names each mapping with its description, and links the page.
    let listening = panel(&dash, "Mappings listening");
    assert!(listening["targets"][0]["legendFormat"].as_str().is_some_and(|l| l.contains("{{description}}")), "{listening}");
    assert!(listening["fieldConfig"]["defaults"]["links"].to_string().contains("/api/stats/monitor"), "{listening}");
}

#[test]
fn daily_totals_are_one_bar_per_day_and_the_tunnel_panel_shows_only_clients_something_waits_for() {
    let (_, dash) = dashboard();
    let daily = panel(&dash, "Daily totals");
    assert_eq!(daily["interval"], "1d", "the panel steps by one day: one bar per day, not a rolling sum at every step");
    assert_eq!(daily["targets"][0]["interval"], "1d");
    assert!(daily["timeFrom"].as_str().is_some_and(|t| t.ends_with('d')), "it shows days whatever the dashboard's range");
    let expr = exprs(daily)[0];
    assert!(expr.contains("increase(") && expr.contains("[1d] offset -1d)"), "each step adds up the day that begins there: {expr}");
    assert_eq!(daily["fieldConfig"]["defaults"]["custom"]["drawStyle"], "bars");
    assert_eq!(daily["fieldConfig"]["defaults"]["custom"]["barAlignment"], 1, "the bar covers its day, after the step");

    // The top-left panel: a client that no tunneled mapping names and that is
    // not connected (the `default` of a direct-only server) is not a red DOWN;
    // a client named in a group counts (one series per mapping and member, where
    // `tunneld_mapping_info`'s client label joins a group's names).
    let first = dash["panels"].as_array().expect("panels").iter().find(|p| p["type"] != "row").expect("a panel");
    assert_eq!(first["title"], "Tunnel per client");
    let expr = exprs(first)[0];
    assert!(
        expr.contains("and on (job, instance, client)")
            && expr.contains(r#"tunneld_mapping_client_connections_total{instance=~"$instance"}"#),
        "{expr}"
    );
}

/// Every `tunneld_*` / `process_*` name in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for prefix in ["tunneld_", "process_"] {
        for (start, _) in text.match_indices(prefix) {
            let name: String = text[start..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            names.insert(name);
        }
    }
    names
}

#[test]
fn every_metric_the_dashboard_queries_is_exported_by_a_live_server_or_client() {
    let server = Daemon::server("s3cret", &[]);
    let client = Daemon::client(&server, "s3cret", &[]);
    let port = free_port();
    let body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo_server().port(), "description": "web",
                      "quota": {"bytes": 5000, "period": "day", "action": "alert"}});
    assert_eq!(post(&server, "/api/mapping/create", body).0, 200);
    // A UDP mapping too: its datagram and session families exist only with one.
    let udp = json!({"source_port": free_port(), "protocol": "udp", "target_host": "127.0.0.1", "target_port": 9});
    assert_eq!(post(&server, "/api/mapping/create", udp).0, 200);
    // A tunneled one too: its clients' series exist from its creation.
    let tunneled = json!({"source_port": free_port(), "target_host": "127.0.0.1", "target_port": 9, "use_tunnel": true});
    assert_eq!(post(&server, "/api/mapping/create", tunneled).0, 200);
    // And a tunneled UDP mapping that carried a datagram: a client's UDP
    // transport series exists only once its datagram link is open.
    let udp_tunneled = udp::free_udp_port();
    let echo = udp::udp_echo();
    let body =
        json!({"source_port": udp_tunneled, "protocol": "udp", "target_host": "127.0.0.1", "target_port": echo.port(), "use_tunnel": true});
    assert_eq!(post(&server, "/api/mapping/create", body).0, 200);
    let reply = udp::exchange(&udp::visitor(2), udp_tunneled, b"hello", std::time::Duration::from_secs(10));
    assert_eq!(reply.as_deref(), Some(&b"hello"[..]));
    wait_for("the client's UDP transport series", std::time::Duration::from_secs(10), || {
        metrics_text(&server).contains("tunneld_tunnel_udp_transport{").then_some(())
    });
    let server_text = metrics_text(&server);
    let client_text = ureq::get(&client.url("/metrics")).call().expect("client /metrics").into_string().expect("text");
    let exported: BTreeSet<String> = [&server_text, &client_text]
        .iter()
        .flat_map(|t| t.lines().filter_map(|l| l.strip_prefix("# TYPE ")))
        .flat_map(|l| {
            // A histogram's series are its name with _bucket, _sum and _count.
            let mut words = l.split_whitespace();
            let (name, kind) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
            let suffixes: &[&str] = if kind == "histogram" { &["_bucket", "_sum", "_count"] } else { &[""] };
            suffixes.iter().map(move |s| format!("{name}{s}")).collect::<Vec<_>>()
        })
        .collect();

    let (_, dash) = dashboard();
    let mut queried = BTreeSet::new();
    for p in panels(&dash) {
        for e in exprs(p) {
            queried.extend(metric_names(e));
        }
    }
    for var in dash["templating"]["list"].as_array().expect("variables") {
        queried.extend(metric_names(&var["query"].to_string()));
    }
    let missing: Vec<&String> = queried.iter().filter(|m| !exported.contains(*m)).collect();
    assert!(missing.is_empty(), "the dashboard queries metrics nobody exports: {missing:?}");
    for wanted in [
        "tunneld_mapping_health",
        "tunneld_mapping_refused_total",
        "tunneld_alert_webhook_failures_total",
        "tunneld_mapping_quota_bytes",
        "tunneld_mapping_connect_duration_seconds_bucket",
        "tunneld_mapping_connection_duration_seconds_bucket",
        "tunneld_tunnel_rtt_seconds_bucket",
        "tunneld_tunnel_udp_transport",
    ] {
        assert!(queried.contains(wanted), "the dashboard does not show {wanted}");
    }
    // The info series carries the description the panels name mappings by.
    let p = port.to_string();
    assert_eq!(
        metric_value(&server_text, "tunneld_mapping_info", &[("port", &p), ("description", "web"), ("mode", "direct")]),
        Some(1.0),
        "{server_text}"
    );
    assert_eq!(metric_value(&server_text, "tunneld_mapping_health", &[("port", &p), ("health", "ok")]), Some(1.0));
    assert!(
        server_text.contains("# HELP tunneld_mapping_connections_total Visitor connections admitted past"),
        "the HELP says what is counted"
    );

    // A description changed live moves the info series with it (one series per port).
    let (status, reply) = post(&server, "/api/mapping/update", json!({"port": port, "description": "web (new)"}));
    assert_eq!(status, 200, "{reply}");
    let text = metrics_text(&server);
    let infos: Vec<&str> =
        text.lines().filter(|l| l.starts_with("tunneld_mapping_info{") && l.contains(&format!("port=\"{p}\""))).collect();
    assert_eq!(infos.len(), 1, "{infos:?}");
    assert!(infos[0].contains(r#"description="web (new)""#), "{infos:?}");
    // The quota panel's filter: this mapping has an allowance (the quota check
    // sets it within a second).
    wait_for("tunneld_mapping_quota_bytes", std::time::Duration::from_secs(10), || {
        (scrape_metric(&server, "tunneld_mapping_quota_bytes", &[("port", &p)]) == Some(5000.0)).then_some(())
    });
}
