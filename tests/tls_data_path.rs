//! Issue 24 §3: a client's data channels speak TLS through rustls's unbuffered
//! API (`tunneld::net::tls_channel`). What must not change with it: every byte
//! arrives and is counted, both ways, at every chunk and record boundary;
//! half-closes and resets cross the tunnel each way; pooled channels are
//! reused; and a peer that breaks TLS (garbage, a cut record, a TCP EOF without
//! close_notify) gives a clear error, never a hang.
//!
//! The first group drives the real binaries; the second puts the channel in
//! front of a rustls server this test controls byte by byte.
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::strace::{self, Strace};
use common::tunnel::{a_visitor_reset_reaches_the_target, flush_tls, read_all};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tunneld::net::metered::MeteredStream;
use tunneld::net::tls_channel::{self, TlsDataChannel};
use tunneld::telemetry::Metrics;

const SECRET: &str = "tls data path secret";

fn mapping_bytes(text: &str, port: u16, direction: &str) -> Option<f64> {
    metric_value(text, "tunneld_mapping_bytes_total", &[("port", &port.to_string()), ("direction", direction)])
}

/// Sizes around a chunk's payload (65,532), a full chunk, a TLS record (16 KiB),
/// and a large transfer, one visitor after another over the pooled channels;
/// each comes back whole and the mapping counts exactly their sum each way.
#[test]
fn every_byte_crosses_the_tls_tunnel_both_ways_at_chunk_and_record_boundaries() {
    let (server, _client) = server_and_client(SECRET, true);
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    let sizes = [1usize, 16_383, 16_384, 16_385, 65_531, 65_532, 65_533, 65_536, 65_537, 131_064, (8 << 20) + 3];
    for &len in &sizes {
        let payload = random_bytes(len);
        let back = roundtrip(loopback(port), &payload);
        assert_eq!(back.len(), len, "{len} bytes sent, {} came back", back.len());
        assert!(sha256(&back) == sha256(&payload), "{len} bytes came back altered");
    }
    let expected: f64 = sizes.iter().sum::<usize>() as f64;
    let text = wait_for("every exchange to end", Duration::from_secs(10), || {
        let t = metrics_text(&server);
        (metric_value(&t, "tunneld_mapping_active_connections", &[("port", &port.to_string())]) == Some(0.0)).then_some(t)
    });
    assert_eq!(mapping_bytes(&text, port, "sent"), Some(expected));
    assert_eq!(mapping_bytes(&text, port, "received"), Some(expected));
}

/// The target half-closes first (its reply, then FIN) and still reads the
/// visitor's late bytes; the visitor half-closes after them, and the target's
/// count of what it read comes back... on a second connection, since its side is shut.
#[test]
fn half_closes_cross_the_tls_tunnel_each_way() {
    let (server, _client) = server_and_client(SECRET, true);
    let (counts, counted) = std::sync::mpsc::channel::<usize>();
    let counts = std::sync::Mutex::new(counts);
    let target = spawn_target(move |mut conn| {
        conn.write_all(b"reply first").unwrap();
        conn.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        let _ = conn.read_to_end(&mut got);
        let _ = counts.lock().unwrap().send(got.len());
    });
    let port = free_port();
    create_mapping(&server, port, target, true);
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    visitor.write_all(b"x").unwrap();
    // The target's reply, then its half-close, while this side is still open.
    let mut reply = Vec::new();
    visitor.read_to_end(&mut reply).expect("the target's half-close arrives as EOF");
    assert_eq!(reply, b"reply first");
    let late = random_bytes(200_000);
    visitor.write_all(&late).expect("the visitor may still write after the target half-closed");
    visitor.shutdown(Shutdown::Write).unwrap();
    let n = counted.recv_timeout(Duration::from_secs(15)).expect("the target saw the visitor's half-close");
    assert_eq!(n, 1 + late.len(), "the target read every byte the visitor sent after the target's half-close");
    // And the channel went back to the pool in good order: the next visitor is served.
    echo_through_target_again(&server);
}

fn echo_through_target_again(server: &Daemon) {
    let port = free_port();
    create_mapping(server, port, echo_server(), true);
    echo_through(port, 100_000);
}

