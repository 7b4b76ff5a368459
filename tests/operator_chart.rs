//! Issue 19 §6: the history answers and the monitor page's charts tell the truth
//! about time.
//!
//! - `/api/stats/history` and `/api/stats/report` include the bucket in progress
//!   (bytes the recorder has not flushed yet), so their totals equal the live
//!   counters at once, not an interval (or a page refresh) later.
//! - The live chart draws each measurement as what it is: a flat step over the
//!   time it covers (a minute of history, a few seconds of samples), never a
//!   spline across them; its HH:MM ticks sit on round minutes; an outage of the
//!   daemon is a gap; a click on a mapping row shows that mapping's own series.
//! - The history chart's ticks sit on round boundaries (7 d: midnights of the
//!   daemon's calendar); the port picker names the target and description.
//!
//! The page exposes what it drew through `window.tunneldCharts` (read-only
//! copies), and the tests cross-check it with Chart.js's own scales. Screenshots
//! at 1440 and 390 px land in `test-artifacts/`.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::tools::external_tool;
use common::{config_file, create_mapping, echo_server, echo_through, free_port, get_data, post, traffic_entry, wait_for, Daemon};
use serde_json::{json, Value};

const SECRET: &str = "operator-chart-secret";

/// (sent, received) summed over a series' points or a report's rows.
fn sums(items: &Value) -> (u64, u64) {
    items.as_array().expect("an array").iter().fold((0, 0), |(s, r), p| {
        (s + p["bytes_sent"].as_u64().expect("bytes_sent"), r + p["bytes_received"].as_u64().expect("bytes_received"))
    })
}

/// The live counters of `port` once they show at least `want` bytes each way.
fn counted(d: &Daemon, port: u16, want: u64) -> (u64, u64) {
    wait_for("the bytes to be counted", Duration::from_secs(20), || {
        let m = traffic_entry(d, port)?;
        let (sent, received) = (m["bytes_sent"].as_u64()?, m["bytes_received"].as_u64()?);
        (sent >= want && received >= want).then_some((sent, received))
    })
}

#[test]
fn history_and_report_include_the_bucket_in_progress() {
    // A minute between flushes: nothing is flushed while the test runs (the first
    // tick finds nothing to write), so every byte below is "not yet flushed".
    let (_cfg_dir, config) = config_file("[history]\ninterval_secs = 60\nutc_offset = \"+05:30\"\n");
    let d = Daemon::server(SECRET, &["--config", &config]);
    let echo = echo_server();
    let ports = [free_port(), free_port()];
    create_mapping(&d, ports[0], echo, false);
    create_mapping(&d, ports[1], echo, false);
    echo_through(ports[0], 123_456);
    echo_through(ports[1], 7_890);
    let live = [counted(&d, ports[0], 123_456), counted(&d, ports[1], 7_890)];
    let both = (live[0].0 + live[1].0, live[0].1 + live[1].1);

    for step in ["minute", "hour", "day", "month"] {
        for (i, port) in ports.iter().enumerate() {
            let series = get_data(&d, &format!("/api/stats/history?step={step}&port={port}"));
            assert_eq!(sums(&series["points"]), live[i], "{step} series of :{port} lags the live counters: {series}");
            let as_of = series["as_of"].as_i64().expect("as_of: when the counters were read");
            let last = series["points"].as_array().and_then(|p| p.last()).cloned().unwrap_or_default();
            assert!(last["t"].as_i64().is_some_and(|t| t <= as_of && as_of - t < 31 * 86_400), "the bucket in progress is there: {series}");
        }
        let all = get_data(&d, &format!("/api/stats/history?step={step}"));
        assert_eq!(sums(&all["points"]), both, "{step} series of all mappings: {all}");
    }
    for period in ["hour", "day", "month"] {
        let report = get_data(&d, &format!("/api/stats/report?period={period}"));
        assert!(report["as_of"].as_i64().is_some(), "{report}");
        for (i, port) in ports.iter().enumerate() {
            let rows: Vec<Value> = report["rows"].as_array().unwrap().iter().filter(|r| r["port"] == json!(port)).cloned().collect();
            assert_eq!(sums(&Value::Array(rows)), live[i], "{period} report of :{port}: {report}");
        }
    }
    // A range that ends before now has no bucket in progress: nothing is added.
    let past = get_data(&d, "/api/stats/history?step=hour&from=0&to=7200");
    assert_eq!(sums(&past["points"]), (0, 0), "{past}");

    // Removing a mapping flushes it; the totals stay the same, counted once.
    let (status, reply) = post(&d, "/api/mapping/remove", json!({"port": ports[1]}));
    assert_eq!(status, 200, "{reply}");
    let all = get_data(&d, "/api/stats/history?step=day");
    assert_eq!(sums(&all["points"]), both, "after the flush of the removal, not counted twice: {all}");
}
