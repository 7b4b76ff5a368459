//! The monitor page (`/api/stats/monitor`) in a real browser.
//!
//! Debian's `chromium` runs headless, driven over the DevTools pipe by
//! `common::browser` (no WebSocket client, no driver binary). Everything asserted is read from the
//! *rendered* DOM after the page's JavaScript ran, and compared with what the daemon
//! itself reports on `/api/stats/traffic`.
//!
//! The browser is cut off from every host but 127.0.0.1: names resolve to nothing
//! (`--host-resolver-rules`) and any request that is not to loopback goes to a
//! "canary" proxy owned by this test that refuses it and records it. So a page that
//! rendered fully did so from the daemon alone, and the test also checks that the
//! canary saw nothing and that every request the page made went to the daemon.
//!
//! Screenshots (phone 375x800 and desktop 1920x1080, light and dark, and the token
//! prompt) are written to `test-artifacts/` for a human to look at.

mod common;

use common::browser::{Browser, UI_TIMEOUT};
use common::tools::external_tool;
use common::{
    config_file, create_client, create_mapping, create_tunneled_mapping, echo_server, echo_through, free_port, get_data,
    get_data_with_token, http, post_with_token, unix_now, wait_for, wait_for_history_flush, Daemon,
};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// What the page shows, re-implemented here to compare texts exactly.
// ---------------------------------------------------------------------------

/// The page's `formatBytes` (static/monitor.js): bytes below 1 KiB as "N B", else
/// binary units with 2/1/0 decimals for values below 10/100/1024. JS `toFixed`
/// rounds the exact value half up, which integer arithmetic reproduces exactly.
fn format_bytes(n: u64) -> String {
    if n < 1024 {
        return format!("{n} B");
    }
    let units = ["KiB", "MiB", "GiB", "TiB"];
    let n = n as u128;
    let mut div: u128 = 1024;
    let mut unit = 0;
    while n >= div * 1024 && unit < units.len() - 1 {
        div *= 1024;
        unit += 1;
    }
    let digits: u32 = if n < 10 * div {
        2
    } else if n < 100 * div {
        1
    } else {
        0
    };
    let scale = 10u128.pow(digits);
    let scaled = (2 * n * scale + div) / (2 * div); // round(n / div * scale), ties up
    let text =
        if digits == 0 { scaled.to_string() } else { format!("{}.{:0width$}", scaled / scale, scaled % scale, width = digits as usize) };
    format!("{text} {}", units[unit])
}

#[test]
fn format_bytes_matches_the_page_rule() {
    assert_eq!(format_bytes(0), "0 B");
    assert_eq!(format_bytes(1023), "1023 B");
    assert_eq!(format_bytes(1024), "1.00 KiB");
    assert_eq!(format_bytes(1536), "1.50 KiB");
    assert_eq!(format_bytes(3200), "3.13 KiB"); // 3.125: JS toFixed rounds the tie up
    assert_eq!(format_bytes(100_000), "97.7 KiB");
    assert_eq!(format_bytes(1_048_575), "1024 KiB");
    assert_eq!(format_bytes(1_500_000), "1.43 MiB");
    assert_eq!(format_bytes(5 << 40), "5.00 TiB");
    assert_eq!(format_bytes(2000 << 40), "2000 TiB");
}

/// Everything the tests look at, read from the rendered DOM in one go.
const SNAPSHOT_JS: &str = r#"(() => {
  const q = (s) => document.querySelector(s);
  const card = (id) => {
    const v = q(`[data-testid="${id}"] [data-role="value"]`);
    return { text: v.textContent.trim(), bytes: v.dataset.bytes === undefined ? null : Number(v.dataset.bytes) };
  };
  const visible = (el) => !!el && !el.hidden && el.getClientRects().length > 0;
  return {
    state: q('[data-testid="connection-status"]').dataset.state,
    status_text: q('[data-testid="connection-status"]').textContent.trim(),
    body_state: document.body.dataset.state,
    samples: Number(document.body.dataset.samples),
    points: Number(q('[data-testid="traffic-chart"]').dataset.points),
    gaps: Number(q('[data-testid="traffic-chart"]').dataset.gaps),
    history_points: Number(q('[data-testid="traffic-chart"]').dataset.historyPoints),
    lifetime_sent: Number(q('[data-testid="card-total-sent"] [data-role="lifetime"]').dataset.bytes),
    lifetime_received: Number(q('[data-testid="card-total-received"] [data-role="lifetime"]').dataset.bytes),
    chart_lib: typeof window.Chart,
    chart_drawn: q('#chart').width > 0 && getComputedStyle(q('#chart-empty')).display === 'none',
    cards: {
      total_sent: card('card-total-sent'),
      total_received: card('card-total-received'),
      tunnel_sent: card('card-tunnel-sent'),
      tunnel_received: card('card-tunnel-received'),
      mappings: card('card-mappings'),
    },
    open_connections: q('[data-testid="card-mappings"] [data-role="connections"]').textContent.trim(),
    tunnel_connected: q('[data-testid="card-tunnel-state"]').dataset.connected,
    tunnel_text: q('[data-testid="card-tunnel-state"] [data-role="value"]').textContent.trim(),
    rate_sent: q('#rate-sent').textContent.trim(),
    rate_received: q('#rate-recv').textContent.trim(),
    rows: [...document.querySelectorAll('[data-testid="mapping-row"]')].map((r) => ({
      port: Number(r.dataset.port),
      // A cell's main value (cells may carry sub-lines: lifetime, inline rate).
      cells: Object.fromEntries([...r.cells].map((c) => [c.dataset.col, (c.querySelector('[data-role="value"]') || c).textContent.trim()])),
      lifetime: Object.fromEntries([...r.querySelectorAll('td[data-lifetime]')].map((c) => [c.dataset.col, c.dataset.lifetime === '' ? null : Number(c.dataset.lifetime)])),
    })),
    auth_visible: visible(q('[data-testid="auth-prompt"]')),
    auth_error: visible(q('[data-testid="auth-error"]')) ? q('[data-testid="auth-error"]').textContent.trim() : null,
    lost_visible: visible(q('[data-testid="lost-banner"]')),
    lost_text: q('[data-testid="lost-banner"]').textContent.trim(),
    scroll_width: document.documentElement.scrollWidth,
    viewport_width: window.innerWidth,
  };
})()"#;

fn chart_theme_is(scheme: &str) -> String {
    format!(r#"document.querySelector('[data-testid="traffic-chart"]').dataset.theme === {scheme:?}"#)
}

fn state_is(state: &str) -> String {
    format!(r#"document.querySelector('[data-testid="connection-status"]').dataset.state === {state:?}"#)
}

/// The browser every test here uses: cut off from every host but 127.0.0.1, its
/// other requests sent to the `canary` proxy, and the page's state
/// ([`SNAPSHOT_JS`]) printed when a wait times out.
fn monitor_browser(chromium: &Path, canary: SocketAddr) -> Browser {
    let mut browser = Browser::launch(chromium, &[], Some(canary));
    browser.set_state_probe(SNAPSHOT_JS);
    browser
}

// ---------------------------------------------------------------------------
// Test fixtures: canary proxy, traffic, the daemon's own view.
// ---------------------------------------------------------------------------

/// A proxy that never proxies: it records the request line of every connection
/// (i.e. every request the browser tried to send off-host) and closes it.
fn canary_proxy() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind canary");
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let _ = BufReader::new(&conn).read_line(&mut line);
            // Chromium pre-opens connections to its proxy and may close them
            // unused: a connection that never names a destination leaks nothing
            // and is not an escape. Any request line is recorded.
            if !line.trim().is_empty() {
                log.lock().unwrap().push(line.trim().to_string());
            }
        }
    });
    (addr, seen)
}

fn u64_at(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing or not a u64 in {v}"))
}

