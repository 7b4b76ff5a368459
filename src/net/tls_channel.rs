//! A data channel's TLS, on either end, through rustls's unbuffered API (issue
//! 24 §3): records are read into a buffer this stream owns, decrypted where they
//! lie, and encrypted straight into the buffer that goes to the socket.
//!
//! Against the buffered stream (`tokio_rustls`) it costs a third less CPU per GB
//! on the receiving side (`examples/tls_datapath.rs`): no 4 KiB `read_tls` steps,
//! no read-ahead copy into rustls's deframer, no plaintext queue to copy out of.
//!
//! Only data channels. rustls 0.23's unbuffered connections have no exporter
//! (`export_keying_material`), and a control connection's auth HMAC is bound to
//! one ([`crate::net::tls::binding`]); a data channel proves itself with its
//! session's token inside the TLS session and needs none. So the client offers
//! the ALPN protocol [`DATA_ALPN`] on data channels only ([`connect`]), and the
//! server reads each ClientHello first ([`read_client_hello`]): a connection
//! that offers it is served here ([`accept`]), any other (a control connection,
//! an older client's data channel) through the buffered stream, whose exporter
//! the auth needs. A server that lists no ALPN (an older one) ignores the offer,
//! and the client takes an answer without ALPN as it takes one with it: the
//! unbuffered API on the client does not depend on the server's.
//!
//! One state machine for both roles ([`Role`]): past the handshake the two
//! connections behave alike, and the handshake differs only in who speaks first.
//!
//! Semantics are the buffered stream's: `read` returns 0 only after the peer's
//! `close_notify`, a TCP EOF without one is `UnexpectedEof`, a bad record is
//! `InvalidData` carrying the `rustls::Error`, written bytes are on their way
//! once flushed, and `shutdown` sends `close_notify` and then the TCP FIN.
//! Buffers exist only while data moves, as the read-ahead's do.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, BytesMut};
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::net::metered::MeteredStream;

/// Largest TLS record on the wire: 16 KiB of plaintext, its content type, the
/// AEAD tag and padding allowance (RFC 8446 §5.2), and the 5-byte header.
const MAX_RECORD: usize = 5 + 16 * 1024 + 256;
/// Most received bytes one `recv` takes: eight full records, two chunks (only
/// while data moves; an idle channel holds no input buffer).
const READ_SIZE: usize = 128 * 1024;
/// Most plaintext one `write` encrypts: a 64 KiB chunk, four records, one `writev`.
const MAX_WRITE: usize = 64 * 1024;
/// Largest plaintext per record, and what each record adds to it (header,
/// content type, tag), to size the output before encrypting.
const MAX_FRAGMENT: usize = 16 * 1024;
const RECORD_OVERHEAD: usize = 5 + 1 + 16;

/// The ALPN protocol a client offers on its data channels, and only there: it
/// tells the server, before the handshake, that this connection needs no
/// exporter and may be served by [`accept`].
pub const DATA_ALPN: &[u8] = b"tunneld-data";

/// Most bytes a ClientHello may take before the server gives up on it (rustls
/// refuses a larger handshake message itself; this bounds the buffer meanwhile).
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Which end of the TLS session this channel is: the only place the two differ
/// (rustls types each side's state machine on its own).
enum Role {
    Client(UnbufferedClientConnection),
    Server(UnbufferedServerConnection),
}

impl Role {
    fn is_handshaking(&self) -> bool {
        match self {
            Role::Client(c) => c.is_handshaking(),
            Role::Server(s) => s.is_handshaking(),
        }
    }
}

/// A TLS 1.3 data channel, either end, driven through `rustls::unbuffered`
/// (see the module doc).
pub struct TlsDataChannel {
    conn: Role,
    io: MeteredStream,
    /// Received TLS bytes not processed yet (a partial record at most, between reads).
    input: BytesMut,
    /// TLS bytes to send.
    output: Outgoing,
    /// Plaintext decrypted but not yet handed out: what did not fit the reader's
    /// buffer, or what a write found while processing.
    plain: BytesMut,
    peer_closed: bool,
    close_sent: bool,
    /// The reader waiting for the socket, woken when a write decrypts its bytes.
    read_waker: Option<Waker>,
    /// The error that ended the session. rustls's unbuffered state machine must
    /// not run again after one: it would deframe the bad input again and queue a
    /// second fatal alert, which it asserts against (and its deframer's progress
    /// belongs to the input it failed on, so even an empty turn to take the
    /// first alert out panics). So no alert is sent: the peer sees the channel
    /// close, which a data channel's peer handles as any failed channel.
    failed: Option<rustls::Error>,
}

