//! Issue 24 §4: what one visitor costs the daemons in system calls — counted by
//! `strace -c -f` attached to the real processes while visitors go through a
//! mapping one after another (connect, one byte each way, close) — and that
//! what was cut keeps its behaviour: a pooled data channel, armed once for its
//! life instead of around each exchange, still tells a killed client's
//! visitors so at once, and still carries a last word (a refusal) whole.
//!
//! Counts, not timings: they do not move with the machine's load. Only calls
//! whose number per visitor the code fixes are checked (`setsockopt`,
//! `splice`, `recvfrom`), not `epoll_wait` or `futex`, which depend on how the
//! scheduler interleaves the threads.
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::strace::{self, Strace};
use common::*;
use serde_json::Value;

const SECRET: &str = "connection rate secret";
const VISITORS: usize = 200;

/// One visitor: connect, one byte each way, half-close, the target's EOF.
fn visit_one_byte(port: u16) {
    let mut conn = TcpStream::connect(loopback(port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).expect("the echoed byte");
    assert_eq!(&byte, b"x");
    conn.shutdown(Shutdown::Write).unwrap();
    // The echo target half-closes after us: the exchange ended cleanly.
    assert_eq!(conn.read(&mut byte).expect("EOF"), 0);
}

fn per_visitor(calls: &BTreeMap<String, u64>, name: &str) -> f64 {
    strace::per(calls, name, VISITORS)
}

fn table(calls: &BTreeMap<String, u64>) -> String {
    strace::table(calls, VISITORS)
}

fn wait_closed(server: &Daemon, port: u16) {
    wait_for("the visitors' connections to close", Duration::from_secs(10), || {
        (traffic_entry(server, port)?["active_connections"].as_u64()? == 0).then_some(())
    });
}

/// Counts the calls of each of `daemons` while [`VISITORS`] visitors go
/// through `port` one after another (after one to warm up what the first one
/// builds, not counted).
fn count_visitors(strace: &Path, server: &Daemon, daemons: &[&Daemon], port: u16) -> Vec<BTreeMap<String, u64>> {
    visit_one_byte(port);
    wait_closed(server, port);
    let traces: Vec<Strace> = daemons.iter().map(|d| Strace::attach(strace, d.child.id())).collect();
    for _ in 0..VISITORS {
        visit_one_byte(port);
    }
    wait_closed(server, port);
    traces.into_iter().map(Strace::finish).collect()
}

/// A one-byte exchange through a direct mapping copies (a `recv` and a
/// `send` each way) instead of splicing (into a pipe, out of it, and the
/// peeks that tell a drained socket from urgent data: six calls a direction
/// where a copy makes four). Its loopback target gets `TCP_NODELAY` and its
/// arming, no keepalive (a peer on this host cannot vanish unannounced), and
/// both sockets a disarming after the clean end: four `setsockopt` where
/// there were seven.
#[test]
fn a_direct_one_byte_exchange_copies_and_its_loopback_target_takes_no_keepalive() {
    let Some(strace) = tools::external_tool("strace", "a_direct_one_byte_exchange_copies_and_its_loopback_target_takes_no_keepalive")
    else {
        return;
    };
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    let calls = count_visitors(&strace, &server, &[&server], port).remove(0);
    eprintln!("direct, server, per visitor: {}", table(&calls));
    let setsockopt = per_visitor(&calls, "setsockopt");
    assert!(setsockopt <= 4.05, "{setsockopt:.2} setsockopt per direct visitor (want at most 4): {}", table(&calls));
    let splice = per_visitor(&calls, "splice");
    assert!(splice <= 0.05, "{splice:.2} splice per one-byte visitor (want none): {}", table(&calls));
    // Per direction: the byte, the read that finds the socket drained, the EOF.
    let recv = per_visitor(&calls, "recvfrom");
    assert!(recv <= 6.05, "{recv:.2} recvfrom per direct visitor (want at most 6): {}", table(&calls));
    // The visitor's socket comes out of `accept` with every option it needs
    // (set once on the listener); one more accept finds the queue empty.
    let accept = per_visitor(&calls, "accept4");
    assert!(accept <= 2.05, "{accept:.2} accept4 per direct visitor (want at most 2): {}", table(&calls));
}

/// Through a pooled TLS data channel: the channel is armed once, when its
/// first exchange starts, not around every exchange (two `setsockopt` fewer
/// per visitor on each end), and the client's loopback target takes
/// `TCP_NODELAY`, its arming and its disarming only. The server: one (the
/// visitor's disarming; three before); the client: three (eight before).
#[test]
fn a_tunneled_visitor_costs_one_setsockopt_in_the_server_and_three_in_the_client() {
    let Some(strace) = tools::external_tool("strace", "a_tunneled_visitor_costs_one_setsockopt_in_the_server_and_three_in_the_client")
    else {
        return;
    };
    let server = Daemon::server(SECRET, &[]);
    let client = Daemon::client(&server, SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    let calls = count_visitors(&strace, &server, &[&server, &client], port);
    eprintln!("TLS tunnel, server, per visitor: {}", table(&calls[0]));
    eprintln!("TLS tunnel, client, per visitor: {}", table(&calls[1]));
    let (server_calls, client_calls) = (per_visitor(&calls[0], "setsockopt"), per_visitor(&calls[1], "setsockopt"));
    assert!(server_calls <= 1.05, "{server_calls:.2} setsockopt per tunneled visitor in the server (want 1): {}", table(&calls[0]));
    assert!(client_calls <= 3.05, "{client_calls:.2} setsockopt per tunneled visitor in the client (want 3): {}", table(&calls[1]));
}

/// A plain tunnel reads its data channels ahead as a TLS one does: a frame's
/// length and body, a chunk's header and payload, come in one `recv` rather
/// than one each (ten `recvfrom` per visitor in the server and nine in the
/// client before). The server's spliced path reads the channel past the
/// stream, and clears the runtime's readiness after a short read as the
/// stream's `poll_read` does, so it tries no read that finds the channel
/// empty: six, as many as a copying server (`TUNNELD_FORCE_COPY=1`); nine
/// when it did not.
#[test]
fn a_plain_tunnel_reads_each_exchange_in_few_calls() {
    let Some(strace) = tools::external_tool("strace", "a_plain_tunnel_reads_each_exchange_in_few_calls") else {
        return;
    };
    let server = Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__TLS", "false")]);
    let client = Daemon::client_with_env(server.tunnel.unwrap(), SECRET, &[], &[("TUNNELD_CLIENT__TLS", "false")]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    let calls = count_visitors(&strace, &server, &[&server, &client], port);
    eprintln!("plain tunnel, server, per visitor: {}", table(&calls[0]));
    eprintln!("plain tunnel, client, per visitor: {}", table(&calls[1]));
    let (server_reads, client_reads) = (per_visitor(&calls[0], "recvfrom"), per_visitor(&calls[1], "recvfrom"));
    assert!(server_reads <= 6.05, "{server_reads:.2} recvfrom per plain-tunneled visitor in the server (want 6): {}", table(&calls[0]));
    assert!(client_reads <= 5.05, "{client_reads:.2} recvfrom per plain-tunneled visitor in the client (want 5): {}", table(&calls[1]));
}

fn client_connected(server: &Daemon, name: &str) -> Option<bool> {
    let list = get_data(server, "/api/client/list");
    list["clients"].as_array()?.iter().find(|c| c["name"] == name)?["connected"].as_bool()
}

fn logged(server: &Daemon, port: u16, count: usize) -> Vec<Value> {
    wait_for(&format!("{count} logged connections of :{port}"), Duration::from_secs(15), || {
        let rows = get_data(server, &format!("/api/connections/log?port={port}&limit=100"));
        let rows = rows["connections"].as_array().cloned().unwrap_or_default();
        (rows.len() >= count).then_some(rows)
    })
}

/// Pooled channels that served visitors stay armed between exchanges. A
/// client killed (kill -9) while one of them carries a visitor and the others
/// wait in the server's pool: the visitor in flight gets a reset at once (not
/// an EOF that would pass for the end of the answer) and is logged as
/// `target_reset`; the server notices the client gone; the next visitor is
/// not given a dead pooled channel to wait on, but an immediate end.
#[test]
fn a_killed_client_is_noticed_by_the_visitor_in_flight_and_the_next_one() {
    let server = Daemon::server(SECRET, &[]);
    let mut client = Daemon::client(&server, SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    // Several channels serve and go back to the pool, armed.
    for _ in 0..8 {
        visit_one_byte(port);
    }
    let mut in_flight = TcpStream::connect(loopback(port)).unwrap();
    in_flight.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    in_flight.write_all(b"y").unwrap();
    let mut byte = [0u8; 1];
    in_flight.read_exact(&mut byte).expect("the echoed byte");

    client.kill();
    let killed = Instant::now();
    let ended = in_flight.read(&mut byte);
    assert!(
        matches!(&ended, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the visitor in flight must see a reset, not an end that looks complete: {ended:?}"
    );
    assert!(killed.elapsed() < Duration::from_secs(5), "the reset took {:?}", killed.elapsed());
    wait_for("the server to notice the client gone", Duration::from_secs(10), || {
        (client_connected(&server, "default") == Some(false)).then_some(())
    });
    // The next visitor: nothing comes back, and at once.
    let started = Instant::now();
    assert_eq!(visit(port, b"z"), b"", "no answer through a killed client");
    assert!(started.elapsed() < Duration::from_secs(5), "the next visitor waited {:?}", started.elapsed());

    let rows = logged(&server, port, 10);
    let ends: Vec<&str> = rows.iter().filter_map(|r| r["end"].as_str()).collect();
    assert_eq!(ends.iter().filter(|e| **e == "closed").count(), 8, "{rows:?}");
    assert!(ends.contains(&"target_reset"), "the visitor in flight ended as target_reset: {rows:?}");
}

/// A refusal written on a channel that served visitors before (so it is
/// armed) reaches the server whole before the client closes the channel:
/// the visitor is refused with the client's reason, the next one is served.
#[test]
fn a_refusal_on_a_reused_channel_arrives_whole() {
    let server = Daemon::server(SECRET, &[]);
    let _client = Daemon::client(&server, SECRET, &[]);
    let served = free_port();
    create_mapping(&server, served, echo_server(), true);
    for _ in 0..6 {
        visit_one_byte(served);
    }
    // A target nobody listens on, reached through the same pooled channels.
    let closed = free_port();
    let refused = free_port();
    create_mapping(&server, refused, loopback(closed), true);
    for round in 0..3 {
        assert_eq!(visit(refused, b"hello"), b"", "round {round}: nothing through an unreachable target");
    }
    let rows = logged(&server, refused, 3);
    for row in &rows {
        assert_eq!(row["end"], "target_unreachable", "{row}");
        let reason = row["reason"].as_str().unwrap_or_default();
        assert!(reason.contains("the tunnel client could not reach the target"), "the client's own words: {row}");
    }
    visit_one_byte(served);
}