/// Keeps traffic flowing through `ports` on a thread until the returned flag is
/// set (or a hard bound of 60 s / 2000 rounds), so the chart has rates to draw.
fn background_traffic(ports: Vec<u16>) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let started = Instant::now();
        for _ in 0..2000 {
            if flag.load(Ordering::SeqCst) || started.elapsed() > Duration::from_secs(60) {
                return;
            }
            for &p in &ports {
                echo_through(p, 48 * 1024);
            }
        }
    });
    (stop, handle)
}

/// Everything on the page that differs from `/api/stats/traffic` (empty: all
/// equal). Cards and table show the API's numbers in the page's own units; the
/// table has one row per mapping, in the API's (port) order.
fn page_vs_api(page: &Value, api: &Value, echo: SocketAddr) -> Vec<String> {
    let mut wrong = Vec::new();
    fn expect(wrong: &mut Vec<String>, what: &str, shown: &Value, want: Value) {
        if *shown != want {
            wrong.push(format!("{what}: page shows {shown}, API says {want}"));
        }
    }
    let cards = &page["cards"];
    for (card, value) in [
        ("total_sent", u64_at(api, "total_sent")),
        ("total_received", u64_at(api, "total_received")),
        ("tunnel_sent", u64_at(&api["tunnel"], "bytes_sent")),
        ("tunnel_received", u64_at(&api["tunnel"], "bytes_received")),
    ] {
        expect(&mut wrong, &format!("{card} card"), &cards[card]["text"], json!(format_bytes(value)));
        expect(&mut wrong, &format!("{card} card bytes"), &cards[card]["bytes"], json!(value));
    }
    expect(&mut wrong, "mappings card", &cards["mappings"]["text"], json!(u64_at(api, "mapping_count").to_string()));
    expect(&mut wrong, "open connections", &page["open_connections"], json!(u64_at(api, "active_connections").to_string()));
    let connected = api["tunnel"]["connected"].as_bool().expect("tunnel.connected");
    expect(&mut wrong, "tunnel state", &page["tunnel_connected"], json!(connected.to_string()));
    expect(&mut wrong, "tunnel text", &page["tunnel_text"], json!(if connected { "Connected" } else { "Not connected" }));

    let maps = api["mappings"].as_array().expect("mappings array");
    let rows = page["rows"].as_array().expect("rows");
    if rows.len() != maps.len() {
        wrong.push(format!("table has {} rows, API has {} mappings", rows.len(), maps.len()));
        return wrong;
    }
    for (row, m) in rows.iter().zip(maps) {
        let port = u64_at(m, "port");
        let cells = &row["cells"];
        for (col, want) in [
            ("port", format!(":{port}")),
            ("target", format!("{}:{}", echo.ip(), echo.port())),
            ("mode", if m["use_tunnel"] == json!(true) { "Tunnel" } else { "Direct" }.to_string()),
            ("status", "Active".to_string()),
            ("sent", format_bytes(u64_at(m, "bytes_sent"))),
            ("received", format_bytes(u64_at(m, "bytes_received"))),
            ("open", u64_at(m, "active_connections").to_string()),
        ] {
            expect(&mut wrong, &format!(":{port} {col}"), &cells[col], json!(want));
        }
        let last = cells["last-activity"].as_str().unwrap_or_default();
        if !(last == "just now" || last.ends_with(" ago")) {
            wrong.push(format!(":{port} last activity reads {last:?}"));
        }
        for col in ["rate-sent", "rate-received"] {
            if !cells[col].as_str().unwrap_or_default().ends_with("/s") {
                wrong.push(format!(":{port} {col} reads {}", cells[col]));
            }
        }
    }
    wrong
}

/// Requests the canary saw that are not Chromium's own background services.
///
/// Chromium phones home by itself (component and extension updates, sign-in) even
/// with every `--disable-*` switch, and which hosts it uses changes between
/// versions; those requests never come from the page. So the canary tolerates
/// Chromium's service domains and reports them, and anything else fails the test.
/// The page's own requests are checked strictly, whatever the host, from the
/// DevTools network events (`assert_stayed_on_loopback`).
fn unexplained_escapes(canary: &Mutex<Vec<String>>) -> Vec<String> {
    let seen = canary.lock().unwrap().clone();
    let (chromium_own, other): (Vec<String>, Vec<String>) = seen.into_iter().partition(|line| {
        // "CONNECT host:443 HTTP/1.1" or "GET http://host/path HTTP/1.1"
        let target = line.split_whitespace().nth(1).unwrap_or_default();
        let host = target.trim_start_matches("http://").trim_start_matches("https://");
        let host = host.split(['/', ':']).next().unwrap_or_default();
        [".google.com", ".googleapis.com", ".gvt1.com"].iter().any(|d| host.ends_with(d))
    });
    if !chromium_own.is_empty() {
        eprintln!("note: chromium's own background requests were refused by the canary: {chromium_own:?}");
    }
    other
}

/// Every request the page made went to the daemon, and nothing tried to leave.
fn assert_stayed_on_loopback(browser: &mut Browser, daemon_base: &str, canary: &Mutex<Vec<String>>) {
    let urls = browser.requested_urls();
    assert!(!urls.is_empty(), "no requests recorded");
    let foreign: Vec<&String> = urls.iter().filter(|u| !u.starts_with(daemon_base)).collect();
    assert!(foreign.is_empty(), "the page requested other hosts: {foreign:?}");
    let escaped = unexplained_escapes(canary);
    assert!(escaped.is_empty(), "the browser tried to reach other hosts: {escaped:?}");
    let failed: Vec<Value> = browser.events_named("Network.loadingFailed").into_iter().filter(|f| f["canceled"] != json!(true)).collect();
    assert!(failed.is_empty(), "requests failed: {failed:?}");
    let thrown = browser.events_named("Runtime.exceptionThrown");
    assert!(thrown.is_empty(), "page threw: {thrown:?}");
}

// ---------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------

