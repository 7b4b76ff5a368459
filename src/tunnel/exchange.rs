//! One visitor's exchange over a pooled data channel (protocol v2), the same code
//! on both ends: the server relays visitor ⇄ channel, the client target ⇄ channel.
//!
//! Each direction carries chunks `u32 length ‖ bytes` (at most [`MAX_CHUNK`]);
//! length 0 ([`END`]) ends the direction — the half-close — and [`RESET`] aborts
//! the exchange. When both directions ended cleanly the channel is handed back for
//! the next visitor; on any failure it is dropped, and the local socket is reset so
//! nobody is left waiting for bytes that will never come. The kernel's TCP still
//! does the flow control: one visitor per channel, no windows of our own.
//!
//! Buffers exist only while data moves: the read side drops its buffer before it
//! waits for the next chunk, the write side allocates per burst, so a thousand
//! open but quiet exchanges cost no copy buffers at all.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

mod spliced;

use self::spliced::{spliced_downstream, spliced_upstream, write_wire, Queued, Segment, WireReader};
use super::frame;
use super::message::{Connect, ConnectResult};
use crate::net::relay::{self, Activity};
use crate::net::splice::Pipes;
use crate::net::transport::TunnelStream;
use crate::telemetry::{Held, Meter, Visit};

/// Chunk length that ends a direction (the half-close).
pub(crate) const END: u32 = 0;
/// Chunk length that aborts the exchange: the receiver resets its socket.
pub(crate) const RESET: u32 = u32::MAX;
/// Largest chunk; anything longer (other than [`RESET`]) is garbage.
pub(crate) const MAX_CHUNK: usize = 64 * 1024;
const HEADER: usize = 4;
/// Most user bytes one chunk carries when this end writes it: header and
/// payload then make exactly 64 KiB, four full TLS records of 16 KiB. A full
/// [`MAX_CHUNK`] of payload would spill its last four bytes into a fifth,
/// nearly empty record, written by a second system call.
const CHUNK_PAYLOAD: usize = MAX_CHUNK - HEADER;

/// How long a failing side tries to tell the other one to reset.
const RESET_NOTICE: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ExchangeError {
    /// The target was not reached (the client's `connect_result`, or the channel
    /// failed before it arrived). Counted as a connect error by the server.
    #[error("{0}")]
    Refused(String),
    /// The other end reset its socket and said so.
    #[error("the other end of the tunnel reset the connection")]
    PeerReset,
    /// The channel broke, closed mid-exchange or carried garbage.
    #[error("data channel failed: {0}")]
    Channel(String),
    /// The local socket (visitor or target) failed, e.g. was reset.
    #[error("{0}")]
    Socket(io::Error),
}

fn channel_error(e: io::Error) -> ExchangeError {
    ExchangeError::Channel(e.to_string())
}

/// Whether the channel carries the client's `connect_result` before its first
/// chunk (the server's side of an exchange). The visitor's first bytes travel
/// ahead of that answer; they are counted as reaching the target only once it
/// arrives, through the [`Held`] part of the upstream meter.
pub(crate) enum Answer<'a> {
    Expected {
        reached_target: &'a Held,
        /// User bytes already sent as the first chunk, with the `connect`
        /// request ([`opening`]); counted when the exchange starts.
        sent_ahead: usize,
        /// Told when the answer says the target was reached: the visitor's
        /// connect time ends there.
        answered: &'a Visit,
    },
    /// The caller already heard the answer ([`hear_answer`]); `sent_ahead`
    /// user bytes went with the opening and are counted when the exchange starts.
    Heard {
        sent_ahead: usize,
    },
    None,
}

/// What the visitor has already sent, taken without waiting (at most `max`
/// bytes, what the mapping's cap lets through at once, see
/// `Meter::allowance_now`; never more than one chunk), so that it travels in
/// the same write as the `connect` request: one write (one TLS record) fewer per
/// visitor, and the client finds the first chunk behind the request. Only bytes already queued are read (`FIONREAD` first), so a pending
/// reset or EOF stays on the socket for the exchange to see, exactly as before.
pub(crate) fn early_bytes(socket: &TcpStream, max: usize) -> Vec<u8> {
    let queued = rustix::io::ioctl_fionread(socket).unwrap_or(0).min(max.min(MAX_CHUNK) as u64) as usize;
    if queued == 0 {
        return Vec::new();
    }
    let mut early = vec![0u8; queued];
    // Non-blocking, and with bytes queued it returns them rather than an error.
    match io::Read::read(&mut &*socket2::SockRef::from(socket), &mut early) {
        Ok(n) => early.truncate(n),
        Err(_) => early.clear(),
    }
    early
}

