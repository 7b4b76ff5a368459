//! The client's half of a control channel's handshake: hello, challenge, the
//! HMAC answer, the verdict. (The server's half lives with the tunnel hub, which
//! knows the clients and throttles failures.)

use tokio::io::{AsyncRead, AsyncWrite};

use super::auth;
use super::frame::{read_frame, write_frame, ProtocolError};
use super::message::{client_features, explain_rejection, Auth, Challenge, Opening, Verdict, PROTOCOL_VERSION};

/// An authenticated session as the server granted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Welcome {
    /// The token this session's data channels present.
    pub session: String,
    pub heartbeat_interval_secs: u64,
}

/// Why the server did not let this client in.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HandshakeError {
    /// Refused before authentication: another protocol version, a bad name, a
    /// TLS/plain mismatch.
    #[error("server rejected the connection: {0}")]
    Rejected(String),
    /// Refused unheard: the server throttles this address for `retry_after_secs`.
    #[error("{reason}")]
    Throttled { reason: String, retry_after_secs: u64 },
    /// The answer to the challenge was refused: unknown name or wrong secret.
    #[error("{0}")]
    AuthFailed(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

/// Runs the handshake as client `name` with `secret` on `stream`, whose TLS
/// session (if any) yields `binding`.
pub(crate) async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    name: &str,
    secret: &str,
    binding: impl FnOnce(&S) -> Vec<u8>,
) -> Result<Welcome, HandshakeError> {
    let hello = Opening::Control { version: PROTOCOL_VERSION, client: name.to_string(), features: client_features() };
    write_frame(stream, &hello).await?;
    let nonce = match read_frame(stream).await?.0 {
        Challenge::Challenge { nonce } => nonce,
        Challenge::Rejected { reason, retry_after_secs: Some(secs) } => {
            return Err(HandshakeError::Throttled { reason, retry_after_secs: secs })
        }
        Challenge::Rejected { reason, .. } => return Err(HandshakeError::Rejected(explain_rejection(&reason))),
    };
    let mac = auth::sign(secret, &nonce, &binding(stream));
    write_frame(stream, &Auth::Auth { mac }).await?;
    match read_frame(stream).await?.0 {
        Verdict::Welcome { session, heartbeat_interval_secs } => Ok(Welcome { session, heartbeat_interval_secs }),
        Verdict::Rejected { reason } => Err(HandshakeError::AuthFailed(reason)),
    }
}