/// Live traffic: cards equal the API's totals, the table lists every mapping, the
/// chart fills up (and stops at 20 points), nothing leaves 127.0.0.1, the layout
/// fits a phone, and the page notices a dead daemon and recovers by itself.
#[test]
fn monitor_page_renders_live_traffic_offline() {
    let Some(chromium) = external_tool("chromium", "monitor_page") else { return };
    let mut daemon = Daemon::server("monitor-secret", &[]);
    // One direct and one tunneled mapping, so the tunnel cards carry real numbers.
    let client = Daemon::client(&daemon, "monitor-secret", &[]);
    let echo = echo_server();
    let ports = [free_port(), free_port()];
    create_mapping(&daemon, ports[0], echo, false);
    create_mapping(&daemon, ports[1], echo, true);
    // A long description makes the pickers (which name each mapping by port,
    // target and description) wide: they must still fit a phone.
    let (status, body) = common::post(
        &daemon,
        "/api/mapping/update",
        json!({"port": ports[0], "description": "the office's main web server, behind the second firewall in rack 4"}),
    );
    assert_eq!(status, 200, "{body}");

    // Known traffic first: 100 000 bytes each way through one mapping and
    // 1 500 000 through the other.
    echo_through(ports[0], 100_000);
    echo_through(ports[1], 1_500_000);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = get_data(&daemon, "/api/stats/traffic");
        if u64_at(&t, "total_sent") == 1_600_000 && u64_at(&t, "total_received") == 1_600_000 {
            break;
        }
        assert!(Instant::now() < deadline, "daemon never counted the known traffic: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }

    let (canary_addr, canary) = canary_proxy();
    let mut browser = monitor_browser(&chromium, canary_addr);
    let base = format!("http://{}/", daemon.http);
    // The page passes ?interval_ms on to its event stream: 250 asks for 4
    // updates a second, the daemon's minimum makes it one.
    browser.navigate(&daemon.url("/api/stats/monitor?interval_ms=250"));
    browser.wait_for("the live stream", &state_is("live"));

    // With traffic flowing, the current rate is non-zero and the chart fills.
    let (stop, pusher) = background_traffic(ports.to_vec());
    browser.wait_for("a non-zero send rate", r#"!['0 B/s', '—'].includes(document.querySelector('#rate-sent').textContent)"#);
    browser.wait_for("a chart with points", r#"Number(document.querySelector('[data-testid="traffic-chart"]').dataset.points) >= 12"#);
    // Screenshots while traffic flows: desktop and phone, light and dark. At
    // 375 px nothing may overflow sideways.
    browser.screenshot("monitor-desktop-light.png");
    browser.set_color_scheme("dark");
    browser.wait_for("the dark chart", &chart_theme_is("dark"));
    browser.screenshot("monitor-desktop-dark.png");
    browser.set_viewport(375, 800, true);
    browser
        .wait_for("the phone layout", "window.innerWidth === 375 && document.querySelector('#chart').getBoundingClientRect().width < 375");
    let page = browser.eval(SNAPSHOT_JS);
    assert_eq!(page["scroll_width"], json!(375), "horizontal overflow at 375 px: {page:#}");
    browser.screenshot("monitor-phone-dark.png");
    browser.set_color_scheme("light");
    browser.wait_for("the light chart", &chart_theme_is("light"));
    browser.screenshot("monitor-phone-light.png");
    browser.screenshot_full_page("monitor-phone-light-full.png");
    browser.set_viewport(1920, 1080, false);

    stop.store(true, Ordering::SeqCst);
    pusher.join().expect("traffic thread");

    // Traffic has stopped: the page must converge on exactly the daemon's numbers
    // (connections still closing may take an update or two to settle).
    let deadline = Instant::now() + UI_TIMEOUT;
    let api = loop {
        let page = browser.eval(SNAPSHOT_JS);
        let api = get_data(&daemon, "/api/stats/traffic");
        let wrong = page_vs_api(&page, &api, echo);
        if wrong.is_empty() {
            break api;
        }
        assert!(Instant::now() < deadline, "the page never showed the daemon's numbers:\n  {}\npage: {page:#}", wrong.join("\n  "));
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(u64_at(&api, "total_sent") > 1_600_000, "background traffic was not counted: {api}");
    let mut sorted = ports.to_vec();
    sorted.sort();
    // Lifetime totals beside the since-start ones (a fresh state dir: equal or more).
    let page = browser.eval(SNAPSHOT_JS);
    assert_eq!(page["lifetime_sent"], json!(u64_at(&api, "lifetime_sent")), "{page:#}");
    assert_eq!(page["lifetime_received"], json!(u64_at(&api, "lifetime_received")), "{page:#}");
    for row in page["rows"].as_array().unwrap() {
        let m = api["mappings"].as_array().unwrap().iter().find(|m| m["port"] == row["port"]).unwrap();
        assert_eq!(row["lifetime"]["sent"], m["lifetime_sent"], "{row}");
        assert_eq!(row["lifetime"]["received"], m["lifetime_received"], "{row}");
    }
    let api_ports: Vec<u64> = api["mappings"].as_array().unwrap().iter().map(|m| u64_at(m, "port")).collect();
    assert_eq!(api_ports, sorted.iter().map(|&p| p as u64).collect::<Vec<_>>(), "the API lists both mappings by port");
    assert_eq!(api["tunnel"]["connected"], json!(true), "{api}");
    assert!(u64_at(&api["tunnel"], "bytes_sent") > 750_000, "tunnel wire bytes shown come from real traffic: {api}");

    // Chart: a real time axis over the last 30 minutes; every sample adds a point
    // (none are dropped at a fixed count) and a steady stream has no gaps.
    let before = browser.eval(SNAPSHOT_JS);
    let samples = before["samples"].as_u64().unwrap();
    browser.wait_for("3 more samples", &format!("Number(document.body.dataset.samples) >= {}", samples + 3));
    let page = browser.eval(SNAPSHOT_JS);
    assert!(page["points"].as_u64().unwrap() >= before["points"].as_u64().unwrap() + 3, "every sample is a point: {page:#}");
    assert_eq!(page["gaps"], json!(0), "a steady stream has no gaps: {page:#}");
    // The old chart stopped at 20 points; this one keeps 30 minutes of them.
    browser.wait_for("more than 20 points", r#"Number(document.querySelector('[data-testid="traffic-chart"]').dataset.points) > 24"#);
    let axis = browser.eval(
        "(() => { const c = Chart.getChart(document.querySelector('#chart')); const x = c.scales.x; \
         return { type: x.type, span: x.max - x.min, last: c.data.datasets[0].data.at(-1).x }; })()",
    );
    assert_eq!(axis["type"], json!("linear"), "time axis: {axis}");
    let span = axis["span"].as_f64().unwrap();
    assert!((299.0..=1801.0).contains(&span), "5 to 30 minutes wide: {axis}");
    assert!(axis["last"].as_f64().unwrap() > 1.7e9, "x values are Unix times: {axis}");
    assert_eq!(page["chart_lib"], json!("function"), "vendored Chart.js did not load");
    assert_eq!(page["chart_drawn"], json!(true));

    // Offline: the page rendered fully from the daemon alone.
    assert_stayed_on_loopback(&mut browser, &base, &canary);

    // The daemon goes away: the page says so, then recovers by itself when a
    // daemon is back on the same address (mappings restored from the state dir).
    daemon.kill();
    let killed = Instant::now();
    browser.wait_for("the lost state", &state_is("lost"));
    let page = browser.eval(SNAPSHOT_JS);
    assert_eq!(page["lost_visible"], json!(true), "{page:#}");
    assert!(page["lost_text"].as_str().unwrap().contains("retrying"), "{page:#}");
    // The last word on the tunnel is stale now: no "Connected" while unreachable.
    assert_eq!(page["tunnel_connected"], json!("unknown"), "{page:#}");
    assert_eq!(page["tunnel_text"], json!("Unknown"), "{page:#}");
    // So is each client's: no "Connected" badge, no duration still counting up.
    let card = browser.eval(
        r#"(() => { const c = document.querySelector('[data-testid="client-card"]');
            return { connected: c.dataset.connected, state: c.querySelector('[data-role="state"]').textContent,
                     ticking: !!c.querySelector('[data-kind="duration"]') }; })()"#,
    );
    assert_eq!(card, json!({"connected": "unknown", "state": "Unknown", "ticking": false}), "{card}");
    browser.screenshot("monitor-connection-lost.png");
    // Away long enough to be a gap at one sample a second (the daemon's
    // shortest interval): more than 1.5 sample spans plus one interval.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(killed.elapsed()));
    let _back = Daemon::server_restarted_on_api(&daemon.state_dir, daemon.http, "monitor-secret");
    browser.wait_for("recovery", &state_is("live"));
    browser.wait_for("the restored mappings", r#"document.querySelectorAll('[data-testid="mapping-row"]').length === 2"#);
    let page = browser.eval(SNAPSHOT_JS);
    assert_eq!(page["lost_visible"], json!(false));
    // The outage is a gap on the time axis, not two adjacent points.
    let samples = page["samples"].as_u64().unwrap();
    browser.wait_for("samples after the outage", &format!("Number(document.body.dataset.samples) >= {}", samples + 3));
    browser.wait_for(
        "a gap where the daemon was away",
        r#"Number(document.querySelector('[data-testid="traffic-chart"]').dataset.gaps) >= 1"#,
    );
    browser.screenshot("monitor-after-outage.png");
    drop(client);
}

/// With an API token configured the page asks for it instead of showing data;
/// a wrong token is refused with a message, the right one brings the data.
#[test]
fn monitor_page_asks_for_the_api_token() {
    let Some(chromium) = external_tool("chromium", "monitor_page") else { return };
    const TOKEN: &str = "monitor-test-token-0123";
    let daemon = Daemon::server("monitor-secret", &["--api-token", TOKEN]);
    let echo = echo_server();
    let port = free_port();
    // create_mapping cannot send the token.
    let body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(), "use_tunnel": false});
    let (status, reply) = post_with_token(&daemon, "/api/mapping/create", TOKEN, body);
    assert_eq!(status, 200, "create mapping with token: {reply}");
    echo_through(port, 3000);

    // The contract the page relies on: 401 without the token, data with it.
    let (status, _) = http("GET", &daemon.url("/api/stats/traffic"), None);
    assert_eq!(status, 401);
    let (status, _) = http("GET", &daemon.url(&format!("/api/stats/traffic?token={TOKEN}")), None);
    assert_eq!(status, 200);

    let (canary_addr, canary) = canary_proxy();
    let mut browser = monitor_browser(&chromium, canary_addr);
    browser.navigate(&daemon.url("/api/stats/monitor?interval_ms=250"));
    browser.wait_for("the token prompt", &state_is("auth-required"));
    let page = browser.eval(SNAPSHOT_JS);
    assert_eq!(page["auth_visible"], json!(true), "{page:#}");
    assert_eq!(page["auth_error"], Value::Null, "no token was tried yet: {page:#}");
    assert_eq!(page["rows"], json!([]), "no data without the token");
    assert_eq!(page["cards"]["total_sent"]["text"], json!("—"));
    assert_eq!(page["status_text"], json!("Token required"));
    browser.screenshot("monitor-token-prompt.png");

    // A wrong token: still the prompt, now with an error.
    let submit = |token: &str| {
        format!(
            "(() => {{ document.querySelector('#auth-token').value = {token:?}; \
             document.querySelector('#auth-form').requestSubmit(); return true; }})()"
        )
    };
    browser.eval(&submit("not-the-token"));
    browser.wait_for(
        "the rejection message",
        r#"!document.querySelector('[data-testid="auth-error"]').hidden && document.body.dataset.state === 'auth-required'"#,
    );

    // The right token: data, stored for the next visit.
    browser.eval(&submit(TOKEN));
    browser.wait_for("the live stream", &state_is("live"));
    browser.wait_for("the mapping row", r#"document.querySelectorAll('[data-testid="mapping-row"]').length === 1"#);
    let api = get_data_with_token(&daemon, "/api/stats/traffic", TOKEN);
    let page = browser.eval(SNAPSHOT_JS);
    assert_eq!(page["auth_visible"], json!(false));
    assert_eq!(page["cards"]["total_sent"]["text"], json!(format_bytes(u64_at(&api, "total_sent"))));
    assert_eq!(page["rows"][0]["port"], json!(port));
    assert_eq!(browser.eval("localStorage.getItem('tunneld.apiToken')"), json!(TOKEN));

    // A reload uses the stored token: straight to live, no prompt.
    browser.navigate(&daemon.url("/api/stats/monitor?interval_ms=250"));
    browser.wait_for("live after reload", &state_is("live"));

    // The stream carried the token as ?token= (EventSource cannot set headers), and
    // still nothing left 127.0.0.1.
    let urls = browser.requested_urls();
    assert!(urls.iter().any(|u| u.contains("/api/stats/stream") && u.contains(&format!("token={TOKEN}"))), "stream requests: {urls:?}");
    let base = format!("http://{}/", daemon.http);
    let foreign: Vec<&String> = urls.iter().filter(|u| !u.starts_with(&base)).collect();
    assert!(foreign.is_empty(), "the page requested other hosts: {foreign:?}");
    let escaped = unexplained_escapes(&canary);
    assert!(escaped.is_empty(), "the browser tried to reach other hosts: {escaped:?}");
}

/// What the History view shows, read from the DOM.
const HISTORY_JS: &str = r#"(() => {
  const q = (s) => document.querySelector(s);
  return {
    state: q('[data-testid="history"]').dataset.state,
    bars: Number(q('[data-testid="history-chart"]').dataset.bars),
    step: q('[data-testid="history-chart"]').dataset.step,
    sent: q('[data-testid="history-sent"]') && Number(q('[data-testid="history-sent"]').dataset.bytes),
    sent_text: q('[data-testid="history-sent"]') && q('[data-testid="history-sent"]').textContent.trim(),
    received: q('[data-testid="history-received"]') && Number(q('[data-testid="history-received"]').dataset.bytes),
    rows: [...document.querySelectorAll('[data-testid="history-row"]')].map((r) => ({
      port: Number(r.dataset.port),
      sent: Number(r.querySelector('[data-col="sent"]').dataset.bytes),
      sent_text: r.querySelector('[data-col="sent"]').textContent.trim(),
      received: Number(r.querySelector('[data-col="received"]').dataset.bytes),
    })),
    options: [...document.querySelectorAll('#history-port option')].map((o) => o.value),
  };
})()"#;

/// The mappings table at a given width: does it overflow, and is any status cut?
const TABLE_FIT_JS: &str = r#"(() => {
  const wrap = document.querySelector('[data-testid="mapping-table"]').parentElement;
  const table = document.querySelector('[data-testid="mapping-table"]');
  const badges = [...document.querySelectorAll('[data-col="status"] .badge')];
  const hiddenCells = [...table.querySelectorAll('tbody td')].filter((td) => {
    const r = td.getBoundingClientRect();
    return getComputedStyle(td).display !== 'none' && r.right > wrap.getBoundingClientRect().right + 0.5;
  }).map((td) => `${td.dataset.col} ${td.getBoundingClientRect().right} > ${wrap.getBoundingClientRect().right} (${td.scrollWidth}/${td.clientWidth})`);
  return {
    width: window.innerWidth,
    page_overflow: document.documentElement.scrollWidth > window.innerWidth,
    table_overflow: table.getBoundingClientRect().right > wrap.getBoundingClientRect().right + 0.5,
    cells_past_edge: hiddenCells,
    statuses: badges.map((b) => ({
      text: b.textContent,
      cut: b.scrollWidth > b.clientWidth + 1 || getComputedStyle(b).textOverflow === 'ellipsis' && b.scrollWidth > b.clientWidth,
      word_break: getComputedStyle(b).wordBreak,
      overflow_wrap: getComputedStyle(b).overflowWrap,
      lines: Math.round(b.getBoundingClientRect().height / parseFloat(getComputedStyle(b).lineHeight)),
    })),
    rates_visible: [...table.querySelectorAll('tbody tr:first-child [data-role="rate"], tbody tr:first-child [data-col^="rate-"]')]
      .filter((e) => getComputedStyle(e).display !== 'none').length,
  };
})()"#;

