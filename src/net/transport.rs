//! One tunnel connection (control or data channel), TLS or plain, counted on the
//! wire: the meter sits under TLS, so `tunneld_tunnel_bytes_total` includes
//! record overhead, frame headers and handshakes — what the network carried.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::net::metered::{MeteredStream, Wire};

/// Both variants boxed alike: the stream carries its read-ahead and its watch.
pub enum TunnelStream {
    /// A plain TCP tunnel (`tls = false` on both sides).
    Plain(Box<MeteredStream>),
    /// TLS 1.3, client or server side, through rustls's buffered stream.
    Tls(Box<tokio_rustls::TlsStream<MeteredStream>>),
    /// TLS 1.3, a data channel (either end): rustls's unbuffered handshake, then
    /// the channel's own record layer (see [`crate::net::tls_channel`]): no
    /// exporter, so never a control connection.
    TlsData(Box<crate::net::tls_channel::TlsDataChannel>),
}

/// The server's TLS handshake on a tunnel connection: a data channel (its
/// ClientHello offers [`crate::net::tls_channel::DATA_ALPN`]) through rustls's
/// unbuffered API, anything else through the buffered stream. The hello is read
/// once and handed to the stack that serves the connection.
pub(crate) async fn accept_tls(tls: &crate::net::tls::ServerTls, mut io: MeteredStream) -> io::Result<TunnelStream> {
    use crate::net::tls_channel;
    let (hello, offers_data) = tls_channel::read_client_hello(&mut io).await?;
    if offers_data {
        let channel = tls_channel::accept(tls.data.clone(), io, hello).await?;
        return Ok(TunnelStream::TlsData(Box::new(channel)));
    }
    io.restore_unread(hello);
    let stream = tls.buffered.accept(io.reading_ahead()).await?;
    Ok(TunnelStream::Tls(Box::new(stream.into())))
}

impl TunnelStream {
    /// Whether this connection can carry a control session: its auth HMAC is
    /// bound to the TLS exporter ([`TunnelStream::binding`]), which a channel
    /// through rustls's unbuffered API does not have.
    pub(crate) fn can_carry_control(&self) -> bool {
        !matches!(self, TunnelStream::TlsData(_))
    }

    fn metered(&mut self) -> &mut MeteredStream {
        match self {
            TunnelStream::Plain(s) => s,
            TunnelStream::Tls(s) => s.get_mut().0,
            TunnelStream::TlsData(s) => s.metered(),
        }
    }

    /// A second handle on the channel's socket (see [`MeteredStream::take_watch`]).
    pub(crate) fn take_watch(&mut self) -> Option<TcpStream> {
        self.metered().take_watch()
    }

    pub(crate) fn return_watch(&mut self, watch: TcpStream) {
        self.metered().return_watch(watch)
    }

    /// Closes the channel so that what was written last arrives (see
    /// [`MeteredStream::disarm`]): for a last word such as a refusal.
    pub(crate) fn close_gracefully(mut self) {
        self.metered().disarm();
    }

    /// Counts this connection, from its first byte, as `client`'s (see
    /// [`MeteredStream::attribute`]).
    pub(crate) fn attribute(&mut self, sent: crate::telemetry::Meter, received: crate::telemetry::Meter) {
        self.metered().attribute(sent, received)
    }

    /// A plain channel's socket and meters (see [`MeteredStream::wire`]);
    /// `None` under TLS, whose bytes only the TLS stream can move.
    pub(crate) fn wire(&mut self) -> Option<Wire<'_>> {
        match self {
            TunnelStream::Plain(s) => s.wire(),
            TunnelStream::Tls(_) | TunnelStream::TlsData(_) => None,
        }
    }

    /// Gives back what a [`Wire`] read ahead and left unread (see
    /// [`MeteredStream::restore_unread`]).
    pub(crate) fn restore_unread(&mut self, unread: bytes::BytesMut) {
        if let TunnelStream::Plain(s) = self {
            s.restore_unread(unread);
        }
    }

    /// Whether [`TunnelStream::wire`] would hand out the socket.
    pub(crate) fn has_wire(&self) -> bool {
        match self {
            TunnelStream::Plain(s) => s.has_wire(),
            TunnelStream::Tls(_) | TunnelStream::TlsData(_) => false,
        }
    }

    /// Frees what an idle channel does not need (see
    /// [`MeteredStream::release_read_ahead`]).
    pub(crate) fn release_read_ahead(&mut self) {
        if let TunnelStream::TlsData(s) = self {
            s.release_buffers();
        }
        self.metered().release_read_ahead()
    }

    /// What the auth HMAC is bound to: the TLS exporter value, or nothing on a
    /// plain (trusted-network) tunnel. A data channel through rustls's
    /// unbuffered API has none (it is not authenticated with a HMAC, and the
    /// server refuses a control hello on one, see
    /// [`TunnelStream::can_carry_control`]).
    pub fn binding(&self) -> Vec<u8> {
        match self {
            TunnelStream::Plain(_) | TunnelStream::TlsData(_) => Vec::new(),
            TunnelStream::Tls(s) => match s.as_ref() {
                tokio_rustls::TlsStream::Client(c) => crate::net::tls::binding(c.get_ref().1),
                tokio_rustls::TlsStream::Server(c) => crate::net::tls::binding(c.get_ref().1),
            },
        }
    }

    /// True when an idle channel has been closed or written to by the peer: a
    /// pooled channel must have nothing to read. Never waits.
    pub(crate) fn is_stale(&mut self) -> bool {
        use futures_util::FutureExt;
        use tokio::io::AsyncReadExt;
        let mut probe = [0u8; 1];
        // `read` that is not ready reads nothing, so polling it once loses no data.
        self.read(&mut probe).now_or_never().is_some()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            TunnelStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            TunnelStream::TlsData(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TunnelStream::Plain(s) => Pin::new(s).poll_write(cx, data),
            TunnelStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
            TunnelStream::TlsData(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TunnelStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            TunnelStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            TunnelStream::TlsData(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            TunnelStream::Plain(s) => s.is_write_vectored(),
            TunnelStream::Tls(s) => s.is_write_vectored(),
            TunnelStream::TlsData(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelStream::Plain(s) => Pin::new(s).poll_flush(cx),
            TunnelStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            TunnelStream::TlsData(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TunnelStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            TunnelStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            TunnelStream::TlsData(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
