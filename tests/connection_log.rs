//! Issue 21 on the monitor page, in Chromium: a mapping's open connections
//! under its row (live, with a Close button that resets the visitor), the top
//! sources beside the history, and the connection log with its filters and CSV
//! download. Screenshots at 1440 and 390 px go to `test-artifacts/`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, TcpStream};
use std::time::Duration;

use common::browser::Browser;
use common::tools::external_tool;
use common::*;
use serde_json::{json, Value};

fn source(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn echo_exchange(visitor: &mut TcpStream, len: usize) {
    visitor.write_all(&vec![1u8; len]).unwrap();
    let mut back = vec![0u8; len];
    visitor.read_exact(&mut back).unwrap();
}

/// What the page shows of the open connections, the sources and the log.
const PROBE: &str = r#"(() => {
  const all = (sel) => [...document.querySelectorAll(sel)];
  return {
    panel: document.querySelector('[data-testid="conns-panel"]')?.dataset || null,
    conns: all('[data-testid="conn"]').map((li) => ({ id: li.dataset.id, source: li.dataset.source,
      sent: Number(li.querySelector('[data-role="conn-sent"]').dataset.bytes) })),
    sources: all('[data-testid="source"]').map((li) => ({ source: li.dataset.source, bytes: Number(li.dataset.bytes), connections: Number(li.dataset.connections) })),
    log: all('[data-testid="connlog-row"]').map((tr) => ({ id: tr.dataset.id, end: tr.dataset.end, source: tr.children[2].textContent })),
    charted: document.querySelector('tr.is-charted')?.dataset.port || null,
  };
})()"#;

fn probe(browser: &mut Browser) -> Value {
    browser.eval(PROBE)
}

