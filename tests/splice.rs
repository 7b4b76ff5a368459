//! Issue 24 §1: a direct mapping's bytes are spliced in the kernel
//! (socket → pipe → socket) and still counted exactly, live, paced by the
//! mapping's cap, half-closed and reset as the copy path does; `/metrics`
//! says which path the relay took; pipes exist only while bytes move.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "splice-test-secret";
/// Bytes each way in the large transfers.
const LARGE: usize = 50 * 1024 * 1024;

/// Waits until the connection log holds a connection of `port`; returns it.
fn logged_end(server: &Daemon, port: u16) -> Value {
    wait_for(&format!("a logged connection of :{port}"), Duration::from_secs(15), || {
        get_data(server, &format!("/api/connections/log?port={port}"))["connections"].as_array()?.first().cloned()
    })
}

/// Reads exactly `len` bytes.
fn read_len(conn: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    conn.read_exact(&mut buf).unwrap_or_else(|e| panic!("reading {len} bytes: {e}"));
    buf
}

/// Waits until the open connection's live counts are exactly `(sent,
/// received)`, asserting on every look that they never ran ahead of what the
/// other side had been handed.
fn wait_for_live_counts(server: &Daemon, port: u16, sent: u64, received: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let conn = open_connection(server, port).expect("the connection is open");
        let now = (conn["bytes_sent"].as_u64().unwrap(), conn["bytes_received"].as_u64().unwrap());
        assert!(now.0 <= sent && now.1 <= received, "counted ahead of the bytes delivered: {conn}, expected {sent}/{received}");
        if now == (sent, received) {
            return;
        }
        assert!(Instant::now() < deadline, "live counts never reached {sent}/{received}: {conn}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 50 MB each way, random bytes, through a direct mapping: they arrive intact,
/// the live per-connection counts are exact midway, and the mapping's
/// counters, `/metrics` and the connection log agree to the byte after.
fn large_transfer(server: &Daemon) -> u16 {
    let up = noise(LARGE, 1);
    let down = noise(LARGE, 2);
    let half = LARGE / 2;
    // The target reads the upload in two halves (reporting each), sending the
    // download's halves when told.
    let (got, got_rx) = mpsc::channel::<Vec<u8>>();
    let (go, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Arc::new(std::sync::Mutex::new(go_rx));
    let target = {
        let down = down.clone();
        spawn_target(move |mut conn| {
            let go = go_rx.lock().unwrap();
            for part in [&down[..half], &down[half..]] {
                got.send(read_len(&mut conn, half)).unwrap();
                go.recv().unwrap();
                conn.write_all(part).unwrap();
            }
            let mut rest = Vec::new();
            conn.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "nothing after the upload");
        })
    };
    let port = create_mapping_with(server, target, false, json!({}));
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    for (i, part) in [&up[..half], &up[half..]].into_iter().enumerate() {
        visitor.write_all(part).unwrap();
        let arrived = got_rx.recv_timeout(Duration::from_secs(60)).expect("the target read the upload");
        assert!(arrived == part, "upload part {i} arrived altered");
        // Everything the target read is counted; the download has not begun.
        let sent = ((i + 1) * half) as u64;
        wait_for_live_counts(server, port, sent, (i * half) as u64);
        go.send(()).unwrap();
        let back = read_len(&mut visitor, half);
        assert!(back == down[i * half..(i + 1) * half], "download part {i} arrived altered");
        wait_for_live_counts(server, port, sent, sent);
    }
    visitor.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    visitor.read_to_end(&mut rest).expect("a clean end");
    assert!(rest.is_empty());

    let row = logged_end(server, port);
    assert_eq!(
        (row["end"].as_str(), row["bytes_sent"].as_u64(), row["bytes_received"].as_u64()),
        (Some("closed"), Some(LARGE as u64), Some(LARGE as u64)),
        "{row}"
    );
    let traffic = traffic_entry(server, port).expect("traffic entry");
    assert_eq!((traffic["bytes_sent"].as_u64(), traffic["bytes_received"].as_u64()), (Some(LARGE as u64), Some(LARGE as u64)), "{traffic}");
    let text = metrics_text(server);
    for direction in ["sent", "received"] {
        let counted = metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &port.to_string()), ("direction", direction)]);
        assert_eq!(counted, Some(LARGE as f64), "{direction}");
    }
    port
}

#[test]
fn large_transfers_are_spliced_intact_and_counted_exactly() {
    let server = Daemon::server(SECRET, &[]);
    let port = large_transfer(&server);
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0), "the connection was relayed by splice");
}

/// The copy path stays for where splice cannot serve; `TUNNELD_FORCE_COPY=1`
/// (for benchmarks) takes it, and it counts the same.
#[test]
fn the_copy_path_still_serves_and_metrics_say_so() {
    let server = Daemon::server_env(SECRET, &[], &[("TUNNELD_FORCE_COPY", "1")]);
    let port = large_transfer(&server);
    assert_eq!(relayed_paths(&server, port), (0.0, 1.0), "the connection was relayed by copying");
}

