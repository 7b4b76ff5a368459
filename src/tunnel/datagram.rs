//! Tunneled UDP: the *datagram link* between a client's session and the server,
//! the same code on both ends.
//!
//! A link is one reliable byte stream plus, on QUIC, an unreliable datagram
//! lane. The stream carries frames `u32 length ‖ kind ‖ body`: kind
//! [`KIND_DATAGRAM`] is `varint session ‖ payload`, kind [`KIND_CONTROL`] a JSON
//! [`DatagramControl`] (a session's open with its target, its answer, its
//! close). On a framed link (a data channel of the tunnel, TLS or plain as the
//! tunnel is) every datagram travels as a frame; on a QUIC link the stream is a
//! QUIC stream and each datagram goes as one QUIC datagram (RFC 9221),
//! `varint session ‖ payload`, unless it is larger than one can hold: then it
//! takes the stream, whole. Either way a datagram arrives whole or not at all,
//! and one lost packet delays only what it carried.
//!
//! What waits to be sent is bounded ([`LINK_QUEUE`] frames): a datagram that
//! does not fit is refused at once ([`SendError::Full`]) for the caller to drop
//! and count; control messages wait for room.
//!
//! Session ids are the server's, numbered per link; a varint as QUIC writes
//! them (RFC 9000 §16), so small ids cost one byte.

use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::debug;

/// Frame kind: a datagram, `varint session ‖ payload`.
const KIND_DATAGRAM: u8 = 0;
/// Frame kind: a [`DatagramControl`] as JSON.
const KIND_CONTROL: u8 = 1;

/// The largest UDP payload there is; a frame's body is never longer than this
/// and its header.
pub(crate) const MAX_DATAGRAM: usize = 65_535;
const MAX_FRAME_BODY: usize = 1 + 8 + MAX_DATAGRAM;

/// Frames that may wait to be written, both directions' datagrams and control
/// together; beyond it datagrams are dropped, not buffered.
pub(crate) const LINK_QUEUE: usize = 1024;

/// How long a client waits for the server's QUIC answer before it falls back
/// to a framed link: UDP to the server may be dropped without a word.
pub(crate) const QUIC_ATTEMPT: std::time::Duration = std::time::Duration::from_secs(3);

/// The reliable messages of a link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub(crate) enum DatagramControl {
    /// server → client: a new session; send its datagrams to `host:port` from
    /// a socket of its own, and the target's replies back tagged `session`.
    #[serde(rename = "udp_open")]
    Open {
        /// The server's id for it on this link.
        session: u64,
        /// The mapping's target host (resolved in the client's network).
        host: String,
        /// The target's port.
        port: u16,
        /// The server ends the session after this much silence and says so;
        /// the client ends it on its own some time later should that word
        /// never come.
        idle_secs: u64,
    },
    /// client → server: the answer to `udp_open`; `error` when the target
    /// could not be resolved or no socket was had.
    #[serde(rename = "udp_opened")]
    Opened {
        /// Which session.
        session: u64,
        /// Why not, if not.
        error: Option<String>,
    },
    /// Either way: the session is over (the server: idle or the visitor's
    /// session ended; the client: its own idle timer).
    #[serde(rename = "udp_close")]
    Close {
        /// Which session.
        session: u64,
    },
}

/// What arrives on a link.
#[derive(Debug)]
pub(crate) enum Frame {
    Datagram { session: u64, payload: Bytes },
    Control(DatagramControl),
}

/// Why a frame was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SendError {
    /// The queue is full: a slow tunnel. The datagram is dropped.
    Full,
    /// The link is gone.
    Closed,
}

/// Called with each frame as it arrives, on the link's reader task(s).
pub(crate) type OnFrame = Arc<dyn Fn(Frame) + Send + Sync>;

/// The sending side of a link, and its end.
#[derive(Clone)]
pub(crate) struct LinkSender {
    queue: mpsc::Sender<Frame>,
    closed: CancellationToken,
}

