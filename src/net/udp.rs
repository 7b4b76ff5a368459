//! UDP sockets: those toward a target, as a direct UDP session on the server
//! and a tunneled one on the client open and read them, and those where many
//! datagrams converge (a UDP mapping's port, a QUIC endpoint), bound with
//! large buffers.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::net::UdpSocket;
use tracing::debug;

/// Buffers asked for on a socket where datagrams converge (every visitor's of
/// a mapping, or every session's of a QUIC link): the kernel's default (about
/// 200 KiB, some 90 datagrams of 1,200 bytes) overflows whenever the reading
/// task is off the CPU for a few milliseconds at a few hundred Mbit/s, and
/// what overflows is lost before tunneld sees it. The kernel caps the request
/// at `net.core.rmem_max` / `wmem_max`.
const CONVERGING_BUFFER: usize = 4 << 20;

/// A non-blocking UDP socket bound to `addr` with [`CONVERGING_BUFFER`]-sized
/// receive and send buffers (smaller ones, where the kernel grants less, are
/// not an error: the socket still works).
pub(crate) fn bind_buffered(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    let socket = socket2::Socket::from(socket);
    if let Err(e) = socket.set_recv_buffer_size(CONVERGING_BUFFER) {
        debug!(%addr, error = %e, "UDP receive buffer not enlarged");
    }
    if let Err(e) = socket.set_send_buffer_size(CONVERGING_BUFFER) {
        debug!(%addr, error = %e, "UDP send buffer not enlarged");
    }
    Ok(socket.into())
}

/// A socket connected to `host:port`, of the target's address family: the
/// target's replies come back on it, and nobody else's.
pub(crate) async fn connect(host: &str, port: u16, timeout: Duration) -> io::Result<UdpSocket> {
    let addrs = tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "resolving the target timed out"))??;
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{host} resolves to no address"));
    for addr in addrs {
        let local: IpAddr = if addr.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
        let socket = UdpSocket::bind((local, 0)).await?;
        match socket.connect(addr).await {
            Ok(()) => return Ok(socket),
            Err(e) => last = e,
        }
    }
    Err(last)
}

thread_local! {
    /// Where a datagram is read before it is copied out at its size: one
    /// buffer per worker thread rather than 64 KiB per session, so a session
    /// costs what it holds (its task, its socket, its queue), not the largest
    /// datagram there could be.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Reads one datagram from a ready socket: `None` when it was larger than
/// `max` (dropped whole; the buffer is one byte longer to tell).
pub(crate) fn receive(socket: &UdpSocket, max: usize) -> io::Result<Option<Vec<u8>>> {
    SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < max + 1 {
            scratch.resize(max + 1, 0);
        }
        let n = socket.try_recv(&mut scratch[..max + 1])?;
        Ok((n <= max).then(|| scratch[..n].to_vec()))
    })
}

/// The next datagram from `socket`, waiting for one (`None`: larger than
/// `max`, dropped). Cancel-safe: nothing is read until it is returned.
pub(crate) async fn next(socket: &UdpSocket, max: usize) -> io::Result<Option<Vec<u8>>> {
    loop {
        socket.readable().await?;
        match receive(socket, max) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            received => return received,
        }
    }
}
