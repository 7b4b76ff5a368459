//! The tunnel wire protocol: framing, messages and the HMAC handshake.
//!
//! Version 2. Every connection runs inside TLS 1.3 unless both sides turned it off.
//! Every message is a length-delimited frame (4-byte big-endian length, then JSON)
//! — the format of tokio-util's `LengthDelimitedCodec`, which the control channel
//! uses directly. Data channels read their `connect` / `connect_result` frames with
//! [`read_frame`], which never reads past the frame, so the chunks that follow
//! (see `exchange`) stay in the stream.
//!
//! A connection to the tunnel port opens with [`Message::Hello`] (control) or
//! [`Message::DataHello`] (data channel). Control: server sends a random
//! `Challenge`, client answers `Auth{mac = HMAC-SHA256(secret, nonce ‖ TLS
//! exporter)}`, server replies `Welcome` (with a session token for data channels)
//! or `Rejected`.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::LengthDelimitedCodec;

/// Bumped on any incompatible change; sent in the first frame of every connection.
pub const PROTOCOL_VERSION: u32 = 2;

/// No legitimate frame is anywhere near this; a larger length prefix is garbage.
pub const MAX_FRAME: usize = 16 * 1024;

/// Length prefix size, counted as tunnel wire bytes.
pub const FRAME_HEADER: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// client → server, first frame of a control channel. `client` names whose
    /// secret the answer will use (absent from clients before named clients:
    /// `default`).
    Hello {
        version: u32,
        #[serde(default = "default_client")]
        client: String,
    },
    /// server → client.
    Challenge { nonce: String },
    /// client → server: hex HMAC-SHA256(secret, nonce).
    Auth { mac: String },
    /// server → client: authenticated. Data channels present `session`.
    Welcome { session: String, heartbeat_interval_secs: u64 },
    /// server → client, then the server closes.
    Rejected { reason: String },
    /// Either way, every heartbeat interval; any frame proves the peer is alive.
    Heartbeat,
    /// server → client: a visitor is waiting and the pool is empty; open one more
    /// data channel.
    OpenDataChannel,
    /// client → server, first frame of a data channel.
    DataHello { version: u32, session: String },
    /// server → client on an idle data channel: dial this target and relay.
    Connect { host: String, port: u16 },
    /// client → server on that data channel: `error` is `None` when the target
    /// answered, and raw bytes follow.
    ConnectResult { error: Option<String> },
}

fn default_client() -> String {
    crate::core::names::DEFAULT_CLIENT.to_string()
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    FrameTooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unexpected message: {0}")]
    Unexpected(&'static str),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these plain enums cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(frame: &[u8]) -> Result<Message, ProtocolError> {
        Ok(serde_json::from_slice(frame)?)
    }

    /// A short name for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Challenge { .. } => "challenge",
            Message::Auth { .. } => "auth",
            Message::Welcome { .. } => "welcome",
            Message::Rejected { .. } => "rejected",
            Message::Heartbeat => "heartbeat",
            Message::OpenDataChannel => "open_data_channel",
            Message::DataHello { .. } => "data_hello",
            Message::Connect { .. } => "connect",
            Message::ConnectResult { .. } => "connect_result",
        }
    }
}

/// The codec for the control channel; same wire format as [`read_frame`].
fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(FRAME_HEADER).max_frame_length(MAX_FRAME).new_codec()
}

/// A control channel's read side, framed, and its write side (written with
/// [`write_frame`]). Control frames are a few dozen bytes, and every connected
/// client holds its control channel for as long as it is connected: the read
/// buffer starts small and grows only for a larger frame, where `Framed` would
/// hold 8 KiB each way per session.
pub fn control_channel<S: AsyncRead + AsyncWrite>(
    stream: S,
) -> (tokio_util::codec::FramedRead<tokio::io::ReadHalf<S>, LengthDelimitedCodec>, tokio::io::WriteHalf<S>) {
    const CONTROL_READ_BUFFER: usize = 256;
    let (read, write) = tokio::io::split(stream);
    (tokio_util::codec::FramedRead::with_capacity(read, codec(), CONTROL_READ_BUFFER), write)
}

/// The body length a frame header announces, refused when over [`MAX_FRAME`]
/// before any of it is allocated or read.
fn body_len(header: [u8; FRAME_HEADER]) -> Result<usize, ProtocolError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME {
        return Err(ProtocolError::FrameTooLarge(len));
    }
    Ok(len)
}

