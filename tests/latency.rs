//! Latency on real sockets: how long a visitor waits for its target
//! (`tunneld_mapping_connect_duration_seconds`, the traffic JSON's p50/p99),
//! how long connections last (`tunneld_mapping_connection_duration_seconds`),
//! and the tunnel's heartbeat round trip (`tunneld_tunnel_rtt_seconds`) on both
//! roles, in `/api/client/list` and `ctl client list`; the monitor page shows
//! them. A slow tunnel is made with a proxy that holds every server → client
//! byte for a known delay.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const SECRET: &str = "latency-test-secret";
const CONNECT: &str = "tunneld_mapping_connect_duration_seconds";
const LASTED: &str = "tunneld_mapping_connection_duration_seconds";
const RTT: &str = "tunneld_tunnel_rtt_seconds";

/// A histogram bucket's count (`le` as the exposition spells it) for `labels`.
fn bucket(text: &str, family: &str, labels: &[(&str, &str)], le: &str) -> Option<f64> {
    let mut with_le = labels.to_vec();
    with_le.push(("le", le));
    metric_value(text, &format!("{family}_bucket"), &with_le)
}

fn count(text: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_value(text, &format!("{family}_count"), labels)
}

/// A proxy in front of `upstream` that delays every byte from `upstream` to
/// the connecting side by `delay` (the other way goes straight through): a
/// tunnel whose server → client leg is `delay` long, for every connection the
/// client opens (control and data channels alike).
fn slow_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for down in listener.incoming().flatten() {
            let Ok(up) = TcpStream::connect(upstream) else { continue };
            let _ = (down.set_nodelay(true), up.set_nodelay(true));
            pipe(down.try_clone().unwrap(), up.try_clone().unwrap(), Duration::ZERO);
            pipe(up, down, delay);
        }
    });
    addr
}

/// Copies `from` → `to` on threads, each chunk written `delay` after it was
/// read, in order; a close is passed on as a close.
fn pipe(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from.read(&mut buf) {
            if tx.send((Instant::now() + delay, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, chunk) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
    });
}

/// A visitor of `port` (an echo target behind it) that says hello, reads it
/// back, stays connected for `hold` and then closes.
fn visit_for(port: u16, hold: Duration) {
    let mut visitor = TcpStream::connect(loopback(port)).expect("connect to the mapping");
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    visitor.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    visitor.read_exact(&mut back).expect("the echo");
    std::thread::sleep(hold);
    visitor.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = visitor.read_to_end(&mut Vec::new());
}

fn traffic_mapping(server: &Daemon, port: u16) -> Value {
    traffic_entry(server, port).unwrap_or_else(|| panic!("port {port} in the traffic report"))
}

#[test]
fn direct_connect_and_connection_times_land_in_their_buckets() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    let p = port.to_string();
    let labels = [("port", p.as_str())];

    // From creation, at 0, like every mapping family.
    let text = metrics_text(&server);
    for family in [CONNECT, LASTED] {
        assert_eq!(count(&text, family, &labels), Some(0.0), "{family} from creation:\n{text}");
        assert_eq!(bucket(&text, family, &labels, "+Inf"), Some(0.0), "{family}");
    }
    let m = traffic_mapping(&server, port);
    assert!(m["connect_p50_seconds"].is_null() && m["connect_p99_seconds"].is_null(), "no connect yet: {m}");

    // Two visitors held for known times, one after the other.
    visit_for(port, Duration::from_millis(300));
    visit_for(port, Duration::from_millis(1200));
    let text = wait_for("both connections ended", Duration::from_secs(10), || {
        let text = metrics_text(&server);
        (count(&text, LASTED, &labels) == Some(2.0)).then_some(text)
    });
    let lasted = |le| bucket(&text, LASTED, &labels, le).unwrap_or(-1.0);
    assert_eq!((lasted("0.1"), lasted("0.5"), lasted("1"), lasted("5")), (0.0, 1.0, 1.0, 2.0), "0.3 s and 1.2 s:\n{text}");
    let sum = metric_value(&text, &format!("{LASTED}_sum"), &labels).unwrap();
    assert!((1.5..3.0).contains(&sum), "durations sum to {sum}");

    // A loopback target answers its connect within milliseconds (the bound
    // leaves room for a busy 2-core machine, and stays below the slow tunnel's).
    assert_eq!(count(&text, CONNECT, &labels), Some(2.0), "{text}");
    assert_eq!(bucket(&text, CONNECT, &labels, "0.1"), Some(2.0), "loopback connects are fast:\n{text}");
    let m = traffic_mapping(&server, port);
    let (p50, p99) = (m["connect_p50_seconds"].as_f64().expect("p50"), m["connect_p99_seconds"].as_f64().expect("p99"));
    assert!(0.0 < p50 && p50 <= p99 && p99 < 0.1, "p50 {p50}, p99 {p99}");

    // Removed with the mapping.
    let (status, _) = post(&server, "/api/mapping/remove", serde_json::json!({ "port": port }));
    assert_eq!(status, 200);
    let text = metrics_text(&server);
    for family in [CONNECT, LASTED] {
        assert_eq!(count(&text, family, &labels), None, "{family} of a removed mapping:\n{text}");
    }
}

