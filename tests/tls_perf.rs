//! Issue 24 §3/§4: what one visitor costs the daemons in system calls, counted
//! by `strace -c -f` attached to the real processes while visitors go through
//! a direct and a tunneled mapping one after another (connect, one byte each
//! way, close). Counts, not timings: they do not move with the machine's load.
//!
//! The figures are for the calls whose number per visitor (or per MiB) is
//! fixed by the code (`setsockopt`, the tunnel's writes), not for
//! `epoll_wait` or `futex`, which depend on how the scheduler interleaves the
//! threads.
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::strace::Strace;
use common::*;

const SECRET: &str = "tls perf secret";
const VISITORS: usize = 200;

/// `VISITORS` sequential visitors through `port` (whose target echoes).
fn visit_one_byte_each(port: u16) {
    for _ in 0..VISITORS {
        let mut conn = TcpStream::connect(loopback(port)).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        conn.write_all(b"x").unwrap();
        let mut byte = [0u8; 1];
        conn.read_exact(&mut byte).expect("the echoed byte");
        assert_eq!(&byte, b"x");
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        // The echo target half-closes after us: the exchange ended cleanly.
        assert_eq!(conn.read(&mut byte).expect("EOF"), 0);
    }
}

fn per_visitor(calls: &BTreeMap<String, u64>, name: &str) -> f64 {
    calls.get(name).copied().unwrap_or(0) as f64 / VISITORS as f64
}

fn wait_closed(server: &Daemon, port: u16) {
    wait_for("the visitors' connections to close", Duration::from_secs(10), || {
        (traffic_entry(server, port)?["active_connections"].as_u64()? == 0).then_some(())
    });
}

fn table(calls: &BTreeMap<String, u64>) -> String {
    calls
        .iter()
        .filter(|(name, _)| *name != "total")
        .map(|(name, n)| format!("{name} {:.2}", *n as f64 / VISITORS as f64))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A visitor's socket comes out of `accept` with every option it needs, set
/// once on the mapping's listener (no `setsockopt` for it); its target, dialed,
/// takes five (`TCP_NODELAY`, keepalive and its two timings) plus the arming
/// and disarming of `SO_LINGER` around the relay, and the visitor's disarming
/// after a clean end. Before: twelve, the visitor's own five included.
#[test]
fn a_direct_visitor_costs_the_server_no_setsockopt_for_its_own_socket() {
    let Some(strace) = common::tools::external_tool("strace", "a_direct_visitor_costs_the_server_no_setsockopt_for_its_own_socket") else {
        return;
    };
    let server = Daemon::server(SECRET, &[]);
    let echo = echo_server();
    let port = free_port();
    create_mapping(&server, port, echo, false);
    // The first visitor pays for what happens once (the runtime's first
    // connection, lazily built state); it is not counted.
    visit_one_byte_each_once(port);
    let trace = Strace::attach(&strace, server.child.id());
    visit_one_byte_each(port);
    wait_closed(&server, port);
    let calls = trace.finish();
    eprintln!("direct, server, per visitor: {}", table(&calls));
    let setsockopt = per_visitor(&calls, "setsockopt");
    assert!(setsockopt <= 7.05, "{setsockopt:.2} setsockopt per direct visitor (want at most 7): {}", table(&calls));
    // One accept that takes the visitor, and one that finds the queue empty.
    let accept = per_visitor(&calls, "accept4");
    assert!(accept <= 2.05, "{accept:.2} accept4 per direct visitor: {}", table(&calls));
}

/// Through a pooled TLS data channel, the server's share of a visitor: its
/// socket as accepted, one `SO_LINGER` change to disarm it after the clean
/// end, and the channel's arming and disarming around the exchange (before:
/// eight, the visitor's own five included).
#[test]
fn a_tunneled_visitor_costs_the_server_no_setsockopt_for_its_own_socket() {
    let Some(strace) = common::tools::external_tool("strace", "a_tunneled_visitor_costs_the_server_no_setsockopt_for_its_own_socket")
    else {
        return;
    };
    let (server, client) = server_and_client(SECRET, true);
    let client = client.expect("a client");
    let echo = echo_server();
    let port = free_port();
    create_mapping(&server, port, echo, true);
    visit_one_byte_each_once(port);
    let server_trace = Strace::attach(&strace, server.child.id());
    let client_trace = Strace::attach(&strace, client.child.id());
    visit_one_byte_each(port);
    wait_closed(&server, port);
    let (server_calls, client_calls) = (server_trace.finish(), client_trace.finish());
    eprintln!("tunnel, server, per visitor: {}", table(&server_calls));
    eprintln!("tunnel, client, per visitor: {}", table(&client_calls));
    let setsockopt = per_visitor(&server_calls, "setsockopt");
    assert!(setsockopt <= 3.05, "{setsockopt:.2} setsockopt per tunneled visitor in the server (want at most 3): {}", table(&server_calls));
}

/// One visitor, to warm up what the first one builds.
fn visit_one_byte_each_once(port: u16) {
    let mut conn = TcpStream::connect(loopback(port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    conn.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    conn.read_exact(&mut byte).expect("the echoed byte");
}

/// Upstream through the TLS tunnel, each chunk the server writes to the data
/// channel (a 4-byte header and its payload) fills exactly four 16 KiB TLS
/// records and leaves in one `writev`: 16 per MiB, plus the odd partial
/// write. Before, a full 64 KiB payload spilled 4 bytes into a fifth record,
/// written by a second call: 32 per MiB.
#[test]
fn the_tls_tunnel_writes_each_chunk_in_one_call() {
    let Some(strace) = common::tools::external_tool("strace", "the_tls_tunnel_writes_each_chunk_in_one_call") else {
        return;
    };
    const MIB: usize = 32;
    let (server, _client) = server_and_client(SECRET, true);
    // A sink: reads everything, then says how much.
    let sink = target(|mut conn| {
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match conn.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        let _ = conn.write_all(&total.to_be_bytes());
    });
    let port = free_port();
    create_mapping(&server, port, sink, true);
    // The first visitor pays for what happens once; it is not counted.
    let mut first = TcpStream::connect(loopback(port)).expect("connect");
    first.write_all(b"x").unwrap();
    first.shutdown(std::net::Shutdown::Write).unwrap();
    let mut total = [0u8; 8];
    first.read_exact(&mut total).expect("the sink's count");
    drop(first);
    wait_closed(&server, port);
    let trace = Strace::attach(&strace, server.child.id());
    let mut conn = TcpStream::connect(loopback(port)).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let block = vec![7u8; 1 << 20];
    for _ in 0..MIB {
        conn.write_all(&block).unwrap();
    }
    conn.shutdown(std::net::Shutdown::Write).unwrap();
    let mut total = [0u8; 8];
    conn.read_exact(&mut total).expect("the sink's count");
    assert_eq!(u64::from_be_bytes(total), (MIB << 20) as u64, "every byte arrived");
    wait_closed(&server, port);
    let calls = trace.finish();
    let writev = calls.get("writev").copied().unwrap_or(0) as f64 / MIB as f64;
    eprintln!("TLS tunnel upstream, server: {writev:.1} writev per MiB; all calls: {calls:?}");
    assert!(writev <= 28.0, "{writev:.1} writev per MiB through the TLS tunnel (want 16, and a few for partial writes): {calls:?}");
}
