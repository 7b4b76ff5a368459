//! Issue #19, section 3: what the journal shows. Under systemd (stderr is the
//! journal stream) the daemon writes journal entries in journald's native
//! protocol; here they go to a datagram socket of the test's own (the daemon's
//! test-only `TUNNELD_JOURNAL_SOCKET`), and are read back the way journald reads
//! them. The message text a person reads with a plain `journalctl` carries the
//! fields (the fingerprint, the client command line, ports, errors), each field
//! is also a journal field of its own, no field shows a Rust debug form, and a
//! flood of refused visitors is one line and a summary with the count.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;

const SECRET: &str = "operator-journal-secret";

/// One journal entry: its fields in the order sent.
type Entry = Vec<(String, String)>;

/// A stand-in for journald: a datagram socket and every entry it received.
struct Journal {
    path: PathBuf,
    entries: Arc<Mutex<Vec<Entry>>>,
    _dir: tempfile::TempDir,
}

impl Journal {
    fn new() -> Journal {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal.sock");
        let socket = UnixDatagram::bind(&path).expect("bind the journal socket");
        let entries = Arc::new(Mutex::new(Vec::new()));
        let sink = entries.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = socket.recv(&mut buf) {
                // journald discards empty datagrams (the daemon's probe).
                if n > 0 {
                    sink.lock().unwrap().push(parse_native(&buf[..n]));
                }
            }
        });
        Journal { path, entries, _dir: dir }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn entries(&self) -> Vec<Entry> {
        self.entries.lock().unwrap().clone()
    }

    /// The first entry whose MESSAGE contains `needle`, waiting for it.
    fn wait_for(&self, needle: &str) -> Entry {
        wait_for(&format!("a journal entry with {needle:?}"), Duration::from_secs(20), || {
            self.entries().into_iter().find(|e| field(e, "MESSAGE").is_some_and(|m| m.contains(needle)))
        })
    }
}

/// Decodes journald's native protocol: `NAME=value\n`, or `NAME\n` + 64-bit
/// little-endian length + value + `\n` for a value that holds a newline.
fn parse_native(mut data: &[u8]) -> Entry {
    let mut entry = Vec::new();
    while !data.is_empty() {
        let nl = data.iter().position(|&b| b == b'\n').expect("every field ends with a newline");
        let line = &data[..nl];
        match line.iter().position(|&b| b == b'=') {
            Some(eq) => {
                entry.push((text(&line[..eq]), text(&line[eq + 1..])));
                data = &data[nl + 1..];
            }
            None => {
                let len = u64::from_le_bytes(data[nl + 1..nl + 9].try_into().unwrap()) as usize;
                let value = &data[nl + 9..nl + 9 + len];
                assert_eq!(data[nl + 9 + len], b'\n', "a binary field ends with a newline");
                entry.push((text(line), text(value)));
                data = &data[nl + 9 + len + 1..];
            }
        }
    }
    entry
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("journal fields are UTF-8")
}

fn field<'a>(entry: &'a Entry, name: &str) -> Option<&'a str> {
    entry.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn message(entry: &Entry) -> &str {
    field(entry, "MESSAGE").unwrap_or_default()
}