#[test]
fn a_slow_tunnel_shows_in_connect_times_and_in_the_round_trip_on_both_sides() {
    let delay = Duration::from_millis(150);
    let server = Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__HEARTBEAT_INTERVAL_SECS", "1")]);
    let proxy = slow_proxy(server.tunnel.unwrap(), delay);
    let client = Daemon::client_with(proxy, SECRET, &["--fingerprint", &server.fingerprint()]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    wait_for("the mapping active", Duration::from_secs(10), || (listed_mapping(&server, port)?["status"] == "active").then_some(()));

    for _ in 0..3 {
        echo_through(port, 1000);
    }
    let p = port.to_string();
    let labels = [("port", p.as_str())];
    let text = metrics_text(&server);
    assert_eq!(count(&text, CONNECT, &labels), Some(3.0), "{text}");
    // Every connect waited for the request's slow way to the client.
    assert_eq!(bucket(&text, CONNECT, &labels, "0.1"), Some(0.0), "faster than the tunnel's delay:\n{text}");
    assert_eq!(bucket(&text, CONNECT, &labels, "2.5"), Some(3.0), "{text}");
    let m = traffic_mapping(&server, port);
    let (p50, p99) = (m["connect_p50_seconds"].as_f64().expect("p50"), m["connect_p99_seconds"].as_f64().expect("p99"));
    assert!(delay.as_secs_f64() <= p50 && p50 <= p99 && p99 < 2.5, "p50 {p50}, p99 {p99}");

    // The round trip, on the server's side and on the client's: at least the delay.
    let client_labels = [("client", "default")];
    for (role, daemon) in [("server", &server), ("client", &client)] {
        let text = wait_for(&format!("a round trip on the {role}"), Duration::from_secs(10), || {
            let text = metrics_text(daemon);
            (count(&text, RTT, &client_labels)? >= 2.0).then_some(text)
        });
        assert_eq!(bucket(&text, RTT, &client_labels, "0.1"), Some(0.0), "{role}: faster than the delay:\n{text}");
        let n = count(&text, RTT, &client_labels).unwrap();
        assert_eq!(bucket(&text, RTT, &client_labels, "2.5"), Some(n), "{role}:\n{text}");
        let last = metric_value(&text, "tunneld_tunnel_rtt_last_seconds", &client_labels).unwrap();
        assert!((0.15..2.5).contains(&last), "{role}: last round trip {last}");
    }

    let clients = get_data(&server, "/api/client/list");
    let default = clients["clients"].as_array().unwrap().iter().find(|c| c["name"] == "default").expect("default listed").clone();
    let rtt = default["rtt_seconds"].as_f64().unwrap_or_else(|| panic!("rtt_seconds in {default}"));
    assert!((0.15..2.5).contains(&rtt), "rtt {rtt}");

    let out = Command::new(BIN).args(["ctl", "--api", &server.url(""), "client", "list"]).output().expect("run ctl");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}{}", String::from_utf8_lossy(&out.stderr));
    let header = table.lines().next().unwrap_or_default();
    let row = table.lines().find(|l| l.starts_with("default")).unwrap_or_default();
    assert!(header.contains("RTT"), "{table}");
    assert!(row.contains(" ms"), "the round trip in milliseconds: {table}");
}