impl LinkSender {
    /// Queues one datagram for `session` without waiting.
    pub(crate) fn try_datagram(&self, session: u64, payload: Bytes) -> Result<(), SendError> {
        if self.closed.is_cancelled() {
            return Err(SendError::Closed);
        }
        self.queue.try_send(Frame::Datagram { session, payload }).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SendError::Full,
            mpsc::error::TrySendError::Closed(_) => SendError::Closed,
        })
    }

    /// Queues a control message, waiting for room.
    pub(crate) async fn control(&self, msg: DatagramControl) -> Result<(), SendError> {
        tokio::select! {
            _ = self.closed.cancelled() => Err(SendError::Closed),
            sent = self.queue.send(Frame::Control(msg)) => sent.map_err(|_| SendError::Closed),
        }
    }

    /// Resolves when the link has ended (either side closed it, or it failed).
    pub(crate) async fn closed(&self) {
        self.closed.cancelled().await
    }

    /// Whether the link has ended.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.is_cancelled()
    }

    /// Ends the link.
    pub(crate) fn close(&self) {
        self.closed.cancel()
    }
}

/// Starts a link on `reader`/`writer` (a data channel's halves, or a QUIC
/// stream's), with `quic`'s datagram lane when given. It ends with `parent`, or
/// when either side fails or closes; the handler `handler` makes (given the
/// link's sender, to answer on) gets every frame that arrives.
pub(crate) fn start<R, W>(
    reader: R,
    writer: W,
    quic: Option<quinn::Connection>,
    handler: impl FnOnce(&LinkSender) -> OnFrame,
    parent: &CancellationToken,
) -> LinkSender
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let closed = parent.child_token();
    let (queue, outgoing) = mpsc::channel(LINK_QUEUE);
    let sender = LinkSender { queue, closed: closed.clone() };
    let on_frame = handler(&sender);
    tokio::spawn(write_frames(outgoing, writer, quic.clone(), closed.clone()));
    tokio::spawn(read_frames(reader, on_frame.clone(), closed.clone()));
    if let Some(quic) = quic {
        tokio::spawn(read_datagrams(quic, on_frame, closed));
    }
    sender
}

async fn write_frames<W: AsyncWrite + Unpin>(
    mut outgoing: mpsc::Receiver<Frame>,
    mut writer: W,
    quic: Option<quinn::Connection>,
    closed: CancellationToken,
) {
    let written = async {
        loop {
            let frame = tokio::select! {
                _ = closed.cancelled() => return Ok(()),
                frame = outgoing.recv() => match frame {
                    Some(frame) => frame,
                    None => return Ok(()),
                },
            };
            write_frame(&mut writer, quic.as_ref(), frame).await?;
            // Whatever else is waiting goes in the same flush.
            while let Ok(frame) = outgoing.try_recv() {
                write_frame(&mut writer, quic.as_ref(), frame).await?;
            }
            writer.flush().await?;
        }
    };
    let result: std::io::Result<()> = written.await;
    if let Err(e) = result {
        debug!(error = %e, "datagram link failed writing");
    }
    let _ = writer.shutdown().await;
    closed.cancel();
}

/// One frame: a datagram that fits a QUIC datagram goes as one; anything else
/// on the stream.
async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, quic: Option<&quinn::Connection>, frame: Frame) -> std::io::Result<()> {
    let wire = match frame {
        Frame::Datagram { session, payload } => {
            if let Some(quic) = quic {
                let datagram = encode_datagram(session, &payload);
                if quic.max_datagram_size().is_some_and(|max| datagram.len() <= max) {
                    // Waits for room in quinn's own buffer rather than
                    // dropping the oldest silently: the bound is ours.
                    return quic.send_datagram_wait(datagram).await.map_err(std::io::Error::other);
                }
            }
            let mut wire = BytesMut::with_capacity(4 + 1 + 8 + payload.len());
            wire.put_u32(0);
            wire.put_u8(KIND_DATAGRAM);
            put_varint(&mut wire, session);
            wire.put_slice(&payload);
            wire
        }
        Frame::Control(msg) => {
            // Plain enums of strings and numbers: serializing cannot fail.
            let body = serde_json::to_vec(&msg).unwrap_or_default();
            let mut wire = BytesMut::with_capacity(4 + 1 + body.len());
            wire.put_u32(0);
            wire.put_u8(KIND_CONTROL);
            wire.put_slice(&body);
            wire
        }
    };
    let mut wire = wire;
    let len = (wire.len() - 4) as u32;
    wire[..4].copy_from_slice(&len.to_be_bytes());
    writer.write_all(&wire).await
}

