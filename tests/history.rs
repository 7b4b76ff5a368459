//! Traffic history end to end: the real binary, a real SQLite file, `kill -9`.
//!
//! Bytes are pushed through two direct mappings; after each kill the history and
//! the lifetime totals must hold everything that had moved before the recorder's
//! last flush and never more than what moved; after a SIGTERM they must be exact.

mod common;

use std::time::Duration;

use common::{
    config_file, create_mapping, echo_server, echo_through, free_port, get_data, http, post, traffic_entry, unix_now, wait_for,
    wait_for_history_flush, Daemon,
};
use serde_json::json;

const SECRET: &str = "history-secret";
const CONFIG: &str = "[history]\ninterval_secs = 1\nutc_offset = \"+08:00\"\n";

/// Waits until the daemon has counted `want` (sent) on `port`, then until the
/// recorder has flushed after that moment.
fn wait_flushed(d: &Daemon, port: u16, want: u64) {
    wait_for("the bytes to be counted", Duration::from_secs(20), || {
        let m = traffic_entry(d, port)?;
        (m["bytes_sent"].as_u64()? >= want).then_some(())
    });
    wait_for_history_flush(d, unix_now());
}

/// (sent, received) per port from the hourly history of the last day.
fn history_sums(d: &Daemon, port: u16) -> (u64, u64) {
    let data = get_data(d, &format!("/api/stats/history?port={port}&step=hour"));
    let points = data["points"].as_array().expect("points");
    points.iter().fold((0, 0), |(s, r), p| (s + p["bytes_sent"].as_u64().unwrap(), r + p["bytes_received"].as_u64().unwrap()))
}

fn lifetime(d: &Daemon, port: u16) -> (u64, u64) {
    let m = traffic_entry(d, port).expect("mapping listed");
    (m["lifetime_sent"].as_u64().unwrap(), m["lifetime_received"].as_u64().unwrap())
}

fn start(state: &std::path::Path, config: &str) -> Daemon {
    Daemon::server_with_state(state, SECRET, &["--config", config])
}

#[test]
fn history_survives_kill_9_and_is_exact_after_sigterm() {
    let state_tmp = tempfile::tempdir().unwrap();
    let state = state_tmp.path().join("state");
    let (_cfg_dir, config) = config_file(CONFIG);
    let echo = echo_server();
    let ports = [free_port(), free_port()];

    // Run 1: known bytes, a confirmed flush, more bytes, kill -9 at once.
    let mut d = start(&state, &config);
    create_mapping(&d, ports[0], echo, false);
    create_mapping(&d, ports[1], echo, false);
    echo_through(ports[0], 100_000);
    echo_through(ports[1], 200_000);
    wait_flushed(&d, ports[1], 200_000);
    wait_flushed(&d, ports[0], 100_000);
    echo_through(ports[0], 30_000); // may be lost: at most one interval
    d.kill();
    let mut moved = [130_000u64, 200_000];
    let mut surely = [100_000u64, 200_000];

    // Run 2: the stored past is there at once; more bytes; kill -9 again.
    let mut d = start(&state, &config);
    for (i, &port) in ports.iter().enumerate() {
        let (sent, received) = lifetime(&d, port);
        assert_eq!(sent, received, "echo: both directions equal");
        assert!(surely[i] <= sent && sent <= moved[i], "after kill -9, :{port} lifetime {sent} outside [{}, {}]", surely[i], moved[i]);
        assert_eq!(history_sums(&d, port), (sent, received), "history and lifetime agree on :{port}");
        // What the store holds now is the new floor.
        surely[i] = sent;
    }
    echo_through(ports[0], 70_000);
    echo_through(ports[1], 11_000);
    wait_flushed(&d, ports[1], 11_000);
    wait_flushed(&d, ports[0], 70_000);
    surely[0] += 70_000;
    surely[1] += 11_000;
    echo_through(ports[1], 5_000); // may be lost
    moved[0] += 70_000;
    moved[1] += 16_000;
    d.kill();

    // Run 3: check again, then a clean SIGTERM right after traffic: exact.
    let mut d = start(&state, &config);
    let mut stored = [0u64; 2];
    for (i, &port) in ports.iter().enumerate() {
        let (sent, _) = lifetime(&d, port);
        assert!(
            surely[i] <= sent && sent <= moved[i],
            "after the second kill -9, :{port} lifetime {sent} outside [{}, {}]",
            surely[i],
            moved[i]
        );
        assert_eq!(history_sums(&d, port).0, sent);
        stored[i] = sent;
    }
    echo_through(ports[0], 12_345);
    echo_through(ports[1], 54_321);
    let status = d.terminate();
    assert!(status.success(), "SIGTERM exit: {status}");

    let d = start(&state, &config);
    for (i, (&port, added)) in ports.iter().zip([12_345u64, 54_321]).enumerate() {
        let want = stored[i] + added;
        assert_eq!(lifetime(&d, port), (want, want), ":{port} after SIGTERM");
        assert_eq!(history_sums(&d, port), (want, want), ":{port} history after SIGTERM");
    }
    // All mappings summed (no port) = the sum of both.
    let all = get_data(&d, "/api/stats/history?step=day&from=0&to=1000000");
    assert_eq!(all["points"].as_array().map(Vec::len), Some(12), "12 days from the epoch at +08:00: {all}");
    let traffic = get_data(&d, "/api/stats/traffic");
    let sum: u64 = ports.iter().map(|&p| lifetime(&d, p).0).sum();
    assert_eq!(traffic["lifetime_sent"].as_u64(), Some(sum));
    assert_eq!(traffic["total_sent"].as_u64(), Some(0), "since-start totals keep their meaning: {traffic}");
    let started = traffic["started_at"].as_f64().expect("started_at");
    assert!(started <= traffic["timestamp"].as_f64().unwrap() && started > unix_now() - 120.0, "{traffic}");
    let (status, _) = http("GET", &d.url("/health"), None);
    assert_eq!(status, 200);
}