#[test]
fn the_server_echoes_a_ping_and_keeps_a_peer_that_never_sends_one() {
    use tunneld::tunnel::frame::{read_frame, write_frame};
    let server = Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__HEARTBEAT_INTERVAL_SECS", "1")]);
    let (tunnel, pin) = (server.tunnel.unwrap(), server.fingerprint());
    let rt = common::tunnel::runtime();
    let _session = rt.block_on(async {
        let mut stream = common::tunnel::tls_connect(tunnel, &pin).await;
        let verdict = common::tunnel::authenticate(&mut stream, SECRET).await;
        assert!(format!("{verdict:?}").contains("Welcome"), "{verdict:?}");
        let (mut reader, mut writer) = tokio::io::split(stream);
        let (frames_tx, mut frames) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let reading = tokio::spawn(async move {
            while let Ok((frame, _)) = read_frame::<Value, _>(&mut reader).await {
                let _ = frames_tx.send(frame);
            }
        });
        // A peer as old as the protocol: bare heartbeats, never an echo. Over
        // four intervals the server pings it and does not drop it.
        for _ in 0..8 {
            write_frame(&mut writer, &serde_json::json!({ "type": "heartbeat" })).await.expect("an old heartbeat");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let mut pings = 0;
        while let Ok(frame) = frames.try_recv() {
            assert_eq!(frame["type"], "heartbeat", "{frame}");
            pings += usize::from(frame["ping"].is_u64());
        }
        assert!(pings >= 3, "the server's heartbeats carry a ping: {pings}");
        assert!(!reading.is_finished(), "the server closed the session of a peer that never echoes");
        // A peer that knows the probe: its ping comes back at once as a pong.
        write_frame(&mut writer, &serde_json::json!({ "type": "heartbeat", "ping": 424242 })).await.unwrap();
        let pong = loop {
            let frame = tokio::time::timeout(Duration::from_secs(2), frames.recv()).await.expect("an echo within two seconds");
            let frame = frame.expect("the session stays up");
            if frame.get("pong").is_some() {
                break frame;
            }
        };
        assert_eq!(pong, serde_json::json!({ "type": "heartbeat", "pong": 424242 }));
        (writer, reading)
    });
    let rtt = scrape_metric(&server, "tunneld_tunnel_rtt_seconds_count", &[("client", "default")]);
    assert_eq!(rtt, Some(0.0), "a peer that never echoes gives no round trip");
    assert_eq!(scrape_metric(&server, "tunneld_tunnel_connected", &[("client", "default")]), Some(1.0), "still connected");
}

/// Milliseconds in a latency as the page writes it ("85 µs", "4.2 ms", "1.25 s").
fn millis(text: &str) -> Option<f64> {
    let (value, unit) = text.trim().split_once(' ')?;
    let value: f64 = value.parse().ok()?;
    match unit {
        "µs" => Some(value / 1000.0),
        "ms" => Some(value),
        "s" => Some(value * 1000.0),
        _ => None,
    }
}

/// Where the page's mapping table and client cards stand, read from the DOM.
const LAYOUT_JS: &str = r#"(() => {
  const rows = [...document.querySelectorAll('[data-testid="mapping-row"]')];
  const wrap = document.querySelector('.table-wrap');
  return {
    width: window.innerWidth,
    page_width: document.documentElement.scrollWidth,
    table_overflow: wrap.scrollWidth - wrap.clientWidth,
    rows: rows.map((r) => {
      // 721-1100 px fold the column into the Open cell.
      const column = r.querySelector('td[data-col="connect"]');
      const folded = column.getBoundingClientRect().width === 0;
      const c = folded ? r.querySelector('[data-role="connect-inline"]') : column;
      const box = c.getBoundingClientRect();
      const text = folded ? [...c.children].map((l) => l.textContent.replace(/^p\d+\s/, '').replace('\u00a0', ' ')).join(' / ') : c.textContent.trim();
      return { port: Number(r.dataset.port), folded, text, right: r.getBoundingClientRect().right,
        cell_visible: box.width > 0 && box.height > 0, cell_right: box.right };
    }),
    rtt: [...document.querySelectorAll('[data-testid="client-card"] [data-role="rtt"]')].map((d) => d.textContent.trim()),
  };
})()"#;