/// What the caller wants done once the connection may send application data.
enum Want<'a> {
    Nothing,
    Encrypt(&'a [u8]),
    CloseNotify,
}

/// What one turn of the state machine calls for.
enum Step {
    /// Progress was made (a record processed or encoded): turn again.
    Again,
    /// TLS bytes are waiting in the output.
    Transmit,
    /// Nothing more without more input.
    NeedInput,
    /// The wanted encryption (or close_notify) is in the output.
    Encrypted,
    /// The peer sent close_notify.
    PeerClosed,
}

/// A rustls error as tokio-rustls reports it, so callers downcast it alike
/// (`net::tls::explain_client_error`).
fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The TLS client handshake over `io`, then the data channel. On failure the
/// socket comes back (with what it kept, see `MeteredStream::keeping_first_bytes`)
/// for the caller to read a refusal from.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
    io: MeteredStream,
) -> Result<TlsDataChannel, (io::Error, MeteredStream)> {
    let conn = match UnbufferedClientConnection::new_with_alpn(config, name, vec![DATA_ALPN.to_vec()]) {
        Ok(conn) => conn,
        Err(e) => return Err((tls_error(e), io)),
    };
    let mut channel = TlsDataChannel::new(Role::Client(conn), io, BytesMut::new());
    match channel.handshake().await {
        Ok(()) => Ok(channel),
        Err(e) => Err((e, channel.io)),
    }
}

/// Reads a ClientHello off `io`: the bytes read (the hello, to be handed to the
/// TLS stack that serves the connection), and whether the client offers
/// [`DATA_ALPN`]. `rustls::server::Acceptor` parses it, so what is and is not a
/// valid hello is rustls's call; a bad one gets rustls's alert and an
/// `InvalidData` error, a connection closed before a whole hello `UnexpectedEof`.
pub async fn read_client_hello(io: &mut MeteredStream) -> io::Result<(BytesMut, bool)> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut hello = BytesMut::new();
    loop {
        if hello.len() >= MAX_CLIENT_HELLO {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS ClientHello larger than 64 KiB"));
        }
        let fed = hello.len();
        hello.reserve(4096);
        if io.read_buf(&mut hello).await? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed before a whole TLS ClientHello"));
        }
        let mut new = &hello[fed..];
        while !new.is_empty() {
            if acceptor.read_tls(&mut new)? == 0 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "TLS ClientHello not taken whole"));
            }
        }
        match acceptor.accept() {
            Ok(None) => {}
            Ok(Some(accepted)) => {
                let offers_data = accepted.client_hello().alpn().is_some_and(|mut offered| offered.any(|p| p == DATA_ALPN));
                return Ok((hello, offers_data));
            }
            Err((e, mut alert)) => {
                let mut wire = Vec::new();
                if alert.write_all(&mut wire).is_ok() && !wire.is_empty() {
                    let _ = io.write_all(&wire).await;
                }
                return Err(tls_error(e));
            }
        }
    }
}

/// The server's TLS handshake of a data channel whose ClientHello
/// ([`read_client_hello`]) is in `hello`, then the channel. `config` should list
/// [`DATA_ALPN`], so the client sees it taken.
pub async fn accept(config: Arc<rustls::ServerConfig>, io: MeteredStream, hello: BytesMut) -> io::Result<TlsDataChannel> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut channel = TlsDataChannel::new(Role::Server(conn), io, hello);
    channel.handshake().await?;
    Ok(channel)
}

impl TlsDataChannel {
    fn new(conn: Role, io: MeteredStream, input: BytesMut) -> TlsDataChannel {
        TlsDataChannel {
            conn,
            io,
            input,
            output: Outgoing::default(),
            plain: BytesMut::new(),
            peer_closed: false,
            close_sent: false,
            read_waker: None,
            failed: None,
        }
    }

    pub(crate) fn metered(&mut self) -> &mut MeteredStream {
        &mut self.io
    }

    /// Drops the buffers that hold nothing (a channel parked in the pool).
    pub(crate) fn release_buffers(&mut self) {
        if self.input.is_empty() {
            self.input = BytesMut::new();
        }
        if self.plain.is_empty() {
            self.plain = BytesMut::new();
        }
        if self.output.is_drained() {
            self.output = Outgoing::default();
        }
    }

