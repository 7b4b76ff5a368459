//! Issue 24 §2: on a plain tunnel (`tls = false` on both sides) each data
//! chunk's payload is spliced in the kernel on both ends (socket → pipe →
//! channel, channel → pipe → socket), with only its 4-byte header in user
//! space; the bytes still arrive intact, count exactly and live, are paced by
//! the mapping's cap, half-close and reset as before, and the pooled channel
//! carries the next visitor cleanly. `/metrics` says which path a tunneled
//! mapping took.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "tunnel-splice-secret";
/// Bytes each way in the large transfers.
const LARGE: usize = 32 * 1024 * 1024;
/// The largest chunk payload the tunnel carries.
const MAX_CHUNK: usize = 64 * 1024;

/// A plain-tunnel server (`server.tls = false`).
fn plain_server(envs: &[(&str, &str)]) -> Daemon {
    let mut all = vec![("TUNNELD_SERVER__TLS", "false")];
    all.extend_from_slice(envs);
    Daemon::server_env(SECRET, &[], &all)
}

/// A plain client (`client.tls = false`) of the tunnel at `tunnel`, connected.
fn plain_client(tunnel: SocketAddr, envs: &[(&str, &str)]) -> Daemon {
    let mut all = vec![("TUNNELD_CLIENT__TLS", "false")];
    all.extend_from_slice(envs);
    let client = Daemon::client_with_env(tunnel, SECRET, &[], &all);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    client
}

/// A plain-tunnel server and its connected plain client, both with `envs`.
fn plain_pair_with(envs: &[(&str, &str)]) -> (Daemon, Daemon) {
    let server = plain_server(envs);
    let client = plain_client(server.tunnel.unwrap(), envs);
    (server, client)
}

fn plain_pair() -> (Daemon, Daemon) {
    plain_pair_with(&[])
}

/// Waits until the connection log holds `n` connections of `port`; returns them, newest first.
fn logged(server: &Daemon, port: u16, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} logged connections of :{port}"), Duration::from_secs(15), || {
        let rows = get_data(server, &format!("/api/connections/log?port={port}"))["connections"].as_array()?.clone();
        (rows.len() >= n).then_some(rows)
    })
}

fn read_len(conn: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    conn.read_exact(&mut buf).unwrap_or_else(|e| panic!("reading {len} bytes: {e}"));
    buf
}

/// Waits until the open connection's live counts are exactly `(sent,
/// received)`, asserting on every look that they never ran ahead of what the
/// other side had been handed.
fn wait_for_live_counts(server: &Daemon, port: u16, sent: u64, received: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
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

/// The mapping's totals agree to the byte in the connection log (newest
/// connection), `/api/stats/traffic` and `/metrics`.
fn assert_counted(server: &Daemon, port: u16, row: &Value, sent: u64, received: u64, mapping_total: (u64, u64)) {
    assert_eq!(
        (row["end"].as_str(), row["bytes_sent"].as_u64(), row["bytes_received"].as_u64()),
        (Some("closed"), Some(sent), Some(received)),
        "{row}"
    );
    let traffic = traffic_entry(server, port).expect("traffic entry");
    assert_eq!(
        (traffic["bytes_sent"].as_u64(), traffic["bytes_received"].as_u64()),
        (Some(mapping_total.0), Some(mapping_total.1)),
        "{traffic}"
    );
    let text = metrics_text(server);
    for (direction, total) in [("sent", mapping_total.0), ("received", mapping_total.1)] {
        let counted = metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &port.to_string()), ("direction", direction)]);
        assert_eq!(counted, Some(total as f64), "{direction}");
    }
}

/// What the tunnel wire carried each way, as the server and as the client
/// count it: (server sent, client received, client sent, server received).
fn wire_counts(server: &Daemon, client: &Daemon) -> (f64, f64, f64, f64) {
    let (s, c) = (metrics_text(server), metrics_text(client));
    let of = |text: &str, direction| metric_value(text, "tunneld_tunnel_bytes_total", &[("direction", direction)]).unwrap_or(0.0);
    (of(&s, "sent"), of(&c, "received"), of(&c, "sent"), of(&s, "received"))
}

