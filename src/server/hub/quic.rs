//! The tunnel port number over UDP: QUIC connections that clients open, after
//! their control session authenticated, to carry UDP mappings' datagrams.
//!
//! Each is admitted by the same defences as a TCP connection to the tunnel
//! port (per-source throttle, bound on unauthenticated connections), then
//! proves itself on its first stream with `quic_hello`: the client's name, its
//! session's token, and HMAC(secret, token ‖ the connection's exporter
//! value). A connection that passes becomes that session's datagram link (see
//! `udp`): datagrams as QUIC datagrams, control on the stream.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::accept::{Attempt, Failure, HANDSHAKE_TIMEOUT};
use super::registry::TunnelHub;
use crate::core::secret::tokens_equal;
use crate::core::sync::lock;
use crate::net::quic;
use crate::server::throttle::Pending;
use crate::tunnel::auth;
use crate::tunnel::frame;
use crate::tunnel::message::{version_rejection, QuicOpening, Verdict, PROTOCOL_VERSION};

impl TunnelHub {
    /// Accepts QUIC connections on `endpoint` until `shutdown`.
    pub(crate) async fn serve_quic(self: Arc<Self>, endpoint: quinn::Endpoint, shutdown: CancellationToken) {
        if let Ok(addr) = endpoint.local_addr() {
            info!(%addr, "QUIC for UDP mappings' datagrams on the tunnel port");
        }
        loop {
            let incoming = tokio::select! {
                _ = shutdown.cancelled() => break,
                incoming = endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let peer = incoming.remote_address();
            let Ok((attempt, pending)) = self.admit(peer) else {
                incoming.refuse();
                continue;
            };
            let hub = self.clone();
            tokio::spawn(async move { hub.quic_connection(incoming, attempt, pending).await });
        }
        endpoint.close(0u32.into(), b"server stopping");
    }

    async fn quic_connection(self: Arc<Self>, incoming: quinn::Incoming, attempt: Attempt, pending: Pending) {
        let peer = attempt.peer;
        let opened = async {
            let connection = incoming.await?;
            let (send, mut recv) = connection.accept_bi().await?;
            let (hello, _) = frame::read_frame::<QuicOpening, _>(&mut recv).await?;
            anyhow::Ok((connection, send, recv, hello))
        };
        let (connection, mut send, recv, hello) = match tokio::time::timeout(HANDSHAKE_TIMEOUT, opened).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                debug!(%peer, error = %format!("{e:#}"), "QUIC connection failed before its hello");
                self.failed(attempt, Failure::BadFirstFrame);
                return;
            }
            Err(_) => {
                self.failed(attempt, Failure::NoHello);
                return;
            }
        };
        let QuicOpening::Hello { version, client, session: token, mac } = hello;
        if version != PROTOCOL_VERSION {
            lock(&self.defences).throttle.refund(attempt.source(), attempt.charge, Instant::now());
            refuse(&connection, send, version_rejection(version)).await;
            return;
        }
        let binding = quic::binding(&connection);
        let session = self.session(&client).filter(|s| tokens_equal(&s.token, &token));
        let proven = match (&session, &binding) {
            (Some(session), Some(binding)) => auth::verify(session.client.secret.expose(), &token, binding, &mac),
            _ => false,
        };
        let Some(session) = session.filter(|_| proven) else {
            let late = lock(&self.defences).ended.late(&token, Instant::now());
            self.failed(attempt, if late { Failure::LateSession } else { Failure::ForgedSession });
            refuse(&connection, send, "unknown session or wrong proof".into()).await;
            return;
        };
        drop(pending);
        {
            let mut d = lock(&self.defences);
            d.throttle.refund(attempt.source(), attempt.charge, Instant::now());
            d.known.remember(attempt.source(), Instant::now());
        }
        let welcome = Verdict::Welcome { session: token, heartbeat_interval_secs: self.settings.heartbeat.as_secs().max(1) };
        if frame::write_frame(&mut send, &welcome).await.is_err() {
            return;
        }
        debug!(%peer, client = %client, session = session.id, "QUIC connection joined its client's session");
        self.attach_udp(&session, recv, send, Some(connection));
    }
}

/// Tells a refused QUIC connection why, then closes it.
async fn refuse(connection: &quinn::Connection, mut send: quinn::SendStream, reason: String) {
    let _ = frame::write_frame(&mut send, &Verdict::Rejected { reason }).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), send.stopped()).await;
    connection.close(1u32.into(), b"refused");
}
