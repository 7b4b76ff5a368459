//! A `TcpStream` wrapper that counts what crosses it into tunnel meters.
//!
//! Every tunnel connection runs over one (under TLS, when TLS is on), so the tunnel
//! meters see the wire: frame headers, TLS records and handshakes included.
//!
//! On the server a connection's client is known only once it has authenticated,
//! so a stream may start unattributed: it tallies what crossed it and hands the
//! tally to the client's meters when [`MeteredStream::attribute`] names them. A
//! connection that never authenticates is counted nowhere, so unknown peers
//! cannot create label sets.
//!
//! It also reads ahead: rustls asks for 4 KiB at a time, which on a bulk
//! transfer means four `recv` calls (and as many wake-ups) per 16 KiB record,
//! and a plain tunnel's frames and chunk headers are read in pieces of a few
//! bytes (a visitor's exchange took ten `recv` calls on each end). The
//! read-ahead takes up to [`READ_AHEAD`] per call instead (under TLS; a plain
//! stream, whose payload reads are large and go straight to the socket, reads
//! only its small reads ahead, [`SMALL_READ_AHEAD`]) and hands it out from
//! memory; its buffer exists only while data is arriving and is released as soon
//! as the socket has nothing more, so an idle connection holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

use crate::telemetry::Meter;

/// Largest read from the socket when reading ahead.
const READ_AHEAD: usize = 64 * 1024;
/// Largest read ahead of a plain stream: enough for a frame, or a chunk's
/// header and a small payload. A larger one would take the start of the next
/// large payload too, and copy it once more on its way out of the buffer.
pub(crate) const SMALL_READ_AHEAD: usize = 4 * 1024;

/// Where a stream's bytes go: a client's meters, or a tally until it is known.
enum Counting {
    Tally { sent: u64, received: u64 },
    Meters { sent: Meter, received: Meter },
}

/// A tunnel connection's TCP stream, counting what crosses it (see the module doc).
pub struct MeteredStream {
    inner: TcpStream,
    counting: Counting,
    /// `None`: reads go straight to the socket. `Some`: read-ahead, holding
    /// unread bytes (an empty buffer is dropped, so this is free while idle).
    ahead: Option<BytesMut>,
    /// How much to read from the socket at once for a read asking less (0: no read-ahead).
    read_ahead: usize,
    /// A second handle on the socket, made for the first exchange and kept for
    /// the stream's life (see `exchange::relay`), so a pooled channel does not
    /// pay a `dup`, two `epoll_ctl` and a `close` per visitor. Making it arms
    /// the socket for good (see [`MeteredStream::take_watch`]).
    watch: Option<TcpStream>,
    /// The first bytes received, kept while a handshake may fail (see
    /// [`MeteredStream::keeping_first_bytes`]); `None` otherwise.
    kept: Option<Vec<u8>>,
}

/// A [`MeteredStream`]'s socket with the meters of what crosses it: whoever
/// moves bytes on `socket` directly records them in `sent` and `received`, as
/// the stream would have. What the stream had read ahead and not handed out
/// yet (the start of a plain channel's first chunk, read with the `connect`
/// in front of it) comes first: [`Wire::try_read`] serves it before the socket.
pub(crate) struct Wire<'a> {
    pub(crate) socket: &'a TcpStream,
    pub(crate) sent: Meter,
    pub(crate) received: Meter,
    /// Read ahead by the stream, counted on the wire then, not handed out yet.
    unread: std::sync::Mutex<BytesMut>,
}

