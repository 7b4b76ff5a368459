//! Issue 24 §3, the server's half: a data channel whose ClientHello offers the
//! ALPN protocol `tunneld-data` is served through rustls's unbuffered API
//! (`tunneld::net::tls_channel`, the same state machine as the client's), every
//! other connection through the buffered stream as before.
//!
//! What must hold: every byte crosses each way at chunk and record boundaries,
//! and is counted; half-closes and resets cross each way; a client that offers
//! no ALPN (an older one) is still served; a control hello on a `tunneld-data`
//! session is refused (its auth could not be bound to the session: no
//! exporter); the server's channel gives a clear error, never a hang, on
//! garbage, a cut record or an EOF without close_notify; and the server reads
//! its data channels in large pieces (the count that fails on main).
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::strace::Strace;
use common::tunnel::{a_visitor_reset_reaches_the_target, data_channel_identity, flush_tls, read_all};
use common::*;
use tunneld::net::metered::MeteredStream;
use tunneld::net::tls_channel::{self, TlsDataChannel, DATA_ALPN};
use tunneld::telemetry::Metrics;
use tunneld::tunnel::frame::{read_frame, write_frame};
use tunneld::tunnel::message::{Challenge, Connect, Opening, Verdict, PROTOCOL_VERSION};

const SECRET: &str = "tls server data secret";

fn mapping_bytes(text: &str, port: u16, direction: &str) -> Option<f64> {
    metric_value(text, "tunneld_mapping_bytes_total", &[("port", &port.to_string()), ("direction", direction)])
}

/// A target that reads a 4-byte length, then sends that many bytes of
/// `noise(len, len)` and closes: the download direction alone (target → client
/// → server, the server decrypting).
fn download_target() -> SocketAddr {
    spawn_target(|mut conn| {
        let mut len = [0u8; 4];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        let len = u32::from_be_bytes(len) as usize;
        let _ = conn.write_all(&noise(len, len as u64));
        let _ = conn.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
    })
}

fn wait_idle(server: &Daemon, port: u16) -> String {
    wait_for("every exchange to end", Duration::from_secs(10), || {
        let t = metrics_text(server);
        (metric_value(&t, "tunneld_mapping_active_connections", &[("port", &port.to_string())]) == Some(0.0)).then_some(t)
    })
}

/// Downloads around a TLS record (16 KiB), a chunk's payload (65,532) and a
/// full chunk, and a large one, each visitor after the other over the pooled
/// channels: each arrives whole, and the mapping counts exactly what moved.
/// Then uploads of the same sizes through an echo (the server encrypting).
#[test]
fn every_byte_crosses_the_servers_channel_each_way_at_chunk_and_record_boundaries() {
    let (server, _client) = server_and_client(SECRET, true);
    let sizes = [1usize, 16_383, 16_384, 16_385, 65_531, 65_532, 65_533, 65_536, 65_537, 131_064, (8 << 20) + 5];

    let port = free_port();
    create_mapping(&server, port, download_target(), true);
    for &len in &sizes {
        let mut visitor = TcpStream::connect(loopback(port)).unwrap();
        visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        visitor.write_all(&(len as u32).to_be_bytes()).unwrap();
        let mut got = Vec::new();
        visitor.read_to_end(&mut got).expect("the download");
        assert_eq!(got.len(), len, "{len} bytes downloaded, {} arrived", got.len());
        assert!(sha256(&got) == sha256(&noise(len, len as u64)), "{len} bytes arrived altered");
    }
    let text = wait_idle(&server, port);
    // `sent` is what went to the target, `received` what came from it.
    assert_eq!(mapping_bytes(&text, port, "received"), Some(sizes.iter().sum::<usize>() as f64), "counted to the byte");
    assert_eq!(mapping_bytes(&text, port, "sent"), Some(4.0 * sizes.len() as f64));

    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    for &len in &sizes {
        let payload = random_bytes(len);
        let back = roundtrip(loopback(port), &payload);
        assert_eq!(back.len(), len, "{len} bytes sent, {} came back", back.len());
        assert!(sha256(&back) == sha256(&payload), "{len} bytes came back altered");
    }
    let text = wait_idle(&server, port);
    let expected = sizes.iter().sum::<usize>() as f64;
    assert_eq!(mapping_bytes(&text, port, "sent"), Some(expected));
    assert_eq!(mapping_bytes(&text, port, "received"), Some(expected));
}

