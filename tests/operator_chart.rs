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

// ---------------------------------------------------------------------------
// The monitor page in Chromium.
// ---------------------------------------------------------------------------

/// What the page shows of the chart, its series and the totals, in one read.
const CHART_JS: &str = r#"(() => {
  const q = (s) => document.querySelector(s);
  const chart = Chart.getChart(q('#chart'));
  return {
    state: q('[data-testid="connection-status"]').dataset.state,
    samples: Number(document.body.dataset.samples),
    live: window.tunneldCharts.live(),
    east: -new Date().getTimezoneOffset() * 60,
    tensions: chart.data.datasets.map((d) => d.tension),
    drawn_ticks: chart.scales.x.ticks.map((t) => ({ value: t.value, label: t.label })),
    chart_port: q('[data-testid="traffic-chart"]').dataset.port,
    series_name: q('[data-testid="chart-series-name"]').textContent.trim(),
    series_select: q('[data-testid="chart-series"]').value,
    show_all_visible: !q('[data-testid="chart-show-all"]').hidden,
    charted_rows: [...document.querySelectorAll('[data-testid="mapping-row"].is-charted')].map((r) => Number(r.dataset.port)),
    history_options: [...document.querySelectorAll('#history-port option')].map((o) => ({ value: o.value, text: o.textContent })),
    history_sent: q('[data-testid="history-sent"]') && Number(q('[data-testid="history-sent"]').dataset.bytes),
    history_received: q('[data-testid="history-received"]') && Number(q('[data-testid="history-received"]').dataset.bytes),
    card_sent: Number(q('[data-testid="card-total-sent"] [data-role="value"]').dataset.bytes),
    card_received: Number(q('[data-testid="card-total-received"] [data-role="value"]').dataset.bytes),
    scroll_width: document.documentElement.scrollWidth,
    viewport_width: window.innerWidth,
  };
})()"#;

fn page_browser(chromium: &std::path::Path) -> Browser {
    let mut browser = Browser::launch(chromium, &[], None);
    browser.set_state_probe(CHART_JS);
    browser
}

