//! The counted bidirectional copy that every forwarding path shares: direct
//! mappings, the server side of tunneled mappings, and the client's side.
//!
//! It works on `&TcpStream` readiness (`readable`/`try_read`) instead of split
//! halves, so both directions run concurrently on one socket without locks, and a
//! copy buffer exists only while data is actually moving: an idle connection holds
//! no user-space buffer at all, which keeps thousands of open tunnels cheap.
//!
//! Between two sockets (a direct mapping) the bytes need not come up to user
//! space at all: given [`Pipes`], a direction that turns out to carry a bulk
//! transfer splices its bursts through a pipe in the kernel (see
//! [`super::splice`]); a short exchange, and where splice cannot serve, copy
//! (see [`pump`]). Either way the bytes are counted as they reach the other socket,
//! paced by the same cap, and end the same way. (A tunnel exchange over a
//! plain data channel splices its chunks' payloads with the same pipes, see
//! `tunnel::exchange`.)
//!
//! It also owns how a forwarded connection ends (see [`relay`]): cleanly only when
//! both directions finished; otherwise — a peer's reset, the idle timeout, an
//! abort — with a reset to the other side, never an EOF that passes for success.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use futures_util::FutureExt;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::splice::{cannot_splice, has_data, Fill, Pipe, Pipes};
use crate::telemetry::Meter;

/// Largest single read. Big enough that a bulk transfer needs few syscalls.
const CHUNK: usize = 64 * 1024;

/// Copies `a → b` and `b → a` until both directions have seen EOF, propagating each
/// EOF as a half-close so a peer that shut down its write side still gets the rest
/// of the reply. `a_to_b` and `b_to_a` are counted as the bytes are written.
///
/// How it ends — the semantics every forwarding path shares (the tunnel's framed
/// path included):
/// - both directions reached EOF: a clean end; both sockets are [`disarm`]ed, so
///   dropping them closes normally (FIN) after the last byte is delivered;
/// - an error on either socket (a reset, say), including one noticed while the
///   other direction is blocked on a peer that does not read: `Err`;
/// - no byte moved either way for `idle_timeout`: `Err(TimedOut)`.
///
/// On `Err` the sockets stay [`arm`]ed: when the caller drops them the peers get
/// a reset (RST), never an EOF, so a cut-off transfer cannot pass for a complete
/// one. Callers arm both sockets before relaying (and may abort any time by
/// dropping them).
///
/// An error from either socket says which one it was ([`failed_side`]): a
/// visitor's reset and its target's end a connection differently in the
/// connection log.
///
/// With `pipes`, each direction splices its bursts in the kernel while it can
/// get a pipe (see [`pump`]); without, it copies.
pub(crate) async fn relay(
    a: &TcpStream,
    b: &TcpStream,
    a_to_b: &Meter,
    b_to_a: &Meter,
    idle_timeout: Duration,
    pipes: Option<&Pipes>,
) -> io::Result<(u64, u64)> {
    let activity = Activity::new();
    let copies = async {
        tokio::try_join!(pump(a, b, a_to_b, &activity, (Side::A, Side::B), pipes), pump(b, a, b_to_a, &activity, (Side::B, Side::A), pipes))
    };
    let totals = guard(copies, (a, b), &activity, idle_timeout).await?;
    disarm(a);
    disarm(b);
    Ok(totals)
}

/// Runs `work` (copies between the two `sockets`) until it finishes, either
/// socket reports an error, or `activity` has been idle for `idle_timeout`. The
/// building block of [`relay`] for paths that interleave their own steps with the
/// copies.
pub(crate) async fn guard<T, E: From<io::Error>>(
    work: impl std::future::Future<Output = Result<T, E>>,
    sockets: (&TcpStream, &TcpStream),
    activity: &Activity,
    idle_timeout: Duration,
) -> Result<T, E> {
    tokio::select! {
        result = work => result,
        error = failure(sockets.0) => Err(on(Side::A, error).into()),
        error = failure(sockets.1) => Err(on(Side::B, error).into()),
        error = activity.idle_for(idle_timeout) => Err(error.into()),
    }
}