/// The visitor half-closes first and still reads the target's late reply; then
/// the target half-closes first and still reads the visitor's late bytes. The
/// pooled channel serves the next visitor after each.
#[test]
fn half_closes_cross_the_servers_channel_each_way() {
    let (server, _client) = server_and_client(SECRET, true);
    // Visitor first: the target reads to EOF, then answers with what it read, reversed.
    let port = free_port();
    create_mapping(
        &server,
        port,
        spawn_target(|mut conn| {
            let mut got = Vec::new();
            let _ = conn.read_to_end(&mut got);
            got.reverse();
            let _ = conn.write_all(&got);
        }),
        true,
    );
    let sent = random_bytes(300_000);
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    visitor.write_all(&sent).unwrap();
    visitor.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    visitor.read_to_end(&mut reply).expect("the reply after the visitor's half-close");
    let mut expected = sent.clone();
    expected.reverse();
    assert!(reply == expected, "the target's late reply arrived whole ({} of {} bytes)", reply.len(), expected.len());

    // Target first: its reply and FIN, then the visitor's late bytes reach it.
    let (counts, counted) = std::sync::mpsc::channel::<usize>();
    let counts = std::sync::Mutex::new(counts);
    let port = free_port();
    create_mapping(
        &server,
        port,
        spawn_target(move |mut conn| {
            conn.write_all(&[3u8; 70_000]).unwrap();
            conn.shutdown(Shutdown::Write).unwrap();
            let mut got = Vec::new();
            let _ = conn.read_to_end(&mut got);
            let _ = counts.lock().unwrap().send(got.len());
        }),
        true,
    );
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut reply = Vec::new();
    visitor.read_to_end(&mut reply).expect("the target's half-close arrives as EOF");
    assert_eq!(reply.len(), 70_000);
    let late = random_bytes(200_000);
    visitor.write_all(&late).expect("the visitor may still write after the target half-closed");
    visitor.shutdown(Shutdown::Write).unwrap();
    let n = counted.recv_timeout(Duration::from_secs(15)).expect("the target saw the visitor's half-close");
    assert_eq!(n, late.len(), "the target read every byte sent after its half-close");

    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    echo_through(port, 100_000);
}