/// Keeps echo traffic flowing through `port` until the flag is set (at most 60 s).
fn traffic_on(port: u16) -> (std::sync::Arc<std::sync::atomic::AtomicBool>, std::thread::JoinHandle<()>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let started = std::time::Instant::now();
        while !flag.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(60) {
            echo_through(port, 32 * 1024);
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    (stop, handle)
}

fn f64_at(v: &Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// The live chart's drawing, checked: every step is flat over a time it covers
/// (minutes on minute boundaries, at most a minute long; samples a few seconds),
/// steps never overlap, no curve (tension 0), and every tick is a round local
/// minute labelled with its own HH:MM.
fn assert_honest_live_chart(page: &Value) {
    let steps = page["live"]["steps"].as_array().expect("steps");
    assert!(!steps.is_empty(), "{page:#}");
    assert!(page["tensions"].as_array().unwrap().iter().all(|t| t == &json!(0)), "no spline: {page:#}");
    let mut end = f64::MIN;
    for s in steps {
        let (from, to) = (f64_at(s, "from"), f64_at(s, "to"));
        assert!(to > from && from >= end - 1e-6, "steps in order, not overlapping: {s} after {end}\n{page:#}");
        end = to;
        match s["kind"].as_str() {
            // A minute, or the part of it a daemon was recording.
            Some("minute") => assert!((from / 60.0).floor() == ((to - 1e-6) / 60.0).floor(), "a minute step lies in its minute: {s}"),
            Some("sample") => assert!(to - from <= 10.5, "a sample step covers its sample interval: {s}"),
            other => panic!("unknown step kind {other:?}"),
        }
    }
    let east = f64_at(page, "east");
    let ticks = page["drawn_ticks"].as_array().unwrap();
    assert!(ticks.len() >= 2, "the time axis has ticks: {page:#}");
    assert_eq!(ticks, page["live"]["ticks"].as_array().unwrap(), "the hook reports what Chart.js drew");
    for t in ticks {
        let v = f64_at(t, "value");
        assert_eq!((v + east).rem_euclid(60.0), 0.0, "tick {t} is not on a minute boundary");
        let local = (v + east) as i64;
        let want = (local.rem_euclid(86_400) / 3600, local.rem_euclid(3600) / 60);
        assert_eq!(t["label"].as_str().and_then(clock_label), Some(want), "tick label = its time: {t}");
    }
}

/// (hour 0-23, minute) of an axis label in the browser's locale: `14:05`, `02:05 PM`.
fn clock_label(label: &str) -> Option<(i64, i64)> {
    let text = label.replace('\u{202f}', " ");
    let (time, suffix) = text.split_once(' ').map_or((text.as_str(), ""), |(t, s)| (t, s));
    let (h, m) = time.split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    let h = match suffix {
        "" => h,
        "AM" => h % 12,
        "PM" => h % 12 + 12,
        _ => return None,
    };
    Some((h, m))
}

#[test]
fn live_chart_is_steps_on_round_ticks_with_gaps_and_a_series_per_mapping() {
    let Some(chromium) = external_tool("chromium", "operator_chart") else { return };
    let state_tmp = tempfile::tempdir().unwrap();
    let state = state_tmp.path().join("state");
    let (_cfg_dir, config) = config_file("[history]\ninterval_secs = 1\n");
    let mut d = Daemon::server_with_state(&state, SECRET, &["--config", &config]);
    let echo = echo_server();
    let (busy, idle) = (free_port(), free_port());
    for (port, description) in [(busy, "build cache"), (idle, "quiet one")] {
        let body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(), "use_tunnel": false, "description": description});
        let (status, reply) = post(&d, "/api/mapping/create", body);
        assert_eq!(status, 200, "{reply}");
    }
    echo_through(busy, 200_000);
    counted(&d, busy, 200_000);

    let mut browser = page_browser(&chromium);
    browser.set_viewport(1440, 900, false);
    browser.navigate(&d.url("/api/stats/monitor?interval_ms=1000"));
    browser.wait_for("the live stream", r#"document.body.dataset.state === 'live'"#);
    // The minute history (this minute so far, flushed every second) is drawn first.
    browser.wait_for("a minute step", "window.tunneldCharts.live().steps.some((s) => s.kind === 'minute')");
    let (stop, pusher) = traffic_on(busy);
    browser.wait_for("sample steps", "window.tunneldCharts.live().steps.filter((s) => s.kind === 'sample' && s.sent > 0).length >= 4");
    let page = browser.eval(CHART_JS);
    assert_honest_live_chart(&page);
    assert_eq!(page["live"]["gaps"], json!([]), "a steady stream has no gaps: {page:#}");

    // The port pickers name target and description.
    let option = page["history_options"].as_array().unwrap().iter().find(|o| o["value"] == json!(busy.to_string())).cloned();
    let want = format!(":{busy} → 127.0.0.1:{} — build cache", echo.port());
    assert_eq!(option.and_then(|o| o["text"].as_str().map(String::from)), Some(want.clone()), "{page:#}");

    // A click on the idle mapping's row charts it alone: nothing moved there.
    browser.eval(&format!("document.querySelector('[data-testid=\"mapping-row\"][data-port=\"{idle}\"] td[data-col=\"port\"]').click()"));
    browser.wait_for("the idle series", &format!("window.tunneldCharts.live().port === {idle}"));
    browser.wait_for("its samples", "window.tunneldCharts.live().steps.filter((s) => s.kind === 'sample').length >= 2");
    let page = browser.eval(CHART_JS);
    assert_honest_live_chart(&page);
    assert!(page["live"]["steps"].as_array().unwrap().iter().all(|s| f64_at(s, "sent") == 0.0), "idle: {page:#}");
    assert_eq!(page["chart_port"], json!(idle.to_string()));
    assert_eq!(page["series_select"], json!(idle.to_string()));
    assert!(page["series_name"].as_str().unwrap().contains(&format!(":{idle} → 127.0.0.1:{} — quiet one", echo.port())), "{page:#}");
    assert_eq!(page["show_all_visible"], json!(true), "the way back is on screen: {page:#}");
    assert_eq!(page["charted_rows"], json!([idle]));
    // The busy one: its own minute history and samples, all moving.
    browser.eval(&format!("document.querySelector('[data-testid=\"mapping-row\"][data-port=\"{busy}\"] td[data-col=\"port\"]').click()"));
    browser.wait_for("the busy series", &format!("window.tunneldCharts.live().port === {busy}"));
    browser.wait_for(
        "its minute history",
        "window.tunneldCharts.live().steps.some((s) => s.kind === 'minute') && window.tunneldCharts.live().steps.some((s) => s.kind === 'sample' && s.sent > 0)",
    );
    let page = browser.eval(CHART_JS);
    assert_honest_live_chart(&page);
    assert_eq!(page["charted_rows"], json!([busy]));
    browser.screenshot("chart-one-mapping-1440.png");
    browser.set_viewport(390, 844, true);
    browser.wait_for("the phone layout", "window.innerWidth === 390 && Chart.getChart(document.querySelector('#chart')).width < 390");
    let page = browser.eval(CHART_JS);
    assert_eq!(page["scroll_width"], json!(390), "no sideways overflow at 390 px: {page:#}");
    assert_honest_live_chart(&page);
    browser.screenshot("chart-one-mapping-390.png");
    browser.set_viewport(1440, 900, false);
    browser.eval("document.querySelector('[data-testid=\"chart-show-all\"]').click()");
    browser.wait_for("all mappings again", "window.tunneldCharts.live().port === null");
    let page = browser.eval(CHART_JS);
    assert_eq!((page["show_all_visible"].clone(), page["charted_rows"].clone()), (json!(false), json!([])), "{page:#}");

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    pusher.join().unwrap();
    // The history totals catch up with the live cards without waiting for a
    // flush or a minute-long refresh (a fresh daemon: its whole history is today).
    browser.wait_for(
        "history totals = the live cards",
        r#"(() => { const p = document.querySelector('[data-testid="history-sent"]'); const c = document.querySelector('[data-testid="card-total-sent"] [data-role="value"]');
             return !!p && p.dataset.bytes === c.dataset.bytes && Number(c.dataset.bytes) > 200000; })()"#,
    );

    // The daemon goes away for a while and comes back on the same address and
    // state: the chart shows a shaded gap there, not a line across it.
    let samples = browser.eval(CHART_JS)["samples"].as_u64().unwrap();
    let killed_at = common::unix_now();
    d.kill();
    browser.wait_for("the lost state", r#"document.body.dataset.state === 'lost'"#);
    // The outage has to last (there is no event for "time passed").
    std::thread::sleep(Duration::from_secs(6));
    let back = Daemon::server_restarted_on_api(&d.state_dir, d.http, SECRET);
    let restarted_at = common::unix_now();
    browser.wait_for("recovery", r#"document.body.dataset.state === 'live'"#);
    browser.wait_for("samples after the outage", &format!("Number(document.body.dataset.samples) >= {}", samples + 4));
    browser.wait_for("a gap", "window.tunneldCharts.live().gaps.length >= 1");
    let page = browser.eval(CHART_JS);
    assert_honest_live_chart(&page);
    let gaps = page["live"]["gaps"].as_array().unwrap();
    assert_eq!(gaps.len(), 1, "{page:#}");
    let (from, to) = (f64_at(&gaps[0], "from"), f64_at(&gaps[0], "to"));
    assert!(from <= killed_at + 1.0 && to >= restarted_at - 1.0, "the gap covers the outage [{killed_at}, {restarted_at}]: {page:#}");
    let drawn_null = browser.eval("Chart.getChart(document.querySelector('#chart')).data.datasets[0].data.some((p) => p.y === null)");
    assert_eq!(drawn_null, json!(true), "the line is broken at the gap");
    browser.screenshot("chart-outage-gap-1440.png");

    // Reloaded, the chart starts from the minute history: the outage, shorter
    // than a minute, is still a gap there (from the old daemon's last write to
    // the new one's start), not a minute average drawn across it.
    browser.navigate(&back.url("/api/stats/monitor?interval_ms=1000"));
    browser.wait_for("the live stream again", r#"document.body.dataset.state === 'live'"#);
    browser.wait_for(
        "the reloaded chart with its gap",
        "window.tunneldCharts.live().gaps.length >= 1 && window.tunneldCharts.live().steps.some((s) => s.kind === 'minute')",
    );
    let page = browser.eval(CHART_JS);
    assert_honest_live_chart(&page);
    let gap = page["live"]["gaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| f64_at(g, "to") >= restarted_at - 2.0 && f64_at(g, "from") <= killed_at + 1.0)
        .cloned();
    let gap = gap.unwrap_or_else(|| panic!("no gap over the outage [{killed_at}, {restarted_at}] after a reload: {page:#}"));
    // The old daemon wrote every second: its last write is shortly before the
    // kill (seconds are whole, and a loaded machine delays a flush or two).
    assert!(f64_at(&gap, "from") >= killed_at - 10.0, "{gap} vs killed at {killed_at}: {page:#}");
    browser.set_viewport(390, 844, true);
    browser.wait_for("the phone layout", "window.innerWidth === 390");
    browser.screenshot("chart-outage-gap-390.png");
    browser.set_viewport(1440, 900, false);
    browser.wait_for("the desktop layout", "window.innerWidth === 1440");
    browser.screenshot("chart-outage-gap-reloaded-1440.png");
    let thrown = browser.events_named("Runtime.exceptionThrown");
    assert!(thrown.is_empty(), "page threw: {thrown:?}");
    drop(back);
}

#[test]
fn history_ticks_fall_on_calendar_boundaries() {
    let Some(chromium) = external_tool("chromium", "operator_chart") else { return };
    const OFFSET: i64 = 5 * 3600 + 1800;
    let (_cfg_dir, config) = config_file("[history]\ninterval_secs = 1\nutc_offset = \"+05:30\"\n");
    let d = Daemon::server(SECRET, &["--config", &config]);
    let echo = echo_server();
    let port = free_port();
    create_mapping(&d, port, echo, false);
    echo_through(port, 50_000);

    let mut browser = page_browser(&chromium);
    for (width, height, mobile) in [(1440, 900, false), (390, 844, true)] {
        browser.set_viewport(width, height, mobile);
        browser.navigate(&d.url("/api/stats/monitor"));
        browser.wait_for("the history view", r#"document.querySelector('[data-testid="history"]').dataset.state === 'ready'"#);
        for range in ["24h", "7d", "30d", "12mo"] {
            browser.eval(&format!("document.querySelector('[data-range=\"{range}\"]').click()"));
            browser.wait_for(
                &format!("the {range} range"),
                &format!("window.tunneldCharts.history().range === '{range}' && document.querySelector('[data-testid=\"history\"]').dataset.state === 'ready'"),
            );
            let view = browser.eval("window.tunneldCharts.history()");
            let ticks = view["ticks"].as_array().unwrap();
            assert!(ticks.len() >= 2, "{width} px, {range}: {view:#}");
            for tick in ticks {
                let local = tick["t"].as_i64().expect("a bucket start") + OFFSET;
                let on_boundary = match range {
                    "24h" => local % 3600 == 0,
                    "7d" | "30d" => local % 86_400 == 0,
                    _ => {
                        local % 86_400 == 0 && {
                            // The first of a month: the day before is in another month.
                            let day = |t: i64| chrono_day(t);
                            day(local) == 1
                        }
                    }
                };
                assert!(on_boundary, "{width} px, {range}: tick {tick} is not on a round boundary at +05:30: {view:#}");
            }
            if range == "7d" {
                let labels: Vec<&str> = ticks.iter().filter_map(|t| t["label"].as_str()).collect();
                assert!(labels.iter().all(|l| !l.contains(':')), "7 d ticks are dates: {labels:?}");
                let spacing: Vec<i64> = ticks.windows(2).map(|w| w[1]["t"].as_i64().unwrap() - w[0]["t"].as_i64().unwrap()).collect();
                assert!(spacing.iter().all(|s| s % 86_400 == 0), "whole days apart: {spacing:?}");
            }
            browser.eval("document.querySelector('[data-testid=\"history\"]').scrollIntoView()");
            browser.screenshot(&format!("history-ticks-{range}-{width}.png"));
        }
    }
}

/// Day of the month of a local time (seconds since the epoch, already offset).
fn chrono_day(local: i64) -> i64 {
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = local.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    doy - (153 * mp + 2) / 5 + 1
}