/// Reads exactly one frame and nothing more. Returns the message and its size on
/// the wire.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<(Message, usize), ProtocolError> {
    let mut len = [0u8; FRAME_HEADER];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ProtocolError::Closed),
        Err(e) => return Err(e.into()),
    }
    let len = body_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => ProtocolError::Closed,
        _ => e.into(),
    })?;
    Ok((Message::decode(&body)?, FRAME_HEADER + len))
}

/// One frame as it goes on the wire: `u32 length ‖ body`.
pub fn encode_frame(msg: &Message) -> Vec<u8> {
    let body = msg.encode();
    let mut frame = Vec::with_capacity(FRAME_HEADER + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Writes one frame; returns its size on the wire.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<usize, ProtocolError> {
    let frame = encode_frame(msg);
    w.write_all(&frame).await?;
    // Under TLS a frame is not on its way until flushed.
    w.flush().await?;
    Ok(frame.len())
}

type HmacSha256 = Hmac<Sha256>;

/// A fresh random challenge (hex).
pub fn new_nonce() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

fn mac(secret: &str, nonce: &str, binding: &[u8]) -> HmacSha256 {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(nonce.as_bytes());
    mac.update(binding);
    mac
}

/// The client's answer to a challenge: HMAC-SHA256(secret, nonce ‖ binding), where
/// `binding` is this TLS session's exporter value (empty on a plain tunnel), so
/// the answer is worthless on any other session.
pub fn sign(secret: &str, nonce: &str, binding: &[u8]) -> String {
    hex::encode(mac(secret, nonce, binding).finalize().into_bytes())
}

/// Checks a client's answer in constant time.
pub fn verify(secret: &str, nonce: &str, binding: &[u8], answer_hex: &str) -> bool {
    let Ok(answer) = hex::decode(answer_hex) else {
        return false;
    };
    mac(secret, nonce, binding).verify_slice(&answer).is_ok()
}

/// What the server answers a peer speaking another protocol version.
pub fn version_rejection(peer_version: u32) -> String {
    let upgrade = if peer_version < PROTOCOL_VERSION { "upgrade the client" } else { "upgrade the server" };
    format!("protocol version {peer_version} is not supported by this server ({PROTOCOL_VERSION}); {upgrade}")
}

/// A rejection as the client reports it; a version-1 server words its version
/// rejection differently, so that one is translated into the same message.
pub fn explain_rejection(reason: &str) -> String {
    if reason.contains("(server speaks 1)") {
        format!("protocol version {PROTOCOL_VERSION} is not supported by this server (1); upgrade the server")
    } else {
        reason.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hello_without_a_client_name_is_the_default_client() {
        let hello = Message::decode(br#"{"type":"hello","version":2}"#).unwrap();
        assert_eq!(hello, Message::Hello { version: 2, client: "default".into() });
    }

    #[test]
    fn hmac_round_trip_and_rejection() {
        let nonce = new_nonce();
        let answer = sign("s3cret", &nonce, b"session a");
        assert!(verify("s3cret", &nonce, b"session a", &answer));
        assert!(!verify("s3cret", &nonce, b"session b", &answer), "bound to the session");
        assert!(!verify("other", &nonce, b"session a", &answer));
        assert!(!verify("s3cret", &new_nonce(), b"session a", &answer));
        assert!(!verify("s3cret", &nonce, b"session a", "zz-not-hex"));
    }

    #[tokio::test]
    async fn frames_round_trip_without_over_reading() {
        let mut wire = Vec::new();
        let msg = Message::Connect { host: "10.0.0.1".into(), port: 22 };
        let n = write_frame(&mut wire, &msg).await.unwrap();
        wire.extend_from_slice(b"raw bytes after the frame");
        let mut reader = &wire[..];
        let (got, m) = read_frame(&mut reader).await.unwrap();
        assert_eq!((got, m), (msg, n));
        assert_eq!(reader, b"raw bytes after the frame");
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_are_rejected() {
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(read_frame(&mut &huge[..]).await, Err(ProtocolError::FrameTooLarge(_))));
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"%%%%%");
        assert!(matches!(read_frame(&mut &garbage[..]).await, Err(ProtocolError::Malformed(_))));
    }
}
