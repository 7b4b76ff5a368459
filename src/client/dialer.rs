//! How the client reaches the server: TCP, counted on the wire as this client's
//! tunnel bytes, then TLS (verified by a pinned fingerprint or a CA) unless
//! `client.tls = false`.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tracing::warn;

use super::diagnosis::ConnectFailure;
use crate::config::ClientConfig;
use crate::net::metered::MeteredStream;
use crate::net::quic;
use crate::net::socket;
use crate::net::tls;
use crate::net::tls_channel;
use crate::net::transport::TunnelStream;
use crate::telemetry::connect_failure::{THROTTLED, TLS_ERROR, UNREACHABLE};
use crate::telemetry::{session_result, Metrics, Tunnel};
use crate::tunnel::frame;
use crate::tunnel::message::Challenge;

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the TLS handshake, and (twice) on the tunnel handshake after it.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a refused handshake may take to deliver the rest of its refusal.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

/// Opens tunnel connections, control and data channels alike.
pub(super) struct Dialer {
    pub(super) config: ClientConfig,
    pub(super) metrics: Arc<Metrics>,
    /// The buffered connector (control connections), the server name, and the
    /// configuration again for data channels' unbuffered connections.
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>, Arc<rustls::ClientConfig>)>,
    /// With TLS: QUIC with the same trust, for UDP mappings' datagrams.
    pub(super) quic: Option<quic::Dialer>,
}

impl Dialer {
    /// Fails when TLS is on and the configured trust (pin or CA) is unusable.
    pub(super) fn new(config: ClientConfig, metrics: Arc<Metrics>) -> anyhow::Result<Dialer> {
        let tls = match config.tls {
            true => {
                let (tls, name) = tls::client_config(&config)?;
                // Data channels hand their traffic secrets over to their own
                // record layer after the handshake (`net::tls_channel`); the
                // control connection keeps them inside rustls.
                let mut data = tls.clone();
                data.enable_secret_extraction = true;
                Some((tokio_rustls::TlsConnector::from(Arc::new(tls)), name, Arc::new(data)))
            }
            false => {
                warn!("client.tls = false: the tunnel is NOT encrypted and the server is not authenticated; use only on a trusted network");
                None
            }
        };
        // The same trust again, for QUIC; without it datagrams go framed.
        let quic = match &tls {
            Some(_) => match tls::client_config(&config).and_then(|(tls, name)| quic::Dialer::new(tls, &name)) {
                Ok(quic) => Some(quic),
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "no QUIC for UDP mappings' datagrams; they go framed");
                    None
                }
            },
            None => None,
        };
        Ok(Dialer { config, metrics, tls, quic })
    }

    /// A control connection (TLS through rustls's buffered stream, whose exporter
    /// the auth HMAC is bound to).
    pub(super) async fn connect(&self) -> Result<TunnelStream, ConnectFailure> {
        self.dial(false).await
    }

    /// A data channel: under TLS through rustls's unbuffered API
    /// (`net::tls_channel`), which copies less per byte, offering the ALPN
    /// protocol `tunneld-data` so that a server that knows it does the same.
    pub(super) async fn connect_data(&self) -> Result<TunnelStream, ConnectFailure> {
        self.dial(true).await
    }

    async fn dial(&self, data: bool) -> Result<TunnelStream, ConnectFailure> {
        let server = &self.config.server;
        let tcp = match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(server)).await {
            Ok(Ok(tcp)) => tcp,
            Ok(Err(e)) => return Err(ConnectFailure::new(UNREACHABLE, format!("cannot connect to {server}: {e}"))),
            Err(_) => return Err(ConnectFailure::new(UNREACHABLE, format!("connecting to {server} timed out"))),
        };
        socket::tune(&tcp);
        let (sent, received) = self.metrics.tunnel_meters(Tunnel::to_server(&self.config.name, server));
        let metered = MeteredStream::new(tcp, sent, received);
        let Some((connector, name, config)) = &self.tls else {
            return Ok(TunnelStream::Plain(Box::new(metered.reading_small_reads_ahead())));
        };
        let handshake = async {
            if data {
                // Reads 64 KiB at a time itself: no read-ahead under it.
                let mut tls = tls_channel::connect(config.clone(), name.clone(), metered.keeping_first_bytes()).await?;
                tls.metered().take_kept();
                Ok(TunnelStream::TlsData(Box::new(tls)))
            } else {
                let handshake = connector.connect(name.clone(), metered.reading_ahead().keeping_first_bytes()).into_fallible();
                let mut tls = handshake.await?;
                tls.get_mut().0.take_kept();
                Ok(TunnelStream::Tls(Box::new(tls.into())))
            }
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err((e, mut io))) => {
                let (reason, explained) = tls::explain_client_error(&e, &self.config);
                // A throttling server's refusal follows its access_denied alert;
                // one with TLS off sends it in the clear, which rustls finds
                // "not TLS".
                let refusal = match reason {
                    THROTTLED | TLS_ERROR => read_refusal(&mut io).await,
                    _ => None,
                };
                match (reason, refusal) {
                    (THROTTLED, refusal) | (_, refusal @ Some((_, Some(_)))) => {
                        self.metrics.count_session(session_result::THROTTLED);
                        let clear = if reason == THROTTLED { "" } else { " (said in the clear: the server runs with server.tls = false)" };
                        let (words, secs) = refusal.unwrap_or_else(|| (tls::THROTTLED.to_string(), None));
                        let message = format!("{server}: throttled by the server: {words}{clear}");
                        Err(ConnectFailure::throttled(message, secs.map(Duration::from_secs)))
                    }
                    (reason, _) => {
                        self.metrics.count_session(session_result::TLS_ERROR);
                        Err(ConnectFailure::new(reason, format!("TLS with {server}: {explained}")))
                    }
                }
            }
            Err(_) => Err(ConnectFailure::new(TLS_ERROR, format!("TLS handshake with {server} timed out"))),
        }
    }
}