/// A target that resets mid-transfer resets the visitor; a visitor that
/// resets mid-transfer resets the target. The tunnel serves the next visitor.
#[test]
fn resets_cross_the_tls_tunnel_each_way() {
    let (server, _client) = server_and_client(SECRET, true);
    // Reads a little, then resets.
    let resetting = spawn_target(|mut conn| {
        let mut buf = [0u8; 1000];
        let _ = conn.read_exact(&mut buf);
        socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
    });
    let port = free_port();
    create_mapping(&server, port, resetting, true);
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    visitor.write_all(&[1u8; 1000]).unwrap();
    let mut buf = [0u8; 16];
    let err = visitor.read(&mut buf).expect_err("a target's reset reaches the visitor as a reset");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");

    // The other way: the target waits; the visitor resets.
    a_visitor_reset_reaches_the_target(&server);
    echo_through_target_again(&server);
}

// ------------------------------------------------- the channel against a rustls server

/// A blocking rustls server on 127.0.0.1:0 with a fresh self-signed identity;
/// `serve` gets each connection after its handshake. Returns its address and
/// the pin a client needs.
fn tls_server(serve: fn(rustls::ServerConnection, TcpStream)) -> (SocketAddr, String) {
    let certified = rcgen::generate_simple_self_signed(vec!["tunneld".to_string()]).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(certified.cert.der().to_vec());
    let pin = format!("sha256:{}", hex::encode(sha256(&cert)));
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut tcp in listener.incoming().flatten() {
            let mut conn = rustls::ServerConnection::new(config.clone()).unwrap();
            tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            while conn.is_handshaking() {
                if conn.complete_io(&mut tcp).is_err() {
                    break;
                }
            }
            std::thread::spawn(move || serve(conn, tcp));
        }
    });
    (addr, pin)
}

/// The channel to `addr`, pinned to `pin`, as a client's data channel dials it.
async fn channel_to(addr: SocketAddr, pin: &str) -> TlsDataChannel {
    let config =
        tunneld::config::ClientConfig { server: addr.to_string(), server_fingerprint: Some(pin.to_string()), ..Default::default() };
    let (config, name) = tunneld::net::tls::client_config(&config).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sent, received) = Metrics::new().tunnel_meters("default");
    match tls_channel::connect(Arc::new(config), name, MeteredStream::new(tcp, sent, received)).await {
        Ok(channel) => channel,
        Err((e, _)) => panic!("TLS handshake: {e}"),
    }
}

/// Echoes plaintext until the client's close_notify, then sends its own and closes.
fn echo_until_close_notify(mut conn: rustls::ServerConnection, mut tcp: TcpStream) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match conn.read_tls(&mut tcp) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let state = conn.process_new_packets().unwrap();
        loop {
            match conn.reader().read(&mut buf) {
                Ok(0) => {
                    conn.send_close_notify();
                    flush_tls(&mut conn, &mut tcp);
                    let _ = tcp.shutdown(Shutdown::Write);
                    return;
                }
                Ok(n) => conn.writer().write_all(&buf[..n]).unwrap(),
                Err(_) => break,
            }
        }
        flush_tls(&mut conn, &mut tcp);
        if state.peer_has_closed() && state.plaintext_bytes_to_read() == 0 {
            conn.send_close_notify();
            flush_tls(&mut conn, &mut tcp);
            let _ = tcp.shutdown(Shutdown::Write);
            return;
        }
    }
}