/// The server's opening of an exchange, for one write: the `connect` request
/// and, when the visitor has already sent some, its first chunk.
pub(crate) fn opening(connect: &Connect, early: &[u8]) -> Vec<u8> {
    let mut wire = frame::encode_frame(connect);
    if !early.is_empty() {
        wire.reserve(HEADER + early.len());
        wire.extend_from_slice(&(early.len() as u32).to_be_bytes());
        wire.extend_from_slice(early);
    }
    wire
}

/// A health check over `channel`: the `connect` request alone, the client's
/// answer, then (the target answered) a [`RESET`], so the client drops the
/// target's connection and the channel. `Err` says why the target could not
/// be reached through this client. The channel is spent either way.
pub(crate) async fn probe<S: AsyncRead + AsyncWrite + Unpin>(channel: &mut S, connect: &Connect) -> Result<(), ExchangeError> {
    let sent = async {
        channel.write_all(&opening(connect, &[])).await?;
        channel.flush().await
    };
    sent.await.map_err(channel_error)?;
    read_answer(channel).await?;
    let _ = channel.write_all(&RESET.to_be_bytes()).await;
    let _ = channel.flush().await;
    Ok(())
}

/// Relays `socket ⇄ channel` until both directions ended. On success the channel
/// comes back, ready for the next exchange, with the user bytes moved each way
/// (`to_channel`, `from_channel`). `to_channel` and `from_channel` count user
/// bytes only; the wire is counted under the channel.
///
/// With `pipes` (see [`splicing`]: a plain channel, where splice serves) each
/// chunk's payload moves in the kernel, socket → pipe → socket, and only the
/// four bytes of its header pass through user space; otherwise (TLS) chunks
/// are copied through a buffer. The wire format is the same either way, so
/// either end may splice without the other.
///
/// It ends as [`relay::relay`] does: an error on the local socket (its peer
/// reset) or on the channel, even while the other direction is blocked, or no
/// byte either way for `idle_timeout`, aborts the exchange; the socket stays armed (a reset on
/// close) and the other end is sent a [`RESET`]. After a clean end the socket is
/// disarmed, so its close delivers every byte. The channel stays armed for its
/// life (see `MeteredStream::take_watch`): idle, it has nothing in flight.
pub(crate) async fn relay(
    mut channel: TunnelStream,
    socket: &TcpStream,
    to_channel: &Meter,
    from_channel: &Meter,
    answer: Answer<'_>,
    idle_timeout: Duration,
    pipes: Option<&Pipes>,
) -> Result<(TunnelStream, u64, u64), ExchangeError> {
    // Armed for the channel's life (see `MeteredStream::take_watch`).
    let watch = channel.take_watch();
    let answered = AtomicBool::new(!matches!(answer, Answer::Expected { .. }));
    let sent_ahead = match answer {
        Answer::Expected { sent_ahead, .. } | Answer::Heard { sent_ahead } => sent_ahead as u64,
        Answer::None => 0,
    };
    let activity = Activity::new();
    let ends = Ends { socket, watch: watch.as_ref(), activity: &activity, idle_timeout };
    let hearing = Hearing { answer, answered: &answered };
    let spliced = pipes.and_then(|pipes| Some((channel.wire()?, pipes)));
    // What a spliced exchange read ahead past its end (the next `connect`, when
    // the other end reused the channel at once) goes back to the stream.
    let mut leftover = None;
    let outcome = match spliced {
        Some((wire, pipes)) => {
            let up = spliced_upstream(socket, &wire, pipes, to_channel, &activity, sent_ahead);
            let down = async {
                hearing.hear(&mut WireReader(&wire)).await?;
                spliced_downstream(&wire, socket, pipes, from_channel, &activity).await
            };
            // Boxed: only one of the two paths runs, and without the box every
            // exchange's future — and every visitor's task, direct ones
            // included — carries the spliced path's state (measured with 1,000
            // open connections: direct 9.2 → 7.7 KB each, TLS-tunneled 17.5 →
            // 15.8 KiB in the server).
            let outcome = Box::pin(ends.guard(async { tokio::try_join!(up, down) })).await;
            match outcome {
                Err(ExchangeError::Socket(_)) => {
                    let _ = tokio::time::timeout(RESET_NOTICE, write_wire(&wire, &RESET.to_be_bytes(), Segment::Last)).await;
                }
                Err(ExchangeError::Channel(_)) => hearing.hear_late(&mut Queued(&wire)),
                _ => {}
            }
            leftover = Some(wire.into_unread());
            outcome
        }
        None => {
            let (mut reader, mut writer) = tokio::io::split(&mut channel);
            let up = upstream(socket, &mut writer, to_channel, &activity, sent_ahead);
            let down = async {
                hearing.hear(&mut reader).await?;
                downstream(&mut reader, socket, from_channel, &activity).await
            };
            let outcome = ends.guard(async { tokio::try_join!(up, down) }).await;
            match outcome {
                Err(ExchangeError::Socket(_)) => {
                    // Best effort: if a chunk was cut off mid-write the other end reads
                    // garbage instead, which ends in the same reset.
                    let notice = async {
                        writer.write_all(&RESET.to_be_bytes()).await?;
                        writer.flush().await
                    };
                    let _ = tokio::time::timeout(RESET_NOTICE, notice).await;
                }
                Err(ExchangeError::Channel(_)) => hearing.hear_late(&mut reader),
                _ => {}
            }
            outcome
        }
    };
    if let Some(unread) = leftover {
        channel.restore_unread(unread);
    }
    match outcome {
        Ok((up, down)) => {
            relay::disarm(socket);
            if let Some(watch) = watch {
                channel.return_watch(watch);
            }
            Ok((channel, up, down))
        }
        Err(ExchangeError::Channel(e)) if !answered.load(Ordering::Relaxed) => {
            Err(ExchangeError::Refused(format!("data channel failed before the tunnel client answered: {e}")))
        }
        Err(e @ ExchangeError::Refused(_)) => Err(e),
        Err(e) => {
            relay::arm(socket);
            Err(e)
        }
    }
}

