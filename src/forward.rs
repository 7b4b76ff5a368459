//! The counted bidirectional copy that every forwarding path shares: direct
//! mappings, the server side of tunneled mappings, and the client's side.
//!
//! It works on `&TcpStream` readiness (`readable`/`try_read`) instead of split
//! halves, so both directions run concurrently on one socket without locks, and a
//! copy buffer exists only while data is actually moving: an idle connection holds
//! no user-space buffer at all, which keeps thousands of open tunnels cheap.
//!
//! It also owns how a forwarded connection ends (see [`relay`]): cleanly only when
//! both directions finished; otherwise — a peer's reset, the idle timeout, an
//! abort — with a reset to the other side, never an EOF that passes for success.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::BytesMut;
use futures_util::FutureExt;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::metrics::Meter;

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
pub async fn relay(a: &TcpStream, b: &TcpStream, a_to_b: &Meter, b_to_a: &Meter, idle_timeout: Duration) -> io::Result<(u64, u64)> {
    let activity = Activity::new();
    let copies = async { tokio::try_join!(copy(a, b, a_to_b, &activity), copy(b, a, b_to_a, &activity)) };
    let totals = guard(copies, (a, b), &activity, idle_timeout).await?;
    disarm(a);
    disarm(b);
    Ok(totals)
}