impl Wire<'_> {
    /// Whether bytes read ahead wait to be read before the socket's.
    pub(crate) fn has_unread(&self) -> bool {
        self.unread.lock().is_ok_and(|unread| unread.has_remaining())
    }

    /// Reads what was read ahead, else what the socket has now (counted on
    /// the wire); `WouldBlock` when neither has anything.
    pub(crate) fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(n) = self.read_unread(buf) {
            return Ok(n);
        }
        let asked = buf.len();
        let n = read_clearing(self.socket, asked, || io::Read::read(&mut &*socket2::SockRef::from(self.socket), buf))?;
        self.received.record(n as u64);
        Ok(n)
    }

    /// As [`Wire::try_read`], but a short read when nothing waits reads up to
    /// [`SMALL_READ_AHEAD`] from the socket and serves from that, as the stream
    /// reads ahead: a frame, a chunk's header and a short payload behind it
    /// come in one `recv`. Not for a bulk transfer's headers, whose payloads
    /// go through the kernel: what is read ahead is copied.
    pub(crate) fn try_read_ahead(&self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.len() >= SMALL_READ_AHEAD || self.has_unread() {
            return self.try_read(buf);
        }
        let n = {
            let Ok(mut unread) = self.unread.lock() else { return self.try_read(buf) };
            unread.clear();
            unread.reserve(SMALL_READ_AHEAD);
            read_clearing(self.socket, SMALL_READ_AHEAD, || self.socket.try_read_buf(&mut (&mut *unread).limit(SMALL_READ_AHEAD)))?
        };
        self.received.record(n as u64);
        Ok(self.read_unread(buf).unwrap_or(0))
    }

    /// As [`Wire::try_read`], but reading the socket directly, past the
    /// runtime's readiness (which may not have caught up with a reset yet).
    pub(crate) fn read_queued(&self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(n) = self.read_unread(buf) {
            return Ok(n);
        }
        let n = io::Read::read(&mut &*socket2::SockRef::from(self.socket), buf)?;
        self.received.record(n as u64);
        Ok(n)
    }

    /// What was read ahead and not read yet, for [`MeteredStream::restore_unread`].
    pub(crate) fn into_unread(self) -> BytesMut {
        self.unread.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn read_unread(&self, buf: &mut [u8]) -> Option<usize> {
        let mut unread = self.unread.lock().ok()?;
        if !unread.has_remaining() || buf.is_empty() {
            return None;
        }
        let n = unread.remaining().min(buf.len());
        buf[..n].copy_from_slice(&unread[..n]);
        unread.advance(n);
        Some(n)
    }
}

/// One read of `socket` by `read` (which asks for `asked` bytes), through the
/// runtime's readiness as the stream's `poll_read` goes through it: a
/// `WouldBlock` clears the readiness, and so does a short read — fewer bytes
/// than asked means the socket is drained for now. `TcpStream::try_read`
/// clears it only on `WouldBlock`, so after a short read the next read would
/// be one more `recv` that finds the socket empty (on a plain tunnel two per
/// visitor in the server). The readiness is cleared only if no new event
/// arrived since it was looked at (tokio's tick), so bytes that arrive
/// meanwhile are never missed.
fn read_clearing(socket: &TcpStream, asked: usize, read: impl FnOnce() -> io::Result<usize>) -> io::Result<usize> {
    let mut short = None;
    let result = socket.try_io(Interest::READABLE, || match read()? {
        n if n > 0 && n < asked => {
            // `try_io` clears the readiness on `WouldBlock`; the bytes read
            // are handed out below.
            short = Some(n);
            Err(io::ErrorKind::WouldBlock.into())
        }
        n => Ok(n),
    });
    match short {
        Some(n) => Ok(n),
        None => result,
    }
}

/// How many received bytes [`MeteredStream::keeping_first_bytes`] keeps.
const KEPT_BYTES: usize = 1024;

impl MeteredStream {
    /// A stream whose bytes count into `sent` and `received` from the first one.
    pub fn new(inner: TcpStream, sent: Meter, received: Meter) -> MeteredStream {
        MeteredStream { inner, counting: Counting::Meters { sent, received }, ahead: None, read_ahead: 0, watch: None, kept: None }
    }

    /// A stream whose client is not known yet; see [`MeteredStream::attribute`].
    pub(crate) fn unattributed(inner: TcpStream) -> MeteredStream {
        MeteredStream { inner, counting: Counting::Tally { sent: 0, received: 0 }, ahead: None, read_ahead: 0, watch: None, kept: None }
    }

    /// Counts everything from here into these meters, starting with what crossed
    /// the stream before.
    pub(crate) fn attribute(&mut self, sent: Meter, received: Meter) {
        if let Counting::Tally { sent: before_sent, received: before_received } = self.counting {
            if before_sent > 0 {
                sent.record(before_sent);
            }
            if before_received > 0 {
                received.record(before_received);
            }
        }
        self.counting = Counting::Meters { sent, received };
    }

    fn count_sent(&mut self, n: u64) {
        match &mut self.counting {
            Counting::Meters { sent, .. } => sent.record(n),
            Counting::Tally { sent, .. } => *sent += n,
        }
    }

