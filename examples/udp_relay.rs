//! The least a user-space UDP forwarder can do, as a yardstick for
//! `bench/floors.py --udp`: two threads with blocking sockets, one per
//! direction, batching reads with `recvmmsg` and writes with `sendmmsg`, no
//! runtime, no per-visitor state but the last visitor's address, no counters.
//! Whatever rate this reaches beside raw loopback on a machine is the ceiling a
//! UDP mapping can be held to there. TCP on the same port is relayed too (a
//! thread per direction), because iperf3 runs its control connection there.
//!
//! ```text
//! cargo run --release --example udp_relay -- LISTEN_ADDR TARGET_ADDR
//! ```

use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};

/// Datagrams moved per call each way.
const BATCH: usize = 32;
/// Receive buffers as large as a UDP mapping asks for (`net::udp`).
const BUFFER: usize = 4 << 20;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: udp_relay LISTEN_ADDR TARGET_ADDR";
    let listen: SocketAddr = args.next().context(usage)?.parse().context(usage)?;
    let target: SocketAddr = args.next().context(usage)?.parse().context(usage)?;

    let control = TcpListener::bind(listen)?;
    std::thread::spawn(move || relay_tcp(control, target));
    let front = UdpSocket::bind(listen)?;
    let back = UdpSocket::bind(if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    back.connect(target)?;
    for socket in [&front, &back] {
        let socket = socket2::SockRef::from(socket);
        socket.set_recv_buffer_size(BUFFER)?;
        socket.set_send_buffer_size(BUFFER)?;
    }
    let visitor = Arc::new(Mutex::new(None::<SocketAddr>));

    let replies = {
        let (front, back, visitor) = (front.try_clone()?, back.try_clone()?, Arc::clone(&visitor));
        std::thread::spawn(move || -> Result<()> {
            let mut batch = Batch::new();
            loop {
                let n = batch.receive(&back)?;
                let to = *visitor.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
                if let Some(to) = to {
                    for i in 0..n {
                        // A visitor gone away is not the relay's end either.
                        let _ = front.send_to(batch.datagram(i), to);
                    }
                }
            }
        })
    };

    let mut batch = Batch::new();
    loop {
        let n = batch.receive(&front)?;
        if n == 0 {
            continue;
        }
        if let Some(from) = batch.source(n - 1) {
            *visitor.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(from);
        }
        batch.send(&back, n)?;
        if replies.is_finished() {
            return replies.join().map_err(|_| anyhow::anyhow!("the reply thread panicked"))?;
        }
    }
}

/// Each TCP connection to `target`, byte for byte, a thread per direction.
fn relay_tcp(listener: TcpListener, target: SocketAddr) {
    for visitor in listener.incoming().flatten() {
        std::thread::spawn(move || -> std::io::Result<()> {
            let upstream = TcpStream::connect(target)?;
            let (mut visitor_in, mut upstream_out) = (visitor.try_clone()?, upstream.try_clone()?);
            let upload = std::thread::spawn(move || {
                let _ = std::io::copy(&mut visitor_in, &mut upstream_out);
                let _ = upstream_out.shutdown(Shutdown::Write);
            });
            let (mut upstream_in, mut visitor_out) = (upstream, visitor);
            let _ = std::io::copy(&mut upstream_in, &mut visitor_out);
            let _ = visitor_out.shutdown(Shutdown::Write);
            let _ = upload.join();
            Ok(())
        });
    }
}

/// `BATCH` buffers of the largest datagram, with the headers `recvmmsg` and
/// `sendmmsg` fill and read.
struct Batch {
    buffers: Vec<[u8; 65_536]>,
    lengths: [usize; BATCH],
    sources: [libc::sockaddr_storage; BATCH],
}

impl Batch {
    fn new() -> Self {
        // SAFETY: an all-zero sockaddr_storage is a valid (unspecified) address.
        let empty: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        Batch { buffers: vec![[0; 65_536]; BATCH], lengths: [0; BATCH], sources: [empty; BATCH] }
    }

    /// Blocks for at least one datagram, takes up to `BATCH`.
    fn receive(&mut self, socket: &UdpSocket) -> Result<usize> {
        let mut iovecs: Vec<libc::iovec> =
            self.buffers.iter_mut().map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() }).collect();
        // SAFETY: zeroed mmsghdr values are valid; each is pointed below at one
        // iovec and one address slot that outlive the call.
        let mut headers: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, h) in headers.iter_mut().enumerate() {
            h.msg_hdr.msg_iov = &mut iovecs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_name = (&mut self.sources[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        }
        // SAFETY: `headers` describes BATCH valid buffers (see above).
        let n = unsafe {
            libc::recvmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), BATCH as libc::c_uint, libc::MSG_WAITFORONE, std::ptr::null_mut())
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            // A connected socket reports the target's ICMP "port unreachable"
            // (a test ended) on its next call: not the relay's end.
            if e.kind() == std::io::ErrorKind::ConnectionRefused {
                return Ok(0);
            }
            return Err(e.into());
        }
        let n = n as usize;
        for (length, h) in self.lengths.iter_mut().zip(&headers).take(n) {
            *length = h.msg_len as usize;
        }
        Ok(n)
    }

    fn datagram(&self, i: usize) -> &[u8] {
        &self.buffers[i][..self.lengths[i]]
    }

    fn source(&self, i: usize) -> Option<SocketAddr> {
        let s = &self.sources[i];
        match s.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the kernel wrote an IPv4 address here.
                let a: &libc::sockaddr_in = unsafe { &*(s as *const libc::sockaddr_storage).cast() };
                Some(SocketAddr::from((u32::from_be(a.sin_addr.s_addr).to_be_bytes(), u16::from_be(a.sin_port))))
            }
            _ => None,
        }
    }

    /// Sends the first `n` datagrams on the connected `socket`, all of them.
    fn send(&mut self, socket: &UdpSocket, n: usize) -> Result<()> {
        let mut iovecs: Vec<libc::iovec> =
            (0..n).map(|i| libc::iovec { iov_base: self.buffers[i].as_mut_ptr().cast(), iov_len: self.lengths[i] }).collect();
        // SAFETY: as in `receive`; no addresses, the socket is connected.
        let mut headers: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (i, h) in headers.iter_mut().enumerate() {
            h.msg_hdr.msg_iov = &mut iovecs[i];
            h.msg_hdr.msg_iovlen = 1;
        }
        let mut sent = 0;
        while sent < n {
            // SAFETY: `headers[sent..]` describe valid buffers.
            let k = unsafe { libc::sendmmsg(socket.as_raw_fd(), headers[sent..].as_mut_ptr(), (n - sent) as libc::c_uint, 0) };
            if k < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::ConnectionRefused {
                    return Ok(()); // the target is gone for now: the batch is lost, as on a network
                }
                return Err(e.into());
            }
            sent += k as usize;
        }
        Ok(())
    }
}
