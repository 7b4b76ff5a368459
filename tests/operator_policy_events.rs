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

use std::path::Path;
use std::time::Duration;

use common::browser::Browser;
use common::tools::external_tool;
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

// ---------------------------------------------------------------------------
// The page
// ---------------------------------------------------------------------------

/// A browser on `server`'s monitor page, live.
fn monitor(chromium: &Path, server: &Daemon, width: u32, height: u32) -> Browser {
    let mut browser = Browser::launch(chromium, &[], None);
    browser.set_viewport(width, height, width < 720);
    browser.navigate(&server.url("/api/stats/monitor?interval_ms=250"));
    browser.wait_for("the live stream", r#"document.querySelector('[data-testid="connection-status"]').dataset.state === 'live'"#);
    browser
}

/// What the policy dialog's amount fields show.
const DIALOG_JS: &str = r#"(() => {
  const q = (s) => document.querySelector(s);
  return {
    limit: q('#policy-limit').value, limit_unit: q('#policy-limit-unit')?.value,
    limit_exact: q('[data-testid="policy-limit-exact"]')?.textContent,
    quota: q('#policy-quota-bytes').value, quota_unit: q('#policy-quota-unit')?.value,
    quota_exact: q('[data-testid="policy-quota-exact"]')?.textContent,
    quota_units: [...(q('#policy-quota-unit')?.options ?? [])].map((o) => o.value),
    limit_units: [...(q('#policy-limit-unit')?.options ?? [])].map((o) => o.value),
  };
})()"#;

const DIALOG_OPEN: &str = r#"!document.querySelector('[data-testid="policy-dialog"]').hidden"#;
const DIALOG_CLOSED: &str = r#"document.querySelector('[data-testid="policy-dialog"]').hidden"#;

fn open_dialog(browser: &mut Browser, port: u16) -> Value {
    let button = format!(r#"document.querySelector('[data-role="edit-policy"][data-port="{port}"]')"#);
    browser.wait_for(&format!("the Edit policy link of port {port}"), &format!("!!{button}"));
    browser.eval(&format!("{button}.click()"));
    browser.wait_for("the policy dialog", DIALOG_OPEN);
    browser.eval(DIALOG_JS)
}

fn save_dialog(browser: &mut Browser) {
    browser.eval(r#"document.querySelector('#policy-form').requestSubmit()"#);
    browser.wait_for("the dialog to close after Save", DIALOG_CLOSED);
}

/// The bodies of every `/api/mapping/update` the page sent so far.
fn update_requests(browser: &mut Browser) -> Vec<Value> {
    browser
        .events_named("Network.requestWillBeSent")
        .iter()
        .filter(|p| p["request"]["url"].as_str().is_some_and(|u| u.ends_with("/api/mapping/update")))
        .map(|p| serde_json::from_str(p["request"]["postData"].as_str().unwrap_or("null")).unwrap_or(Value::Null))
        .collect()
}

#[test]
fn the_policy_dialog_saves_exactly_what_the_operator_changed() {
    let Some(chromium) = external_tool("chromium", "the_policy_dialog_saves_exactly_what_the_operator_changed") else { return };
    let server = Daemon::server(SECRET, &[]);
    // The issue's mapping: a 300,000,000 B quota and a 1,000,000 B/s cap.
    let office = free_port();
    let (status, reply) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": office, "target_host": "127.0.0.1", "target_port": echo_server().port(),
               "description": "office SSH", "bandwidth_limit": 1_000_000,
               "quota": {"bytes": 300_000_000, "period": "month", "action": "alert"}, "allow": ["10.0.0.0/8"]}),
    );
    assert_eq!(status, 200, "{reply}");
    // And one past its quota (220 %), as the one whose save re-fired events.
    let busy = mapping_with_traffic(&server, 1_100_000);
    exhaust(&server, busy, 1_000_000);
    let stored = |port| policy_of(&listed_mapping(&server, port).expect("the mapping"));
    let (office_before, busy_before) = (stored(office), stored(busy));

    let mut browser = monitor(&chromium, &server, 1440, 1000);
    let shown = open_dialog(&mut browser, office);
    assert_eq!(shown["limit"], "1", "{shown:#}");
    assert_eq!(shown["limit_unit"], "MB/s", "{shown:#}");
    assert_eq!(shown["limit_exact"], "= 1,000,000 bytes/s", "{shown:#}");
    assert_eq!(shown["quota"], "300", "{shown:#}");
    assert_eq!(shown["quota_unit"], "MB", "{shown:#}");
    assert_eq!(shown["quota_exact"], "= 300,000,000 bytes", "{shown:#}");
    assert_eq!(shown["quota_units"], json!(["B", "KB", "MB", "GB", "TB", "KiB", "MiB", "GiB", "TiB"]));
    assert_eq!(shown["limit_units"], json!(["B/s", "KB/s", "MB/s", "GB/s", "KiB/s", "MiB/s", "GiB/s", "kbit/s", "Mbit/s", "Gbit/s"]));
    browser.screenshot("policy-dialog-1440.png");
    save_dialog(&mut browser);
    let shown = open_dialog(&mut browser, busy);
    assert_eq!((shown["quota"].as_str(), shown["quota_unit"].as_str()), (Some("1"), Some("MB")), "{shown:#}");
    save_dialog(&mut browser);
    assert_eq!(update_requests(&mut browser), Vec::<Value>::new(), "Save without edits sends nothing to change");
    assert_eq!(stored(office), office_before, "byte-exact");
    assert_eq!(stored(busy), busy_before, "byte-exact");

    // Esc closes the dialog, changing nothing.
    open_dialog(&mut browser, office);
    browser.eval(r#"document.querySelector('#policy-limit').value = '5'"#);
    browser.eval(r#"document.activeElement.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}))"#);
    browser.wait_for("Esc to close the dialog", DIALOG_CLOSED);
    assert_eq!(stored(office), office_before);

    // The operator picks the unit: 12 Mbit/s is 1,500,000 bytes/s, exactly;
    // half a GiB is 536,870,912 bytes. Only those two fields are sent.
    open_dialog(&mut browser, office);
    browser.eval(
        r#"(() => { const set = (id, value) => { const e = document.querySelector(id); e.value = value;
                      e.dispatchEvent(new Event(e.tagName === 'SELECT' ? 'change' : 'input', {bubbles: true})); };
                   set('#policy-limit-unit', 'Mbit/s'); set('#policy-limit', '12');
                   set('#policy-quota-unit', 'GiB'); set('#policy-quota-bytes', '0.5'); return true; })()"#,
    );
    let shown = browser.eval(DIALOG_JS);
    assert_eq!(shown["limit_exact"], "= 1,500,000 bytes/s", "{shown:#}");
    assert_eq!(shown["quota_exact"], "= 536,870,912 bytes", "{shown:#}");
    save_dialog(&mut browser);
    let sent = update_requests(&mut browser);
    assert_eq!(
        sent,
        [json!({"port": office, "bandwidth_limit": 1_500_000, "quota": {"bytes": 536_870_912, "period": "month", "action": "alert"}})]
    );
    let mut expected = office_before.clone();
    expected["bandwidth_limit"] = json!(1_500_000);
    expected["quota"]["bytes"] = json!(536_870_912);
    assert_eq!(stored(office), expected);
    // Shown back exactly, in the unit that reads shortest.
    let shown = open_dialog(&mut browser, office);
    assert_eq!((shown["limit"].as_str(), shown["limit_unit"].as_str()), (Some("1.5"), Some("MB/s")), "{shown:#}");
    assert_eq!((shown["quota"].as_str(), shown["quota_unit"].as_str()), (Some("512"), Some("MiB")), "{shown:#}");
    browser.set_viewport(390, 844, true);
    browser.wait_for("the phone layout", "window.innerWidth === 390");
    browser.screenshot("policy-dialog-390.png");
    let past_edge = browser.eval(
        r#"(() => { const form = document.querySelector('#policy-form');
                   const inner = form.getBoundingClientRect().right - parseFloat(getComputedStyle(form).paddingRight);
                   return [...form.querySelectorAll('input, select, textarea, fieldset, button')]
                     .filter((e) => e.getBoundingClientRect().right > Math.min(inner, window.innerWidth) + 0.5)
                     .map((e) => e.id || e.tagName); })()"#,
    );
    assert_eq!(past_edge, json!([]), "every field of the dialog fits a phone");
    browser.eval(r#"document.activeElement.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', bubbles: true}))"#);
    browser.wait_for("Esc to close the dialog", DIALOG_CLOSED);

    // Nothing was announced again by any of it.
    watcher_pass(&server);
    assert_eq!(port_kinds(&server, busy), ["quota_exhausted"], "{:#?}", events(&server));
    assert_eq!(port_kinds(&server, office), Vec::<String>::new(), "{:#?}", events(&server));
}