/// Runs `work` (copies between the two `sockets`) until it finishes, either
/// socket reports an error, or `activity` has been idle for `idle_timeout`. The
/// building block of [`relay`] for paths that interleave their own steps with the
/// copies.
pub async fn guard<T, E: From<io::Error>>(
    work: impl std::future::Future<Output = Result<T, E>>,
    sockets: (&TcpStream, &TcpStream),
    activity: &Activity,
    idle_timeout: Duration,
) -> Result<T, E> {
    tokio::select! {
        result = work => result,
        error = failure(sockets.0) => Err(error.into()),
        error = failure(sockets.1) => Err(error.into()),
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

/// When bytes last moved on a relayed connection, in either direction.
pub struct Activity {
    started: tokio::time::Instant,
    /// Milliseconds after `started`.
    last: AtomicU64,
}

impl Activity {
    pub fn new() -> Activity {
        Activity { started: tokio::time::Instant::now(), last: AtomicU64::new(0) }
    }

    pub(crate) fn touch(&self) {
        self.last.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Resolves with a `TimedOut` error once nothing has moved for `limit`.
    pub async fn idle_for(&self, limit: Duration) -> io::Error {
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
pub fn arm(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Undoes [`arm`] after a clean end, so closing delivers every byte still queued.
pub fn disarm(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(None);
}

/// One direction of [`relay`]: `src → dst` until EOF, then half-close `dst`.
pub async fn copy(src: &TcpStream, dst: &TcpStream, meter: &Meter, activity: &Activity) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        src.readable().await?;
        // Allocated per burst, not per connection: the buffer is released as soon as
        // the socket runs dry. `try_read_buf` fills spare capacity without zeroing.
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.clear();
            match src.try_read_buf(&mut buf) {
                Ok(0) => {
                    // Half-close: the peer may still be sending the other way.
                    // ENOTCONN here only means the other side is already gone.
                    let _ = socket2::SockRef::from(dst).shutdown(Shutdown::Write);
                    return Ok(total);
                }
                Ok(n) => {
                    activity.touch();
                    write_all(dst, &buf[..n], activity).await?;
                    meter.counted(n as u64).await;
                    total += n as u64;
                    if n < buf.capacity() {
                        // Short read: the socket is probably drained; let readiness
                        // tell us rather than paying for a WouldBlock syscall.
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
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

/// Whether `e` means this process (or the system) is out of file descriptors:
/// a local limit, not a fault of the peer being dialed or accepted.
pub fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Raises the soft limit on open descriptors to the hard limit, as most servers
/// do: every forwarded connection costs two descriptors, and the distribution
/// default soft limit (often 1024) is far below what the hard limit allows.
/// Returns `(before, after)` when it changed.
pub fn raise_descriptor_limit() -> Option<(u64, u64)> {
    reserve_descriptor();
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), maximum) = (limit.current, limit.maximum) else { return None };
    // An unlimited hard limit is not a value the kernel accepts for NOFILE; stay
    // within fs.nr_open's usual default.
    let target = maximum.unwrap_or(1 << 20).min(1 << 20);
    if target <= soft {
        return None;
    }
    setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum }).ok()?;
    Some((soft, target))
}

/// The soft limit on open descriptors (`None`: unlimited or unknown).
pub fn descriptor_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Listen backlog for every listener: a burst of a thousand connects must queue,
/// not be dropped and retried a second later by the kernel (the default of 128
/// overflows under such a burst). The kernel caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

/// Binds a listener with [`BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind`
/// does, so a restart is not blocked by connections in TIME_WAIT).
pub fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// Accepts the next connection, riding out transient failures (ECONNABORTED)
/// with a short pause instead of spinning or giving up on the listener.
///
/// Out of descriptors (EMFILE), the pending connection is not left to wait in
/// the backlog with the listener spinning on it: the reserve descriptor is freed
/// for a moment, the connection accepted and closed at once, and `refused` is
/// called — the visitor learns immediately, and the refusal is counted.
///
/// Failures are logged at most once per [`ACCEPT_WARN_INTERVAL`] for the whole
/// process, with the count of those not logged — not once per attempt (ten lines
/// a second while out of descriptors would flood the journal exactly when it
/// matters).
pub async fn accept(listener: &TcpListener, refused: impl Fn()) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                let exhausted = out_of_descriptors(&e);
                note_accept_failure(listener, &e, exhausted);
                if exhausted && shed(listener) {
                    refused();
                    continue;
                }
                let pause = if exhausted { Duration::from_millis(250) } else { Duration::from_millis(50) };
                tokio::time::sleep(pause).await;
            }
        }
    }
}

const ACCEPT_WARN_INTERVAL: Duration = Duration::from_secs(10);

/// When an accept failure was last logged, and how many failed since.
static ACCEPT_FAILURES: Mutex<(Option<std::time::Instant>, u64)> = Mutex::new((None, 0));

fn note_accept_failure(listener: &TcpListener, e: &io::Error, exhausted: bool) {
    let Ok(mut state) = ACCEPT_FAILURES.lock() else { return };
    let (last, unlogged) = &mut *state;
    if last.is_some_and(|at| at.elapsed() < ACCEPT_WARN_INTERVAL) {
        *unlogged += 1;
        return;
    }
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    tracing::warn!(
        port,
        error = %e,
        out_of_descriptors = exhausted,
        failures_not_logged = *unlogged,
        "accept failed; further failures are counted and logged at most every 10 s"
    );
    *last = Some(std::time::Instant::now());
    *unlogged = 0;
}

/// One descriptor held back for [`shed`]: without it, a process out of
/// descriptors cannot even accept a connection to close it.
static RESERVE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Takes the reserve descriptor (at start, and again after each use).
pub fn reserve_descriptor() {
    if let Ok(mut reserve) = RESERVE.lock() {
        if reserve.is_none() {
            *reserve = std::fs::File::open("/dev/null").ok();
        }
    }
}

/// Accepts one pending connection with the reserve descriptor and closes it.
fn shed(listener: &TcpListener) -> bool {
    let Ok(mut reserve) = RESERVE.lock() else { return false };
    if reserve.take().is_none() {
        return false;
    }
    let shed = matches!(listener.accept().now_or_never(), Some(Ok(_)));
    *reserve = std::fs::File::open("/dev/null").ok();
    shed
}

/// Socket options every forwarded connection gets: no Nagle delay (interactive
/// protocols and small request/response exchanges), and keepalive so a vanished
/// peer is eventually noticed even on an idle connection.
pub fn tune(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(15));
    let _ = socket2::SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Dials `host:port` within `timeout`, trying each resolved address in turn.
pub async fn connect(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect((host, port))).await {
        Ok(Ok(stream)) => {
            tune(&stream);
            Ok(stream)
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {host}:{port} timed out after {timeout:?}"))),
    }
}
