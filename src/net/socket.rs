//! Sockets as every listener and dialer of the daemon sets them up: the listen
//! backlog, accepting through descriptor exhaustion, keepalive, dialing with a
//! timeout, and the process's descriptor limit.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::core::sync::lock;

/// Whether `e` means this process (or the system) is out of file descriptors:
/// a local limit, not a fault of the peer being dialed or accepted.
pub(crate) fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Raises the soft limit on open descriptors to the hard limit, as most servers
/// do: every forwarded connection costs two descriptors, and the distribution
/// default soft limit (often 1024) is far below what the hard limit allows.
/// Returns `(before, after)` when it changed.
pub(crate) fn raise_descriptor_limit() -> Option<(u64, u64)> {
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
pub(crate) fn descriptor_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// Whether `ip` is one of this host's own addresses (loopback, the wildcard, or
/// an interface address): an address this host can bind is one it answers on.
pub(crate) fn is_local_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Listen backlog for every listener: a burst of a thousand connects must queue,
/// not be dropped and retried a second later by the kernel (the default of 128
/// overflows under such a burst). The kernel caps it at `net.core.somaxconn`.
const BACKLOG: u32 = 4096;

/// Binds a listener with [`BACKLOG`] (and `SO_REUSEADDR`, as `TcpListener::bind`
/// does, so a restart is not blocked by connections in TIME_WAIT).
pub(crate) fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// A [`listen`]er for a mapping's visitors, whose accepted sockets come out
/// [`tune`]d and armed (`SO_LINGER` 0, see `relay::arm`: however a visitor's
/// connection ends early, it gets a reset, not an EOF that looks like a
/// complete answer). Linux copies a listening socket's options (`TCP_NODELAY`,
/// keepalive and its timings, `SO_LINGER`) into every socket it accepts, so
/// setting them once here spares each visitor five `setsockopt` calls, an
/// eighth of the system calls of a direct visitor.
pub(crate) fn listen_for_visitors(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = listen(addr)?;
    let socket = socket2::SockRef::from(&listener);
    set_tuned(&socket)?;
    socket.set_linger(Some(Duration::ZERO))?;
    Ok(listener)
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
pub(crate) async fn accept(listener: &TcpListener, refused: impl Fn()) -> (TcpStream, SocketAddr) {
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
    let mut state = lock(&ACCEPT_FAILURES);
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
pub(crate) fn reserve_descriptor() {
    let mut reserve = lock(&RESERVE);
    if reserve.is_none() {
        *reserve = std::fs::File::open("/dev/null").ok();
    }
}

/// Accepts one pending connection with the reserve descriptor and closes it.
fn shed(listener: &TcpListener) -> bool {
    let mut reserve = lock(&RESERVE);
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
pub(crate) fn tune(stream: &TcpStream) {
    let _ = set_tuned(&socket2::SockRef::from(stream));
}

fn set_tuned(socket: &socket2::SockRef<'_>) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    let keepalive = socket2::TcpKeepalive::new().with_time(Duration::from_secs(60)).with_interval(Duration::from_secs(15));
    socket.set_tcp_keepalive(&keepalive)
}

/// [`tune`] for a socket dialed to `peer`. Keepalive finds a peer *host* that
/// vanished without a word (powered off, cut off); a peer on this host cannot
/// vanish that way — when its process dies the kernel closes its end and says
/// so — so a loopback target (the usual one of a tunnel client beside its
/// service) gets no keepalive: three `setsockopt` calls fewer per visitor.
fn tune_dialed(stream: &TcpStream, peer: SocketAddr) {
    let socket = socket2::SockRef::from(stream);
    match peer.ip().to_canonical().is_loopback() {
        true => {
            let _ = socket.set_tcp_nodelay(true);
        }
        false => {
            let _ = set_tuned(&socket);
        }
    }
}

/// Dials `host:port` within `timeout`, trying each resolved address in turn
/// (an address literal is not looked up), and [`tune_dialed`]s the connection.
pub(crate) async fn connect(host: &str, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    let dial = async {
        let mut last_error = None;
        for addr in tokio::net::lookup_host((host, port)).await? {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    tune_dialed(&stream, addr);
                    return Ok(stream);
                }
                Err(e) => last_error = Some(e),
            }
        }
        // What `TcpStream::connect` says when a name has no address.
        Err(last_error.unwrap_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "could not resolve to any address")))
    };
    match tokio::time::timeout(timeout, dial).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connect to {host}:{port} timed out after {timeout:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What [`listen_for_visitors`] relies on: the kernel hands every
    /// accepted socket the listener's options, so nobody sets them again.
    #[tokio::test]
    async fn visitors_are_accepted_tuned_and_armed() {
        let listener = listen_for_visitors("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, taken) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (_dialed, (stream, _)) = (dialed.unwrap(), taken.unwrap());
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), Duration::from_secs(15));
        assert_eq!(socket.linger().unwrap(), Some(Duration::ZERO));
    }

    /// A dialed target gets `TCP_NODELAY` always, keepalive only off this host.
    #[tokio::test]
    async fn dialed_targets_get_keepalive_only_off_this_host() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dialed = connect("127.0.0.1", addr.port(), Duration::from_secs(5)).await.unwrap();
        let socket = socket2::SockRef::from(&dialed);
        assert!(socket.tcp_nodelay().unwrap());
        assert!(!socket.keepalive().unwrap(), "no keepalive toward a loopback peer");
        // Off this host: set as on every other forwarded socket (applied to a
        // loopback socket here, as no other host can be dialed in a test).
        tune_dialed(&dialed, "192.0.2.1:9".parse().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(60));
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), Duration::from_secs(15));
    }
}