/// The pipes an exchange over `channel` splices through: `Some` when the
/// channel is plain TCP and splice serves here (not `TUNNELD_FORCE_COPY=1`,
/// not refused by the kernel), `None` when its chunks are copied.
pub(crate) fn splicing<'p>(channel: &TunnelStream, pipes: &'p Pipes) -> Option<&'p Pipes> {
    (pipes.splicing() && channel.has_wire()).then_some(pipes)
}

/// What ends an exchange besides its two directions finishing.
struct Ends<'a> {
    socket: &'a TcpStream,
    watch: Option<&'a TcpStream>,
    activity: &'a Activity,
    idle_timeout: Duration,
}

impl Ends<'_> {
    /// Runs `work` (both directions) until it finishes, either socket fails, or
    /// nothing moved for the idle timeout.
    async fn guard<T>(&self, work: impl std::future::Future<Output = Result<T, ExchangeError>>) -> Result<T, ExchangeError> {
        tokio::select! {
            result = work => result,
            e = relay::failure(self.socket) => Err(ExchangeError::Socket(e)),
            e = channel_failure(self.watch) => Err(ExchangeError::Channel(format!("reset by the other end: {e}"))),
            e = self.activity.idle_for(self.idle_timeout) => Err(ExchangeError::Socket(e)),
        }
    }
}

/// The client's answer the server's side still waits for, if any.
struct Hearing<'a> {
    answer: Answer<'a>,
    answered: &'a AtomicBool,
}

