//! Issue #18, items 3 and 8: the tunnel port's defences against unauthenticated
//! connections, tried with real TLS handshakes from several loopback addresses
//! (all of 127.0.0.0/8 is loopback on Linux). A blocked address is readmitted
//! one handshake at a time, not sixteen; forged data-channel tokens count
//! against their source; a known client gets in while strangers hold every
//! ordinary slot; a client's own data channels are never throttled; and a
//! throttled client is told so.

mod common;

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::tunnel::{authenticate, challenge_as, runtime, tls_connect_from};
use common::*;
use tunneld::net::transport::TunnelStream;
use tunneld::tunnel::frame::{read_frame, write_frame};
use tunneld::tunnel::message::{Auth, Opening, Verdict, PROTOCOL_VERSION};

const SECRET: &str = "hardening-throttle-secret";

/// Failed handshakes an address may make before it is throttled (the server's
/// `FAILURE_BURST`); after it, one more per 12 s.
const FAILURE_BURST: usize = 5;

fn source(a: u8, b: u8, c: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, a, b, c))
}

/// A full TLS handshake and a control hello from `from`, answered with a wrong
/// HMAC; panics unless the server heard it out and refused the answer.
async fn wrong_secret(from: IpAddr, tunnel: SocketAddr, pin: &str) {
    let mut stream = tls_connect_from(from, tunnel, pin).await.expect("admitted while the burst lasts");
    challenge_as(&mut stream, "default").await;
    write_frame(&mut stream, &Auth::Auth { mac: "00".repeat(32) }).await.expect("send auth");
    let verdict: Verdict = read_frame(&mut stream).await.expect("a verdict").0;
    assert!(matches!(verdict, Verdict::Rejected { .. }), "{verdict:?}");
}

/// Whether the server has answered or closed `conn` (a refusal), as opposed to
/// still waiting on it (an admitted handshake). Never waits.
fn refused(conn: &TcpStream) -> bool {
    conn.set_nonblocking(true).expect("nonblocking");
    match conn.peek(&mut [0u8; 64]) {
        // The refusal's answer (the client is told it was throttled), or the close.
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Polls until `count` reaches `want` or `within` passes; returns the last count.
fn count_until(want: usize, within: Duration, mut count: impl FnMut() -> usize) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let n = count();
        if n >= want || Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A data channel presenting `token` from `from`: `true` when the server
/// admitted it (the TLS handshake completed); then waits until the server
/// closes it, so the server has judged it before the next one.
async fn data_hello(from: IpAddr, tunnel: SocketAddr, pin: &str, token: &str) -> bool {
    let Ok(mut channel) = tls_connect_from(from, tunnel, pin).await else { return false };
    let hello = Opening::Data { version: PROTOCOL_VERSION, session: token.to_string() };
    write_frame(&mut channel, &hello).await.expect("send data hello");
    let closed = tokio::time::timeout(Duration::from_secs(10), drain(&mut channel)).await;
    assert!(closed.is_ok(), "a data channel for no live session is closed at once");
    true
}

async fn drain(channel: &mut TunnelStream) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 256];
    while matches!(channel.read(&mut buf).await, Ok(n) if n > 0) {}
}

#[test]
fn a_blocked_address_starting_sixteen_handshakes_at_once_gets_one_admitted() {
    let server = Daemon::server(SECRET, &[]);
    let (tunnel, pin) = (server.tunnel.unwrap(), server.fingerprint());
    let attacker = source(0, 0, 2);
    // All but one of the burst used: the address has one attempt left, as a
    // blocked address has once every refill interval.
    runtime().block_on(async {
        for _ in 0..FAILURE_BURST - 1 {
            wrong_secret(attacker, tunnel, &pin).await;
        }
    });
    let throttled_before = tunnel_sessions(&server, "throttled");
    // Sixteen handshakes at once that send a TLS record header and stall, as
    // the attack did: each one admitted holds a slot for the handshake timeout.
    let conns: Vec<TcpStream> = (0..16)
        .map(|_| {
            let mut conn = connect_from(attacker, tunnel);
            conn.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).expect("send a record header");
            conn
        })
        .collect();
    let answered = count_until(15, Duration::from_secs(5), || conns.iter().filter(|c| refused(c)).count());
    assert_eq!(answered, 15, "16 handshakes from an address with one attempt left: {} admitted, not 1", 16 - answered);
    assert_eq!(tunnel_sessions(&server, "throttled") - throttled_before, 15.0);
    assert_eq!(conns.iter().filter(|c| !refused(c)).count(), 1, "the admitted one is still being heard out");
    // Another address is not punished for this one.
    runtime().block_on(wrong_secret(source(0, 0, 3), tunnel, &pin));
}