/// A target that resets mid-download resets the visitor; a visitor that resets
/// mid-upload resets the target. The tunnel serves the next visitor.
#[test]
fn resets_cross_the_servers_channel_each_way() {
    let (server, _client) = server_and_client(SECRET, true);
    let resetting = spawn_target(|mut conn| {
        let _ = conn.write_all(&[1u8; 100_000]);
        socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
    });
    let port = free_port();
    create_mapping(&server, port, resetting, true);
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    let err = loop {
        match visitor.read(&mut buf) {
            Ok(0) => panic!("a target's reset reached the visitor as a clean EOF"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    a_visitor_reset_reaches_the_target(&server);

    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    echo_through(port, 100_000);
}

// ------------------------------------------------- hand-made clients against the server

/// An older client, speaking through the buffered TLS stream with no ALPN:
/// its control session, and a data channel that the server must still take
/// and use: the visitor's `connect` arrives on it.
#[test]
fn a_client_without_alpn_is_still_served() {
    let server = Daemon::server(SECRET, &[]);
    let rt = common::tunnel::runtime();
    let (tunnel, pin) = (server.tunnel.unwrap(), server.fingerprint());
    let (_control, token) = rt.block_on(async {
        let mut control = common::tunnel::tls_connect(tunnel, &pin).await;
        match common::tunnel::authenticate(&mut control, SECRET).await {
            Verdict::Welcome { session, .. } => (control, session),
            other => panic!("{other:?}"),
        }
    });
    let channel = rt.spawn(async move {
        let mut channel = common::tunnel::tls_connect(tunnel, &pin).await;
        write_frame(&mut channel, &Opening::Data { version: PROTOCOL_VERSION, session: token }).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(10), read_frame::<Connect, _>(&mut channel)).await {
            Ok(Ok((Connect::Connect { host, port, .. }, _))) => Some((host, port)),
            _ => None,
        }
    });
    wait_for("the hand-made client's session", Duration::from_secs(10), || {
        get_data(&server, "/api/client/list")["clients"].as_array()?.iter().find(|c| c["connected"] == true).cloned()
    });
    let target = echo_server();
    let port = free_port();
    create_mapping(&server, port, target, true);
    let _visitor = TcpStream::connect(loopback(port)).unwrap();
    let asked = rt.block_on(channel).unwrap();
    assert_eq!(asked, Some((target.ip().to_string(), target.port())), "the ALPN-less data channel was asked to connect");
}

/// A connection that offers `tunneld-data` is a data channel: a control hello
/// on it is refused before any challenge (its HMAC could not be bound to the
/// session, which has no exporter here), and counted as a protocol error.
#[test]
fn a_control_hello_on_a_data_channel_session_is_refused() {
    let server = Daemon::server(SECRET, &[]);
    let rt = common::tunnel::runtime();
    let (tunnel, pin) = (server.tunnel.unwrap(), server.fingerprint());
    let answer = rt.block_on(async {
        let mut channel = data_channel_to(tunnel, &pin).await;
        let hello = Opening::Control { version: PROTOCOL_VERSION, client: "default".into(), features: vec![] };
        write_frame(&mut channel, &hello).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), read_frame::<Challenge, _>(&mut channel)).await.expect("an answer").map(|a| a.0)
    });
    match answer {
        Ok(Challenge::Rejected { reason, .. }) => assert!(reason.contains("tunneld-data"), "{reason}"),
        other => panic!("a control hello over the unbuffered data path was not refused: {other:?}"),
    }
    let text = wait_for("the refusal counted", Duration::from_secs(10), || {
        let t = metrics_text(&server);
        metric_value(&t, "tunneld_tunnel_sessions_total", &[("result", "protocol_error")]).filter(|n| *n >= 1.0).map(|_| t)
    });
    assert_eq!(metric_value(&text, "tunneld_tunnel_sessions_total", &[("result", "ok")]).unwrap_or(0.0), 0.0, "no session was opened");
}

/// A TLS connection to the tunnel port that offers `tunneld-data`, as a data
/// channel's does (here through the buffered stream: what matters is the offer).
async fn data_channel_to(tunnel: SocketAddr, pin: &str) -> tunneld::net::transport::TunnelStream {
    let config =
        tunneld::config::ClientConfig { server: tunnel.to_string(), server_fingerprint: Some(pin.to_string()), ..Default::default() };
    let (mut config, name) = tunneld::net::tls::client_config(&config).unwrap();
    config.alpn_protocols = vec![b"tunneld-data".to_vec()];
    let tcp = tokio::net::TcpStream::connect(tunnel).await.unwrap();
    let (sent, received) = Metrics::new().tunnel_meters("default");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, MeteredStream::new(tcp, sent, received)).await;
    tunneld::net::transport::TunnelStream::Tls(Box::new(tls.expect("TLS handshake").into()))
}

// ------------------------------------------------- the server's channel against a rustls client

/// A fresh identity (`common::tunnel::data_channel_identity`) whose client
/// offers `alpn`.
fn identity(alpn: &[&[u8]]) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let (server, mut client) = data_channel_identity(None);
    client.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (Arc::new(server), Arc::new(client))
}

