//! Speaking the tunnel protocol by hand, through the crate's own types: TLS
//! connections pinned like a real client's, from a chosen loopback source, and
//! the control channel's handshake.

use std::net::{IpAddr, SocketAddr};

use tunneld::net::metered::MeteredStream;
use tunneld::net::transport::TunnelStream;
use tunneld::telemetry::Metrics;
use tunneld::tunnel::auth;
use tunneld::tunnel::frame::{read_frame, write_frame};
use tunneld::tunnel::message::{Auth, Challenge, Opening, Verdict, PROTOCOL_VERSION};

/// A small runtime for in-process peers (two workers, as on the smallest CI machine).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("a tokio runtime")
}

/// A TLS connection to a server's tunnel port from the source address `from`
/// (all of 127.0.0.0/8 is loopback), pinned to `pin` like a real client. `Err`
/// when the server refused it (the TLS handshake failed).
pub async fn tls_connect_from(from: IpAddr, tunnel: SocketAddr, pin: &str) -> std::io::Result<TunnelStream> {
    let config =
        tunneld::config::ClientConfig { server: tunnel.to_string(), server_fingerprint: Some(pin.to_string()), ..Default::default() };
    let (connector, name) = tunneld::net::tls::connector(&config).expect("a TLS connector");
    let socket = if from.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(from, 0))?;
    let tcp = socket.connect(tunnel).await?;
    let (sent, received) = Metrics::new().tunnel_meters("default");
    let tls = connector.connect(name, MeteredStream::new(tcp, sent, received)).await?;
    Ok(TunnelStream::Tls(Box::new(tls.into())))
}

/// [`tls_connect_from`] 127.0.0.1, which must be admitted.
pub async fn tls_connect(tunnel: SocketAddr, pin: &str) -> TunnelStream {
    tls_connect_from([127, 0, 0, 1].into(), tunnel, pin).await.expect("a TLS connection to the tunnel port")
}

/// Opens a control channel as `client`: the hello, and the server's challenge nonce.
pub async fn challenge_as(stream: &mut TunnelStream, client: &str) -> String {
    write_frame(stream, &Opening::Control { version: PROTOCOL_VERSION, client: client.into(), features: vec![] })
        .await
        .expect("send hello");
    match read_frame(stream).await.expect("a challenge").0 {
        Challenge::Challenge { nonce } => nonce,
        other => panic!("expected a challenge, got {other:?}"),
    }
}

/// The control handshake as `default` with `secret`: the server's verdict.
pub async fn authenticate(stream: &mut TunnelStream, secret: &str) -> Verdict {
    let nonce = challenge_as(stream, "default").await;
    let mac = auth::sign(secret, &nonce, &stream.binding());
    write_frame(stream, &Auth::Auth { mac }).await.expect("send auth");
    read_frame(stream).await.expect("a verdict").0
}

/// Writes what a rustls connection (either side) has queued, to the socket.
pub fn flush_tls<T>(conn: &mut rustls::ConnectionCommon<T>, tcp: &mut std::net::TcpStream) {
    while conn.wants_write() {
        conn.write_tls(tcp).unwrap();
    }
}

/// Reads a data channel until it ends: the bytes, and how it ended (a read
/// that hangs for 10 s fails the test).
pub async fn read_all(channel: &mut tunneld::net::tls_channel::TlsDataChannel) -> (Vec<u8>, std::io::Result<()>) {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), channel.read(&mut buf)).await.expect("a read hangs");
        match read {
            Ok(0) => return (got, Ok(())),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => return (got, Err(e)),
        }
    }
}

/// A visitor of a new tunneled mapping on `server` sends 5,000 bytes, and once
/// the target has read them, resets: the target must see the reset (not a
/// clean EOF) through the tunnel.
pub fn a_visitor_reset_reaches_the_target(server: &super::Daemon) {
    use std::io::{Read, Write};
    use std::sync::mpsc;
    use std::time::Duration;
    const SENT: usize = 5000;
    let (read_all_sent, all_sent_read) = mpsc::channel::<()>();
    let (seen, saw) = mpsc::channel::<std::io::ErrorKind>();
    let (read_all_sent, seen) = (std::sync::Mutex::new(read_all_sent), std::sync::Mutex::new(seen));
    let waiting = super::spawn_target(move |mut conn| {
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        let kind = loop {
            match conn.read(&mut buf) {
                Ok(0) => break std::io::ErrorKind::UnexpectedEof,
                Ok(n) => {
                    total += n;
                    if total == SENT {
                        let _ = read_all_sent.lock().unwrap().send(());
                    }
                }
                Err(e) => break e.kind(),
            }
        };
        let _ = seen.lock().unwrap().send(kind);
    });
    let port = super::free_port();
    super::create_mapping(server, port, waiting, true);
    let visitor = std::net::TcpStream::connect(super::loopback(port)).unwrap();
    (&visitor).write_all(&[2u8; SENT]).unwrap();
    all_sent_read.recv_timeout(Duration::from_secs(15)).expect("the target reads the visitor's bytes");
    socket2::SockRef::from(&visitor).set_linger(Some(Duration::ZERO)).unwrap();
    drop(visitor);
    let kind = saw.recv_timeout(Duration::from_secs(15)).expect("the target learns of the visitor's reset");
    assert_eq!(kind, std::io::ErrorKind::ConnectionReset);
}

/// A fresh identity for a data channel: the server's configuration (TLS 1.3,
/// listing `tunneld-data`, only `suite` when given) and the daemon's client
/// configuration pinned to it (the caller may change what it offers).
pub fn data_channel_identity(suite: Option<rustls::SupportedCipherSuite>) -> (rustls::ServerConfig, rustls::ClientConfig) {
    let certified = rcgen::generate_simple_self_signed(vec!["tunneld".to_string()]).unwrap();
    let cert = rustls::pki_types::CertificateDer::from(certified.cert.der().to_vec());
    let pin = format!("sha256:{}", hex::encode(super::sha256(&cert)));
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
    let mut provider = rustls::crypto::ring::default_provider();
    if let Some(suite) = suite {
        provider.cipher_suites = vec![suite];
    }
    let mut server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    server.alpn_protocols = vec![tunneld::net::tls_channel::DATA_ALPN.to_vec()];
    let client = tunneld::config::ClientConfig { server: "127.0.0.1:1".into(), server_fingerprint: Some(pin), ..Default::default() };
    let (client, _) = tunneld::net::tls::client_config(&client).unwrap();
    (server, client)
}