/// 6 MiB in writes of odd sizes (from 1 byte to past a record and a chunk)
/// come back whole; `shutdown` sends close_notify, and the server's
/// close_notify ends the read with 0, not an error.
#[tokio::test]
async fn the_channel_carries_every_byte_both_ways_and_ends_on_close_notify() {
    let (addr, pin) = tls_server(echo_until_close_notify);
    let channel = channel_to(addr, &pin).await;
    let payload = random_bytes(6 << 20);
    let (mut reader, mut writer) = tokio::io::split(channel);
    let sent = payload.clone();
    let writing = tokio::spawn(async move {
        let sizes = [1usize, 5, 16_384, 16_385, 65_532, 65_536, 70_000, 3];
        let (mut at, mut i) = (0, 0);
        while at < sent.len() {
            let n = sizes[i % sizes.len()].min(sent.len() - at);
            writer.write_all(&sent[at..at + n]).await.unwrap();
            if i % 3 == 0 {
                writer.flush().await.unwrap();
            }
            at += n;
            i += 1;
        }
        writer.shutdown().await.unwrap();
        writer
    });
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    let ended = loop {
        let read = tokio::time::timeout(Duration::from_secs(20), reader.read(&mut buf)).await.expect("a read hangs");
        match read {
            Ok(0) => break Ok(()),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    let _writer = writing.await.unwrap();
    ended.expect("the server's close_notify ends the stream cleanly");
    assert_eq!(got.len(), payload.len());
    assert!(sha256(&got) == sha256(&payload), "the echo came back altered");
}

/// Garbage where a record should be: an `InvalidData` error with rustls's
/// reason, at once.
#[tokio::test]
async fn garbage_instead_of_a_record_is_a_clear_error() {
    let (addr, pin) = tls_server(|mut conn, mut tcp| {
        conn.writer().write_all(b"a good record first").unwrap();
        flush_tls(&mut conn, &mut tcp);
        tcp.write_all(&[0x42; 64]).unwrap();
        std::thread::sleep(Duration::from_secs(5)); // hold the socket open: the error must not wait for EOF
    });
    let mut channel = channel_to(addr, &pin).await;
    let (got, ended) = read_all(&mut channel).await;
    assert_eq!(got, b"a good record first");
    let err = ended.expect_err("garbage is an error");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidData, "{err}");
    assert!(err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()).is_some(), "carries the rustls error: {err}");
}

/// A record cut off by the peer's close: `UnexpectedEof`, saying so.
#[tokio::test]
async fn a_truncated_record_is_an_unexpected_eof() {
    let (addr, pin) = tls_server(|mut conn, mut tcp| {
        conn.writer().write_all(&[7u8; 10_000]).unwrap();
        let mut wire = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut wire).unwrap();
        }
        tcp.write_all(&wire[..wire.len() - 100]).unwrap();
        let _ = tcp.shutdown(Shutdown::Write);
        std::thread::sleep(Duration::from_secs(2));
    });
    let mut channel = channel_to(addr, &pin).await;
    let (got, ended) = read_all(&mut channel).await;
    assert!(got.is_empty(), "no byte of a record that did not arrive whole");
    let err = ended.expect_err("a cut record is an error");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    assert!(err.to_string().contains("middle of a TLS record"), "{err}");
}

/// A TCP EOF without close_notify after whole records: the records' bytes,
/// then `UnexpectedEof` (a truncation attack must not look like a clean end).
#[tokio::test]
async fn a_tcp_eof_without_close_notify_is_an_error_after_the_data() {
    let (addr, pin) = tls_server(|mut conn, mut tcp| {
        conn.writer().write_all(&[9u8; 40_000]).unwrap();
        flush_tls(&mut conn, &mut tcp);
        let _ = tcp.shutdown(Shutdown::Write);
        std::thread::sleep(Duration::from_secs(2));
    });
    let mut channel = channel_to(addr, &pin).await;
    let (got, ended) = read_all(&mut channel).await;
    assert_eq!(got.len(), 40_000);
    let err = ended.expect_err("EOF without close_notify is an error");
    assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof, "{err}");
    assert!(err.to_string().contains("close_notify"), "{err}");
}

/// A server whose certificate is not the pinned one: the handshake fails with
/// the pin mismatch (what `net::tls::explain_client_error` reports), the socket comes back.
#[tokio::test]
async fn a_wrong_pin_fails_the_handshake_with_the_pin_mismatch() {
    let (addr, _pin) = tls_server(|_, _| {});
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let config = tunneld::config::ClientConfig { server: addr.to_string(), server_fingerprint: Some(wrong), ..Default::default() };
    let (config, name) = tunneld::net::tls::client_config(&config).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sent, received) = Metrics::new().tunnel_meters("default");
    let handshake = tls_channel::connect(Arc::new(config), name, MeteredStream::new(tcp, sent, received));
    let Err((err, _socket)) = tokio::time::timeout(Duration::from_secs(10), handshake).await.expect("the handshake hangs") else {
        panic!("a wrong pin was accepted");
    };
    let inner = err.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    assert!(matches!(inner, Some(rustls::Error::InvalidCertificate(_))), "{err}");
    assert!(err.to_string().contains("PinMismatch"), "{err}");
}