impl Hearing<'_> {
    /// Reads the answer off `reader` before the first chunk, when one is expected.
    async fn hear<R: AsyncRead + Unpin>(&self, reader: &mut R) -> Result<(), ExchangeError> {
        if let Answer::Expected { reached_target, answered: visit, .. } = &self.answer {
            read_answer(reader).await?;
            visit.target_answered();
            self.answered.store(true, Ordering::Relaxed);
            reached_target.release();
        }
        Ok(())
    }

    /// After the channel failed while the answer was still expected: the
    /// client may have answered (the target was reached) and reset the
    /// channel right after — its target reset at once — while this end was
    /// busy sending. A reset does not discard what was received before it,
    /// so an answer already queued is read now, without waiting: the visitor
    /// then ends as its target's reset, not as a target never reached.
    fn hear_late<R: AsyncRead + Unpin>(&self, reader: &mut R) {
        if self.answered.load(Ordering::Relaxed) {
            return;
        }
        if let Answer::Expected { reached_target, answered: visit, .. } = &self.answer {
            if let Some(Ok(())) = read_answer(reader).now_or_never() {
                visit.target_answered();
                self.answered.store(true, Ordering::Relaxed);
                reached_target.release();
            }
        }
    }
}

/// A reset of the channel seen through its watch (`TunnelStream::take_watch`), a
/// second handle on its socket for what the split halves cannot do: notice a
/// reset from the other end while this exchange is blocked on its local socket
/// (a target that does not read must not pin the exchange after the visitor is
/// gone), and make this end's close a reset while an exchange is in flight, so
/// the other end learns at once. Never without a watch: it is `None` when the
/// descriptor could not be duplicated (out of descriptors), and the exchange then
/// ends when it next touches the channel.
async fn channel_failure(watch: Option<&TcpStream>) -> io::Error {
    match watch {
        Some(watch) => relay::failure(watch).await,
        None => std::future::pending().await,
    }
}

/// The client's answer to the `connect` request on `channel`, read before the
/// exchange starts: `Ok(Ok(()))` the target answered, `Ok(Err(why))` the client
/// could not reach it, `Err(why)` the channel failed first — the client is gone
/// and another one may take the visitor.
pub(crate) async fn hear_answer<R: AsyncRead + Unpin>(channel: &mut R) -> Result<Result<(), String>, String> {
    match frame::read_frame(channel).await {
        Ok((ConnectResult::ConnectResult { error: None }, _)) => Ok(Ok(())),
        Ok((ConnectResult::ConnectResult { error: Some(e) }, _)) => Ok(Err(format!("the tunnel client could not reach the target: {e}"))),
        Err(e) => Err(format!("no answer from the tunnel client: {e}")),
    }
}

async fn read_answer<R: AsyncRead + Unpin>(reader: &mut R) -> Result<(), ExchangeError> {
    let reply = frame::read_frame(reader).await.map_err(|e| ExchangeError::Refused(format!("no answer from the tunnel client: {e}")))?;
    match reply.0 {
        ConnectResult::ConnectResult { error: None } => Ok(()),
        ConnectResult::ConnectResult { error: Some(e) } => {
            Err(ExchangeError::Refused(format!("the tunnel client could not reach the target: {e}")))
        }
    }
}