/// Each event message's width, and the words a line break cut in two.
const EVENT_LAYOUT_JS: &str = r#"(() => {
  const list = document.querySelector('[data-testid="event-list"]');
  return {
    list_width: list.getBoundingClientRect().width,
    page_overflow: document.documentElement.scrollWidth > window.innerWidth,
    messages: [...list.querySelectorAll('[data-testid="event"] .event-message')].map((m) => {
      const text = m.firstChild;
      const split = [];
      for (const word of text.data.matchAll(/\S+/g)) {
        const range = document.createRange();
        range.setStart(text, word.index);
        range.setEnd(text, word.index + word[0].length);
        const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
        if (lines.size > 1) split.push(word[0]);
      }
      return { width: m.getBoundingClientRect().width, split, text: text.data };
    }),
  };
})()"#;

#[test]
fn the_events_panel_is_readable_on_a_phone_and_a_desktop() {
    let Some(chromium) = external_tool("chromium", "the_events_panel_is_readable_on_a_phone_and_a_desktop") else { return };
    let server = Daemon::server(SECRET, &[]);
    for _ in 0..2 {
        let port = mapping_with_traffic(&server, 1_100_000);
        exhaust(&server, port, 1_000_000);
    }
    let mut client = Daemon::client(&server, SECRET, &[]);
    client.kill();
    wait_for("client_lost", Duration::from_secs(20), || (client_kinds(&server, "default") == ["client_lost"]).then_some(()));

    for (width, height) in [(390, 844), (1440, 1000)] {
        let mut browser = monitor(&chromium, &server, width, height);
        browser.wait_for("three events in the panel", r#"document.querySelectorAll('[data-testid="event"]').length === 3"#);
        browser.eval(r#"document.querySelector('[data-testid="events"]').scrollIntoView({block: 'start'})"#);
        let layout = browser.eval(EVENT_LAYOUT_JS);
        browser.screenshot(&format!("events-{width}.png"));
        assert_eq!(layout["page_overflow"], json!(false), "{layout:#}");
        let list_width = layout["list_width"].as_f64().unwrap();
        for message in layout["messages"].as_array().unwrap() {
            let shown = message["width"].as_f64().unwrap();
            // On a phone the message has the row to itself; beside the time
            // and kind on a desktop it still has most of it.
            let least = if width < 720 { list_width - 1.0 } else { list_width * 0.6 };
            assert!(shown >= least, "at {width} px a message is {shown} px wide of {list_width}: {layout:#}");
            assert_eq!(message["split"], json!([]), "at {width} px words are cut: {layout:#}");
        }
    }
}