#[test]
fn report_csv_parses_and_bad_queries_are_refused() {
    let (_cfg_dir, config) = config_file(CONFIG);
    let d = Daemon::server(SECRET, &["--config", &config]);
    let echo = echo_server();
    let port = free_port();
    create_mapping(&d, port, echo, false);
    echo_through(port, 4_321);
    wait_flushed(&d, port, 4_321);

    // JSON and CSV carry the same rows; the CSV is an RFC 4180 attachment.
    let json = get_data(&d, "/api/stats/report?period=day");
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(json["utc_offset"], "+08:00");
    let row = rows.iter().find(|r| r["port"] == port).expect("a row for the port");
    assert_eq!(row["bytes_sent"], 4_321);
    let resp = ureq::get(&d.url("/api/stats/report?period=month&format=csv")).call().expect("csv report");
    assert!(resp.header("Content-Type").unwrap_or_default().starts_with("text/csv"), "{:?}", resp.header("Content-Type"));
    let disposition = resp.header("Content-Disposition").unwrap_or_default().to_string();
    assert!(disposition.starts_with("attachment; filename=\"tunneld-report-month-"), "{disposition}");
    let body = resp.into_string().unwrap();
    assert!(body.ends_with("\r\n") && body.contains("\r\n"), "RFC 4180 line ends: {body:?}");
    let mut reader = csv::Reader::from_reader(body.as_bytes());
    assert_eq!(
        reader.headers().unwrap().iter().collect::<Vec<_>>(),
        // `protocol` came with UDP mappings: added last, so a reader of the
        // columns before keeps finding them where they were.
        vec!["period", "period_start", "port", "bytes_sent", "bytes_received", "protocol"]
    );
    let records: Vec<csv::StringRecord> = reader.records().collect::<Result<_, _>>().expect("valid CSV");
    let mine: Vec<&csv::StringRecord> = records.iter().filter(|r| r[2] == port.to_string()).collect();
    assert_eq!(mine.len(), 1, "{body}");
    assert_eq!((&mine[0][3], &mine[0][4]), ("4321", "4321"));
    assert_eq!(mine[0][0].len(), "2026-11".len(), "month label: {:?}", &mine[0][0]);

    // 400s, each with a message that says what to do.
    let now = unix_now() as i64;
    for (query, needle) in [
        ("history?step=week", "step"),
        ("history?step=minute&from=0&to=999999", "step=hour"),
        ("history?step=day&from=0&to=253402300000", "step=month"),
        (&format!("history?from={now}&to={}", now - 10), "before"),
        ("history?port=0", "port"),
        ("history?from=yesterday", "from"),
        ("history?colour=red", "unknown parameter"),
        ("report?period=week", "period"),
        ("report?format=xml", "format"),
        ("report?period=day&from=0&to=253402300000", "shorter range"),
    ] {
        let (status, body) = http("GET", &d.url(&format!("/api/stats/{query}")), None);
        assert_eq!(status, 400, "{query}: {body}");
        assert_eq!(body["success"], false);
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains(needle), "{query}: {message}");
    }
}

#[test]
fn a_removed_mapping_keeps_its_history_and_a_new_one_on_its_port_counts_from_zero() {
    let (_cfg_dir, config) = config_file("[history]\ninterval_secs = 60\n");
    let d = Daemon::server(SECRET, &["--config", &config]);
    let echo = echo_server();
    let port = free_port();
    create_mapping(&d, port, echo, false);
    // With a 60 s interval no periodic flush comes in between: removal records it.
    echo_through(port, 7_000);
    let (status, body) = post(&d, "/api/mapping/remove", json!({"port": port}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(history_sums(&d, port), (7_000, 7_000), "the removed mapping's bytes are in the history");
    create_mapping(&d, port, echo, false);
    echo_through(port, 500);
    assert_eq!(lifetime(&d, port), (7_500, 7_500), "the port's lifetime continues, counting the new mapping from 0");
    let report = get_data(&d, "/api/stats/report?period=day");
    let row = report["rows"].as_array().unwrap().iter().find(|r| r["port"] == port).cloned().expect("report row");
    // The report is as of now: the new mapping's unflushed 500 are in today's row too.
    assert_eq!(row["bytes_sent"], 7_500, "{report}");
}
