//! A direct UDP session's path to its target (issue 22, direct UDP toward
//! loopback's rate): what any change to make it faster must keep. Three levers
//! were tried first and none kept (the receive loop sending past the queue,
//! `sendmmsg` batches alone, the receive loop on a thread of its own); what
//! is kept reads the mapping's socket with `recvmmsg` and sends a session's
//! queued trains with UDP GSO (bench/README.md, "UDP", "Direct UDP in
//! batches"; tests/udp_batch.rs). These tests hold, whichever way a datagram
//! goes: order, exact counts (the mapping's and the session's own), nothing
//! lost unaccounted or duplicated, the idle end, and the mapping's bound on
//! queued bytes once sessions end with datagrams still queued (that one
//! failed before: the bound shrank for good by what each such session held).
//!
//! A target that stops reading does not make a sender block on loopback (the
//! kernel drops at the target's full buffer, and the sender never waits), so
//! a mix of queued and unqueued sends is made with a cap lifted while
//! datagrams wait behind it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::udp::*;
use common::*;
use serde_json::{json, Value};

const SECRET: &str = "udp-fast-path-secret-0123456789";

fn create_udp(server: &Daemon, port: u16, target: SocketAddr, extra: Value) {
    let mut body = json!({"source_port": port, "protocol": "udp", "target_host": "127.0.0.1", "target_port": target.port()});
    if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
        body.extend(extra.clone());
    }
    let (status, created) = post(server, "/api/mapping/create", body);
    assert_eq!(status, 200, "{created}");
}

/// The sequence numbers (each datagram's first 4 bytes) in arrival order,
/// and the payload bytes, once `n` datagrams have arrived at `target`.
fn sequence_after(target: &Recorder, n: usize) -> (Vec<u32>, u64) {
    let got = target.after(n, Duration::from_secs(20));
    let seqs = got.iter().map(|(_, d)| u32::from_be_bytes([d[0], d[1], d[2], d[3]])).collect();
    (seqs, got.iter().map(|(_, d)| d.len() as u64).sum())
}

/// Datagram `seq` of `len` bytes: the number, then filler.
fn numbered(seq: u32, len: usize) -> Vec<u8> {
    let mut d = vec![(seq % 251) as u8; len];
    d[..4].copy_from_slice(&seq.to_be_bytes());
    d
}

/// The open session's bytes toward the target, as `/api/connections` has it.
fn session_bytes_sent(server: &Daemon, port: u16) -> u64 {
    let open = get_data(server, &format!("/api/connections?port={port}&protocol=udp"));
    assert_eq!(open["count"], 1, "one session: {open}");
    open["connections"][0]["bytes_sent"].as_u64().expect("bytes_sent")
}

#[test]
fn a_burst_reaches_the_target_in_order_each_datagram_once_and_counted_exactly() {
    let server = Daemon::server(SECRET, &[]);
    let target = Recorder::start();
    let port = free_port();
    create_udp(&server, port, target.addr, json!({}));
    let v = visitor(2);
    const N: u32 = 5000;
    const LEN: usize = 700;
    for seq in 0..N {
        v.send_to(&numbered(seq, LEN), loopback(port)).expect("send");
        if seq % 50 == 0 {
            // A breath now and then, so the burst fits the mapping's receive buffer.
            std::thread::sleep(Duration::from_micros(500));
        }
    }
    let sent = || udp_metric(&server, "tunneld_mapping_datagrams_total", port, &[("direction", "sent")]);
    // Done when the daemon's count stops moving and the target has caught up with it.
    let forwarded = wait_for("the burst to be forwarded", Duration::from_secs(20), || {
        let before = sent();
        std::thread::sleep(Duration::from_millis(300));
        let after = sent();
        (before == after && target.count() as f64 >= after).then_some(after)
    });
    let dropped = udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "queue_full")]);
    let (seqs, bytes) = sequence_after(&target, forwarded as usize);
    assert_eq!(seqs.len() as f64, forwarded, "every datagram counted as sent reached the target, and no other");
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order, none twice: {:?}", &seqs[..seqs.len().min(50)]);
    assert!(seqs.len() as f64 + dropped <= f64::from(N));
    assert!(seqs.len() >= N as usize * 9 / 10, "most of a paced burst gets through: {} of {N}", seqs.len());
    assert_eq!(udp_metric(&server, "tunneld_mapping_bytes_total", port, &[("direction", "sent")]) as u64, bytes);
    assert_eq!(session_bytes_sent(&server, port), bytes, "the session's own count is the mapping's");
    assert_eq!(udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]), 1.0);
}