/// The History view against the API: every range, all mappings and one, the
/// per-port totals, the CSV download (with the API token), the live chart filled
/// from minute history, and the mappings table at 720-1,000 px with a long error
/// status — with screenshots.
#[test]
fn history_view_matches_the_api_and_downloads_csv() {
    let Some(chromium) = external_tool("chromium", "monitor_page") else { return };
    const TOKEN: &str = "history-view-token";
    let (_cfg_dir, config) = config_file("[history]\ninterval_secs = 1\nutc_offset = \"+08:00\"\n");
    let state_tmp = tempfile::tempdir().unwrap();
    let state = state_tmp.path().join("state");
    let args = ["--api-token", TOKEN, "--config", config.as_str()];
    let echo = echo_server();
    let ports = [free_port(), free_port(), free_port()];

    // First run: three mappings, known traffic on two, a clean stop (exact flush).
    let mut first = Daemon::server_with_state(&state, "monitor-secret", &args);
    for &port in &ports {
        let body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(), "use_tunnel": false});
        let (status, reply) = post_with_token(&first, "/api/mapping/create", TOKEN, body);
        assert_eq!(status, 200, "create: {reply}");
    }
    echo_through(ports[0], 300_000);
    echo_through(ports[1], 2_000_000);
    assert!(first.terminate().success());

    // The third port is taken while the daemon is away: its status becomes a long error.
    let squatter = TcpListener::bind(("0.0.0.0", ports[2])).expect("occupy the third port");
    let daemon = Daemon::server_with_state(&state, "monitor-secret", &args);
    echo_through(ports[0], 40_000);
    wait_for_history_flush(&daemon, unix_now());
    // The live chart is filled from *complete* minutes of history: wait until one
    // with traffic has ended (at most a minute).
    wait_for("a complete minute of history", Duration::from_secs(75), || {
        let now = unix_now() as i64;
        let data = get_data_with_token(&daemon, &format!("/api/stats/history?step=minute&from={}&to={now}", now - 1800), TOKEN);
        data["points"]
            .as_array()?
            .iter()
            .any(|p| p["t"].as_i64().unwrap() + 60 <= now && p["bytes_sent"].as_u64().unwrap() > 0)
            .then_some(())
    });

    let (canary_addr, canary) = canary_proxy();
    let mut browser = monitor_browser(&chromium, canary_addr);
    let downloads = tempfile::tempdir().unwrap();
    browser.allow_downloads_to(downloads.path());
    // The token arrives in the URL once: the page stores it and drops it from the address bar.
    browser.navigate(&daemon.url(&format!("/api/stats/monitor?interval_ms=250&token={TOKEN}")));
    browser.wait_for("the live stream", &state_is("live"));
    assert_eq!(browser.eval("location.search"), json!("?interval_ms=250"), "the token left the address bar");
    browser.wait_for("the history view", r#"document.querySelector('[data-testid="history"]').dataset.state === 'ready'"#);
    browser.wait_for(
        "the minute history in the live chart",
        r#"Number(document.querySelector('[data-testid="traffic-chart"]').dataset.historyPoints) >= 1"#,
    );

    // Every range, all mappings: bars = the API's points, totals = the API's sums.
    for (range, step, period) in [("24h", "hour", "hour"), ("7d", "hour", "hour"), ("30d", "day", "day"), ("12mo", "month", "month")] {
        browser.eval(&format!("document.querySelector('[data-range=\"{range}\"]').click()"));
        browser.wait_for(
            &format!("the {range} range"),
            &format!("document.querySelector('[data-testid=\"history\"]').dataset.state === 'ready' && document.querySelector('[data-testid=\"history-chart\"]').dataset.step === '{step}'"),
        );
        let view = browser.eval(HISTORY_JS);
        let span = match range {
            "24h" => 86_400,
            "7d" => 7 * 86_400,
            "30d" => 30 * 86_400,
            _ => 334 * 86_400,
        };
        let to = unix_now() as i64;
        let series = get_data_with_token(&daemon, &format!("/api/stats/history?step={step}&from={}&to={to}", to - span), TOKEN);
        let points = series["points"].as_array().unwrap();
        assert!((view["bars"].as_i64().unwrap() - points.len() as i64).abs() <= 1, "{range}: {view} vs {} points", points.len());
        if range == "12mo" {
            assert_eq!(view["bars"], json!(12), "12 monthly bars");
        }
        let sent: u64 = points.iter().map(|p| p["bytes_sent"].as_u64().unwrap()).sum();
        assert_eq!(view["sent"], json!(sent), "{range}: {view}");
        assert_eq!(view["sent"], json!(2_340_000), "{range}: all traffic is within every range");
        assert_eq!(view["sent_text"], json!(format_bytes(2_340_000)));
        let report = get_data_with_token(&daemon, &format!("/api/stats/report?period={period}&from={}&to={to}", to - span), TOKEN);
        for row in view["rows"].as_array().unwrap() {
            let want: u64 = report["rows"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["port"] == row["port"])
                .map(|r| r["bytes_sent"].as_u64().unwrap())
                .sum();
            assert_eq!(row["sent"], json!(want), "{range}: {row}");
            assert_eq!(row["sent_text"], json!(format_bytes(want)));
        }
        assert_eq!(view["rows"].as_array().unwrap().len(), 2, "{range}: the two ports with traffic: {view}");
        browser.eval("document.querySelector('[data-testid=\"history\"]').scrollIntoView()");
        browser.screenshot(&format!("history-{range}.png"));
    }

    // One mapping.
    browser.eval(&format!(
        "(() => {{ const s = document.querySelector('#history-port'); s.value = '{}'; s.dispatchEvent(new Event('change')); }})()",
        ports[1]
    ));
    browser.wait_for("one mapping", &format!("document.querySelector('#history-sub').textContent.startsWith(':{}')", ports[1]));
    browser.wait_for("its totals", r#"document.querySelector('[data-testid="history"]').dataset.state === 'ready'"#);
    let view = browser.eval(HISTORY_JS);
    assert_eq!(view["sent"], json!(2_000_000), "{view}");
    assert_eq!(view["rows"].as_array().unwrap().len(), 1, "{view}");
    assert!(view["options"].as_array().unwrap().contains(&json!(ports[2].to_string())), "every mapping is selectable: {view}");
    browser.eval("document.querySelector('[data-testid=\"history\"]').scrollIntoView()");
    browser.screenshot("history-one-mapping.png");

    // Download CSV: the page fetches it with the token; the file is the API's CSV.
    browser.eval("document.querySelector('[data-testid=\"history-csv\"]').click()");
    let file = wait_for("the downloaded CSV", Duration::from_secs(30), || {
        std::fs::read_dir(downloads.path()).ok()?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|x| x == "csv"))
    });
    let text = std::fs::read_to_string(&file).expect("read download");
    assert!(file.file_name().unwrap().to_string_lossy().starts_with("tunneld-report-month-"), "{file:?}");
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let records: Vec<csv::StringRecord> = reader.records().collect::<Result<_, _>>().expect("the download is valid CSV");
    let sum_sent: u64 = records.iter().map(|r| r[3].parse::<u64>().unwrap()).sum();
    assert_eq!(sum_sent, 2_340_000, "{text}");
    let ports_in_csv: std::collections::BTreeSet<u16> = records.iter().map(|r| r[2].parse().unwrap()).collect();
    assert_eq!(ports_in_csv, [ports[0], ports[1]].into_iter().collect(), "{text}");

    // The mappings table between 720 and 1,000 px: nothing cut off, the long error
    // status wraps between words.
    browser.wait_for(
        "the error status",
        r#"[...document.querySelectorAll('[data-testid="mapping-row"]')].some((r) => r.dataset.status.startsWith('error'))"#,
    );
    for width in [720, 780, 860, 1000] {
        browser.set_viewport(width, 1000, false);
        browser.wait_for("the new width", &format!("window.innerWidth === {width}"));
        let fit = browser.eval(TABLE_FIT_JS);
        browser.eval("document.querySelector('[data-testid=\"mapping-table\"]').scrollIntoView()");
        browser.screenshot(&format!("monitor-table-{width}.png"));
        assert_eq!(fit["page_overflow"], json!(false), "{fit:#}");
        assert_eq!(fit["table_overflow"], json!(false), "{fit:#}");
        assert_eq!(fit["cells_past_edge"], json!([]), "{fit:#}");
        assert!(fit["rates_visible"].as_u64().unwrap() >= 2, "rates stay visible: {fit:#}");
        for status in fit["statuses"].as_array().unwrap() {
            assert_eq!(status["cut"], json!(false), "{fit:#}");
            assert_eq!(status["word_break"], json!("normal"), "{fit:#}");
            assert_eq!(status["overflow_wrap"], json!("normal"), "{fit:#}");
        }
        let error = fit["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["text"].as_str().unwrap().starts_with("Error"))
            .expect("error badge")
            .clone();
        assert!(error["text"].as_str().unwrap().contains("in use"), "the whole status is there: {error}");
    }
    browser.set_viewport(1920, 1080, false);
    browser.set_color_scheme("dark");
    browser.wait_for("the dark chart", &chart_theme_is("dark"));
    browser.eval("document.querySelector('[data-testid=\"history\"]').scrollIntoView()");
    browser.screenshot("history-dark.png");
    browser.set_color_scheme("light");
    browser.screenshot_full_page("monitor-with-history-full.png");

    let base = format!("http://{}/", daemon.http);
    let urls = browser.requested_urls();
    let foreign: Vec<&String> = urls.iter().filter(|u| !u.starts_with(&base) && !u.starts_with("blob:")).collect();
    assert!(foreign.is_empty(), "the page requested other hosts: {foreign:?}");
    let escaped = unexplained_escapes(&canary);
    assert!(escaped.is_empty(), "the browser tried to reach other hosts: {escaped:?}");
    let thrown = browser.events_named("Runtime.exceptionThrown");
    assert!(thrown.is_empty(), "page threw: {thrown:?}");
    drop(squatter);
}