async fn read_frames<R: AsyncRead + Unpin>(mut reader: R, on_frame: OnFrame, closed: CancellationToken) {
    let read = async {
        loop {
            let mut header = [0u8; 4];
            reader.read_exact(&mut header).await?;
            let len = u32::from_be_bytes(header) as usize;
            if len == 0 || len > MAX_FRAME_BODY {
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("datagram frame of {len} bytes")));
            }
            let mut body = BytesMut::zeroed(len);
            reader.read_exact(&mut body).await?;
            let mut body = body.freeze();
            let kind = body.get_u8();
            let frame = match kind {
                KIND_DATAGRAM => decode_datagram(body).map(|(session, payload)| Frame::Datagram { session, payload }),
                KIND_CONTROL => serde_json::from_slice(&body).ok().map(Frame::Control),
                _ => None,
            };
            match frame {
                Some(frame) => on_frame(frame),
                None => return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed datagram frame")),
            }
        }
    };
    let result: std::io::Result<()> = tokio::select! {
        _ = closed.cancelled() => Ok(()),
        r = read => r,
    };
    if let Err(e) = result {
        debug!(error = %e, "datagram link ended reading");
    }
    closed.cancel();
}

async fn read_datagrams(quic: quinn::Connection, on_frame: OnFrame, closed: CancellationToken) {
    loop {
        let datagram = tokio::select! {
            _ = closed.cancelled() => break,
            d = quic.read_datagram() => d,
        };
        match datagram {
            Ok(datagram) => {
                if let Some((session, payload)) = decode_datagram(datagram) {
                    on_frame(Frame::Datagram { session, payload });
                }
            }
            Err(e) => {
                debug!(error = %e, "QUIC connection of a datagram link ended");
                break;
            }
        }
    }
    closed.cancel();
    // The connection is the link's alone.
    quic.close(0u32.into(), b"datagram link closed");
}

/// `varint session ‖ payload`, as a QUIC datagram carries it.
fn encode_datagram(session: u64, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(8 + payload.len());
    put_varint(&mut buf, session);
    buf.put_slice(payload);
    buf.freeze()
}

fn decode_datagram(mut datagram: Bytes) -> Option<(u64, Bytes)> {
    let session = get_varint(&mut datagram)?;
    Some((session, datagram))
}

/// A QUIC variable-length integer (RFC 9000 §16); ids beyond 2^62 never occur.
fn put_varint(buf: &mut BytesMut, v: u64) {
    if v < 1 << 6 {
        buf.put_u8(v as u8);
    } else if v < 1 << 14 {
        buf.put_u16(0x4000 | v as u16);
    } else if v < 1 << 30 {
        buf.put_u32(0x8000_0000 | v as u32);
    } else {
        buf.put_u64(0xc000_0000_0000_0000 | (v & ((1 << 62) - 1)));
    }
}

