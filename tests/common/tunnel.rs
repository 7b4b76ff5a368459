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