/// 32 MB each way, random bytes, through a plain tunnel: they arrive intact,
/// the live counts are exact midway, the mapping's counters agree to the byte
/// after, and both ends counted the same wire bytes (payload plus headers).
#[test]
fn large_transfers_through_a_plain_tunnel_are_spliced_intact_and_counted_exactly() {
    let (server, client) = plain_pair();
    let up = noise(LARGE, 1);
    let down = noise(LARGE, 2);
    let half = LARGE / 2;
    let (got, got_rx) = mpsc::channel::<Vec<u8>>();
    let (go, go_rx) = mpsc::channel::<()>();
    let go_rx = Arc::new(Mutex::new(go_rx));
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
    let port = create_mapping_with(&server, target, true, json!({}));
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    for (i, part) in [&up[..half], &up[half..]].into_iter().enumerate() {
        visitor.write_all(part).unwrap();
        let arrived = got_rx.recv_timeout(Duration::from_secs(60)).expect("the target read the upload");
        assert!(arrived == part, "upload part {i} arrived altered");
        let sent = ((i + 1) * half) as u64;
        wait_for_live_counts(&server, port, sent, (i * half) as u64);
        go.send(()).unwrap();
        let back = read_len(&mut visitor, half);
        assert!(back == down[i * half..(i + 1) * half], "download part {i} arrived altered");
        wait_for_live_counts(&server, port, sent, sent);
    }
    visitor.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    visitor.read_to_end(&mut rest).expect("a clean end");
    assert!(rest.is_empty());
    let row = &logged(&server, port, 1)[0];
    assert_counted(&server, port, row, LARGE as u64, LARGE as u64, (LARGE as u64, LARGE as u64));
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0), "the tunneled connection was spliced");

    // The wire: every payload byte and at least a header per 64 KiB, counted
    // alike by the end that sent it and the end that received it.
    let least = (LARGE + LARGE / MAX_CHUNK * 4) as f64;
    let wire = wait_for("both ends to count the same wire bytes", Duration::from_secs(10), || {
        let w = wire_counts(&server, &client);
        (w.0 == w.1 && w.2 == w.3).then_some(w)
    });
    assert!(wire.0 >= least && wire.2 >= least, "wire bytes {wire:?}, expected at least {least} each way");
    // Headers and frames only: far less than the payload's 1/1000 on top of it.
    assert!(wire.0 < least * 1.001 + 100_000.0 && wire.2 < least * 1.001 + 100_000.0, "wire bytes {wire:?}");
}

/// Many small writes (a byte to a few KiB, 3,000 of them) echoed back: every
/// byte in order, counted exactly.
#[test]
fn many_small_writes_arrive_in_order_and_count_exactly() {
    let (server, _client) = plain_pair();
    let port = create_mapping_with(&server, echo_server(), true, json!({}));
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    visitor.set_nodelay(true).unwrap();
    let all = noise(4 * 1024 * 1024, 3);
    let mut reader = visitor.try_clone().unwrap();
    let expected_len = {
        let mut sizes = Vec::new();
        let mut at = 0usize;
        for i in 0..3000usize {
            let size = 1 + (i * 7919) % 2500;
            sizes.push(at..at + size);
            at += size;
        }
        let total = at;
        let writes = std::thread::spawn({
            let all = all.clone();
            move || {
                for range in sizes {
                    visitor.write_all(&all[range]).unwrap();
                }
                visitor.shutdown(Shutdown::Write).unwrap();
            }
        });
        let mut back = Vec::new();
        reader.read_to_end(&mut back).expect("the echo, then a clean end");
        writes.join().unwrap();
        assert!(back == all[..total], "the echo arrived altered ({} of {total} bytes)", back.len());
        total as u64
    };
    let row = &logged(&server, port, 1)[0];
    assert_counted(&server, port, row, expected_len, expected_len, (expected_len, expected_len));
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0));
}

