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

/// Datagrams read (`recvmmsg`) or sent (`sendmmsg`) in one system call: one
/// wake-up and one call carry up to this many, where each cost one before.
pub(crate) const BATCH: usize = 32;

thread_local! {
    /// Where [`receive_batch`] reads: [`BATCH`] slots of the largest datagram
    /// plus one byte, per worker thread rather than per mapping (the pages
    /// are the kernel's zero pages until a datagram lands in them).
    static BATCH_SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// quinn-udp's receive path (`recvmmsg`) and GSO send, without its socket set-up.
///
/// `UdpSocketState::new` sets options on the socket it is given: don't
/// fragment (`IP_MTU_DISCOVER` = probe, `IPV6_DONTFRAG`), GRO, packet info.
/// A mapping's replies to visitors must not lose fragmentation (a 4 KB DNS
/// answer would then fail to leave), and GRO would hand over trains of
/// datagrams a slot of [`BATCH_SCRATCH`] may not hold. Its `recv` and
/// `try_send` use whichever socket they are handed (the state only decodes
/// what the kernel reports, and remembers whether GSO works), so the state is
/// made once on a throwaway socket, and the mappings' and sessions' sockets
/// keep the kernel's defaults.
fn receive_state() -> io::Result<&'static quinn_udp::UdpSocketState> {
    static STATE: std::sync::OnceLock<quinn_udp::UdpSocketState> = std::sync::OnceLock::new();
    if let Some(state) = STATE.get() {
        return Ok(state);
    }
    let throwaway = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?;
    let state = quinn_udp::UdpSocketState::new((&throwaway).into())?;
    Ok(STATE.get_or_init(|| state))
}

/// One datagram of a batch read by [`receive_batch`]: `None` when it was
/// larger than the `max` asked for (dropped whole, never forwarded cut).
pub(crate) type Received<'a> = (Option<&'a [u8]>, SocketAddr);

/// Reads what is waiting on `socket`, up to [`BATCH`] datagrams in one
/// `recvmmsg`, and hands each to `each` in arrival order with its source;
/// returns how many were read (`WouldBlock` when none were waiting: the
/// socket's readiness is then cleared, as by tokio's own reads).
pub(crate) fn receive_batch(socket: &UdpSocket, max: usize, mut each: impl FnMut(Received<'_>)) -> io::Result<usize> {
    let state = receive_state()?;
    let slot = max + 1;
    BATCH_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        if scratch.len() < slot * BATCH {
            // Zeroed allocation: untouched pages cost no memory.
            *scratch = vec![0u8; slot * BATCH];
        }
        let mut meta = [quinn_udp::RecvMeta::default(); BATCH];
        let read = {
            let mut slices: Vec<io::IoSliceMut<'_>> = scratch.chunks_exact_mut(slot).take(BATCH).map(io::IoSliceMut::new).collect();
            let batch = slices.len().min(quinn_udp::BATCH_SIZE);
            socket.try_io(tokio::io::Interest::READABLE, || state.recv(socket.into(), &mut slices[..batch], &mut meta[..batch]))?
        };
        for (i, meta) in meta.iter().take(read).enumerate() {
            // A datagram that fills its slot was larger than `max`.
            let datagram = (meta.len <= max).then(|| &scratch[i * slot..i * slot + meta.len]);
            each((datagram, meta.addr));
        }
        Ok(read)
    })
}

/// Sends `datagrams` in order on `socket`, connected to `to`, waiting while
/// the socket's buffer is full; returns how many the kernel took, each whole
/// (an error is the first unsent one's: the caller skips it and sends the
/// rest). A train of equal-sized datagrams (the last may be shorter) goes as
/// one `sendmsg` the kernel splits (UDP GSO, `UDP_SEGMENT`), others up to
/// [`BATCH`] in one `sendmmsg`.
pub(crate) async fn send_batch(socket: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) -> io::Result<usize> {
    let count = datagrams.len().min(BATCH);
    if count == 0 {
        return Ok(0);
    }
    if count == 1 {
        // One datagram: a plain `send`, without the batch's bookkeeping.
        return socket.send(&datagrams[0]).await.map(|_| 1);
    }
    let train = gso_train(&datagrams[..count]);
    if train > 1 {
        match send_train(socket, to, &datagrams[..train]).await {
            Ok(()) => return Ok(train),
            // Reported for an earlier datagram: as any send would.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return Err(e),
            // The route cannot segment (a datagram over its MTU, no GSO):
            // one by one instead; quinn-udp stops offering GSO after this.
            Err(e) => debug!(%to, error = %e, "UDP GSO send failed; sending the datagrams one by one"),
        }
    }
    let slices: Vec<[io::IoSlice<'_>; 1]> = datagrams[..count].iter().map(|d| [io::IoSlice::new(d)]).collect();
    loop {
        socket.writable().await?;
        let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
            let mut controls: Vec<rustix::net::SendAncillaryBuffer<'_, '_, '_>> = slices.iter().map(|_| Default::default()).collect();
            let mut headers: Vec<rustix::net::MMsgHdr<'_>> =
                slices.iter().zip(controls.iter_mut()).map(|(iov, control)| rustix::net::MMsgHdr::new(iov, control)).collect();
            Ok(rustix::net::sendmmsg(socket, &mut headers, rustix::net::SendFlags::DONTWAIT)?)
        });
        match sent {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            sent => return sent,
        }
    }
}

/// Bytes one GSO send may carry (the kernel's limit is a UDP datagram's 64 KiB).
const GSO_MAX_BYTES: usize = 60_000;

/// How many of `datagrams`, from the first, make a train the kernel can split
/// at equal sizes: all of the first's length, the last possibly shorter.
fn gso_train(datagrams: &[Vec<u8>]) -> usize {
    let Ok(state) = receive_state() else { return 1 };
    let segment = datagrams[0].len();
    if segment == 0 {
        return 1;
    }
    let most = state.max_gso_segments().min(GSO_MAX_BYTES / segment);
    let mut train = 0;
    for datagram in datagrams.iter().take(most) {
        if datagram.len() > segment || datagram.is_empty() {
            break;
        }
        train += 1;
        if datagram.len() < segment {
            break;
        }
    }
    train.max(1)
}

/// Sends `datagrams` (a [`gso_train`]) as one `sendmsg` with `UDP_SEGMENT`.
async fn send_train(socket: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) -> io::Result<()> {
    let state = receive_state()?;
    let contents = datagrams.concat();
    let transmit =
        quinn_udp::Transmit { destination: to, ecn: None, contents: &contents, segment_size: Some(datagrams[0].len()), src_ip: None };
    loop {
        socket.writable().await?;
        match socket.try_io(tokio::io::Interest::WRITABLE, || state.try_send(socket.into(), &transmit)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            sent => return sent,
        }
    }
}