#[test]
fn policy_badges_events_and_the_edit_form() {
    let Some(chromium) = external_tool("chromium", "monitor_page") else { return };
    const TOKEN: &str = "monitor-policy-token-0123";
    let daemon = Daemon::server("monitor-secret", &["--api-token", TOKEN]);
    let echo = echo_server();
    let port = free_port();
    let (_, created) = post_with_token(
        &daemon,
        "/api/mapping/create",
        TOKEN,
        json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(), "description": "office SSH",
               "bandwidth_limit": 50 * 1024 * 1024, "quota": {"bytes": 4_000_000, "period": "month", "action": "alert"},
               "allow": ["127.0.0.0/8", "10.0.0.0/8"], "deny": ["10.9.9.9"]}),
    );
    assert_eq!(created["success"], json!(true), "{created}");
    // An echo counts both ways: 2 × 1.7 MB = 85 % of the quota.
    echo_through(port, 1_700_000);

    let (canary_addr, canary) = canary_proxy();
    let mut browser = monitor_browser(&chromium, canary_addr);
    browser.navigate(&daemon.url(&format!("/api/stats/monitor?interval_ms=250&token={TOKEN}")));
    browser.wait_for("the live stream", &state_is("live"));
    browser.wait_for("the quota bar at 85 %", r#"Number(document.querySelector('[data-role="quota"]')?.dataset.ratio) >= 0.85"#);
    browser.wait_for("the 80 % event in the list", r#"document.querySelector('[data-testid="event"]')?.dataset.kind === 'quota_warning'"#);
    let badges = browser.eval(
        r#"(() => { const p = document.querySelector('[data-testid="policy"]'); return {
            cap: p.querySelector('[data-role="cap"]')?.textContent, quota: p.querySelector('[data-role="quota"]')?.textContent,
            level: p.querySelector('[data-role="quota"]')?.dataset.level, acl: p.querySelector('[data-role="acl"]')?.textContent,
            acl_title: p.querySelector('[data-role="acl"]')?.title,
            description: document.querySelector('[data-role="description"]')?.textContent,
            event: document.querySelector('[data-testid="event"] .event-message')?.textContent }; })()"#,
    );
    assert_eq!(badges["cap"], json!("cap 50.0 MiB/s"), "{badges:#}");
    assert_eq!(badges["quota"], json!(format!("{} / {} per month", format_bytes(3_400_000), format_bytes(4_000_000))), "{badges:#}");
    assert_eq!(badges["level"], json!("warn"), "{badges:#}");
    assert_eq!(badges["acl"], json!("ACL 2 allowed, 1 denied"), "{badges:#}");
    assert_eq!(badges["acl_title"], json!("allow 127.0.0.0/8, 10.0.0.0/8; deny 10.9.9.9/32"), "{badges:#}");
    assert_eq!(badges["description"], json!("office SSH"), "{badges:#}");
    assert!(badges["event"].as_str().unwrap().contains(&format!("port {port}")), "{badges:#}");
    browser.screenshot("monitor-policy.png");

    // The form: opened with the current values; a bad CIDR is refused with the
    // daemon's message naming the field; a good edit applies (token sent).
    browser.eval(r#"document.querySelector('[data-role="edit-policy"]').click()"#);
    browser.wait_for("the policy dialog", r#"!document.querySelector('[data-testid="policy-dialog"]').hidden"#);
    let form = browser.eval(
        r#"({limit: document.querySelector('#policy-limit').value, quota: document.querySelector('#policy-quota-bytes').value,
            deny: document.querySelector('#policy-deny').value, allow: document.querySelector('#policy-allow').value})"#,
    );
    assert_eq!(form, json!({"limit": "50", "quota": "4", "deny": "10.9.9.9/32", "allow": "127.0.0.0/8\n10.0.0.0/8"}));
    browser.eval(
        r#"(() => { document.querySelector('#policy-deny').value = '300.1.1.1';
                   document.querySelector('#policy-form').requestSubmit(); return true; })()"#,
    );
    browser.wait_for("the refusal", r#"!document.querySelector('[data-testid="policy-error"]').hidden"#);
    let error = browser.eval(r#"document.querySelector('[data-testid="policy-error"]').textContent"#);
    assert!(error.as_str().unwrap().contains("`deny`"), "{error}");
    browser.screenshot("monitor-policy-form-error.png");
    browser.eval(
        r#"(() => { document.querySelector('#policy-deny').value = '';
                   document.querySelector('#policy-limit').value = '';
                   document.querySelector('#policy-quota-bytes').value = '1';
                   document.querySelector('#policy-quota-unit').value = 'GiB';
                   document.querySelector('#policy-quota-action').value = 'block';
                   document.querySelector('#policy-form').requestSubmit(); return true; })()"#,
    );
    browser.wait_for("the dialog to close", r#"document.querySelector('[data-testid="policy-dialog"]').hidden"#);
    let (_, listed) = post_with_token(&daemon, "/api/mapping/update", TOKEN, json!({"port": port}));
    let m = &listed["data"];
    assert_eq!(m["bandwidth_limit"], Value::Null, "{m}");
    assert_eq!(m["deny"], json!([]), "{m}");
    assert_eq!(m["allow"], json!(["127.0.0.0/8", "10.0.0.0/8"]), "{m}");
    assert_eq!(m["quota"], json!({"bytes": 1024u64 * 1024 * 1024, "period": "month", "action": "block"}), "{m}");
    browser.wait_for("the cap badge gone", r#"!document.querySelector('[data-role="cap"]')"#);
    browser.screenshot("monitor-policy-after-edit.png");
    assert_stayed_on_loopback(&mut browser, &daemon.url(""), &canary);
}

/// The Clients section, the tunnel card and the client column of the mappings
/// table, read from the DOM.
const CLIENTS_JS: &str = r#"(() => {
  const q = (s, root = document) => root.querySelector(s);
  const tunnel = q('[data-testid="card-tunnel-state"]');
  const bytes = (card, role) => {
    const v = q(`[data-role="${role}"] [data-role="value"]`, card);
    return { bytes: Number(v.dataset.bytes), text: v.textContent.trim() };
  };
  return {
    visible: !q('[data-testid="clients"]').hidden,
    sub: q('[data-testid="clients-sub"]').textContent.trim(),
    tunnel: {
      connected: tunnel.dataset.connected,
      health: tunnel.dataset.health,
      text: q('[data-role="state-text"]', tunnel).textContent.trim(),
      sub: q('[data-role="sub"]', tunnel).textContent.trim(),
    },
    cards: [...document.querySelectorAll('[data-testid="client-card"]')].map((c) => ({
      name: c.dataset.name,
      // Text only: a name is never parsed as markup.
      name_text: q('[data-role="name"]', c).textContent,
      name_elements: q('[data-role="name"]', c).children.length,
      connected: c.dataset.connected,
      missed: c.dataset.missed,
      state: q('[data-role="state"]', c).textContent.trim(),
      peer: q('[data-role="peer"]', c).textContent.trim(),
      since: q('[data-role="since"] [data-role="ago"]', c).textContent.trim(),
      // The absolute "since" time, as Unix seconds read back from its datetime.
      clock: (() => { const t = q('[data-role="since"] [data-role="clock"]', c); return t ? Date.parse(t.getAttribute('datetime')) / 1000 : null; })(),
      sent: bytes(c, 'sent'),
      received: bytes(c, 'received'),
      mappings: Number(q('[data-role="mappings"] [data-role="value"]', c).dataset.count),
      mappings_text: q('[data-role="mappings"]', c).textContent.trim(),
    })),
    rows: [...document.querySelectorAll('[data-testid="mapping-row"]')].map((r) => ({
      port: Number(r.dataset.port),
      client: r.dataset.client,
      mode: q('td[data-col="mode"] [data-role="value"]', r).textContent.trim(),
      client_text: q('td[data-col="mode"] [data-role="client"]', r)?.textContent ?? null,
      client_inline: q('td[data-col="target"] [data-role="client"]', r)?.textContent ?? null,
      status: r.dataset.status,
    })),
  };
})()"#;