#[test]
fn the_page_lists_closes_and_logs_connections_and_shows_top_sources() {
    let Some(chromium) = external_tool("chromium", "connection_log") else { return };
    let server = Daemon::server("connection-log-page", &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    // One ended connection of .4 (a big one) before the page opens; three open ones.
    let mut ended = connect_from(source(4), loopback(port));
    echo_exchange(&mut ended, 50_000);
    ended.shutdown(std::net::Shutdown::Write).unwrap();
    let _ = ended.read_to_end(&mut Vec::new());
    let mut visitors: Vec<TcpStream> = [(2u8, 3_000usize), (3, 700), (4, 12_000)]
        .iter()
        .map(|&(last, len)| {
            let mut v = connect_from(source(last), loopback(port));
            echo_exchange(&mut v, len);
            v
        })
        .collect();
    wait_for("three open connections", Duration::from_secs(5), || (get_data(&server, "/api/connections")["count"] == 3).then_some(()));
    wait_for("the ended one logged", Duration::from_secs(5), || (get_data(&server, "/api/connections/log")["count"] == 1).then_some(()));

    let mut browser = Browser::launch(&chromium, &[], None);
    browser.set_state_probe(PROBE);
    browser.set_viewport(1440, 1000, false);
    browser.navigate(&server.url("/api/stats/monitor?interval_ms=1000"));
    browser.wait_for("the live stream", r#"document.querySelector('[data-testid="connection-status"]').dataset.state === 'live'"#);
    browser.wait_for(
        "the Open button",
        &format!(r#"document.querySelector('[data-role="open-conns"][data-port="{port}"]')?.textContent === '3'"#),
    );
    browser.eval(&format!(r#"document.querySelector('[data-role="open-conns"][data-port="{port}"]').click()"#));
    browser.wait_for("three connections under the row", r#"document.querySelectorAll('[data-testid="conn"]').length === 3"#);
    let page = probe(&mut browser);
    let shown: Vec<(String, u64)> = page["conns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["source"].as_str().unwrap().rsplit_once(':').unwrap().0.to_string(), c["sent"].as_u64().unwrap()))
        .collect();
    assert_eq!(shown, vec![("127.0.0.2".into(), 3_000), ("127.0.0.3".into(), 700), ("127.0.0.4".into(), 12_000)], "{page}");
    // The row under the mapping sits right after it, and opening it did not chart it.
    let after = browser.eval(&format!(r#"document.querySelector('tr[data-port="{port}"]').nextElementSibling.dataset.testid"#));
    assert_eq!(after, "conns-row");
    assert!(page["charted"].is_null(), "the Open button does not chart the mapping: {page}");

    // Live: more bytes on the first connection show up without a click.
    echo_exchange(&mut visitors[0], 5_000);
    browser.wait_for("the new bytes", r#"document.querySelector('[data-testid="conn"] [data-role="conn-sent"]').dataset.bytes === '8000'"#);
    browser.eval("document.querySelector('[data-testid=\"mapping-table\"]').scrollIntoView()");
    browser.screenshot("connections-open-1440.png");

    // Close the .3 connection from the page: its visitor gets a reset.
    browser.eval(r#"[...document.querySelectorAll('[data-testid="conn"]')].find((li) => li.dataset.source.startsWith('127.0.0.3:')).querySelector('[data-role="close-conn"]').click()"#);
    browser.wait_for("two connections left", r#"document.querySelectorAll('[data-testid="conn"]').length === 2"#);
    let mut closed = visitors.remove(1);
    assert_eq!(closed.read_to_end(&mut Vec::new()).map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));

    // The row click still charts the mapping (the other feature of the row).
    browser.eval(&format!(r#"document.querySelector('tr[data-port="{port}"] td[data-col="port"]').click()"#));
    browser.wait_for("the mapping charted", &format!(r#"document.querySelector('tr.is-charted')?.dataset.port === '{port}'"#));

    // Top sources beside the history: .4 moved the most (its ended connection).
    browser.eval("document.querySelector('[data-testid=\"history\"]').scrollIntoView()");
    browser.wait_for("the sources", r#"document.querySelectorAll('[data-testid="source"]').length === 2"#);
    let page = probe(&mut browser);
    assert_eq!(page["sources"][0]["source"], "127.0.0.4", "{page}");
    assert_eq!(page["sources"][0]["bytes"], 100_000, "{page}");
    assert_eq!(page["sources"][1]["source"], "127.0.0.3", "the closed one: {page}");
    assert_eq!(page["sources"][1]["bytes"], 1_400, "{page}");
    browser.eval("document.querySelector('[data-testid=\"sources\"]').scrollIntoView({block: 'center'})");
    browser.screenshot("connections-sources-1440.png");

    // The log, filtered by source, and its CSV.
    browser.wait_for("the log", r#"document.querySelectorAll('[data-testid="connlog-row"]').length >= 1"#);
    browser.eval(
        r#"(() => { const f = document.querySelector('#connlog-form'); f.elements.source.value = '127.0.0.3'; f.requestSubmit(); })()"#,
    );
    browser.wait_for(
        "the .3 row only",
        r#"(() => { const rows = [...document.querySelectorAll('[data-testid="connlog-row"]')]; return rows.length === 1 && rows[0].dataset.end === 'closed_by_api'; })()"#,
    );
    browser.eval(r#"(() => { const f = document.querySelector('#connlog-form'); f.elements.source.value = ''; f.elements.to.value = '2000-01-01 00:00'; f.requestSubmit(); })()"#);
    browser.wait_for("nothing before 2000", r#"!document.querySelector('[data-testid="connlog-empty"]').hidden && document.querySelectorAll('[data-testid="connlog-row"]').length === 0"#);
    // The note sits below the table's header row, not on it.
    let overlap = browser.eval(
        r#"(() => { const head = document.querySelector('[data-testid="connlog-table"] thead').getBoundingClientRect(); const note = document.querySelector('[data-testid="connlog-empty"]').getBoundingClientRect(); return note.top - head.bottom; })()"#,
    );
    assert!(overlap.as_f64().is_some_and(|gap| gap >= 0.0), "the empty log's note overlaps the table's header by {overlap}px");
    browser.eval(r#"(() => { const f = document.querySelector('#connlog-form'); f.elements.to.value = ''; f.requestSubmit(); })()"#);
    browser.wait_for("both ended rows", r#"document.querySelectorAll('[data-testid="connlog-row"]').length === 2"#);
    let downloads = tempfile::tempdir().unwrap();
    browser.allow_downloads_to(downloads.path());
    browser.eval(r#"document.querySelector('#connlog-csv').click()"#);
    let csv_path = downloads.path().join("tunneld-connections.csv");
    let text =
        wait_for("the CSV download", Duration::from_secs(10), || std::fs::read_to_string(&csv_path).ok().filter(|t| t.ends_with("\r\n")));
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let ends: Vec<String> = reader.records().map(|r| r.unwrap()[9].to_string()).collect();
    assert_eq!(ends, ["closed_by_api", "closed"], "{text}");
    browser.eval("document.querySelector('[data-testid=\"connlog\"]').scrollIntoView()");
    browser.screenshot("connections-log-1440.png");

    // A phone: the same parts, readable at 390 px, nothing overflowing sideways.
    browser.set_viewport(390, 844, true);
    browser.eval("document.querySelector('[data-testid=\"conns-row\"]').scrollIntoView({block: 'center'})");
    browser.screenshot("connections-open-390.png");
    browser.eval("document.querySelector('[data-testid=\"sources\"]').scrollIntoView({block: 'center'})");
    browser.screenshot("connections-sources-390.png");
    browser.eval("document.querySelector('[data-testid=\"connlog\"]').scrollIntoView()");
    browser.screenshot("connections-log-390.png");
    let overflow = browser.eval("document.documentElement.scrollWidth - document.documentElement.clientWidth");
    assert_eq!(overflow, json!(0), "the page scrolls sideways at 390 px");
    let outside = browser.eval(
        r#"(() => { const card = document.querySelector('[data-testid="connlog"]').getBoundingClientRect(); const rows = document.querySelector('#connlog-rows').getBoundingClientRect(); return rows.bottom - card.bottom; })()"#,
    );
    assert!(outside.as_f64().is_some_and(|past| past <= 0.0), "the log's rows run {outside}px past its card at 390 px");
    let thrown = browser.events_named("Runtime.exceptionThrown");
    assert!(thrown.is_empty(), "page threw: {thrown:?}");
    let base = format!("http://{}/", server.http);
    let foreign: Vec<String> = browser.requested_urls().into_iter().filter(|u| !u.starts_with(&base) && !u.starts_with("blob:")).collect();
    assert!(foreign.is_empty(), "the page requested other hosts: {foreign:?}");
}
