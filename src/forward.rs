//! The counted bidirectional copy that every forwarding path shares: direct
//! mappings, the server side of tunneled mappings, and the client's side.
//!
//! It works on `&TcpStream` readiness (`readable`/`try_read`) instead of split
//! halves, so both directions run concurrently on one socket without locks, and a
//! copy buffer exists only while data is actually moving: an idle connection holds
//! no user-space buffer at all, which keeps thousands of open tunnels cheap.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::metrics::Meter;

/// Largest single read. Big enough that a bulk transfer needs few syscalls.
const CHUNK: usize = 64 * 1024;

/// Copies `a → b` and `b → a` until both directions have seen EOF, propagating each
/// EOF as a half-close so a peer that shut down its write side still gets the rest
/// of the reply. `a_to_b` and `b_to_a` are counted as the bytes are written.
///
/// Returns the byte counts of each direction; on an error (a reset, say) the other
/// direction is abandoned and both sockets close when the caller drops them.
pub async fn relay(a: &TcpStream, b: &TcpStream, a_to_b: &Meter, b_to_a: &Meter) -> io::Result<(u64, u64)> {
    tokio::try_join!(copy(a, b, a_to_b), copy(b, a, b_to_a))
}

/// One direction of [`relay`]: `src → dst` until EOF, then half-close `dst`.
pub async fn copy(src: &TcpStream, dst: &TcpStream, meter: &Meter) -> io::Result<u64> {
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
                    write_all(dst, &buf[..n]).await?;
                    meter.record(n as u64);
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

pub(crate) async fn write_all(dst: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match dst.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
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

/// Accepts the next connection, riding out transient failures (EMFILE when the
/// process is out of descriptors, ECONNABORTED) with a short pause instead of
/// spinning or giving up on the listener.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
                tracing::warn!(port, error = %e, "accept failed; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
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