/// Does the Clients section fit its panel, with every fact whole (not cut)?
const CLIENTS_FIT_JS: &str = r#"(() => {
  const panel = document.querySelector('[data-testid="clients"]').getBoundingClientRect();
  const cards = [...document.querySelectorAll('[data-testid="client-card"]')];
  return {
    page_overflow: document.documentElement.scrollWidth > window.innerWidth,
    cards_past_edge: cards.filter((c) => c.getBoundingClientRect().right > panel.right + 0.5).map((c) => c.dataset.name),
    cut: cards.flatMap((c) => [...c.querySelectorAll('dd, [data-role="name"], [data-role="state"]')]
      .filter((e) => e.scrollWidth > e.clientWidth + 1)
      .map((e) => `${c.dataset.name} ${e.dataset.role || e.tagName}: ${e.textContent} (${e.scrollWidth}/${e.clientWidth})`)),
  };
})()"#;

/// Everything in the Clients section and the client column that differs from
/// `/api/stats/traffic` (empty: all equal).
fn clients_vs_api(view: &Value, api: &Value) -> Vec<String> {
    let mut wrong = Vec::new();
    // Clients that mappings wait for first, then the API's order (by name).
    let missed = |c: &&Value| c["connected"] == json!(false) && c["mappings"].as_u64().unwrap_or(0) > 0;
    let all = api["clients"].as_array().expect("clients array");
    let clients: Vec<&Value> = all.iter().filter(missed).chain(all.iter().filter(|c| !missed(c))).collect();
    let cards = view["cards"].as_array().expect("cards");
    let names: Vec<&Value> = clients.iter().map(|c| &c["name"]).collect();
    let shown: Vec<&Value> = cards.iter().map(|c| &c["name"]).collect();
    if names != shown {
        wrong.push(format!("cards {shown:?}, API clients {names:?}"));
        return wrong;
    }
    for (card, c) in cards.iter().zip(clients.iter().copied()) {
        let name = c["name"].as_str().unwrap();
        let connected = c["connected"].as_bool().expect("connected");
        let mut expect = |what: &str, shown: &Value, want: Value| {
            if *shown != want {
                wrong.push(format!("{name} {what}: page shows {shown}, API says {want}"));
            }
        };
        expect("name", &card["name_text"], json!(name));
        expect("connected", &card["connected"], json!(connected.to_string()));
        expect("state", &card["state"], json!(if connected { "Connected" } else { "Not connected" }));
        expect("peer", &card["peer"], json!(c["peer"].as_str().unwrap_or("—")));
        expect("mappings", &card["mappings"], c["mappings"].clone());
        expect("sent", &card["sent"]["bytes"], c["bytes_sent"].clone());
        expect("sent text", &card["sent"]["text"], json!(format_bytes(u64_at(c, "bytes_sent"))));
        expect("received", &card["received"]["bytes"], c["bytes_received"].clone());
        expect("received text", &card["received"]["text"], json!(format_bytes(u64_at(c, "bytes_received"))));
        // The page's <time datetime> keeps milliseconds; the API may send finer.
        let since = c["connected_since"].as_f64().filter(|_| connected);
        let clock = card["clock"].as_f64();
        let same = match (since, clock) {
            (Some(want), Some(shown)) => (want - shown).abs() < 0.001,
            (None, None) => true,
            _ => false,
        };
        if !same {
            wrong.push(format!("{name} connected since: page shows {clock:?}, API says {since:?}"));
        }
    }
    for (row, m) in view["rows"].as_array().unwrap().iter().zip(api["mappings"].as_array().unwrap()) {
        let client = m["client"].as_str();
        if row["client_text"] != json!(client) {
            wrong.push(format!(":{} shows client {}, API says {:?}", row["port"], row["client_text"], client));
        }
    }
    wrong
}