/// Sizes around the 64 KiB chunk and the 256 KiB pipe, each its own visitor
/// on the pooled channels, echoed whole: no byte lost or added at a boundary.
#[test]
fn chunk_boundary_sizes_arrive_whole() {
    let (server, _client) = plain_pair();
    let port = create_mapping_with(&server, echo_server(), true, json!({}));
    let sizes = [1, 4, 65_531, 65_532, 65_535, 65_536, 65_537, 131_072, 131_076, 262_144, 262_145, 1_048_577];
    let mut total = 0u64;
    for (i, size) in sizes.into_iter().enumerate() {
        let payload = noise(size, 100 + i as u64);
        let back = roundtrip(loopback(port), &payload);
        assert_eq!(back.len(), size, "size {size}");
        assert!(back == payload, "size {size}: the echo arrived altered");
        total += size as u64;
        let row = &logged(&server, port, i + 1)[0];
        assert_counted(&server, port, row, size as u64, size as u64, (total, total));
    }
    assert_eq!(relayed_paths(&server, port), (sizes.len() as f64, 0.0));
}

/// A FIN one way keeps the other way flowing, both ways round, through the
/// spliced tunnel; the connection ends `closed` with every byte counted.
#[test]
fn half_close_either_way_keeps_the_other_way_flowing() {
    let (server, _client) = plain_pair();
    const REPLY: usize = 5 * 1024 * 1024;
    let answers_after_eof = spawn_target(|mut conn| {
        let mut request = Vec::new();
        conn.read_to_end(&mut request).unwrap();
        conn.write_all(&noise(REPLY, request.len() as u64)).unwrap();
    });
    let port = create_mapping_with(&server, answers_after_eof, true, json!({}));
    let request = noise(300_000, 3);
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    visitor.write_all(&request).unwrap();
    visitor.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    visitor.read_to_end(&mut reply).expect("the reply after the visitor's FIN");
    assert!(reply == noise(REPLY, request.len() as u64), "the reply arrived whole ({} bytes)", reply.len());
    let row = &logged(&server, port, 1)[0];
    assert_counted(&server, port, row, 300_000, REPLY as u64, (300_000, REPLY as u64));

    let (lengths, lengths_rx) = mpsc::channel::<usize>();
    let closes_first = spawn_target(move |mut conn| {
        conn.write_all(&noise(REPLY, 4)).unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).unwrap();
        assert!(answer == noise(REPLY, 5), "the visitor's answer arrived altered");
        lengths.send(answer.len()).unwrap();
    });
    let port = create_mapping_with(&server, closes_first, true, json!({}));
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut first = Vec::new();
    visitor.read_to_end(&mut first).expect("the target's bytes, then its FIN");
    assert!(first == noise(REPLY, 4), "the target's bytes arrived whole ({} bytes)", first.len());
    visitor.write_all(&noise(REPLY, 5)).expect("the visitor still sends after the target's FIN");
    visitor.shutdown(Shutdown::Write).unwrap();
    assert_eq!(lengths_rx.recv_timeout(Duration::from_secs(30)).unwrap(), REPLY);
    let row = &logged(&server, port, 1)[0];
    assert_counted(&server, port, row, REPLY as u64, REPLY as u64, (REPLY as u64, REPLY as u64));
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0));
}

fn reset_on_drop(stream: &TcpStream) {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
}

/// A reset mid-transfer from the target and from the visitor crosses the
/// spliced tunnel as a reset (never a clean end), with the right reason logged.
#[test]
fn resets_mid_transfer_cross_the_tunnel_either_way() {
    let (server, _client) = plain_pair();
    let resets = spawn_target(|mut conn| {
        read_len(&mut conn, 1024 * 1024);
        reset_on_drop(&conn);
    });
    let port = create_mapping_with(&server, resets, true, json!({}));
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
    let row = &logged(&server, port, 1)[0];
    assert_eq!(row["end"], "target_reset", "{row}");
    assert!(row["bytes_sent"].as_u64().unwrap() >= 1024 * 1024, "{row}");

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
    let port = create_mapping_with(&server, endless, true, json!({}));
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    read_len(&mut visitor, 1024 * 1024);
    reset_on_drop(&visitor);
    drop(visitor);
    let e = ended_rx.recv_timeout(Duration::from_secs(15)).expect("the target's writes fail");
    assert!(matches!(e.kind(), ErrorKind::ConnectionReset | ErrorKind::BrokenPipe), "the target gets a reset: {e}");
    let row = &logged(&server, port, 1)[0];
    assert_eq!(row["end"], "visitor_reset", "{row}");
    assert!(row["bytes_received"].as_u64().unwrap() >= 1024 * 1024, "{row}");
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0));
}