#[test]
fn the_journal_message_carries_the_fields_and_each_is_a_journal_field_too() {
    let journal = Journal::new();
    let server = Daemon::server_in_journal(SECRET, &[], journal.path());
    let (pin, tunnel) = (server.fingerprint(), server.tunnel.unwrap());

    let cert = journal.wait_for("tunnel TLS certificate");
    assert!(message(&cert).contains(&format!("fingerprint={pin}")), "{cert:?}");
    assert_eq!(field(&cert, "F_FINGERPRINT"), Some(pin.as_str()), "{cert:?}");

    let start = journal.wait_for("start a client with");
    let command = format!("--server {tunnel} --fingerprint {pin}");
    assert!(message(&start).contains(&command), "the operator sees the command line: {start:?}");
    assert!(field(&start, "F_CLIENT_COMMAND").is_some_and(|c| c.contains(&command)), "{start:?}");
    assert_eq!(field(&start, "PRIORITY"), Some("5"), "info is notice");
    assert!(field(&start, "SYSLOG_IDENTIFIER").is_some() && field(&start, "TARGET").is_some(), "{start:?}");

    let restored = journal.wait_for("mappings restored");
    assert!(message(&restored).contains("restored=0 failed=0"), "{restored:?}");
    assert_eq!(field(&restored, "F_RESTORED"), Some("0"));

    // A visitor whose target is down: the port and the error are in the text.
    let port = free_port();
    create_mapping(&server, port, loopback(free_port()), false);
    visit(port, b"hello");
    let refused = journal.wait_for("visitor refused: target unreachable");
    let error = field(&refused, "F_ERROR").expect("the error is a field").to_string();
    assert!(message(&refused).contains(&format!("port={port}")) && message(&refused).contains(&error), "{refused:?}");
    assert_eq!(field(&refused, "F_PORT"), Some(port.to_string().as_str()));
    assert_eq!(field(&refused, "PRIORITY"), Some("4"), "a warning");
    assert!(!server.log().contains("start a client with"), "logged to the journal, not to stderr:\n{}", server.log());
}

#[test]
fn no_log_line_of_a_session_shows_a_rust_debug_form() {
    let journal = Journal::new();
    let mut server = Daemon::server_in_journal(SECRET, &[], journal.path());
    let mut client = Daemon::client(&server, SECRET, &[]);
    let (tunneled, direct) = (free_port(), free_port());
    create_mapping(&server, tunneled, echo_server(), true);
    create_mapping(&server, direct, echo_server(), false);
    echo_through(tunneled, 10_000);
    echo_through(direct, 10_000);
    // A visitor of a direct mapping whose target is down.
    let dead = free_port();
    create_mapping(&server, dead, loopback(free_port()), false);
    visit(dead, b"x");
    journal.wait_for("visitor refused: target unreachable");
    // The client goes and comes back: events without a port.
    client.kill();
    let lost = journal.wait_for("tunnel client default disconnected");
    assert!(message(&lost).contains("client=default"), "{lost:?}");
    assert_eq!(field(&lost, "F_PORT"), None, "an event without a port has no port field: {lost:?}");
    let client = Daemon::client(&server, SECRET, &[]);
    journal.wait_for("tunnel client default is back");
    echo_through(tunneled, 10_000);
    server.terminate();

    let entries = journal.entries();
    assert!(entries.len() > 10, "{entries:?}");
    for entry in &entries {
        for (name, value) in entry {
            assert!(!debug_form(value), "{name}={value:?} shows a Rust debug form in {entry:?}");
        }
    }
    for line in client.log().lines() {
        assert!(!debug_form(line), "the client's log: {line}");
    }
}

/// `Some(…)`, or `None` as a value.
fn debug_form(text: &str) -> bool {
    text.contains("Some(") || text == "None" || text.contains("=None")
}

#[test]
fn a_flood_of_refused_visitors_is_one_line_and_a_summary_with_the_count() {
    const VISITORS: usize = 200;
    let journal = Journal::new();
    let mut server = Daemon::server_in_journal(SECRET, &[], journal.path());
    // Tunneled, and no client ever connects: every visitor is refused.
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    for _ in 0..VISITORS {
        visit(port, b"x");
    }
    let p = port.to_string();
    wait_for("every refusal counted", Duration::from_secs(20), || {
        (scrape_metric(&server, "tunneld_mapping_connect_errors_total", &[("port", &p)]) == Some(VISITORS as f64)).then_some(())
    });
    // The summary of an interval cut short by a shutdown is logged at shutdown.
    server.terminate();

    // What an operator sees at the default level (info, and above).
    let shown: Vec<Entry> = journal
        .entries()
        .into_iter()
        .filter(|e| field(e, "PRIORITY").is_some_and(|p| p <= "5"))
        .filter(|e| message(e).contains("visitor") && field(e, "F_PORT") == Some(p.as_str()))
        .collect();
    assert!(shown.len() <= 3, "{} lines for {VISITORS} refused visitors: {shown:#?}", shown.len());
    let first = shown.iter().filter(|e| message(e).starts_with("visitor refused: target unreachable")).count();
    assert_eq!(first, 1, "the first refusal in full: {shown:#?}");
    let summary = shown.iter().find(|e| message(e).starts_with("more visitors refused")).expect("a summary line");
    assert_eq!(field(summary, "F_COUNT"), Some("199"), "{summary:?}");
    assert_eq!(field(summary, "F_REASON"), Some("target_unreachable"), "{summary:?}");
    assert!(message(summary).contains("count=199") && message(summary).contains("is not connected"), "{summary:?}");
}

