//! A plain data channel's side of an exchange with each chunk's payload
//! spliced in the kernel (see [`super::relay`]): only the 4-byte headers, and
//! short chunks read whole with theirs, pass through tunneld's memory. The
//! wire format is the copy path's, so either end may splice without the other.

use std::io;
use std::net::Shutdown;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, BytesMut};
use futures_util::FutureExt;
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::TcpStream;

use super::{channel_error, ExchangeError, END, HEADER, MAX_CHUNK, RESET};
use crate::net::metered::{Wire, SMALL_READ_AHEAD};
use crate::net::relay::{self, Activity};
use crate::net::splice::{cannot_splice, has_data, Fill, Pipe, Pipes};
use crate::telemetry::Meter;

/// Whether a write to the channel is followed at once by the rest of its chunk.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Segment {
    /// A header whose payload is spliced right after it: `MSG_MORE` holds it
    /// back to go out in the payload's segment, not as a 4-byte one of its own.
    More,
    /// The end of what this end has to send now.
    Last,
}

/// Writes all of `data` to a plain channel, counting it on the wire.
pub(super) async fn write_wire(wire: &Wire<'_>, mut data: &[u8], segment: Segment) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    let more = if segment == Segment::More { libc::MSG_MORE } else { 0 };
    #[cfg(not(target_os = "linux"))]
    let more = 0;
    #[cfg(target_os = "linux")]
    let flags = more | libc::MSG_NOSIGNAL;
    #[cfg(not(target_os = "linux"))]
    let flags = more;
    while !data.is_empty() {
        match wire.socket.try_io(Interest::WRITABLE, || socket2::SockRef::from(wire.socket).send_with_flags(data, flags)) {
            Ok(n) => {
                wire.sent.record(n as u64);
                data = &data[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wire.socket.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads a plain channel the ordinary way, counting on the wire: for the
/// client's answer ahead of the first chunk.
pub(super) struct WireReader<'a>(pub(super) &'a Wire<'a>);

impl AsyncRead for WireReader<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let wire = self.0;
        loop {
            if !wire.has_unread() {
                std::task::ready!(wire.socket.poll_read_ready(cx))?;
            }
            match wire.try_read_ahead(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

/// What a plain channel has queued, read straight from the socket and counted
/// on the wire, without waiting and without the runtime's readiness (which may
/// not have caught up with a reset yet): only for a last look, polled once;
/// `Pending` when nothing (more) is queued.
pub(super) struct Queued<'a>(pub(super) &'a Wire<'a>);

impl AsyncRead for Queued<'_> {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let wire = self.0;
        match wire.read_queued(buf.initialize_unfilled()) {
            Ok(n) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

/// Bytes a splice moved, for what the meter's allowance left unused.
fn moved(filled: &io::Result<Fill>) -> usize {
    match filled {
        Ok(Fill::Moved(n)) => *n,
        _ => 0,
    }
}

/// How one copied chunk of [`copy_chunk`] went.
#[derive(PartialEq, Eq)]
enum Copied {
    /// A chunk went, or the socket had nothing after all.
    Chunk,
    /// A chunk went that took all the read asked for: more is probably
    /// waiting, a bulk transfer.
    Full,
    /// The socket's end: [`END`] went.
    End,
}

/// `socket → channel` as [`upstream`] does, with each chunk's payload spliced:
/// socket → pipe (no more than the meter allows, at most [`MAX_CHUNK`]), then
/// the header, then the payload pipe → channel. A user byte counts as it is
/// spliced into the channel, as the copy path counts it once written there.
///
/// The pipe is taken while the socket has data and given back when it runs
/// dry, as in `relay::relay`. Without one (none to be had, or the kernel
/// refused to splice) a chunk is copied as today; so is one read past TCP
/// urgent data, which splice cannot move.
pub(super) async fn spliced_upstream(
    socket: &TcpStream,
    wire: &Wire<'_>,
    pipes: &Pipes,
    meter: &Meter,
    activity: &Activity,
    sent_ahead: u64,
) -> Result<u64, ExchangeError> {
    if sent_ahead > 0 {
        // Already paced: the opening took no more than the cap allowed.
        meter.record(sent_ahead);
    }
    let mut total = sent_ahead;
    let mut pipe: Option<Pipe> = None;
    // As a direct mapping's relay does (`relay::pump`): a short exchange's
    // few bytes cost two calls copied (read, write) and three or more spliced,
    // so this direction copies until one read fills what it asked for — a
    // bulk transfer — and splices from then on.
    let mut bulk = false;
    loop {
        let ready = match socket.readable().now_or_never() {
            Some(ready) => ready,
            None => {
                // Nothing to read now: the pipe (empty between chunks) goes back.
                if let Some(idle) = pipe.take() {
                    pipes.give_back(idle);
                }
                socket.readable().await
            }
        };
        ready.map_err(ExchangeError::Socket)?;
        if pipe.is_none() && bulk {
            pipe = pipes.take();
        }
        let Some(p) = &pipe else {
            match copy_chunk(socket, wire, meter, activity, &mut total).await? {
                Copied::End => return Ok(total),
                Copied::Full => bulk = true,
                Copied::Chunk => {}
            }
            continue;
        };
        // As much as the pipe holds (several chunks) in one splice: the
        // chunks then cost a header and a splice out each.
        let allowed = meter.allowance(p.size()).await;
        let filled = p.try_fill(socket, allowed);
        meter.unused(allowed - moved(&filled));
        match filled {
            Ok(Fill::Moved(0)) if !has_data(socket) => {
                write_wire(wire, &END.to_be_bytes(), Segment::Last).await.map_err(channel_error)?;
                if let Some(empty) = pipe.take() {
                    pipes.give_back(empty);
                }
                return Ok(total);
            }
            // Urgent data stops the splice; one plain read takes what is before it.
            Ok(Fill::Moved(0) | Fill::Urgent) => {
                if copy_chunk(socket, wire, meter, activity, &mut total).await? == Copied::End {
                    return Ok(total);
                }
            }
            Ok(Fill::Moved(n)) => {
                activity.touch();
                if let Some(refusal) = send_batch(p, wire, n, meter, activity, &mut total).await? {
                    pipes.refused(&refusal);
                    pipe = None;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if cannot_splice(&e) => {
                // Nothing went into the pipe: copy from now on.
                pipes.refused(&e);
                pipe = None;
            }
            Err(e) => return Err(ExchangeError::Socket(e)),
        }
    }
}

/// Sends the `n` bytes the pipe holds as chunks of at most [`MAX_CHUNK`]:
/// each chunk's header (held back by `MSG_MORE` to leave in its payload's
/// segment), then its payload spliced pipe → channel, each but the last with
/// `SPLICE_F_MORE` (so the next header and payload fill the segment the
/// payload's last bytes began). A user byte counts as it enters the channel.
/// When the kernel refuses to splice on, the rest goes through user space, as
/// each header promised, and the refusal is returned.
async fn send_batch(
    p: &Pipe,
    wire: &Wire<'_>,
    mut n: usize,
    meter: &Meter,
    activity: &Activity,
    total: &mut u64,
) -> Result<Option<io::Error>, ExchangeError> {
    let mut refusal = None;
    while n > 0 {
        let chunk = n.min(MAX_CHUNK);
        write_wire(wire, &(chunk as u32).to_be_bytes(), Segment::More).await.map_err(channel_error)?;
        let mut spliced = 0;
        let delivered = |piece: usize| {
            meter.record(piece as u64);
            wire.sent.record(piece as u64);
            activity.touch();
        };
        if refusal.is_none() {
            let counted = |piece: usize| {
                spliced += piece;
                delivered(piece);
            };
            match p.drain(wire.socket, chunk, n > chunk, counted).await {
                Ok(()) => {}
                Err(e) if cannot_splice(&e) => refusal = Some(e),
                Err(e) => return Err(channel_error(e)),
            }
        }
        if spliced < chunk {
            p.copy_out(wire.socket, chunk - spliced, delivered).await.map_err(channel_error)?;
        }
        *total += chunk as u64;
        n -= chunk;
    }
    Ok(refusal)
}

/// One read of `socket` (what the meter allows) sent as one chunk, header and
/// payload in one write; [`END`] at the socket's end.
async fn copy_chunk(
    socket: &TcpStream,
    wire: &Wire<'_>,
    meter: &Meter,
    activity: &Activity,
    total: &mut u64,
) -> Result<Copied, ExchangeError> {
    let mut buf = BytesMut::with_capacity(HEADER + MAX_CHUNK);
    let allowed = meter.allowance(MAX_CHUNK).await;
    buf.put_u32(0);
    let read = socket.try_read_buf(&mut (&mut buf).limit(allowed));
    meter.unused(allowed - read.as_ref().map_or(0, |n| *n));
    match read {
        Ok(0) => {
            write_wire(wire, &END.to_be_bytes(), Segment::Last).await.map_err(channel_error)?;
            Ok(Copied::End)
        }
        Ok(n) => {
            activity.touch();
            buf[..HEADER].copy_from_slice(&(n as u32).to_be_bytes());
            write_wire(wire, &buf, Segment::Last).await.map_err(channel_error)?;
            meter.record(n as u64);
            *total += n as u64;
            Ok(if n == allowed { Copied::Full } else { Copied::Chunk })
        }
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Copied::Chunk),
        Err(e) => Err(ExchangeError::Socket(e)),
    }
}

/// `channel → socket` as [`downstream`] does, with each chunk's payload
/// spliced: exactly the 4 header bytes are read, then exactly the payload's
/// length is spliced channel → pipe, piece by piece as the meter allows (the
/// next header stays in the channel). Several chunks' payloads gather in the
/// pipe (reading the next header in between) before one splice takes them
/// out to the socket: when the pipe cannot take the next payload whole, when
/// the channel has nothing more for now, and at the end. A user byte counts
/// as it reaches the socket. Without a pipe a piece is copied.
pub(super) async fn spliced_downstream(
    wire: &Wire<'_>,
    socket: &TcpStream,
    pipes: &Pipes,
    meter: &Meter,
    activity: &Activity,
) -> Result<u64, ExchangeError> {
    let mut batch = Batch { pipes, pipe: None, held: 0, socket, meter, activity, total: 0 };
    // Short chunks are read whole with their header (read ahead) and copied;
    // see [`Wire::try_read_ahead`].
    let mut bulk = false;
    loop {
        // A busy channel never makes these splices wait, so nothing here would
        // give the worker back to the other tasks (the session's heartbeats
        // among them): a chunk spends a unit of the task's budget, as a read
        // through the stream does.
        tokio::task::consume_budget().await;
        match read_wire_header(wire, &mut batch, bulk).await? {
            END => {
                batch.deliver().await?;
                // ENOTCONN only means the socket's peer is already gone.
                let _ = socket2::SockRef::from(socket).shutdown(Shutdown::Write);
                batch.give_back();
                return Ok(batch.total);
            }
            RESET => return Err(ExchangeError::PeerReset),
            len if len as usize > MAX_CHUNK => {
                return Err(ExchangeError::Channel(format!("chunk of {len} bytes exceeds the {MAX_CHUNK}-byte limit")))
            }
            len => {
                // A chunk larger than a read-ahead holds: a bulk transfer,
                // whose next headers are read alone so that their payloads
                // go through the kernel whole.
                bulk |= len as usize > SMALL_READ_AHEAD;
                let mut left = len as usize;
                while left > 0 {
                    // The start of the first chunk may have been read ahead
                    // with the `connect` in front of it: that part is copied,
                    // after what the pipe holds.
                    if wire.has_unread() {
                        batch.deliver().await?;
                        left -= copy_piece(wire, socket, left, meter, activity, &mut batch.total).await?;
                        continue;
                    }
                    if batch.pipe.is_none() {
                        batch.pipe = pipes.take();
                    }
                    let Some(p) = &batch.pipe else {
                        left -= copy_piece(wire, socket, left, meter, activity, &mut batch.total).await?;
                        continue;
                    };
                    let room = p.size() - batch.held;
                    if batch.held > 0 && room < left {
                        // The payload would not fit whole: out with the batch first.
                        batch.deliver().await?;
                        continue;
                    }
                    // Paced piece by piece, as the copy path's `relay::forward`.
                    let allowed = meter.allowance(left.min(room)).await;
                    let filled = p.try_fill(wire.socket, allowed);
                    meter.unused(allowed - moved(&filled));
                    match filled {
                        Ok(Fill::Moved(0)) => return Err(ExchangeError::Channel("closed in the middle of a chunk".into())),
                        Ok(Fill::Moved(n)) => {
                            wire.received.record(n as u64);
                            activity.touch();
                            batch.held += n;
                            left -= n;
                        }
                        // The pipe is full (its slots, not its bytes), and the
                        // channel has more: out with the batch, then go on.
                        Ok(Fill::Urgent) if batch.held > 0 => batch.deliver().await?,
                        // Bytes arrived just after the splice found none (or,
                        // never from a tunneld peer, urgent data): a plain read.
                        Ok(Fill::Urgent) => left -= copy_piece(wire, socket, left, meter, activity, &mut batch.total).await?,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            // The rest of the payload is still on its way:
                            // what has come goes out while waiting.
                            batch.deliver().await?;
                            wire.socket.readable().await.map_err(channel_error)?
                        }
                        Err(e) if cannot_splice(&e) => {
                            batch.deliver().await?;
                            pipes.refused(&e);
                            batch.pipe = None;
                        }
                        Err(e) => return Err(channel_error(e)),
                    }
                }
            }
        }
    }
}

/// The receiving end's pipe and the payload bytes it holds for the socket.
struct Batch<'a> {
    pipes: &'a Pipes,
    pipe: Option<Pipe>,
    /// Bytes in the pipe, not yet delivered.
    held: usize,
    socket: &'a TcpStream,
    meter: &'a Meter,
    activity: &'a Activity,
    /// User bytes delivered to the socket so far.
    total: u64,
}

impl Batch<'_> {
    /// Splices what the pipe holds into the socket, counting each piece as it
    /// arrives there; through user space if the kernel refuses (then splicing
    /// stops for good).
    async fn deliver(&mut self) -> Result<(), ExchangeError> {
        let Some(p) = self.pipe.as_ref().filter(|_| self.held > 0) else { return Ok(()) };
        let (meter, activity) = (self.meter, self.activity);
        let mut delivered = 0;
        let counted = |piece: usize| {
            meter.record(piece as u64);
            activity.touch();
            delivered += piece;
        };
        let drained = p.drain(self.socket, self.held, false, counted).await;
        self.total += delivered as u64;
        self.held -= delivered;
        match drained {
            Ok(()) => Ok(()),
            Err(e) if cannot_splice(&e) => {
                let mut copied = 0;
                let counted = |piece: usize| {
                    meter.record(piece as u64);
                    copied += piece;
                };
                let out = p.copy_out(self.socket, self.held, counted).await;
                self.total += copied as u64;
                self.held = 0;
                self.pipes.refused(&e);
                self.pipe = None;
                out.map_err(ExchangeError::Socket)
            }
            Err(e) => Err(ExchangeError::Socket(e)),
        }
    }

    /// Gives the pipe back, empty: nothing moves for now.
    fn give_back(&mut self) {
        if self.held == 0 {
            if let Some(idle) = self.pipe.take() {
                self.pipes.give_back(idle);
            }
        }
    }
}

/// Exactly the next chunk header off a plain channel, nothing past it. When
/// none is ready what the pipe holds goes out and the pipe goes back first,
/// so a quiet exchange holds none.
async fn read_wire_header(wire: &Wire<'_>, batch: &mut Batch<'_>, bulk: bool) -> Result<u32, ExchangeError> {
    let mut header = [0u8; HEADER];
    let mut have = 0;
    while have < HEADER {
        let read = match bulk {
            true => wire.try_read(&mut header[have..]),
            false => wire.try_read_ahead(&mut header[have..]),
        };
        match read {
            Ok(0) => {
                let what = if have == 0 { "closed mid-exchange" } else { "closed in the middle of a chunk header" };
                return Err(ExchangeError::Channel(what.into()));
            }
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                batch.deliver().await?;
                batch.give_back();
                wire.socket.readable().await.map_err(channel_error)?;
            }
            Err(e) => return Err(channel_error(e)),
        }
    }
    Ok(u32::from_be_bytes(header))
}

/// Up to `left` payload bytes read off a plain channel and written to
/// `socket` through a buffer, paced and counted as [`downstream`] does: for
/// when no pipe can be had. Returns how many.
async fn copy_piece(
    wire: &Wire<'_>,
    socket: &TcpStream,
    left: usize,
    meter: &Meter,
    activity: &Activity,
    total: &mut u64,
) -> Result<usize, ExchangeError> {
    let mut buf = vec![0u8; left.min(MAX_CHUNK)];
    let n = loop {
        match wire.try_read(&mut buf) {
            Ok(0) => return Err(ExchangeError::Channel("closed in the middle of a chunk".into())),
            Ok(n) => break n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wire.socket.readable().await.map_err(channel_error)?,
            Err(e) => return Err(channel_error(e)),
        }
    };
    relay::forward(socket, &buf[..n], meter, activity).await.map_err(ExchangeError::Socket)?;
    *total += n as u64;
    Ok(n)
}
