//! Framing: every tunnel message is a length-delimited frame (4-byte big-endian
//! length, then JSON) — the format of tokio-util's `LengthDelimitedCodec`, which
//! the control channel uses directly. Data channels read their `connect` /
//! `connect_result` frames with [`read_frame`], which never reads past the frame,
//! so the chunks that follow (see `exchange`) stay in the stream.

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

/// No legitimate frame is anywhere near this; a larger length prefix is garbage.
pub const MAX_FRAME: usize = 16 * 1024;

/// Length prefix size, counted as tunnel wire bytes.
pub const FRAME_HEADER: usize = 4;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed")]
    /// The peer closed the connection (between frames or inside one).
    Closed,
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    /// A length prefix over [`MAX_FRAME`]: garbage, refused unread.
    FrameTooLarge(usize),
    /// Not JSON, or not a message that may come at this point of the protocol.
    #[error("malformed frame: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error(transparent)]
    /// The connection failed.
    Io(#[from] std::io::Error),
}

/// A frame's body as the message it must be.
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, ProtocolError> {
    Ok(serde_json::from_slice(body)?)
}

/// One frame as it goes on the wire: `u32 length ‖ body`.
pub fn encode_frame<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serializing these plain enums of strings and numbers cannot fail.
    let body = serde_json::to_vec(msg).unwrap_or_default();
    let mut frame = Vec::with_capacity(FRAME_HEADER + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The codec for the control channel; same wire format as [`read_frame`].
fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(FRAME_HEADER).max_frame_length(MAX_FRAME).new_codec()
}

/// A control channel's frames, read side, with its write side (written with
/// [`write_frame`]).
pub type ControlFrames<S> = (FramedRead<tokio::io::ReadHalf<S>, LengthDelimitedCodec>, tokio::io::WriteHalf<S>);

/// Splits a control channel into its framed read side and its write side.
/// Control frames are a few dozen bytes, and every connected client holds its
/// control channel for as long as it is connected: the read buffer starts small
/// and grows only for a larger frame, where `Framed` would hold 8 KiB each way
/// per session.
pub fn control_channel<S: AsyncRead + AsyncWrite>(stream: S) -> ControlFrames<S> {
    const CONTROL_READ_BUFFER: usize = 256;
    let (read, write) = tokio::io::split(stream);
    (FramedRead::with_capacity(read, codec(), CONTROL_READ_BUFFER), write)
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
pub async fn read_frame<T: DeserializeOwned, R: AsyncRead + Unpin>(r: &mut R) -> Result<(T, usize), ProtocolError> {
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
    Ok((decode(&body)?, FRAME_HEADER + len))
}

/// Writes one frame; returns its size on the wire.
pub async fn write_frame<T: Serialize, W: AsyncWrite + Unpin>(w: &mut W, msg: &T) -> Result<usize, ProtocolError> {
    let frame = encode_frame(msg);
    w.write_all(&frame).await?;
    // Under TLS a frame is not on its way until flushed.
    w.flush().await?;
    Ok(frame.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::message::Connect;

    #[tokio::test]
    async fn frames_round_trip_without_over_reading() {
        let mut wire = Vec::new();
        let msg = Connect::Connect { host: "10.0.0.1".into(), port: 22, proxy_header: None };
        let n = write_frame(&mut wire, &msg).await.unwrap();
        wire.extend_from_slice(b"raw bytes after the frame");
        let mut reader = &wire[..];
        let (got, m): (Connect, usize) = read_frame(&mut reader).await.unwrap();
        assert_eq!((got, m), (msg, n));
        assert_eq!(reader, b"raw bytes after the frame");
    }

    #[tokio::test]
    async fn oversized_and_garbage_frames_are_rejected() {
        let huge = (MAX_FRAME as u32 + 1).to_be_bytes();
        assert!(matches!(read_frame::<Connect, _>(&mut &huge[..]).await, Err(ProtocolError::FrameTooLarge(_))));
        let mut garbage = 5u32.to_be_bytes().to_vec();
        garbage.extend_from_slice(b"%%%%%");
        assert!(matches!(read_frame::<Connect, _>(&mut &garbage[..]).await, Err(ProtocolError::Malformed(_))));
    }
}