    fn count_received(&mut self, n: u64) {
        match &mut self.counting {
            Counting::Meters { received, .. } => received.record(n),
            Counting::Tally { received, .. } => *received += n,
        }
    }

    /// Turns on read-ahead (for a stream that TLS will read in small pieces).
    pub(crate) fn reading_ahead(mut self) -> MeteredStream {
        self.read_ahead = READ_AHEAD;
        self
    }

    /// Turns on read-ahead for small reads only (for a plain tunnel stream,
    /// whose frames and chunk headers are read a few bytes at a time).
    pub(crate) fn reading_small_reads_ahead(mut self) -> MeteredStream {
        self.read_ahead = SMALL_READ_AHEAD;
        self
    }

    /// Keeps a copy of the first bytes received, until [`MeteredStream::take_kept`]:
    /// what a server sent after the TLS alert that refused a handshake (its
    /// reasons, see `tunnel::message::Challenge::Rejected`) is read by rustls
    /// and lost with the failed handshake otherwise.
    pub(crate) fn keeping_first_bytes(mut self) -> MeteredStream {
        self.kept = Some(Vec::new());
        self
    }

    /// The bytes kept so far; stops keeping.
    pub(crate) fn take_kept(&mut self) -> Vec<u8> {
        self.kept.take().unwrap_or_default()
    }

    /// Lends out the socket's second handle, made on first use; `None` when the
    /// descriptor cannot be duplicated (out of descriptors). Give it back with
    /// [`MeteredStream::return_watch`] to reuse it for the next exchange.
    ///
    /// The first use also arms the socket (`SO_LINGER` 0, see `relay::arm`),
    /// once for the channel's life rather than around each exchange (two
    /// `setsockopt` per visitor on each end): should this process die or drop
    /// the channel mid-exchange, the other end gets a reset, never an EOF that
    /// could pass for the end of the exchange. Between exchanges nothing is in
    /// flight on the channel, so a reset loses nothing there: the other end
    /// takes a reset idle channel for a closed one (`TunnelStream::is_stale`,
    /// the client's wait for a `connect`). Where this end sends a last word
    /// before it closes, [`MeteredStream::disarm`] lets it arrive first.
    pub(crate) fn take_watch(&mut self) -> Option<TcpStream> {
        self.watch.take().or_else(|| {
            crate::net::relay::arm(&self.inner);
            let duplicate = socket2::SockRef::from(&self.inner).try_clone().ok()?;
            TcpStream::from_std(std::net::TcpStream::from(duplicate)).ok()
        })
    }

    /// Undoes the arming of [`MeteredStream::take_watch`] (if it happened), so
    /// that closing this stream delivers what was written last.
    pub(crate) fn disarm(&mut self) {
        if self.watch.is_some() {
            crate::net::relay::disarm(&self.inner);
        }
    }

    pub(crate) fn return_watch(&mut self, watch: TcpStream) {
        self.watch = Some(watch);
    }

    /// Whether [`MeteredStream::wire`] can hand out the socket: not while
    /// first bytes are kept, nor while its client is not known yet — then only
    /// the stream itself counts right.
    pub(crate) fn has_wire(&self) -> bool {
        matches!(self.counting, Counting::Meters { .. }) && self.kept.is_none()
    }

    /// The socket and its meters, for moving bytes on it without this
    /// stream (a plain data channel's chunks spliced in the kernel, see
    /// `tunnel::exchange`), with what the stream read ahead and did not hand
    /// out yet; `None` where [`MeteredStream::has_wire`] says so.
    pub(crate) fn wire(&mut self) -> Option<Wire<'_>> {
        if !self.has_wire() {
            return None;
        }
        let Counting::Meters { sent, received } = &self.counting else { return None };
        let (sent, received) = (sent.clone(), received.clone());
        let unread = self.ahead.take().unwrap_or_default();
        Some(Wire { socket: &self.inner, sent, received, unread: std::sync::Mutex::new(unread) })
    }

    /// Puts back what a [`Wire`] read ahead and left unread (bytes past the
    /// end of a spliced exchange), so the stream's next read returns them.
    pub(crate) fn restore_unread(&mut self, unread: BytesMut) {
        if unread.has_remaining() {
            self.ahead = Some(unread);
        }
    }

    /// Drops the read-ahead buffer when nothing unread is in it. A reader that
    /// stops polling after a read that returned data (a data channel parked in
    /// the server's pool after reading its hello or an exchange's last frame)
    /// never sees the `Pending` that releases it, and would keep up to
    /// [`READ_AHEAD`] for as long as it waits.
    pub(crate) fn release_read_ahead(&mut self) {
        if self.ahead.as_ref().is_some_and(|a| !a.has_remaining()) {
            self.ahead = None;
        }
    }
}