/// `socket → channel` as chunks, then [`END`]; `sent_ahead` user bytes already
/// went with the opening.
async fn upstream<W: AsyncWrite + Unpin>(
    socket: &TcpStream,
    channel: &mut W,
    meter: &Meter,
    activity: &Activity,
    sent_ahead: u64,
) -> Result<u64, ExchangeError> {
    if sent_ahead > 0 {
        // Already paced: the opening took no more than the cap allowed.
        meter.record(sent_ahead);
    }
    let mut total = sent_ahead;
    loop {
        // Whatever was written is on its way before we wait: TLS holds records
        // back until flushed.
        channel.flush().await.map_err(channel_error)?;
        socket.readable().await.map_err(ExchangeError::Socket)?;
        // Per burst, released when the socket runs dry; the header slot sits in
        // front of the payload so each chunk is one write.
        let mut buf = BytesMut::with_capacity(HEADER + CHUNK_PAYLOAD);
        loop {
            // Asked before reading, so nothing goes out ahead of the cap.
            let allowed = meter.allowance(CHUNK_PAYLOAD).await;
            buf.clear();
            buf.put_u32(0);
            let read = socket.try_read_buf(&mut (&mut buf).limit(allowed));
            meter.unused(allowed - read.as_ref().map_or(0, |n| *n));
            match read {
                Ok(0) => {
                    channel.write_all(&END.to_be_bytes()).await.map_err(channel_error)?;
                    channel.flush().await.map_err(channel_error)?;
                    return Ok(total);
                }
                Ok(n) => {
                    activity.touch();
                    buf[..HEADER].copy_from_slice(&(n as u32).to_be_bytes());
                    channel.write_all(&buf).await.map_err(channel_error)?;
                    meter.record(n as u64);
                    total += n as u64;
                    if n < allowed {
                        break;
                    }
                    if meter.capped() {
                        // The next turn may be a while: this chunk goes now.
                        channel.flush().await.map_err(channel_error)?;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(ExchangeError::Socket(e)),
            }
        }
    }
}

/// `channel → socket` until [`END`] (half-closes the socket) or [`RESET`].
///
/// Each read of a chunk's payload may also take the next chunk's header (never
/// more: bytes past it could belong to the channel's next exchange), so a bulk
/// transfer costs one read per chunk, not two. Reads fill the buffer's spare
/// capacity, which is never zeroed: the buffer is released whenever the
/// channel has nothing ready, so zeroing it would be a pass over every burst.
async fn downstream<R: AsyncRead + Unpin>(
    channel: &mut R,
    socket: &TcpStream,
    meter: &Meter,
    activity: &Activity,
) -> Result<u64, ExchangeError> {
    let mut total = 0u64;
    let mut buf = BytesMut::new();
    let mut header = [0u8; HEADER];
    let mut have = 0;
    loop {
        match read_header(channel, &mut header, have, &mut buf).await? {
            END => {
                // ENOTCONN only means the socket's peer is already gone.
                let _ = socket2::SockRef::from(socket).shutdown(Shutdown::Write);
                return Ok(total);
            }
            RESET => return Err(ExchangeError::PeerReset),
            len if len as usize > MAX_CHUNK => {
                return Err(ExchangeError::Channel(format!("chunk of {len} bytes exceeds the {MAX_CHUNK}-byte limit")))
            }
            len => {
                let mut left = len as usize;
                have = 0;
                while left > 0 {
                    // Gather what is already buffered or decrypted, then one write.
                    // Sized by what arrives: a one-byte exchange takes no 64 KiB.
                    let limit = left + HEADER;
                    buf.clear();
                    buf.reserve(limit);
                    if channel.read_buf(&mut (&mut buf).limit(limit)).await.map_err(channel_error)? == 0 {
                        return Err(ExchangeError::Channel("closed in the middle of a chunk".into()));
                    }
                    while buf.len() < left {
                        let room = limit - buf.len();
                        match channel.read_buf(&mut (&mut buf).limit(room)).now_or_never() {
                            Some(Ok(0)) | None => break,
                            Some(Ok(_)) => {}
                            Some(Err(e)) => return Err(channel_error(e)),
                        }
                    }
                    let filled = buf.len();
                    let payload = filled.min(left);
                    // Paced piece by piece: a chunk off the channel does not
                    // go out ahead of the cap either.
                    relay::forward(socket, &buf[..payload], meter, activity).await.map_err(ExchangeError::Socket)?;
                    total += payload as u64;
                    left -= payload;
                    // What came past the payload is the start of the next header.
                    have = filled - payload;
                    header[..have].copy_from_slice(&buf[payload..filled]);
                }
            }
        }
    }
}

/// The next chunk header, of which `have` bytes are already in `header`. When
/// none is ready the copy buffer is released first, so a quiet exchange holds none.
async fn read_header<R: AsyncRead + Unpin>(
    channel: &mut R,
    header: &mut [u8; HEADER],
    mut have: usize,
    buf: &mut BytesMut,
) -> Result<u32, ExchangeError> {
    while have < HEADER {
        // A `read` that is not ready has read nothing, so trying once is lossless.
        let ready = channel.read(&mut header[have..]).now_or_never();
        let n = match ready {
            Some(r) => r,
            None => {
                *buf = BytesMut::new();
                channel.read(&mut header[have..]).await
            }
        }
        .map_err(channel_error)?;
        if n == 0 {
            let what = if have == 0 { "closed mid-exchange" } else { "closed in the middle of a chunk header" };
            return Err(ExchangeError::Channel(what.into()));
        }
        have += n;
    }
    Ok(u32::from_be_bytes(*header))
}