/// Resolves when `socket` reports an error (a reset from its peer): a direction
/// blocked on the *other* socket would never see it, and the connection must not
/// outlive its peer (the client dropping its target when its data channel is cut).
pub(crate) async fn failure(socket: &TcpStream) -> io::Error {
    loop {
        match socket.ready(Interest::ERROR).await {
            Ok(ready) if ready.is_error() => {
                return match socket.take_error() {
                    Ok(Some(e)) => e,
                    _ => io::Error::from(io::ErrorKind::ConnectionReset),
                };
            }
            Ok(_) => tokio::task::yield_now().await,
            Err(e) => return e,
        }
    }
}

/// Which socket of a [`relay`] failed: `A` is its first argument, `B` its second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    A,
    B,
}

/// An error of one socket of a [`relay`], carried inside the `io::Error` it
/// returns (same kind, same message).
#[derive(Debug)]
struct SideError {
    side: Side,
    error: io::Error,
}

impl std::fmt::Display for SideError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for SideError {}

fn on(side: Side, error: io::Error) -> io::Error {
    if failed_side(&error).is_some() {
        return error;
    }
    io::Error::new(error.kind(), SideError { side, error })
}

/// Which socket a [`relay`] error came from; `None` for the idle timeout.
pub(crate) fn failed_side(error: &io::Error) -> Option<Side> {
    error.get_ref().and_then(|e| e.downcast_ref::<SideError>()).map(|e| e.side)
}

/// When bytes last moved on a relayed connection, in either direction.
pub(crate) struct Activity {
    started: tokio::time::Instant,
    /// Milliseconds after `started`.
    last: AtomicU64,
}

impl Activity {
    pub(crate) fn new() -> Activity {
        Activity { started: tokio::time::Instant::now(), last: AtomicU64::new(0) }
    }