#[test]
fn datagrams_queued_behind_a_cap_keep_their_order_when_the_cap_is_lifted() {
    let server = Daemon::server(SECRET, &[]);
    let target = Recorder::start();
    let port = free_port();
    // 20,000 B/s: 40 datagrams of 1,000 bytes wait about 2 s behind the cap.
    create_udp(&server, port, target.addr, json!({"bandwidth_limit": 20_000}));
    let v = visitor(2);
    for seq in 0..40 {
        v.send_to(&numbered(seq, 1000), loopback(port)).expect("send");
    }
    wait_for("the first datagrams through the cap", Duration::from_secs(10), || (target.count() > 0).then_some(()));
    assert!(target.count() < 40, "the rest waits behind the cap");
    let (status, updated) = post(&server, "/api/mapping/update", json!({"port": port, "protocol": "udp", "bandwidth_limit": null}));
    assert_eq!(status, 200, "{updated}");
    // Sent while the queue still holds the first ones: these must wait their turn.
    for seq in 40..240 {
        v.send_to(&numbered(seq, 1000), loopback(port)).expect("send");
    }
    let (seqs, bytes) = sequence_after(&target, 240);
    assert_eq!(seqs, (0..240).collect::<Vec<u32>>(), "all of them, in the order sent, once");
    assert_eq!(bytes, 240_000);
    // Uncapped from now on, still in order.
    for seq in 240..1240 {
        v.send_to(&numbered(seq, 1000), loopback(port)).expect("send");
    }
    let (seqs, bytes) = sequence_after(&target, 1240);
    assert_eq!(seqs, (0..1240).collect::<Vec<u32>>());
    assert_eq!(bytes, 1_240_000);
    assert_eq!(udp_metric(&server, "tunneld_mapping_datagrams_total", port, &[("direction", "sent")]), 1240.0);
    assert_eq!(udp_metric(&server, "tunneld_mapping_bytes_total", port, &[("direction", "sent")]), 1_240_000.0);
    assert_eq!(session_bytes_sent(&server, port), 1_240_000);
    assert_eq!(udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "queue_full")]), 0.0);
}

#[test]
fn a_session_stays_open_while_one_way_datagrams_flow_and_ends_when_they_stop() {
    let (_dir, path) = config_file("[server]\nudp_session_idle_secs = 1\n");
    let server = Daemon::server(SECRET, &["--config", &path]);
    let target = Recorder::start();
    let port = free_port();
    create_udp(&server, port, target.addr, json!({}));
    let v = visitor(2);
    // Three idle periods of datagrams one way (the target never answers).
    let started = std::time::Instant::now();
    let mut seq = 0;
    while started.elapsed() < Duration::from_millis(3000) {
        v.send_to(&numbered(seq, 100), loopback(port)).expect("send");
        seq += 1;
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            udp_metric(&server, "tunneld_mapping_connections_total", port, &[]),
            1.0,
            "the session did not end and reopen while datagrams came (after {seq})"
        );
    }
    assert_eq!(udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]), 1.0);
    wait_for("the idle session to end", Duration::from_secs(10), || {
        (udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]) == 0.0).then_some(())
    });
    let logged = wait_for("the ended session in the connection log", Duration::from_secs(10), || {
        let log = get_data(&server, &format!("/api/connections/log?port={port}&protocol=udp"));
        (log["count"] == 1).then_some(log)
    });
    assert_eq!(logged["connections"][0]["end"], "idle_timeout", "{logged}");
    assert_eq!(logged["connections"][0]["bytes_sent"], u64::from(seq) * 100, "{logged}");
    assert_eq!(sequence_after(&target, seq as usize).0, (0..seq).collect::<Vec<u32>>());
}

#[test]
fn datagrams_left_queued_when_sessions_end_give_back_the_mapping_queue_bound() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    // 1,000 B/s: two visitors' floods fill the mapping's 4 MiB of queued bytes.
    create_udp(&server, port, udp_echo(), json!({"bandwidth_limit": 1000}));
    let visitors = [visitor(2), visitor(3)];
    for i in 0..2200u32 {
        for v in &visitors {
            v.send_to(&numbered(i, 1100), loopback(port)).expect("send");
        }
        std::thread::sleep(Duration::from_micros(30));
    }
    wait_for("the mapping's queue bound to be reached", Duration::from_secs(10), || {
        let full = udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "queue_full")]);
        (full > 0.0).then_some(())
    });
    let open = get_data(&server, &format!("/api/connections?port={port}&protocol=udp"));
    for c in open["connections"].as_array().expect("connections") {
        let (status, closed) = post(&server, "/api/connection/close", json!({"id": c["id"]}));
        assert_eq!(status, 200, "{closed}");
    }
    wait_for("both sessions to end", Duration::from_secs(15), || {
        (udp_metric(&server, "tunneld_mapping_udp_sessions", port, &[]) == 0.0).then_some(())
    });
    let (status, updated) = post(&server, "/api/mapping/update", json!({"port": port, "protocol": "udp", "bandwidth_limit": null}));
    assert_eq!(status, 200, "{updated}");
    // What the ended sessions held is no longer counted against the bound:
    // a new visitor's large datagram is queued, sent and answered.
    let payload = numbered(7, 30_000);
    let dropped_before = udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "queue_full")]);
    let reply = exchange(&visitor(4), port, &payload, Duration::from_secs(5));
    let dropped_after = udp_metric(&server, "tunneld_mapping_dropped_datagrams_total", port, &[("reason", "queue_full")]);
    assert_eq!(dropped_after, dropped_before, "the new visitor's datagram was not dropped as queue_full");
    assert_eq!(reply, Some(payload));
}