#[test]
fn the_page_shows_connect_times_per_mapping_and_the_round_trip_on_client_cards() {
    let Some(chromium) = common::tools::external_tool("chromium", "latency") else { return };
    let delay = Duration::from_millis(120);
    let server = Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__HEARTBEAT_INTERVAL_SECS", "1")]);
    let proxy = slow_proxy(server.tunnel.unwrap(), delay);
    let client = Daemon::client_with(proxy, SECRET, &["--fingerprint", &server.fingerprint()]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    let echo = echo_server();
    let (direct, tunneled) = (free_port(), free_port());
    create_mapping(&server, direct, echo, false);
    create_mapping(&server, tunneled, echo, true);
    wait_for("the tunneled mapping active", Duration::from_secs(10), || {
        (listed_mapping(&server, tunneled)?["status"] == "active").then_some(())
    });
    for _ in 0..3 {
        echo_through(direct, 100);
        echo_through(tunneled, 100);
    }

    let mut browser = common::browser::Browser::launch(&chromium, &[], None);
    browser.set_state_probe(LAYOUT_JS);
    browser.navigate(&server.url("/api/stats/monitor"));
    let cell = |port: u16| format!(r#"document.querySelector('[data-port="{port}"] td[data-col="connect"]').dataset.p50 !== ''"#);
    browser.wait_for("the direct mapping's connect times", &cell(direct));
    browser.wait_for("the tunneled mapping's connect times", &cell(tunneled));
    browser.wait_for(
        "the round trip on the client card",
        r#"/\d (ms|s)$/.test(document.querySelector('[data-testid="client-card"][data-name="default"] [data-role="rtt"]').textContent.trim())"#,
    );

    for (width, height, mobile) in [(1440, 900, false), (1000, 800, false), (780, 900, false), (390, 844, true)] {
        browser.set_viewport(width, height, mobile);
        browser.wait_for("the new width", &format!("window.innerWidth === {width}"));
        let layout = browser.eval(LAYOUT_JS);
        let text = |port: u16| {
            let row = layout["rows"].as_array().unwrap().iter().find(|r| r["port"] == port).unwrap_or_else(|| panic!("{layout:#}"));
            assert_eq!(row["cell_visible"], true, "{width} px: the column shows: {layout:#}");
            assert!(row["cell_right"].as_f64().unwrap() <= f64::from(width), "{width} px: the cell is on screen: {layout:#}");
            row["text"].as_str().unwrap().to_string()
        };
        // "0.1 ms / 0.2 ms" for loopback; at least the tunnel's delay through it.
        let folded = layout["rows"][0]["folded"] == true;
        assert_eq!(folded, (721..=1100).contains(&width), "{width} px: the column folds into Open only in the middle layout: {layout:#}");
        let (fast, slow) = (text(direct), text(tunneled));
        assert!(fast.contains(" / ") && (fast.contains("µs") || fast.contains("ms")), "{width} px: {fast}");
        let slow_p50 = millis(slow.split(" / ").next().unwrap_or_default()).unwrap_or_else(|| panic!("{width} px: {slow}"));
        assert!(slow_p50 >= delay.as_millis() as f64, "{width} px: {slow}");
        assert!(layout["page_width"].as_f64().unwrap() <= f64::from(width), "{width} px: no sideways scroll: {layout:#}");
        assert!(layout["table_overflow"].as_f64().unwrap() <= 0.0, "{width} px: the table fits: {layout:#}");
        let rtt = layout["rtt"][0].as_str().unwrap_or_default();
        let ms = millis(rtt).unwrap_or_else(|| panic!("{width} px: the round trip {rtt:?}"));
        assert!(ms >= delay.as_millis() as f64, "{width} px: {rtt}");
        browser.eval("document.querySelector('[data-testid=\"mapping-table\"]').scrollIntoView({ block: 'center' })");
        browser.screenshot(&format!("latency-{width}.png"));
        if mobile {
            browser.screenshot_full_page(&format!("latency-{width}-full.png"));
        }
    }
}