/// A FIN one way keeps the other way flowing, both ways round, and the
/// connection ends `closed` with every byte counted.
#[test]
fn half_close_either_way_keeps_the_other_way_flowing() {
    let server = Daemon::server(SECRET, &[]);
    const REPLY: usize = 5 * 1024 * 1024;
    // The visitor closes first: the target reads to the end, then answers.
    let answers_after_eof = spawn_target(|mut conn| {
        let mut request = Vec::new();
        conn.read_to_end(&mut request).unwrap();
        conn.write_all(&noise(REPLY, request.len() as u64)).unwrap();
    });
    let port = create_mapping_with(&server, answers_after_eof, false, json!({}));
    let request = noise(300_000, 3);
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    visitor.write_all(&request).unwrap();
    visitor.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    visitor.read_to_end(&mut reply).expect("the reply after the visitor's FIN");
    assert!(reply == noise(REPLY, request.len() as u64), "the reply arrived whole ({} bytes)", reply.len());
    let row = logged_end(&server, port);
    assert_eq!(
        (row["end"].as_str(), row["bytes_sent"].as_u64(), row["bytes_received"].as_u64()),
        (Some("closed"), Some(300_000), Some(REPLY as u64)),
        "{row}"
    );

    // The target closes first: it sends, half-closes, then reads the
    // visitor's whole answer and says how long it was.
    let (lengths, lengths_rx) = mpsc::channel::<usize>();
    let closes_first = spawn_target(move |mut conn| {
        conn.write_all(&noise(REPLY, 4)).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).unwrap();
        assert!(answer == noise(REPLY, 5), "the visitor's answer arrived altered");
        lengths.send(answer.len()).unwrap();
    });
    let port = create_mapping_with(&server, closes_first, false, json!({}));
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut first = Vec::new();
    visitor.read_to_end(&mut first).expect("the target's bytes, then its FIN");
    assert!(first == noise(REPLY, 4), "the target's bytes arrived whole ({} bytes)", first.len());
    visitor.write_all(&noise(REPLY, 5)).expect("the visitor still sends after the target's FIN");
    visitor.shutdown(Shutdown::Write).unwrap();
    assert_eq!(lengths_rx.recv_timeout(Duration::from_secs(30)).unwrap(), REPLY);
    let row = logged_end(&server, port);
    assert_eq!(
        (row["end"].as_str(), row["bytes_sent"].as_u64(), row["bytes_received"].as_u64()),
        (Some("closed"), Some(REPLY as u64), Some(REPLY as u64)),
        "{row}"
    );
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0));
}

/// A reset instead of a FIN when `stream` is dropped.
fn reset_on_drop(stream: &TcpStream) {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
}

/// A reset mid-transfer, from the target and from the visitor, ends the
/// connection with the right reason in the log, and the other side gets a
/// reset, not a clean end.
#[test]
fn resets_mid_transfer_are_told_apart() {
    let server = Daemon::server(SECRET, &[]);
    // The target takes 1 MB of an endless upload, then resets.
    let resets = spawn_target(|mut conn| {
        read_len(&mut conn, 1024 * 1024);
        reset_on_drop(&conn);
    });
    let port = create_mapping_with(&server, resets, false, json!({}));
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    visitor.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    let chunk = noise(64 * 1024, 6);
    let cut = loop {
        if let Err(e) = visitor.write_all(&chunk) {
            break e;
        }
    };
    assert!(matches!(cut.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe), "{cut}");
    let row = logged_end(&server, port);
    assert_eq!(row["end"], "target_reset", "{row}");
    assert!(row["bytes_sent"].as_u64().unwrap() >= 1024 * 1024, "{row}");

    // The target sends endlessly; the visitor takes 1 MB and resets.
    let (ended, ended_rx) = mpsc::channel::<std::io::Error>();
    let endless = spawn_target(move |mut conn| {
        let chunk = noise(64 * 1024, 7);
        let e = loop {
            if let Err(e) = conn.write_all(&chunk) {
                break e;
            }
        };
        let _ = ended.send(e);
    });
    let port = create_mapping_with(&server, endless, false, json!({}));
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    read_len(&mut visitor, 1024 * 1024);
    reset_on_drop(&visitor);
    drop(visitor);
    let e = ended_rx.recv_timeout(Duration::from_secs(15)).expect("the target's writes fail");
    assert!(matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe), "the target gets a reset: {e}");
    let row = logged_end(&server, port);
    assert_eq!(row["end"], "visitor_reset", "{row}");
    assert!(row["bytes_received"].as_u64().unwrap() >= 1024 * 1024, "{row}");
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0));
}