impl AsyncRead for MeteredStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = self.as_mut().poll_read_counted(cx, buf);
        if let Some(kept) = self.kept.as_mut() {
            let new = &buf.filled()[before..];
            let room = KEPT_BYTES.saturating_sub(kept.len());
            kept.extend_from_slice(&new[..new.len().min(room)]);
        }
        poll
    }
}

impl MeteredStream {
    fn poll_read_counted(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Some(ahead) = this.ahead.as_mut().filter(|a| a.has_remaining()) {
            serve(ahead, buf);
            return Poll::Ready(Ok(()));
        }
        if buf.remaining() >= this.read_ahead {
            let before = buf.filled().len();
            let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
            let n = buf.filled().len() - before;
            if n > 0 {
                this.count_received(n as u64);
            }
            return poll;
        }
        let size = this.read_ahead;
        let ahead = this.ahead.get_or_insert_with(|| BytesMut::with_capacity(size));
        // Drained: reuse the whole allocation from its start.
        ahead.clear();
        ahead.reserve(size);
        match tokio_util::io::poll_read_buf(Pin::new(&mut this.inner), cx, ahead) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    serve(ahead, buf);
                    this.count_received(n as u64);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                // Nothing is arriving: the buffer goes until data moves again.
                this.ahead = None;
                Poll::Pending
            }
        }
    }
}

fn serve(ahead: &mut BytesMut, buf: &mut ReadBuf<'_>) {
    let n = ahead.remaining().min(buf.remaining());
    buf.put_slice(&ahead[..n]);
    ahead.advance(n);
}

impl AsyncWrite for MeteredStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, data);
        if let Poll::Ready(Ok(n)) = &poll {
            let n = *n as u64;
            self.count_sent(n);
        }
        poll
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &poll {
            let n = *n as u64;
            self.count_sent(n);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A spliced exchange takes the stream's unread bytes with its [`Wire`];
    /// what it leaves unread (the next exchange's opening, read ahead with the
    /// last header) must be what the stream reads next, none lost.
    #[tokio::test]
    async fn bytes_a_wire_read_ahead_and_left_go_back_to_the_stream() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let meter = || Meter::tunnel(prometheus::IntCounter::new("t", "t").unwrap(), prometheus::Gauge::new("a", "a").unwrap());
        let mut stream = MeteredStream::new(dialed.unwrap(), meter(), meter()).reading_small_reads_ahead();
        let mut peer = accepted.unwrap().0;

        peer.write_all(b"endnext exchange").await.unwrap();
        let mut first = [0u8; 1];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"e");
        let wire = stream.wire().expect("a plain, attributed stream has a wire");
        let mut rest_of_end = [0u8; 2];
        assert_eq!(wire.try_read_ahead(&mut rest_of_end).unwrap(), 2, "served from what the stream read ahead");
        assert_eq!(&rest_of_end, b"nd");
        let left = wire.into_unread();
        stream.restore_unread(left);
        let mut next = [0u8; 13];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read_exact(&mut next)).await;
        read.expect("the bytes given back, not a wait on the socket").unwrap();
        assert_eq!(&next, b"next exchange");
    }

    #[tokio::test]
    async fn releasing_the_read_ahead_keeps_unread_bytes_and_frees_a_drained_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (dialed, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let mut stream = MeteredStream::unattributed(dialed.unwrap()).reading_ahead();
        let mut peer = accepted.unwrap().0;

        peer.write_all(b"hello world").await.unwrap();
        let mut first = [0u8; 5];
        stream.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"hello");
        // Bytes read ahead but not yet handed out must survive a release.
        stream.release_read_ahead();
        let mut rest = [0u8; 6];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" world");
        // Drained, the buffer is still held (nothing polled to Pending) until released.
        assert!(stream.ahead.is_some());
        stream.release_read_ahead();
        assert!(stream.ahead.is_none());
    }
}