// ------------------------------------------------- system calls per MiB on each side

/// The client writes the target's bytes into its data channel as whole chunks:
/// header and payload, four full records, one `writev` each (16 per MiB, and a
/// few for partial writes), as the server does the other way (below).
#[test]
fn the_client_writes_each_chunk_of_the_download_in_one_call() {
    let Some(strace) = common::tools::external_tool("strace", "the_client_writes_each_chunk_of_the_download_in_one_call") else {
        return;
    };
    const MIB: usize = 32;
    let (server, client) = server_and_client(SECRET, true);
    let client = client.expect("a client");
    // A source: MIB MiB to whoever connects, then EOF.
    let source = target(|mut conn| {
        let block = vec![5u8; 1 << 20];
        for _ in 0..MIB {
            if conn.write_all(&block).is_err() {
                return;
            }
        }
        let _ = conn.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
    });
    let port = free_port();
    create_mapping(&server, port, source, true);
    // The first visitor opens what is opened once; it is not counted.
    echo_through_target_again(&server);
    let trace = Strace::attach(&strace, client.child.id());
    let mut visitor = TcpStream::connect(loopback(port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    visitor.shutdown(Shutdown::Write).unwrap();
    let mut got = Vec::new();
    visitor.read_to_end(&mut got).expect("the download");
    assert_eq!(got.len(), MIB << 20, "every byte arrived");
    wait_for("the download's exchange to end", Duration::from_secs(10), || {
        (traffic_entry(&server, port)?["active_connections"].as_u64()? == 0).then_some(())
    });
    let writev = trace.finish().get("writev").copied().unwrap_or(0) as f64 / MIB as f64;
    eprintln!("TLS tunnel downstream, client: {writev:.1} writev per MiB");
    assert!(writev <= 28.0, "{writev:.1} writev per MiB from the client (want 16, and a few for partial writes)");
}

/// Upstream, each chunk the server writes to the data channel (a 4-byte header
/// and its payload) fills exactly four 16 KiB TLS records and leaves in one
/// `writev`: 16 per MiB, plus the odd partial write. A full 64 KiB payload
/// used to spill 4 bytes into a fifth record, written by a second call.
#[test]
fn the_server_writes_each_chunk_of_the_upload_in_one_call() {
    let Some(strace) = common::tools::external_tool("strace", "the_server_writes_each_chunk_of_the_upload_in_one_call") else {
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
    let upload = |mib: usize| {
        let mut conn = TcpStream::connect(loopback(port)).expect("connect");
        conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let block = vec![7u8; 1 << 20];
        for _ in 0..mib {
            conn.write_all(&block).unwrap();
        }
        conn.shutdown(Shutdown::Write).unwrap();
        let mut total = [0u8; 8];
        conn.read_exact(&mut total).expect("the sink's count");
        assert_eq!(u64::from_be_bytes(total), (mib << 20) as u64, "every byte arrived");
        wait_for("the upload's exchange to end", Duration::from_secs(10), || {
            (traffic_entry(&server, port)?["active_connections"].as_u64()? == 0).then_some(())
        });
    };
    // The first visitor opens what is opened once; it is not counted.
    upload(1);
    let trace = Strace::attach(&strace, server.child.id());
    upload(MIB);
    let calls = trace.finish();
    let writev = strace::per(&calls, "writev", MIB);
    eprintln!("TLS tunnel upstream, server: {writev:.1} writev per MiB");
    assert!(
        writev <= 28.0,
        "{writev:.1} writev per MiB through the TLS tunnel (want 16, and a few for partial writes): {}",
        strace::table(&calls, MIB)
    );
}
