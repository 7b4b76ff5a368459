//! How the client reaches the server: TCP, counted on the wire as this client's
//! tunnel bytes, then TLS (verified by a pinned fingerprint or a CA) unless
//! `client.tls = false`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::net::TcpStream;
use tracing::warn;

use crate::config::ClientConfig;
use crate::net::metered::MeteredStream;
use crate::net::socket;
use crate::net::tls;
use crate::net::transport::TunnelStream;
use crate::telemetry::{session_result, Metrics};

const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on the TLS handshake, and (twice) on the tunnel handshake after it.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The server's defences refused the connection before any handshake: too many
/// failed or unfinished handshakes from this client's address.
#[derive(Debug, thiserror::Error)]
#[error("{server}: {}", tls::THROTTLED)]
pub(super) struct Throttled {
    server: String,
}

/// Opens tunnel connections, control and data channels alike.
pub(super) struct Dialer {
    pub(super) config: ClientConfig,
    pub(super) metrics: Arc<Metrics>,
    tls: Option<(tokio_rustls::TlsConnector, rustls::pki_types::ServerName<'static>)>,
}

impl Dialer {
    /// Fails when TLS is on and the configured trust (pin or CA) is unusable.
    pub(super) fn new(config: ClientConfig, metrics: Arc<Metrics>) -> anyhow::Result<Dialer> {
        let tls = match config.tls {
            true => Some(tls::connector(&config)?),
            false => {
                warn!("client.tls = false: the tunnel is NOT encrypted and the server is not authenticated; use only on a trusted network");
                None
            }
        };
        Ok(Dialer { config, metrics, tls })
    }

    pub(super) async fn connect(&self) -> anyhow::Result<TunnelStream> {
        let server = &self.config.server;
        let tcp = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(server))
            .await
            .map_err(|_| anyhow!("connecting to {server} timed out"))?
            .with_context(|| format!("cannot connect to {server}"))?;
        socket::tune(&tcp);
        let (sent, received) = self.metrics.tunnel_meters(&self.config.name);
        let metered = MeteredStream::new(tcp, sent, received);
        let Some((connector, name)) = &self.tls else {
            return Ok(TunnelStream::Plain(Box::new(metered)));
        };
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name.clone(), metered.reading_ahead())).await {
            Ok(Ok(tls)) => Ok(TunnelStream::Tls(Box::new(tls.into()))),
            Ok(Err(e)) if tls::refused_as_throttled(&e) => {
                self.metrics.count_session(session_result::THROTTLED);
                Err(Throttled { server: server.clone() }.into())
            }
            Ok(Err(e)) => {
                self.metrics.count_session(session_result::TLS_ERROR);
                bail!("TLS with {server}: {}", tls::explain_client_error(&e, &self.config))
            }
            Err(_) => bail!("TLS handshake with {server} timed out"),
        }
    }
}