    pub(crate) fn touch(&self) {
        self.last.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves with a `TimedOut` error once nothing has moved for `limit`.
    pub(crate) async fn idle_for(&self, limit: Duration) -> io::Error {
        loop {
            let last = self.started + Duration::from_millis(self.last.load(Ordering::Relaxed));
            let deadline = last + limit;
            if tokio::time::Instant::now() >= deadline {
                return io::Error::new(io::ErrorKind::TimedOut, format!("no bytes either way for {} s", limit.as_secs()));
            }
            tokio::time::sleep_until(deadline).await;
        }
    }
}

impl Default for Activity {
    fn default() -> Self {
        Activity::new()
    }
}

/// Makes dropping `stream` send a reset instead of an EOF (SO_LINGER 0) — also when
/// the process dies, since the kernel closes its descriptors the same way. Set on
/// every forwarded socket until its relay ends cleanly.
pub(crate) fn arm(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Undoes [`arm`] after a clean end, so closing delivers every byte still queued.
pub(crate) fn disarm(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(None);
}

/// One direction of [`relay`]: `src → dst` until EOF, then half-close `dst`.
///
/// Burst by burst: each time `src` has data, the burst is spliced through a
/// pipe from `pipes` if one can be had (see [`splice_burst`]), else copied
/// (see [`copy_burst`]). The pipe is kept while `src` keeps having data and
/// given back as soon as it has none, so an idle direction holds no pipe, as
/// it holds no buffer.
///
/// A direction copies until one read fills what it asked for (more is
/// waiting: a bulk transfer), and splices from then on. A request or an
/// answer of a few bytes costs a copy two calls (`recv`, `send`) and a splice
/// three or more (into the pipe, out of it, and the peeks that tell a drained
/// socket or its end from urgent data): the first read of a short-lived
/// connection copies, a bulk one splices all but its first [`CHUNK`].
///
/// Errors name the socket they came from, `sides` being (`src`, `dst`).
async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    meter: &Meter,
    activity: &Activity,
    sides: (Side, Side),
    mut pipes: Option<&Pipes>,
) -> io::Result<u64> {
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = None;
    // Whether a read filled what it asked for: splice from then on.
    let mut bulk = false;
    loop {
        let ready = match src.readable().now_or_never() {
            Some(ready) => ready,
            None => {
                // Nothing to read now: the pipe (empty between bursts) goes back.
                if let (Some(pool), Some(idle)) = (pipes, pipe.take()) {
                    pool.give_back(idle);
                }
                src.readable().await
            }
        };
        ready.map_err(|e| on(sides.0, e))?;
        if pipe.is_none() && bulk {
            pipe = pipes.and_then(Pipes::take);
        }
        let reads = match pipes.is_some() && !bulk {
            true => Reads::UntilFull,
            false => Reads::UntilDrained,
        };
        let burst = match &pipe {
            Some(p) => splice_burst(src, dst, p, meter, activity, sides, &mut total).await?,
            None => copy_burst(src, dst, meter, activity, sides, &mut total, reads).await?,
        };
        let burst = match burst {
            // Splice read nothing: the end — unless urgent data comes before
            // it, which splice cannot pass and a plain read takes.
            Burst::MaybeEnded if has_data(src) => copy_burst(src, dst, meter, activity, sides, &mut total, Reads::One).await?,
            Burst::MaybeEnded => Burst::Ended,
            burst => burst,
        };
        match burst {
            Burst::Drained | Burst::MaybeEnded => {}
            Burst::Bulk => bulk = true,
            Burst::Ended => {
                // Half-close: the peer may still be sending the other way.
                // ENOTCONN here only means the other side is already gone.
                let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                if let (Some(pool), Some(empty)) = (pipes, pipe.take()) {
                    pool.give_back(empty);
                }
                return Ok(total);
            }
            Burst::Refused(e) => {
                // The kernel will not splice here: copy from now on (the pipe
                // was emptied before this was returned).
                if let Some(pool) = pipes.take() {
                    pool.refused(&e);
                }
                pipe = None;
            }
        }
    }
}

/// How a burst of one direction ended.
enum Burst {
    /// `src` has nothing more for now.
    Drained,
    /// `src` reached its end (EOF).
    Ended,
    /// A splice from `src` moved nothing: EOF, or only urgent data to read.
    MaybeEnded,
    /// The kernel refused to splice (see [`cannot_splice`]).
    Refused(io::Error),
    /// A read filled what it asked for and more is probably waiting (see
    /// [`Reads::UntilFull`]).
    Bulk,
}

/// How much of what `src` has [`copy_burst`] copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// Everything, until it runs dry: the copy path.
    UntilDrained,
    /// One read, past what stopped a splice (TCP urgent data), and back to
    /// splicing. Copying on until `src` ran dry copies for as long as the
    /// relay does not catch up with its sender — a CPU-starved relay, a fast
    /// sender: one strace'd iperf3 run of four copied to its end (12,500
    /// reads and writes per GB, against 20), after a splice found the socket
    /// empty and a segment arrived before the check for urgent data.
    One,
    /// Until it runs dry or a read fills what it asked for ([`Burst::Bulk`]):
    /// a direction that may splice, until it turns out to be a bulk one.
    UntilFull,
}