/// A TCP proxy in front of `to` that counts the connections it accepted.
fn counting_proxy(to: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let Ok(upstream) = TcpStream::connect(to) else { continue };
            for (mut from, mut into) in [(conn.try_clone().unwrap(), upstream.try_clone().unwrap()), (upstream, conn)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(Shutdown::Write);
                });
            }
        }
    });
    (addr, accepted)
}

/// With one pooled channel, visitors in turn — a bulk one, a reset one, a
/// small one — ride the channels the previous ones handed back, and each
/// gets exactly its own bytes: a spliced exchange leaves nothing of itself
/// (no header or payload byte too many or too few) in a reused channel.
#[test]
fn a_reused_pooled_channel_carries_the_next_visitor_cleanly() {
    let server = plain_server(&[]);
    let (proxy, accepted) = counting_proxy(server.tunnel.unwrap());
    let _client = plain_client(proxy, &[("TUNNELD_CLIENT__POOL_SIZE", "1")]);
    let echo = create_mapping_with(&server, echo_server(), true, json!({}));
    const ROUNDS: usize = 30;
    let mut total = 0u64;
    for round in 0..ROUNDS {
        let payload = noise(if round % 3 == 0 { 700_001 } else { 1 + round * 997 }, 200 + round as u64);
        let back = roundtrip(loopback(echo), &payload);
        assert_eq!(back.len(), payload.len(), "round {round}: exactly its own bytes");
        assert!(back == payload, "round {round}: the echo arrived altered");
        total += payload.len() as u64;
    }
    let opened = accepted.load(Ordering::SeqCst);
    // One control channel, the pool and the spares made while one was busy:
    // far fewer than a channel per visitor.
    assert!(opened <= ROUNDS / 2, "{ROUNDS} visitors opened {opened} tunnel connections: channels were not reused");
    let rows = logged(&server, echo, ROUNDS);
    assert!(rows.iter().all(|r| r["end"] == "closed"), "every exchange ended cleanly");
    assert_counted(
        &server,
        echo,
        &rows[0],
        rows[0]["bytes_sent"].as_u64().unwrap(),
        rows[0]["bytes_received"].as_u64().unwrap(),
        (total, total),
    );
    assert_eq!(relayed_paths(&server, echo), (ROUNDS as f64, 0.0));
}