/// What a throttling server sent after its access_denied alert: a plain
/// `rejected` frame with its words and, when it refuses the address for a
/// while, the seconds (see `tunnel::message::Challenge::Rejected`). `None`
/// from a server that sends only the alert.
async fn read_refusal(io: &mut MeteredStream) -> Option<(String, Option<u64>)> {
    let mut bytes = io.take_kept();
    let deadline = tokio::time::Instant::now() + REFUSAL_WAIT;
    loop {
        match parse_refusal(&bytes) {
            Refusal::Complete(reason, secs) => return Some((reason, secs)),
            Refusal::Invalid => return None,
            Refusal::Incomplete => {}
        }
        let mut more = [0u8; 512];
        match tokio::time::timeout_at(deadline, io.read(&mut more)).await {
            Ok(Ok(n)) if n > 0 && bytes.len() + n <= frame::MAX_FRAME => bytes.extend_from_slice(&more[..n]),
            _ => return None,
        }
    }
}

enum Refusal {
    Complete(String, Option<u64>),
    Incomplete,
    Invalid,
}

/// TLS alert records, then one frame: a `rejected` challenge.
fn parse_refusal(bytes: &[u8]) -> Refusal {
    const RECORD_HEADER: usize = 5;
    let mut rest = bytes;
    while rest.first() == Some(&tls::TLS_ALERT_BYTE) {
        let Some(header) = rest.get(..RECORD_HEADER) else { return Refusal::Incomplete };
        let end = RECORD_HEADER + usize::from(u16::from_be_bytes([header[3], header[4]]));
        let Some(after) = rest.get(end..) else { return Refusal::Incomplete };
        rest = after;
    }
    let Some(prefix) = rest.get(..frame::FRAME_HEADER) else { return Refusal::Incomplete };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > frame::MAX_FRAME {
        return Refusal::Invalid;
    }
    let Some(body) = rest.get(frame::FRAME_HEADER..frame::FRAME_HEADER + len) else { return Refusal::Incomplete };
    match frame::decode::<Challenge>(body) {
        Ok(Challenge::Rejected { reason, retry_after_secs }) => Refusal::Complete(reason, retry_after_secs),
        _ => Refusal::Invalid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::message::throttled_rejection;

    #[test]
    fn a_refusal_is_read_after_the_alert_whole_or_not_at_all() {
        let frame = frame::encode_frame(&Challenge::Rejected { reason: throttled_rejection(Some(12)), retry_after_secs: Some(12) });
        let wire = [&tls::THROTTLED_ALERT[..], &frame].concat();
        match parse_refusal(&wire) {
            Refusal::Complete(reason, secs) => {
                assert_eq!((reason.as_str(), secs), ("refused for 12 s after failed attempts from this address", Some(12)))
            }
            _ => panic!("not read"),
        }
        for cut in [0, 3, 7, 10, wire.len() - 1] {
            assert!(matches!(parse_refusal(&wire[..cut]), Refusal::Incomplete), "{cut} bytes");
        }
        let garbage = [&tls::THROTTLED_ALERT[..], b"\0\0\0\x02{]"].concat();
        assert!(matches!(parse_refusal(&garbage), Refusal::Invalid));
    }
}