/// Copies what `src` has now (or one read of it, see [`Reads`]) to `dst`
/// through a buffer, adding to `total`.
///
/// Each read takes no more than `meter`'s cap allows at that moment (asked
/// before reading, see [`Meter::allowance`]), so the cap holds from a
/// connection's first byte; uncapped, a read takes up to [`CHUNK`].
async fn copy_burst(
    src: &TcpStream,
    dst: &TcpStream,
    meter: &Meter,
    activity: &Activity,
    sides: (Side, Side),
    total: &mut u64,
    reads: Reads,
) -> io::Result<Burst> {
    // Allocated per burst, not per connection: the buffer is released as soon as
    // the socket runs dry. `try_read_buf` fills spare capacity without zeroing.
    let mut buf = BytesMut::with_capacity(CHUNK);
    loop {
        let allowed = meter.allowance(CHUNK).await;
        buf.clear();
        let read = src.try_read_buf(&mut (&mut buf).limit(allowed));
        meter.unused(allowed - read.as_ref().map_or(0, |n| *n));
        match read {
            Ok(0) => return Ok(Burst::Ended),
            Ok(n) => {
                activity.touch();
                write_all(dst, &buf[..n], activity).await.map_err(|e| on(sides.1, e))?;
                meter.record(n as u64);
                *total += n as u64;
                // A short read: the socket is probably drained; let readiness
                // tell us rather than paying for a WouldBlock syscall.
                if n < allowed || reads == Reads::One {
                    return Ok(Burst::Drained);
                }
                if reads == Reads::UntilFull {
                    return Ok(Burst::Bulk);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) => return Err(on(sides.0, e)),
        }
    }
}

/// Splices what `src` has now to `dst` through `pipe` (empty on entry and on
/// return), adding to `total`: each splice into the pipe takes no more than
/// `meter`'s cap allows, and the bytes are counted as each splice out of it
/// delivers them, exactly as [`copy_burst`] counts its writes.
async fn splice_burst(
    src: &TcpStream,
    dst: &TcpStream,
    pipe: &Pipe,
    meter: &Meter,
    activity: &Activity,
    sides: (Side, Side),
    total: &mut u64,
) -> io::Result<Burst> {
    loop {
        let allowed = meter.allowance(pipe.size()).await;
        let filled = pipe.try_fill(src, allowed);
        meter.unused(allowed - filled.as_ref().map_or(0, |f| if let Fill::Moved(n) = f { *n } else { 0 }));
        match filled {
            // Splice stops at TCP urgent data and does not move past it; a
            // plain read does (and skips the urgent byte, as any user-space
            // relay does). The socket is still marked readable for it.
            Ok(Fill::Urgent) => return copy_burst(src, dst, meter, activity, sides, total, Reads::One).await,
            Ok(Fill::Moved(0)) => return Ok(Burst::MaybeEnded),
            Ok(Fill::Moved(n)) => {
                activity.touch();
                if let Err(e) = drain(pipe, dst, n, meter, activity, total).await {
                    return match cannot_splice(&e) {
                        true => {
                            copy_out(pipe, dst, n, meter, activity, total).await.map_err(|e| on(sides.1, e))?;
                            Ok(Burst::Refused(e))
                        }
                        false => Err(on(sides.1, e)),
                    };
                }
                if n < allowed {
                    // As in `copy_burst`: probably drained.
                    return Ok(Burst::Drained);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Burst::Drained),
            Err(e) if cannot_splice(&e) => return Ok(Burst::Refused(e)),
            Err(e) => return Err(on(sides.0, e)),
        }
    }
}

/// Splices the `n` bytes in `pipe` into `dst`, counting each piece as it is
/// delivered. On an error, what was not delivered is still in the pipe.
async fn drain(pipe: &Pipe, dst: &TcpStream, n: usize, meter: &Meter, activity: &Activity, total: &mut u64) -> io::Result<()> {
    pipe.drain(dst, n, false, |moved| delivered(moved, meter, activity, total)).await
}

/// Delivers what is left in `pipe` (at most `n` bytes) to `dst` through user
/// space: for bytes spliced in before the kernel refused to splice them out.
async fn copy_out(pipe: &Pipe, dst: &TcpStream, n: usize, meter: &Meter, activity: &Activity, total: &mut u64) -> io::Result<()> {
    pipe.copy_out(dst, n, |moved| delivered(moved, meter, activity, total)).await
}

/// Counts `n` bytes that reached the other socket.
fn delivered(n: usize, meter: &Meter, activity: &Activity, total: &mut u64) {
    meter.record(n as u64);
    *total += n as u64;
    activity.touch();
}

/// Writes all of `data` to `dst` as `meter`'s cap allows, asking before each
/// piece, and counts each piece once written: for bytes already in hand (a
/// chunk off the tunnel) that must not go out ahead of the cap.
pub(crate) async fn forward(dst: &TcpStream, mut data: &[u8], meter: &Meter, activity: &Activity) -> io::Result<()> {
    while !data.is_empty() {
        let allowed = meter.allowance(data.len()).await;
        write_all(dst, &data[..allowed], activity).await?;
        meter.record(allowed as u64);
        data = &data[allowed..];
    }
    Ok(())
}

pub(crate) async fn write_all(dst: &TcpStream, mut data: &[u8], activity: &Activity) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => {
                data = &data[n..];
                activity.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