/// A blocking rustls client (in a thread) that completes its handshake and
/// then does `then`; the server's channel as the tunnel port makes it.
async fn server_channel(then: fn(rustls::ClientConnection, TcpStream)) -> (TlsDataChannel, bool) {
    let (server, client) = identity(&[DATA_ALPN]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut tcp = TcpStream::connect(addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let name = rustls::pki_types::ServerName::try_from("tunneld").unwrap();
        let mut conn = rustls::ClientConnection::new(client, name).unwrap();
        while conn.is_handshaking() {
            if conn.complete_io(&mut tcp).is_err() {
                return;
            }
        }
        then(conn, tcp)
    });
    let (tcp, _) = listener.accept().await.unwrap();
    let (sent, received) = Metrics::new().tunnel_meters("default");
    let mut io = MeteredStream::new(tcp, sent, received);
    let (hello, offers_data) = tls_channel::read_client_hello(&mut io).await.expect("a ClientHello");
    let accept = tls_channel::accept(server, io, hello);
    let channel = tokio::time::timeout(Duration::from_secs(10), accept).await.expect("the handshake hangs").expect("the handshake");
    (channel, offers_data)
}

/// Records, then close_notify: every byte, then a clean end; and the hello
/// was seen to offer `tunneld-data`.
#[tokio::test]
async fn the_servers_channel_reads_every_byte_and_ends_on_close_notify() {
    let (mut channel, offers_data) = server_channel(|mut conn, mut tcp| {
        for piece in noise(200_000, 7).chunks(10_000) {
            conn.writer().write_all(piece).unwrap();
            flush_tls(&mut conn, &mut tcp);
        }
        conn.send_close_notify();
        flush_tls(&mut conn, &mut tcp);
        std::thread::sleep(Duration::from_secs(2));
    })
    .await;
    assert!(offers_data, "the hello's ALPN offer was seen");
    let (got, ended) = read_all(&mut channel).await;
    ended.expect("close_notify ends the stream cleanly");
    assert!(got == noise(200_000, 7), "{} bytes arrived, altered or not all", got.len());
}

/// Garbage where a record should be: the good record's bytes, then an
/// `InvalidData` error carrying rustls's reason, while the socket stays open.
#[tokio::test]
async fn garbage_to_the_servers_channel_is_a_clear_error() {
    let (mut channel, _) = server_channel(|mut conn, mut tcp| {
        conn.writer().write_all(b"a good record first").unwrap();
        flush_tls(&mut conn, &mut tcp);
        tcp.write_all(&[0x42; 64]).unwrap();
        std::thread::sleep(Duration::from_secs(5));
    })
    .await;
    let (got, ended) = read_all(&mut channel).await;
    assert_eq!(got, b"a good record first");
    let err = ended.expect_err("garbage is an error");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_some(), "carries the rustls error: {err}");
}

/// A record cut off by the client's close: `UnexpectedEof`, saying so.
#[tokio::test]
async fn a_cut_record_to_the_servers_channel_is_an_unexpected_eof() {
    let (mut channel, _) = server_channel(|mut conn, mut tcp| {
        conn.writer().write_all(&[7u8; 10_000]).unwrap();
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire).unwrap();
        }
        tcp.write_all(&wire[..wire.len() - 100]).unwrap();
        let _ = tcp.shutdown(Shutdown::Write);
        std::thread::sleep(Duration::from_secs(2));
    })
    .await;
    let (got, ended) = read_all(&mut channel).await;
    assert!(got.is_empty(), "no byte of a record that did not arrive whole");
    let err = ended.expect_err("a cut record is an error");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    assert!(err.to_string().contains("middle of a TLS record"), "{err}");
}

/// A TCP EOF without close_notify after whole records: their bytes, then
/// `UnexpectedEof` (a truncation must not pass for a clean end).
#[tokio::test]
async fn an_eof_without_close_notify_to_the_servers_channel_is_an_error_after_the_data() {
    let (mut channel, _) = server_channel(|mut conn, mut tcp| {
        conn.writer().write_all(&[9u8; 40_000]).unwrap();
        flush_tls(&mut conn, &mut tcp);
        let _ = tcp.shutdown(Shutdown::Write);
        std::thread::sleep(Duration::from_secs(2));
    })
    .await;
    let (got, ended) = read_all(&mut channel).await;
    assert_eq!(got.len(), 40_000);
    let err = ended.expect_err("EOF without close_notify is an error");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    assert!(err.to_string().contains("close_notify"), "{err}");
}