/// Two named clients, each serving its own tunneled mappings: the Clients section
/// shows both (state, peer, since when, wire bytes, mapping count) as the API
/// does, each tunneled row names its client, the tunnel card counts "N of M", and
/// killing one client turns only its card to "Not connected" — at desktop, phone
/// and 720-1,000 px widths, with screenshots.
#[test]
fn clients_section_follows_each_client() {
    let Some(chromium) = external_tool("chromium", "monitor_page") else { return };
    const SECRET: &str = "monitor-secret";
    let daemon = Daemon::server(SECRET, &[]);
    let office_secret = create_client(&daemon, "office");
    let default_client = Daemon::client(&daemon, SECRET, &[]);
    let mut office = Daemon::client(&daemon, &office_secret, &["--name", "office"]);

    let echo = echo_server();
    let [direct, home, office_a, office_b] = [free_port(), free_port(), free_port(), free_port()];
    create_mapping(&daemon, direct, echo, false);
    create_mapping(&daemon, home, echo, true); // no "client": the default one
    for port in [office_a, office_b] {
        let m = create_tunneled_mapping(&daemon, port, echo, "office");
        assert_eq!(m["client"], json!("office"), "{m}");
    }
    // Known traffic through each client's tunnel, so both cards carry real bytes.
    echo_through(home, 200_000);
    echo_through(office_a, 1_200_000);
    echo_through(office_b, 30_000);

    let (canary_addr, canary) = canary_proxy();
    let mut browser = monitor_browser(&chromium, canary_addr);
    browser.navigate(&daemon.url("/api/stats/monitor?interval_ms=250"));
    browser.wait_for("the live stream", &state_is("live"));
    browser.wait_for(
        "both clients connected",
        r#"[...document.querySelectorAll('[data-testid="client-card"]')].filter((c) => c.dataset.connected === 'true').length === 2"#,
    );

    // The page converges on exactly the daemon's numbers (idle tunnels still move
    // a few keepalive bytes, so compare a page and an API reading taken together).
    let deadline = Instant::now() + UI_TIMEOUT;
    let (view, api) = loop {
        let view = browser.eval(CLIENTS_JS);
        let api = get_data(&daemon, "/api/stats/traffic");
        let wrong = clients_vs_api(&view, &api);
        if wrong.is_empty() {
            break (view, api);
        }
        assert!(Instant::now() < deadline, "the page never showed the daemon's clients:\n  {}\n{view:#}", wrong.join("\n  "));
        std::thread::sleep(Duration::from_millis(100));
    };
    let card = |name: &str| view["cards"].as_array().unwrap().iter().find(|c| c["name"] == json!(name)).unwrap().clone();
    let (default_card, office_card) = (card("default"), card("office"));
    assert_eq!(view["visible"], json!(true));
    assert_eq!(default_card["mappings"], json!(1), "{view:#}");
    assert_eq!(office_card["mappings"], json!(2), "{view:#}");
    assert_eq!(office_card["mappings_text"], json!("2"), "{view:#}");
    for c in [&default_card, &office_card] {
        assert_eq!(c["state"], json!("Connected"), "{c}");
        assert!(c["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "the client's address: {c}");
        assert!(c["since"].as_str().unwrap().ends_with(" s") || c["since"].as_str().unwrap().contains("min"), "how long: {c}");
        assert_eq!(c["name_elements"], json!(0), "{c}");
    }
    assert!(u64_at(&office_card["received"], "bytes") > 1_200_000, "office's wire bytes carry its traffic: {office_card}");
    assert!(u64_at(&default_card["received"], "bytes") > 200_000, "default's wire bytes carry its traffic: {default_card}");
    assert!(
        u64_at(&office_card["received"], "bytes") > u64_at(&default_card["received"], "bytes"),
        "each card has its own client's bytes, not the sum: {view:#}"
    );
    assert_eq!(view["sub"], json!("2 of 2 connected · wire bytes per client, since the daemon started"));
    assert_eq!(view["tunnel"]["text"], json!("2 of 2 connected"), "{view:#}");
    assert_eq!(view["tunnel"]["health"], json!("ok"), "{view:#}");
    assert_eq!(view["tunnel"]["sub"], json!("all clients connected"), "{view:#}");
    assert_eq!(api["tunnel"]["connected"], json!(true));

    // Each tunneled row names its client (in the Mode column and, for narrow
    // tables, under the target); the direct row names none.
    let row = |port: u16| view["rows"].as_array().unwrap().iter().find(|r| r["port"] == json!(port)).unwrap().clone();
    for (port, client) in [(home, Some("default")), (office_a, Some("office")), (office_b, Some("office")), (direct, None)] {
        let r = row(port);
        assert_eq!(r["client_text"], json!(client), "{r}");
        assert_eq!(r["client_inline"], json!(client), "{r}");
        assert_eq!(r["client"], json!(client.unwrap_or("")), "{r}");
        assert_eq!(r["mode"], json!(if client.is_some() { "Tunnel" } else { "Direct" }), "{r}");
    }

    // Screenshots: desktop light and dark, phone; nothing overflows on a phone.
    browser.eval("document.querySelector('[data-testid=\"clients\"]').scrollIntoView()");
    browser.screenshot("monitor-clients-desktop.png");
    browser.set_color_scheme("dark");
    browser.wait_for("the dark chart", &chart_theme_is("dark"));
    browser.screenshot("monitor-clients-desktop-dark.png");
    browser.set_color_scheme("light");
    browser.wait_for("the light chart", &chart_theme_is("light"));
    browser.eval("window.scrollTo(0, 0)"); // the sticky top bar at the top of the full page
    browser.screenshot_full_page("monitor-clients-full.png");
    browser.set_viewport(375, 800, true);
    browser.wait_for("the phone layout", "window.innerWidth === 375");
    let fit = browser.eval(CLIENTS_FIT_JS);
    assert_eq!(fit, json!({"page_overflow": false, "cards_past_edge": [], "cut": []}), "at 375 px");
    browser.eval("document.querySelector('[data-testid=\"clients\"]').scrollIntoView()");
    browser.screenshot("monitor-clients-phone.png");
    browser.eval("window.scrollTo(0, 0)"); // the sticky top bar at the top of the full page
    browser.screenshot_full_page("monitor-clients-phone-full.png");

    // 720-1,000 px: the table (now with client names) and the client cards fit.
    for width in [720, 780, 860, 1000] {
        browser.set_viewport(width, 1000, false);
        browser.wait_for("the new width", &format!("window.innerWidth === {width}"));
        let table = browser.eval(TABLE_FIT_JS);
        assert_eq!(table["page_overflow"], json!(false), "{table:#}");
        assert_eq!(table["table_overflow"], json!(false), "{table:#}");
        assert_eq!(table["cells_past_edge"], json!([]), "{table:#}");
        let fit = browser.eval(CLIENTS_FIT_JS);
        assert_eq!(fit, json!({"page_overflow": false, "cards_past_edge": [], "cut": []}), "at {width} px");
        browser.eval("document.querySelector('[data-testid=\"clients\"]').scrollIntoView()");
        browser.screenshot(&format!("monitor-clients-{width}.png"));
    }
    browser.set_viewport(1920, 1080, false);

    // One client goes away: only its card turns "Not connected", its mappings wait
    // for it, the tunnel card counts 1 of 2 and turns amber (mappings need office).
    office.kill();
    browser.wait_for(
        "office not connected",
        r#"document.querySelector('[data-testid="client-card"][data-name="office"]').dataset.connected === 'false'"#,
    );
    browser.wait_for(
        "office's mappings waiting",
        r#"[...document.querySelectorAll('[data-testid="mapping-row"][data-client="office"]')].every((r) => r.dataset.status === 'waiting_for_tunnel')"#,
    );
    let deadline = Instant::now() + UI_TIMEOUT;
    let view = loop {
        let view = browser.eval(CLIENTS_JS);
        let wrong = clients_vs_api(&view, &get_data(&daemon, "/api/stats/traffic"));
        if wrong.is_empty() {
            break view;
        }
        assert!(Instant::now() < deadline, "the page never showed the daemon's clients:\n  {}\n{view:#}", wrong.join("\n  "));
        std::thread::sleep(Duration::from_millis(100));
    };
    let (default_card, office_card) = (
        view["cards"].as_array().unwrap().iter().find(|c| c["name"] == json!("default")).unwrap().clone(),
        view["cards"].as_array().unwrap().iter().find(|c| c["name"] == json!("office")).unwrap().clone(),
    );
    assert_eq!(view["cards"][0]["name"], json!("office"), "the client mappings wait for comes first: {view:#}");
    assert_eq!(office_card["state"], json!("Not connected"), "{office_card}");
    assert_eq!(office_card["peer"], json!("—"), "{office_card}");
    assert_eq!(office_card["missed"], json!("true"), "its mappings wait for it: {office_card}");
    assert_eq!(office_card["mappings"], json!(2), "{office_card}");
    assert_eq!(default_card["state"], json!("Connected"), "the other client is untouched: {default_card}");
    assert_eq!(default_card["connected"], json!("true"), "{default_card}");
    assert_eq!(view["tunnel"]["text"], json!("1 of 2 connected"), "{view:#}");
    assert_eq!(view["tunnel"]["connected"], json!("true"), "{view:#}");
    assert_eq!(view["tunnel"]["health"], json!("degraded"), "{view:#}");
    assert_eq!(view["tunnel"]["sub"], json!("not connected: office"), "{view:#}");
    let home_row = view["rows"].as_array().unwrap().iter().find(|r| r["port"] == json!(home)).unwrap().clone();
    assert_eq!(home_row["status"], json!("active"), "{home_row}");
    echo_through(home, 10_000); // the default client's mapping still serves
    browser.eval("document.querySelector('[data-testid=\"clients\"]').scrollIntoView()");
    browser.screenshot("monitor-clients-one-lost.png");
    browser.eval("window.scrollTo(0, 0)");
    browser.screenshot_full_page("monitor-clients-one-lost-full.png");
    browser.set_viewport(375, 800, true);
    browser.wait_for("the phone layout", "window.innerWidth === 375");
    browser.eval("document.querySelector('[data-testid=\"clients\"]').scrollIntoView()");
    browser.screenshot("monitor-clients-one-lost-phone.png");
    assert_stayed_on_loopback(&mut browser, &daemon.url(""), &canary);
    drop(default_client);
}