/// A `bandwidth_limit` paces the spliced tunnel both ways: sampled while a
/// download and then an upload run, the live count never gets ahead of the
/// cap (plus a burst), and each is counted exactly.
#[test]
fn a_bandwidth_limit_paces_the_spliced_tunnel() {
    const CAP: f64 = 1_000_000.0;
    const BURST: f64 = CAP / 10.0 + MAX_CHUNK as f64;
    const SIZE: usize = 2_000_000;
    let (server, _client) = plain_pair();
    let (uploaded, uploaded_rx) = mpsc::channel::<usize>();
    let target = spawn_target(move |mut conn| {
        let mut first = [0u8; 1];
        conn.read_exact(&mut first).unwrap();
        if first[0] == b'D' {
            let _ = conn.write_all(&noise(SIZE, 8));
        } else {
            let mut all = Vec::new();
            conn.read_to_end(&mut all).unwrap();
            let _ = uploaded.send(all.len() + 1);
        }
    });
    let port = create_mapping_with(&server, target, true, json!({"bandwidth_limit": CAP as u64}));
    for download in [true, false] {
        let start = Instant::now();
        let mut visitor = TcpStream::connect(loopback(port)).unwrap();
        visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let worker = std::thread::spawn(move || {
            if download {
                visitor.write_all(b"D").unwrap();
                let mut body = Vec::new();
                visitor.read_to_end(&mut body).expect("the download");
                assert!(body == noise(SIZE, 8), "the download arrived whole ({} bytes)", body.len());
            } else {
                let mut body = noise(SIZE, 9);
                body[0] = b'U';
                visitor.write_all(&body).unwrap();
                visitor.shutdown(Shutdown::Write).unwrap();
                let mut rest = Vec::new();
                let _ = visitor.read_to_end(&mut rest);
            }
            start.elapsed()
        });
        let field = if download { "bytes_received" } else { "bytes_sent" };
        let mut samples = Vec::new();
        while !worker.is_finished() {
            if let Some(conn) = open_connection(&server, port) {
                let elapsed = start.elapsed().as_secs_f64();
                let counted = conn[field].as_u64().unwrap() as f64;
                assert!(counted <= 2.0 * CAP * elapsed + BURST, "{counted} B counted after {elapsed:.2} s under a {CAP} B/s cap");
                samples.push(counted);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let took = worker.join().unwrap();
        let fastest = Duration::from_secs_f64((SIZE as f64 - BURST) / (2.0 * CAP));
        assert!(took >= fastest, "{SIZE} B in {took:?}: faster than twice the cap");
        assert!(samples.len() >= 5, "sampled while it ran: {samples:?}");
        assert!(samples.windows(2).all(|w| w[0] <= w[1]), "live counts only grow: {samples:?}");
        if !download {
            assert_eq!(uploaded_rx.recv_timeout(Duration::from_secs(10)).unwrap(), SIZE);
        }
        let rows = logged(&server, port, if download { 1 } else { 2 });
        assert_eq!(rows[0][field], SIZE as u64, "{}", rows[0]);
    }
    assert_eq!(relayed_paths(&server, port), (2.0, 0.0));
}

/// `/metrics` says which path a tunneled mapping's exchanges took: splice on
/// a plain tunnel, copy with `TUNNELD_FORCE_COPY=1` (the benchmarks' other
/// path) and on a TLS tunnel (whose records cannot be spliced).
#[test]
fn metrics_say_which_path_a_tunneled_mapping_takes() {
    let (server, _client) = plain_pair();
    let port = create_mapping_with(&server, echo_server(), true, json!({}));
    echo_through(port, 100_000);
    assert_eq!(relayed_paths(&server, port), (1.0, 0.0), "a plain tunnel splices:\n{}", metrics_text(&server));

    let (server, _client) = plain_pair_with(&[("TUNNELD_FORCE_COPY", "1")]);
    let port = create_mapping_with(&server, echo_server(), true, json!({}));
    echo_through(port, 100_000);
    assert_eq!(relayed_paths(&server, port), (0.0, 1.0), "TUNNELD_FORCE_COPY=1 copies");

    let server = Daemon::server(SECRET, &[]);
    let _client = Daemon::client(&server, SECRET, &[]);
    let port = create_mapping_with(&server, echo_server(), true, json!({}));
    echo_through(port, 100_000);
    assert_eq!(relayed_paths(&server, port), (0.0, 1.0), "a TLS tunnel copies");
}

/// Pipe descriptors `daemon` holds now (`/proc/PID/fd`).
fn pipes_held(daemon: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", daemon.child.id()))
        .unwrap()
        .flatten()
        .filter(|e| std::fs::read_link(e.path()).is_ok_and(|target| target.to_string_lossy().starts_with("pipe:")))
        .count()
}

/// Pipes are held only while a chunk moves: twenty open tunneled connections
/// that each moved bytes both ways and went quiet hold none of their own on
/// either end (what is left is the pools' few spares).
#[test]
fn quiet_tunneled_connections_hold_no_pipes() {
    let (server, client) = plain_pair();
    let port = create_mapping_with(&server, echo_server(), true, json!({}));
    let before = (pipes_held(&server), pipes_held(&client));
    let mut visitors = Vec::new();
    for i in 0..20 {
        let mut v = TcpStream::connect(loopback(port)).unwrap();
        v.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let payload = noise(200_000, 300 + i);
        v.write_all(&payload).unwrap();
        assert!(read_len(&mut v, payload.len()) == payload);
        visitors.push(v);
    }
    wait_for("20 open connections with their bytes", Duration::from_secs(10), || {
        let list = get_data(&server, &format!("/api/connections?port={port}"));
        let conns = list["connections"].as_array()?;
        (conns.len() == 20 && conns.iter().all(|c| c["bytes_received"] == 200_000)).then_some(())
    });
    // Two descriptors a pipe; 20 exchanges splicing both ways would hold 80 on each end.
    let held = (pipes_held(&server).saturating_sub(before.0), pipes_held(&client).saturating_sub(before.1));
    assert!(held.0 <= 16 && held.1 <= 16, "pipe descriptors held by quiet exchanges (server, client): {held:?}");
    assert_eq!(relayed_paths(&server, port), (20.0, 0.0));
}