fn get_varint(buf: &mut Bytes) -> Option<u64> {
    let first = *buf.first()?;
    let len = 1usize << (first >> 6);
    if buf.len() < len {
        return None;
    }
    let mut v = u64::from(buf.get_u8() & 0x3f);
    for _ in 1..len {
        v = (v << 8) | u64::from(buf.get_u8());
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_round_trip_as_quic_varints() {
        for id in [0, 1, 63, 64, 16_383, 16_384, (1 << 30) - 1, 1 << 30, (1 << 62) - 1] {
            let wire = encode_datagram(id, b"payload");
            let (back, payload) = decode_datagram(wire.clone()).unwrap();
            assert_eq!((back, &payload[..]), (id, &b"payload"[..]), "{id}: {wire:?}");
        }
        assert_eq!(encode_datagram(5, b"").len(), 1, "a small id costs one byte");
        assert!(decode_datagram(Bytes::from_static(&[0x40])).is_none(), "a cut varint");
    }

    #[tokio::test]
    async fn frames_cross_a_stream_whole_and_in_order() {
        let (a, b) = tokio::io::duplex(1 << 20);
        let (ar, aw) = tokio::io::split(a);
        let (br, bw) = tokio::io::split(b);
        let cancel = CancellationToken::new();
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let on_b: OnFrame = Arc::new(move |f| {
            let _ = seen_tx.send(f);
        });
        let a_side = start(ar, aw, None, |_| Arc::new(|_| {}), &cancel);
        let _b_side = start(br, bw, None, |_| on_b, &cancel);
        a_side.control(DatagramControl::Open { session: 7, host: "h".into(), port: 53, idle_secs: 60 }).await.unwrap();
        let big = vec![9u8; MAX_DATAGRAM];
        a_side.try_datagram(7, Bytes::from_static(b"")).unwrap();
        a_side.try_datagram(7, Bytes::from(big.clone())).unwrap();
        assert!(matches!(seen.recv().await, Some(Frame::Control(DatagramControl::Open { session: 7, .. }))));
        assert!(matches!(seen.recv().await, Some(Frame::Datagram { session: 7, payload }) if payload.is_empty()));
        assert!(matches!(seen.recv().await, Some(Frame::Datagram { session: 7, payload }) if payload[..] == big[..]));
        a_side.close();
        assert!(a_side.try_datagram(7, Bytes::new()).is_err());
    }

    /// A QUIC link's stream that carries nothing either way, so whatever
    /// arrives came by the datagram lane.
    struct Blackhole;

    impl AsyncRead for Blackhole {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test]
    async fn on_quic_a_datagram_that_fits_takes_the_datagram_lane_and_a_larger_one_the_stream() {
        use crate::net::{quic, tls};
        let certified = rcgen::generate_simple_self_signed(vec!["tunneld".to_string()]).unwrap();
        let der = certified.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
        let pin = tls::fingerprint(&der);
        let identity = tls::Identity { chain: vec![der], key, cert_path: "test".into() };
        let server = quic::server(&tls::server_config(identity).unwrap(), "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = server.local_addr().unwrap();
        let client_config = crate::config::ClientConfig { server: addr.to_string(), server_fingerprint: Some(pin), ..Default::default() };
        let (tls_config, name) = tls::client_config(&client_config).unwrap();
        let dialer = quic::Dialer::new(tls_config, &name).unwrap();
        let accepted = tokio::spawn(async move { server.accept().await.unwrap().await.unwrap() });
        let (_endpoint, to_server) = dialer.connect(&addr.to_string()).await.unwrap();
        let at_server = accepted.await.unwrap();
        assert_eq!(quic::binding(&to_server), quic::binding(&at_server), "both ends derive one binding");
        assert!(quic::binding(&to_server).is_some());

        let cancel = CancellationToken::new();
        let (seen_tx, mut seen) = mpsc::unbounded_channel();
        let on_server: OnFrame = Arc::new(move |f| {
            let _ = seen_tx.send(f);
        });
        // The stream both ways is a black hole: only QUIC datagrams get through.
        let client_side = start(Blackhole, tokio::io::sink(), Some(to_server.clone()), |_| Arc::new(|_| {}), &cancel);
        let _server_side = start(Blackhole, tokio::io::sink(), Some(at_server.clone()), |_| on_server, &cancel);
        let max = to_server.max_datagram_size().unwrap();
        assert!(max >= 1000, "{max}");
        client_side.try_datagram(3, Bytes::from(vec![1u8; 1000])).unwrap();
        // Too large for one QUIC datagram: the stream, which here goes nowhere.
        client_side.try_datagram(4, Bytes::from(vec![2u8; max + 1])).unwrap();
        client_side.try_datagram(5, Bytes::from_static(b"after")).unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), seen.recv()).await.unwrap();
        assert!(matches!(got, Some(Frame::Datagram { session: 3, payload }) if payload[..] == [1u8; 1000][..]));
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), seen.recv()).await.unwrap();
        assert!(matches!(&got, Some(Frame::Datagram { session: 5, payload }) if &payload[..] == b"after"), "{got:?}");
        cancel.cancel();
    }
}