/// A `bandwidth_limit` paces the splices: sampled while a download runs, the
/// live count never gets ahead of the cap (plus one burst), and the whole
/// download is counted exactly.
#[test]
fn a_bandwidth_limit_paces_the_splices() {
    const CAP: f64 = 1_000_000.0;
    const BURST: f64 = CAP / 10.0;
    const DOWNLOAD: usize = 2_000_000;
    let server = Daemon::server(SECRET, &[]);
    let target = spawn_target(|mut conn| {
        let _ = conn.write_all(&noise(DOWNLOAD, 8));
    });
    let port = create_mapping_with(&server, target, false, json!({"bandwidth_limit": CAP as u64}));
    let start = Instant::now();
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let reader = std::thread::spawn(move || {
        let mut body = Vec::new();
        visitor.read_to_end(&mut body).expect("the download");
        (body, start.elapsed())
    });
    let mut samples = Vec::new();
    while !reader.is_finished() {
        if let Some(conn) = open_connection(&server, port) {
            let elapsed = start.elapsed().as_secs_f64();
            let counted = conn["bytes_received"].as_u64().unwrap() as f64;
            // A generous bound: twice the cap, plus the first burst.
            assert!(counted <= 2.0 * CAP * elapsed + BURST, "{counted} B counted after {elapsed:.2} s under a {CAP} B/s cap");
            samples.push(counted);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (body, took) = reader.join().unwrap();
    assert!(body == noise(DOWNLOAD, 8), "the download arrived whole ({} bytes)", body.len());
    let fastest = Duration::from_secs_f64((DOWNLOAD as f64 - BURST) / (2.0 * CAP));
    assert!(took >= fastest, "{DOWNLOAD} B in {took:?}: faster than twice the cap");
    assert!(samples.len() >= 5, "the download was sampled while it ran: {samples:?}");
    assert!(samples.windows(2).all(|w| w[0] <= w[1]), "live counts only grow: {samples:?}");
    let row = logged_end(&server, port);
    assert_eq!(row["bytes_received"], DOWNLOAD as u64, "{row}");
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0));
}

/// Pipes are taken only while bytes move and given back when a direction
/// runs dry: twenty idle connections that each moved bytes hold their two
/// sockets each and no pipe of their own (the pool keeps a few at most).
#[test]
fn idle_connections_hold_no_pipes() {
    let server = Daemon::server(SECRET, &[]);
    let port = create_mapping_with(&server, echo_server(), false, json!({}));
    let pipes = |d: &Daemon| -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", d.child.id()))
            .unwrap()
            .flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target.to_string_lossy().starts_with("pipe:")))
            .count()
    };
    let before = pipes(&server);
    let mut visitors = Vec::new();
    for i in 0..20 {
        let mut v = TcpStream::connect(loopback(port)).unwrap();
        v.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let payload = noise(200_000, 10 + i);
        v.write_all(&payload).unwrap();
        assert!(read_len(&mut v, payload.len()) == payload);
        visitors.push(v);
    }
    wait_for("20 open connections with their bytes", Duration::from_secs(10), || {
        let list = get_data(&server, &format!("/api/connections?port={port}"));
        let conns = list["connections"].as_array()?;
        (conns.len() == 20 && conns.iter().all(|c| c["bytes_received"] == 200_000)).then_some(())
    });
    let held = pipes(&server) - before;
    // Two descriptors a pipe; 20 connections splicing both ways would hold 80.
    // What is held is the pool's: the few pipes of the moments when one
    // connection's last burst overlapped the next one's first.
    assert!(held <= 16, "{held} pipe descriptors held by idle connections");
    assert_eq!(relayed_paths(&server, port), (20.0, 0.0));
}

/// Splice stops at TCP urgent data and cannot move past it; the relay reads
/// past it the plain way (skipping the urgent byte, as a user-space relay
/// always did), so the bytes around it are not stuck.
#[test]
fn urgent_data_does_not_stall_the_splice() {
    const TAIL: &[u8] = b"after the urgent byte";
    let server = Daemon::server(SECRET, &[]);
    let (got, got_rx) = mpsc::channel::<Vec<u8>>();
    // The target answers once it has everything but the urgent byte; the
    // visitor waits for that answer before it closes, so no FIN comes to help.
    let target = spawn_target(move |mut conn| {
        let all = read_len(&mut conn, 100_000 + TAIL.len());
        conn.write_all(b"ok").unwrap();
        got.send(all).unwrap();
    });
    let port = create_mapping_with(&server, target, false, json!({}));
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    visitor.write_all(&noise(100_000, 11)).unwrap();
    socket2::SockRef::from(&visitor).send_out_of_band(b"!").unwrap();
    visitor.write_all(TAIL).unwrap();
    assert_eq!(read_len(&mut visitor, 2), b"ok", "the target's answer");
    let all = got_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let mut expected = noise(100_000, 11);
    expected.extend_from_slice(TAIL);
    assert!(all == expected, "the bytes around the urgent byte arrived altered");
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0));
}