    async fn handshake(&mut self) -> io::Result<()> {
        loop {
            match self.step(None, Want::Nothing) {
                Ok(Step::Again) => {}
                Ok(Step::Transmit) => poll_fn(|cx| self.poll_transmit(cx)).await?,
                Ok(Step::NeedInput | Step::Encrypted) => {
                    if !self.conn.is_handshaking() {
                        return Ok(());
                    }
                    if poll_fn(|cx| self.poll_fill(cx)).await? == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"));
                    }
                }
                Ok(Step::PeerClosed) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")),
                Err(e) => return Err(e),
            }
        }
    }

    /// One turn of rustls's state machine over the unprocessed input. Decrypted
    /// plaintext goes into `read` while it has room, the rest into `plain`.
    fn step(&mut self, read: Option<&mut ReadBuf<'_>>, want: Want<'_>) -> io::Result<Step> {
        if let Some(e) = &self.failed {
            return Err(tls_error(e.clone()));
        }
        let TlsDataChannel { conn, input, output, plain, failed, .. } = self;
        let (discard, step) = match conn {
            Role::Client(c) => turn(c.process_tls_records(&mut input[..]), output, plain, read, want, failed),
            Role::Server(s) => turn(s.process_tls_records(&mut input[..]), output, plain, read, want, failed),
        };
        input.advance(discard);
        step
    }

    /// Writes out the pending TLS bytes.
    fn poll_transmit(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while !self.output.is_drained() {
            let pending = [io::IoSlice::new(self.output.unsent())];
            let n = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.output.sent += n;
        }
        // Drained: the next records start at the front, over the same memory.
        self.output.filled = 0;
        self.output.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads more TLS bytes: how many, 0 at EOF. A drained buffer is released
    /// while nothing arrives.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.input.capacity() == 0 {
            self.input.reserve(READ_SIZE + MAX_RECORD);
        } else if self.input.capacity() - self.input.len() < MAX_RECORD {
            // Moves what is left (a partial record at most) to the front of the
            // same allocation: it was sized so that this always fits.
            self.input.reserve(READ_SIZE);
        }
        match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.input) {
            Poll::Pending => {
                if self.input.is_empty() {
                    self.input = BytesMut::new();
                }
                Poll::Pending
            }
            ready => ready,
        }
    }

    /// Encrypts `want` (data or close_notify) into the output, processing
    /// whatever the state machine needs first.
    fn poll_encrypt(&mut self, cx: &mut Context<'_>, want: Want<'_>) -> Poll<io::Result<()>> {
        let data = match want {
            Want::Encrypt(data) => Some(data),
            _ => None,
        };
        loop {
            let before = self.plain.len();
            let want = match data {
                Some(data) => Want::Encrypt(data),
                None => Want::CloseNotify,
            };
            let was_closed = self.peer_closed;
            let step = self.step(None, want)?;
            if matches!(step, Step::PeerClosed) {
                self.peer_closed = true;
            }
            if self.plain.len() > before || self.peer_closed != was_closed {
                // Records (or the end) for the reader, found on the way: it may
                // be waiting on the socket, which will not wake it for these.
                if let Some(waker) = self.read_waker.take() {
                    waker.wake();
                }
            }
            match step {
                Step::Encrypted => return Poll::Ready(Ok(())),
                Step::Again => {}
                Step::Transmit => ready!(self.poll_transmit(cx))?,
                Step::PeerClosed => {}
                Step::NeedInput => return Poll::Ready(Err(io::Error::other("TLS handshake not complete"))),
            }
        }
    }
}

/// TLS bytes on their way out: `buf[sent..filled]` is not written yet. The
/// memory is kept (and zeroed) once per burst, not per record.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    filled: usize,
    sent: usize,
}

impl Outgoing {
    fn is_drained(&self) -> bool {
        self.sent == self.filled
    }

    fn unsent(&self) -> &[u8] {
        &self.buf[self.sent..self.filled]
    }

    /// At least `n` writable bytes after what is filled.
    fn room(&mut self, n: usize) -> &mut [u8] {
        if self.buf.len() < self.filled + n {
            self.buf.resize(self.filled + n, 0);
        }
        &mut self.buf[self.filled..]
    }
}

/// What one `process_tls_records` found: how much input it consumed, and the step.
fn turn<D>(
    status: UnbufferedStatus<'_, '_, D>,
    output: &mut Outgoing,
    plain: &mut BytesMut,
    read: Option<&mut ReadBuf<'_>>,
    want: Want<'_>,
    failed: &mut Option<rustls::Error>,
) -> (usize, io::Result<Step>) {
    let UnbufferedStatus { discard, state } = status;
    let step = match state {
        Err(e) => {
            *failed = Some(e.clone());
            Err(tls_error(e))
        }
        Ok(state) => handle(state, output, plain, read, want),
    };
    (discard, step)
}

