//! `tunneld ctl` against a hostile fake API (issue 18, item 7): an answer too
//! large to hold, terminal escape sequences in every text field, and a refusal
//! whose body is no envelope. `ctl` must stay bounded, print nothing a terminal
//! would act on, and always say what went wrong.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::BIN;

/// What the fake API answers to every request.
#[derive(Clone)]
enum Answer {
    /// `200` with this JSON body.
    Json(String),
    /// `status` with a body of `len` bytes of `fill` (no envelope).
    Raw { status: u16, len: u64, fill: u8 },
}

/// A fake API on a loopback port that gives `answer` to every request; returns
/// its address and the number of body bytes it managed to write.
fn fake_api(answer: Answer) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let (answer, counter) = (answer.clone(), counter.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                    line.clear();
                }
                let mut conn = conn;
                let (status, len, fill, json) = match &answer {
                    Answer::Json(body) => (200, body.len() as u64, 0, Some(body.clone())),
                    Answer::Raw { status, len, fill } => (*status, *len, *fill, None),
                };
                let head = format!(
                    "HTTP/1.1 {status} Whatever\r\nContent-Type: application/json\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                );
                if conn.write_all(head.as_bytes()).is_err() {
                    return;
                }
                if let Some(body) = json {
                    let _ = conn.write_all(body.as_bytes());
                    counter.fetch_add(len, Ordering::Relaxed);
                    return;
                }
                let chunk = vec![fill; 1 << 20];
                let mut left = len;
                while left > 0 {
                    let n = left.min(chunk.len() as u64);
                    if conn.write_all(&chunk[..n as usize]).is_err() {
                        return;
                    }
                    counter.fetch_add(n, Ordering::Relaxed);
                    left -= n;
                }
            });
        }
    });
    (addr, written)
}

fn ctl(api: SocketAddr, args: &[&str]) -> Output {
    let config = tempfile::NamedTempFile::new().unwrap();
    Command::new(BIN)
        .arg("ctl")
        .arg("--api")
        .arg(format!("http://{api}"))
        .arg("--config")
        .arg(config.path())
        .args(args)
        .env_remove("TUNNELD_API__TOKEN")
        .output()
        .expect("run tunneld ctl")
}

/// Bytes a terminal acts on: C0 controls but newline, DEL, and the C1 range, plus
/// bidi overrides that reorder what is shown.
fn terminal_controls(out: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(out);
    text.chars()
        .filter(|&c| {
            (c.is_control() && c != '\n') || matches!(c, '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
        })
        .map(|c| format!("{:?}", c))
        .collect()
}

/// Every text field a hostile API could fill with escapes: set-title, OSC 52
/// clipboard write, clear screen, a carriage-return fake line, a bidi override.
const EVIL: &str = "x\u{1b}]0;pwned\u{7}\u{1b}]52;c;cm0gLXJmIH4=\u{7}\u{1b}[2J\rFAKE LINE\u{202E}\u{9b}";

#[test]
fn ctl_list_events_and_clients_print_no_terminal_controls() {
    let evil = serde_json::to_string(EVIL).unwrap();
    let evil_status = serde_json::to_string(&format!("error: {EVIL}")).unwrap();
    let mapping = format!(
        r#"{{"source_port":2222,"target_host":{evil},"target_port":22,"use_tunnel":true,"client":{evil},"created_at":0,"description":{evil},
            "bandwidth_limit":null,"quota":null,"allow":[],"deny":[],"status":{evil_status},
            "health":"target_failing","health_reason":{evil}}}"#
    );
    let cases = [
        (vec!["list"], format!(r#"{{"success":true,"message":"ok","data":{{"mappings":[{mapping}],"count":1}}}}"#)),
        (
            vec!["events"],
            format!(
                r#"{{"success":true,"message":"ok","data":{{"events":[{{"time":0,"kind":{evil},"port":1,"client":{evil},"message":{evil}}}],"count":1}}}}"#
            ),
        ),
        (
            vec!["client", "list"],
            format!(
                r#"{{"success":true,"message":"ok","data":{{"clients":[{{"name":{evil},"connected":false,"peer":null,"connected_since":null,
                "bytes_sent":0,"bytes_received":0,"last_update":null,"mappings":0}}],"count":1}}}}"#
            ),
        ),
    ];
    for (args, body) in cases {
        let (api, _) = fake_api(Answer::Json(body));
        let out = ctl(api, &args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            terminal_controls(&out.stdout).is_empty(),
            "{args:?} printed {:?}:\n{}",
            terminal_controls(&out.stdout),
            String::from_utf8_lossy(&out.stdout)
        );
        let shown = String::from_utf8_lossy(&out.stdout);
        assert!(shown.contains(r"\u{1b}]0;pwned"), "the escape is shown as text, not dropped: {shown}");
    }
    // A refusal's message goes to stderr, as printable as the rest.
    let (api, _) = fake_api(Answer::Json(format!(r#"{{"success":false,"message":{evil}}}"#)));
    let out = ctl(api, &["list"]);
    assert!(!out.status.success());
    assert!(terminal_controls(&out.stderr).is_empty(), "stderr printed {:?}", terminal_controls(&out.stderr));
}

#[test]
fn ctl_stops_reading_an_answer_too_large_to_be_real() {
    // 200 MB of digits inside a JSON array would take a naive reader to gigabytes.
    const HUGE: u64 = 200 << 20;
    let (api, written) = fake_api(Answer::Raw { status: 200, len: HUGE, fill: b'1' });
    let out = ctl(api, &["list"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("larger than 16 MiB"), "{stderr}");
    // The server could write at most the bound plus what the socket buffers hold.
    let sent = written.load(Ordering::Relaxed);
    assert!(sent < 64 << 20, "ctl read {} MiB of a 200 MiB answer", sent >> 20);
}

#[test]
fn ctl_always_says_why_a_request_failed() {
    // A 500 whose body is 20 MB of HTML: no envelope, and more than any reader keeps.
    let (api, _) = fake_api(Answer::Raw { status: 500, len: 20 << 20, fill: b'<' });
    let out = ctl(api, &["list"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("ctl:  ("), "an empty message: {stderr}");
    assert!(stderr.contains("HTTP 500") && stderr.contains("<<<"), "{stderr}");
    assert!(stderr.len() < 2_000, "the message is bounded: {} bytes", stderr.len());
    // An empty 502: still a sentence.
    let (api, _) = fake_api(Answer::Raw { status: 502, len: 0, fill: b' ' });
    let out = ctl(api, &["list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("without a message: 502"), "{stderr}");
}