#[test]
fn a_flood_through_the_tunnel_to_a_dead_target_is_one_line_and_a_summary_on_the_client_too() {
    const VISITORS: usize = 50;
    let server = Daemon::server(SECRET, &[]);
    let mut client = Daemon::client(&server, SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, loopback(free_port()), true);
    for _ in 0..VISITORS {
        visit(port, b"x");
    }
    let p = port.to_string();
    wait_for("every visitor counted as a connect error", Duration::from_secs(20), || {
        (scrape_metric(&server, "tunneld_mapping_connect_errors_total", &[("port", &p)]) == Some(VISITORS as f64)).then_some(())
    });
    // The summary of an interval cut short by a shutdown is logged at shutdown.
    client.terminate();
    let log = client.log();
    let warned: Vec<&str> = log.lines().filter(|l| l.contains(" WARN ") && l.contains("target")).collect();
    assert_eq!(warned.iter().filter(|l| l.contains("cannot reach target")).count(), 1, "{warned:#?}");
    let summary = warned.iter().find(|l| l.contains("more visitors' targets could not be reached")).expect("a summary line");
    assert!(summary.contains(&format!("count={}", VISITORS - 1)), "{summary}");
}

/// The root of `port=Some(22225) client=None`: a field recorded with `?` (its
/// Debug form). An optional field is recorded as the `Option` itself (tracing
/// leaves out `None` and records `Some(x)` as `x`), `opt.map(display)`, or
/// `opt.as_deref()`; every other field by value or with `%`. This keeps it so
/// in every log call of the daemon's source.
#[test]
fn no_log_call_records_a_field_in_its_debug_form() {
    let mut offenders = Vec::new();
    for file in rust_files(&repo_path("src")) {
        let source = std::fs::read_to_string(&file).expect("read source");
        for (line, call) in log_calls(&source) {
            if records_debug(&call) {
                offenders.push(format!("{}:{line}: {call}", file.display()));
            }
        }
    }
    assert!(offenders.is_empty(), "fields recorded with `?` (Debug):\n{}", offenders.join("\n"));
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// Each `trace!`/`debug!`/`info!`/`warn!`/`error!` call (with its line), its
/// string literals blanked.
fn log_calls(source: &str) -> Vec<(usize, String)> {
    let mut calls = Vec::new();
    for name in ["trace!(", "debug!(", "info!(", "warn!(", "error!("] {
        let mut from = 0;
        while let Some(at) = source[from..].find(name).map(|i| i + from) {
            from = at + name.len();
            let preceded = source[..at].chars().next_back();
            if preceded.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let (mut depth, mut in_string, mut escaped, mut call) = (1, false, false, String::new());
            for c in source[from..].chars() {
                match (in_string, escaped, c) {
                    (true, true, _) => escaped = false,
                    (true, false, '\\') => escaped = true,
                    (true, false, '"') => in_string = false,
                    (true, false, _) => {}
                    (false, _, '"') => {
                        in_string = true;
                        call.push_str("\"\"");
                    }
                    (false, _, '(') => depth += 1,
                    (false, _, ')') => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    break;
                }
                if !in_string && c != '"' {
                    call.push(c);
                }
            }
            calls.push((source[..at].lines().count(), call.split_whitespace().collect::<Vec<_>>().join(" ")));
        }
    }
    calls
}

/// `name = ?value` or a bare `?name` among the call's fields.
fn records_debug(call: &str) -> bool {
    call.split(',').any(|part| {
        let part = part.trim();
        part.starts_with('?') || part.split_once('=').is_some_and(|(_, value)| value.trim_start().starts_with('?'))
    })
}