#[test]
fn forged_data_channel_tokens_are_throttled_but_an_ended_sessions_late_channels_are_not() {
    let server = Daemon::server(SECRET, &[]);
    let (tunnel, pin) = (server.tunnel.unwrap(), server.fingerprint());
    let rt = runtime();
    // Full TLS handshakes, each presenting a random session token.
    let forger = source(0, 0, 4);
    let admitted = rt.block_on(async {
        let mut admitted = 0;
        for _ in 0..40 {
            let token = hex_token();
            admitted += usize::from(data_hello(forger, tunnel, &pin, &token).await);
        }
        admitted
    });
    assert!(admitted <= FAILURE_BURST + 1, "{admitted} of 40 forged data channels were admitted");
    assert!(tunnel_sessions(&server, "throttled") >= (40 - FAILURE_BURST - 1) as f64, "{}", metrics_text(&server));

    // A session that ended: its client's data channels still in flight present
    // its token. They are not guesses, and are never throttled.
    let token = rt.block_on(async {
        let mut control = tls_connect_from(source(0, 0, 5), tunnel, &pin).await.expect("admitted");
        match authenticate(&mut control, SECRET).await {
            Verdict::Welcome { session, .. } => session,
            other => panic!("{other:?}"),
        }
    });
    wait_for("the session to end", Duration::from_secs(10), || {
        (scrape_metric(&server, "tunneld_tunnel_connected", &[]) == Some(0.0)).then_some(())
    });
    let late = source(0, 0, 6);
    let throttled_before = tunnel_sessions(&server, "throttled");
    let admitted = rt.block_on(async {
        let mut admitted = 0;
        for _ in 0..20 {
            admitted += usize::from(data_hello(late, tunnel, &pin, &token).await);
        }
        admitted
    });
    assert_eq!(admitted, 20, "late data channels of an ended session");
    assert_eq!(tunnel_sessions(&server, "throttled"), throttled_before);
}

fn hex_token() -> String {
    random_bytes(32).iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_known_client_connects_while_strangers_hold_every_unauthenticated_slot() {
    const ATTACKERS: u8 = 60;
    const PER_ATTACKER: usize = 6;
    const SLOTS: usize = 256;
    let server = Daemon::server(SECRET, &[]);
    let tunnel = server.tunnel.unwrap();
    // The client has connected from its address before (127.0.0.1), then
    // goes away.
    let mut first = Daemon::client(&server, SECRET, &[]);
    first.kill();
    wait_for("the session to end", Duration::from_secs(10), || {
        (scrape_metric(&server, "tunneld_tunnel_connected", &[]) == Some(0.0)).then_some(())
    });
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);

    // Strangers open silent connections until every ordinary slot is held; each
    // is held until the 10 s handshake timeout.
    let conns: Vec<TcpStream> =
        (1..=ATTACKERS).flat_map(|a| (0..PER_ATTACKER).map(move |_| connect_from(source(0, 1, a), tunnel))).collect();
    let attempts = conns.len();
    let refusals = count_until(attempts - SLOTS, Duration::from_secs(5), || conns.iter().filter(|c| refused(c)).count());
    assert_eq!(refusals, attempts - SLOTS, "every slot held: {SLOTS} of {attempts} admitted");

    // The client comes back now: it is in within moments, not after the
    // strangers' handshakes time out.
    let client = Daemon::client_unconnected(&server, SECRET, &[]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(7));
    let held = conns.iter().filter(|c| !refused(c)).count();
    assert_eq!(held, SLOTS, "the strangers still held their slots while the client got in");
    // Its data channels got in too.
    assert_eq!(roundtrip(loopback(port), b"through the kept slots"), b"through the kept slots");
}

#[test]
fn two_hundred_concurrent_visitors_through_one_client_are_never_throttled() {
    const VISITORS: usize = 200;
    let server = Daemon::server(SECRET, &[]);
    let _client = Daemon::client(&server, SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    let start = Arc::new(Barrier::new(VISITORS));
    let visitors: Vec<_> = (0..VISITORS)
        .map(|i| {
            let start = start.clone();
            std::thread::spawn(move || {
                let payload = format!("visitor {i} ").repeat(100).into_bytes();
                start.wait();
                roundtrip(loopback(port), &payload) == payload
            })
        })
        .collect();
    let served = visitors.into_iter().filter_map(|v| v.join().ok()).filter(|ok| *ok).count();
    assert_eq!(served, VISITORS);
    assert_eq!(tunnel_sessions(&server, "throttled"), 0.0, "{}", server.log());
    assert!(!server.log().contains("too many unauthenticated connections"), "{}", server.log());
}

#[test]
fn a_client_throttled_for_its_address_logs_that_it_was_throttled() {
    let server = Daemon::server(SECRET, &[]);
    let (tunnel, pin) = (server.tunnel.unwrap(), server.fingerprint());
    // Another program at the client's address (127.0.0.1) uses up its burst.
    runtime().block_on(async {
        for _ in 0..FAILURE_BURST {
            wrong_secret(source(0, 0, 1), tunnel, &pin).await;
        }
    });
    let client = Daemon::client_unconnected(&server, SECRET, &[]);
    let log = client.wait_for_log("throttled by the server", Duration::from_secs(10));
    let line = log.lines().find(|l| l.contains("throttled by the server")).unwrap_or_default();
    assert!(line.contains("ERROR") && line.contains("tunnel session failed"), "logged as the session's failure: {line}");
    assert!(!log.contains("closed the connection during the TLS handshake"), "{log}");
    assert!(tunnel_sessions(&server, "throttled") >= 1.0);
}