/// Before the handshake: garbage instead of a ClientHello is `InvalidData`
/// (with rustls's alert sent back), a hello cut by EOF is `UnexpectedEof`, and
/// a hello without ALPN is read as not offering `tunneld-data`. None hangs.
#[tokio::test]
async fn the_client_hello_is_read_whole_or_refused_clearly() {
    async fn hello_from(send: Vec<u8>, close: bool) -> std::io::Result<bool> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let writer = std::thread::spawn(move || {
            let mut tcp = TcpStream::connect(addr).unwrap();
            tcp.write_all(&send).unwrap();
            if close {
                tcp.shutdown(Shutdown::Write).unwrap();
            }
            std::thread::sleep(Duration::from_secs(2));
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let (sent, received) = Metrics::new().tunnel_meters("default");
        let mut io = MeteredStream::new(tcp, sent, received);
        let read = tokio::time::timeout(Duration::from_secs(10), tls_channel::read_client_hello(&mut io)).await.expect("hangs");
        drop(writer);
        read.map(|(_, offers)| offers)
    }
    fn client_hello(alpn: &[&[u8]]) -> Vec<u8> {
        let (_, client) = identity(alpn);
        let name = rustls::pki_types::ServerName::try_from("tunneld").unwrap();
        let mut conn = rustls::ClientConnection::new(client, name).unwrap();
        let mut wire = Vec::new();
        conn.write_tls(&mut wire).unwrap();
        wire
    }
    let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x20];
    garbage.extend_from_slice(&[0xee; 32]);
    let err = hello_from(garbage, false).await.expect_err("garbage is not a hello");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");

    let hello = client_hello(&[DATA_ALPN]);
    let err = hello_from(hello[..hello.len() / 2].to_vec(), true).await.expect_err("half a hello");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");

    assert!(hello_from(hello, false).await.expect("a whole hello"), "tunneld-data offered");
    assert!(!hello_from(client_hello(&[]), false).await.expect("a hello without ALPN"), "nothing offered");
    assert!(!hello_from(client_hello(&[b"h2"]), false).await.expect("another ALPN"), "tunneld-data not offered");
}

// ------------------------------------------------- system calls on the server's side

/// The server reads its data channel in large pieces: the unbuffered channel
/// asks for 128 KiB per `recvfrom`, where the buffered stream's read-ahead
/// asked for 64 KiB (so main needs at least 16 calls per MiB downloaded).
#[test]
fn the_server_reads_the_download_in_large_pieces() {
    let Some(strace) = common::tools::external_tool("strace", "the_server_reads_the_download_in_large_pieces") else {
        return;
    };
    const MIB: usize = 64;
    let (server, _client) = server_and_client(SECRET, true);
    let port = free_port();
    create_mapping(&server, port, download_target(), true);
    // The first visitor opens what is opened once; it is not counted.
    let mut first = TcpStream::connect(loopback(port)).unwrap();
    first.write_all(&1000u32.to_be_bytes()).unwrap();
    let mut got = Vec::new();
    first.read_to_end(&mut got).unwrap();
    drop(first);
    wait_idle(&server, port);

    let trace = Strace::attach(&strace, server.child.id());
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    visitor.write_all(&((MIB << 20) as u32).to_be_bytes()).unwrap();
    let mut total = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match visitor.read(&mut buf).expect("the download") {
            0 => break,
            n => total += n,
        }
    }
    assert_eq!(total, MIB << 20, "every byte arrived");
    drop(visitor);
    wait_idle(&server, port);
    let calls = trace.finish();
    let reads = (calls.get("recvfrom").copied().unwrap_or(0) + calls.get("read").copied().unwrap_or(0)) as f64 / MIB as f64;
    eprintln!("TLS tunnel downstream, server: {reads:.1} reads per MiB; all calls: {calls:?}");
    assert!(reads < 14.0, "{reads:.1} reads per MiB in the server (want 8 for full 128 KiB reads; 16 is the most 64 KiB reads can do)");
}
