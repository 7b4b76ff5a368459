//! QUIC on the tunnel port number over UDP, for UDP mappings' datagrams
//! (RFC 9221): the server's endpoint and the client's, with the TCP tunnel's
//! TLS — the same certificate, the same pinning or CA, TLS 1.3 with ring —
//! and the binding the client's HMAC answer is bound to, as on TCP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use rustls::pki_types::ServerName;

use super::tls::EXPORTER_LABEL;
use crate::telemetry::Meter;

/// ALPN of the tunnel's QUIC connections: nothing else is spoken on them.
const ALPN: &[u8] = b"tunneld-datagrams";

/// A quiet link is kept open (its client's session decides when it ends);
/// a peer silent this long is gone.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
const MAX_IDLE: Duration = Duration::from_secs(30);

fn transport() -> anyhow::Result<Arc<quinn::TransportConfig>> {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    transport.max_idle_timeout(Some(MAX_IDLE.try_into().context("QUIC idle timeout")?));
    Ok(Arc::new(transport))
}

/// A QUIC endpoint on a socket with large buffers (every session's datagrams
/// of a link converge on it; quinn binds one with the kernel's defaults, which
/// lost hundreds of datagrams of an iperf3 run at 200 Mbit/s).
fn endpoint(server: Option<quinn::ServerConfig>, addr: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, super::udp::bind_buffered(addr)?, runtime)
}

/// The server's QUIC endpoint on `addr` (the tunnel's address, over UDP),
/// presenting the tunnel's certificate.
pub(crate) fn server(tls: &rustls::ServerConfig, addr: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let mut tls = tls.clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).context("the tunnel's TLS configuration cannot serve QUIC")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport()?);
    endpoint(Some(config), addr).with_context(|| format!("cannot bind UDP {addr}"))
}

/// The client's side: its QUIC configuration and the name it expects the
/// server to prove, from the TLS trust it uses on TCP.
pub(crate) struct Dialer {
    config: quinn::ClientConfig,
    server_name: String,
}

impl Dialer {
    pub(crate) fn new(tls: rustls::ClientConfig, name: &ServerName<'static>) -> anyhow::Result<Dialer> {
        let mut tls = tls;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("the client's TLS configuration cannot speak QUIC")?;
        let mut config = quinn::ClientConfig::new(Arc::new(crypto));
        config.transport_config(transport()?);
        let server_name = match name {
            ServerName::DnsName(name) => name.as_ref().to_string(),
            ServerName::IpAddress(ip) => IpAddr::from(*ip).to_string(),
            other => return Err(anyhow!("unusable server name {other:?}")),
        };
        Ok(Dialer { config, server_name })
    }

    /// A QUIC connection to `server` (`host:port`), on an endpoint of its own
    /// (kept alive by the connection).
    pub(crate) async fn connect(&self, server: &str) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
        let addr = tokio::net::lookup_host(server)
            .await
            .with_context(|| format!("cannot resolve {server}"))?
            .next()
            .ok_or_else(|| anyhow!("{server} resolves to no address"))?;
        let local: IpAddr = if addr.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        let mut endpoint = endpoint(None, SocketAddr::new(local, 0)).context("cannot bind a UDP socket for QUIC")?;
        endpoint.set_default_client_config(self.config.clone());
        let connection = endpoint.connect(addr, &self.server_name)?.await?;
        Ok((endpoint, connection))
    }
}

/// Counts the connection's bytes on the wire (its UDP payloads: QUIC packets
/// with their headers, acknowledgements and retransmissions) into the
/// tunnel's meters, as a TCP tunnel connection's are: every second, and once
/// more when it closes.
pub(crate) async fn count_wire(connection: quinn::Connection, sent: Meter, received: Meter) {
    let mut counted = (0u64, 0u64);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        let closed = tokio::select! {
            _ = connection.closed() => true,
            _ = tick.tick() => false,
        };
        let stats = connection.stats();
        let now = (stats.udp_tx.bytes, stats.udp_rx.bytes);
        for (meter, before, now) in [(&sent, counted.0, now.0), (&received, counted.1, now.1)] {
            if now > before {
                meter.record(now - before);
            }
        }
        counted = now;
        if closed {
            return;
        }
    }
}

/// The value both ends of one QUIC connection derive alike, and no other
/// connection can: what the client's HMAC answer is bound to. `None` (no
/// answer is then accepted) should the exporter fail.
pub(crate) fn binding(connection: &quinn::Connection) -> Option<Vec<u8>> {
    let mut binding = vec![0u8; 32];
    connection.export_keying_material(&mut binding, EXPORTER_LABEL, b"quic").ok().map(|()| binding)
}