fn handle<D>(
    state: ConnectionState<'_, '_, D>,
    output: &mut Outgoing,
    plain: &mut BytesMut,
    mut read: Option<&mut ReadBuf<'_>>,
    want: Want<'_>,
) -> io::Result<Step> {
    match state {
        ConnectionState::ReadTraffic(mut records) => {
            while let Some(record) = records.next_record() {
                let mut payload = record.map_err(tls_error)?.payload;
                if let Some(buf) = read.as_deref_mut().filter(|_| plain.is_empty()) {
                    let n = payload.len().min(buf.remaining());
                    buf.put_slice(&payload[..n]);
                    payload = &payload[n..];
                }
                plain.extend_from_slice(payload);
            }
            Ok(Step::Again)
        }
        ConnectionState::EncodeTlsData(mut encode) => {
            let needed = match encode.encode(&mut []) {
                Err(EncodeError::InsufficientSize(size)) => size.required_size,
                Ok(_) => return Ok(Step::Again),
                Err(e) => return Err(io::Error::other(e)),
            };
            let n = encode.encode(output.room(needed)).map_err(io::Error::other)?;
            output.filled += n;
            Ok(Step::Again)
        }
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            Ok(Step::Transmit)
        }
        ConnectionState::BlockedHandshake => Ok(Step::NeedInput),
        ConnectionState::PeerClosed | ConnectionState::Closed => Ok(Step::PeerClosed),
        ConnectionState::WriteTraffic(mut traffic) => {
            let mut room = match want {
                Want::Nothing => return Ok(Step::NeedInput),
                Want::Encrypt(data) => data.len() + data.len().div_ceil(MAX_FRAGMENT).max(1) * RECORD_OVERHEAD,
                Want::CloseNotify => 2 + RECORD_OVERHEAD,
            };
            loop {
                let written = match want {
                    Want::Encrypt(data) => traffic.encrypt(data, output.room(room)),
                    _ => traffic.queue_close_notify(output.room(room)),
                };
                match written {
                    Ok(n) => {
                        output.filled += n;
                        return Ok(Step::Encrypted);
                    }
                    Err(EncryptError::InsufficientSize(size)) if size.required_size > room => room = size.required_size,
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
        }
        other => Err(io::Error::other(format!("unexpected TLS state {other:?}"))),
    }
}

impl AsyncRead for TlsDataChannel {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.plain.is_empty() {
            let n = this.plain.len().min(buf.remaining());
            buf.put_slice(&this.plain[..n]);
            this.plain.advance(n);
            return Poll::Ready(Ok(()));
        }
        if this.peer_closed {
            return Poll::Ready(Ok(()));
        }
        let start = buf.filled().len();
        loop {
            let step = match this.step(Some(buf), Want::Nothing) {
                Ok(step) => step,
                // What came before the bad record goes out first; the error
                // (kept in `failed`) comes with the next read.
                Err(_) if buf.filled().len() > start => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e)),
            };
            match step {
                Step::Again => {
                    if buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                // A key update's answer, or an alert: on its way as the socket takes it.
                Step::Transmit => {
                    if let Poll::Ready(Err(e)) = this.poll_transmit(cx) {
                        return Poll::Ready(Err(e));
                    }
                }
                Step::PeerClosed => {
                    this.peer_closed = true;
                    return Poll::Ready(Ok(()));
                }
                Step::NeedInput | Step::Encrypted => {
                    if buf.filled().len() > start {
                        return Poll::Ready(Ok(()));
                    }
                    match this.poll_fill(cx) {
                        Poll::Pending => {
                            this.read_waker = Some(cx.waker().clone());
                            return Poll::Pending;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(0)) => {
                            let why = if this.input.is_empty() {
                                "peer closed connection without sending TLS close_notify"
                            } else {
                                "peer closed connection in the middle of a TLS record"
                            };
                            return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, why)));
                        }
                        Poll::Ready(Ok(_)) => {}
                    }
                }
            }
        }
    }
}

impl AsyncWrite for TlsDataChannel {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.close_sent {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after TLS close_notify")));
        }
        // What was encrypted before goes first: at most one chunk is held.
        ready!(this.poll_transmit(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        ready!(this.poll_encrypt(cx, Want::Encrypt(data)))?;
        // On its way now if the socket takes it; the rest goes with the next
        // write or flush.
        if let Poll::Ready(Err(e)) = this.poll_transmit(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_transmit(cx))?;
        // A burst is over: its buffer goes until the next one.
        this.output = Outgoing::default();
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(this.poll_transmit(cx))?;
            ready!(this.poll_encrypt(cx, Want::CloseNotify))?;
            this.close_sent = true;
        }
        ready!(this.poll_transmit(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}
