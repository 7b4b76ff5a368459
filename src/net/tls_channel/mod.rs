//! A data channel's TLS, on either end: rustls does the handshake (through its
//! unbuffered API), then this module moves the records itself (issue 24 §3).
//!
//! Past the handshake rustls hands over the traffic secrets
//! (`dangerous_into_kernel_connection`, the API meant for kTLS) and keeps only
//! what needs its state: new traffic secrets on a key update, and the session
//! tickets a server sends (the client's next handshakes resume with them). The
//! records are sealed and opened here with ring, the same AEAD rustls would use:
//!
//! - sending, each piece of plaintext is copied once, into the buffer that goes
//!   to the socket, and sealed where it lies: rustls's unbuffered `encrypt`
//!   copies it twice (into a new `Vec` per record, then into the caller's
//!   buffer), its buffered stream once plus a `Vec` per record;
//! - receiving, records are read into a buffer this stream owns and opened where
//!   they lie, and the reader copies the plaintext out of it: rustls's unbuffered
//!   API opens them in place too, but then copies each record's plaintext into a
//!   new `Vec` (0.23) before the reader's copy.
//!
//! No allocation per record either way; the TLS 1.3 record layer (`records`, RFC 8446 §5)
//! is small: a 5-byte header, the plaintext followed by its content type,
//! the AEAD tag, the nonce the IV XOR the record's sequence number.
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
//! and the client takes an answer without ALPN as it takes one with it: nothing
//! on the wire depends on which stack either end runs.
//!
//! One handshake for both roles ([`Role`]): it differs only in who speaks first.
//!
//! Semantics are the buffered stream's: `read` returns 0 only after the peer's
//! `close_notify`, a TCP EOF without one is `UnexpectedEof`, a bad record is
//! `InvalidData` carrying the `rustls::Error`, written bytes are on their way
//! once flushed, and `shutdown` sends `close_notify` and then the TCP FIN.
//! A channel that fails sends no alert, it just closes (as before, when rustls's
//! unbuffered state machine could not run again after an error); the peer
//! handles that as any failed channel. Buffers exist only while data moves,
//! as the read-ahead's do.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BytesMut};
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::ServerName;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{InvalidMessage, PeerMisbehaved};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::net::metered::MeteredStream;

mod records;

use records::{whole_record, Kernel, Protection, Records, ALERT, APPLICATION_DATA, HANDSHAKE, HEADER, MAX_CIPHERTEXT};

/// Largest TLS record on the wire.
const MAX_RECORD: usize = HEADER + MAX_CIPHERTEXT;
/// Most received bytes one `recv` takes: eight full records, two chunks (only
/// while data moves; an idle channel holds no input buffer).
const READ_SIZE: usize = 128 * 1024;
/// Most plaintext one `write` encrypts: a 64 KiB chunk, four records, one `writev`.
const MAX_WRITE: usize = 64 * 1024;
/// Post-handshake messages this end may receive (RFC 8446 §4.6).
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// Largest post-handshake message taken (a session ticket is a few hundred bytes).
const MAX_HANDSHAKE_MESSAGE: usize = 64 * 1024;
/// The close_notify alert (warning level).
const CLOSE_NOTIFY: [u8; 2] = [1, 0];
const USER_CANCELED: u8 = 90;

/// The ALPN protocol a client offers on its data channels, and only there: it
/// tells the server, before the handshake, that this connection needs no
/// exporter and may be served by [`accept`].
pub const DATA_ALPN: &[u8] = b"tunneld-data";

/// Most bytes a ClientHello may take before the server gives up on it (rustls
/// refuses a larger handshake message itself; this bounds the buffer meanwhile).
const MAX_CLIENT_HELLO: usize = 64 * 1024;

/// Which end of the TLS session this channel is, while rustls does the
/// handshake (rustls types each side's state machine on its own).
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

/// A TLS 1.3 data channel, either end (see the module doc).
pub struct TlsDataChannel {
    io: MeteredStream,
    records: Records,
    /// Received TLS bytes: opened application data (`opened`) at the front,
    /// then records not opened yet (a partial one at most, between reads).
    input: BytesMut,
    /// The application data of the record at the front of `input`, opened in place.
    opened: Option<Opened>,
    /// TLS bytes to send.
    output: Outgoing,
    /// Plaintext rustls decrypted during the handshake (application data right
    /// behind the peer's last handshake flight), handed out first.
    plain: BytesMut,
    /// A post-handshake message whose records have not all arrived.
    handshake_message: Vec<u8>,
    peer_closed: bool,
    close_sent: bool,
    /// The error that ended the session: every later read and write returns it.
    failed: Option<rustls::Error>,
}

/// Where the opened record's plaintext lies in `input`, and where the record ends.
struct Opened {
    start: usize,
    end: usize,
    record_end: usize,
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
    // The handover after the handshake needs secret extraction (the daemon's
    // own configuration has it on; one made elsewhere gets a copy with it).
    let mut config = config;
    if !config.enable_secret_extraction {
        Arc::make_mut(&mut config).enable_secret_extraction = true;
    }
    let conn = match UnbufferedClientConnection::new_with_alpn(config, name, vec![DATA_ALPN.to_vec()]) {
        Ok(conn) => conn,
        Err(e) => return Err((tls_error(e), io)),
    };
    let mut handshake = Handshake::new(Role::Client(conn), io, BytesMut::new());
    match handshake.run().await {
        Ok(()) => handshake.into_channel(),
        Err(e) => Err((e, handshake.io)),
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
/// [`DATA_ALPN`], so the client sees it taken, and have secret extraction on
/// (else a copy with it on is made per connection).
pub async fn accept(config: Arc<rustls::ServerConfig>, io: MeteredStream, hello: BytesMut) -> io::Result<TlsDataChannel> {
    let mut config = config;
    if !config.enable_secret_extraction {
        Arc::make_mut(&mut config).enable_secret_extraction = true;
    }
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut handshake = Handshake::new(Role::Server(conn), io, hello);
    handshake.run().await?;
    handshake.into_channel().map_err(|(e, _)| e)
}

/// A data channel while rustls's unbuffered state machine does its handshake.
struct Handshake {
    conn: Role,
    io: MeteredStream,
    input: BytesMut,
    output: Outgoing,
    plain: BytesMut,
}

/// What one turn of the handshake's state machine calls for.
enum Step {
    /// Progress was made (a record processed or encoded): turn again.
    Again,
    /// TLS bytes are waiting in the output.
    Transmit,
    /// Nothing more without more input.
    NeedInput,
    /// rustls would take application data to send: the handshake is done
    /// unless it is still waiting for the client's Finished.
    Traffic,
    /// The peer sent close_notify.
    PeerClosed,
}

impl Handshake {
    fn new(conn: Role, io: MeteredStream, input: BytesMut) -> Handshake {
        Handshake { conn, io, input, output: Outgoing::default(), plain: BytesMut::new() }
    }

    async fn run(&mut self) -> io::Result<()> {
        loop {
            let Handshake { conn, input, output, plain, .. } = self;
            let (discard, step) = match conn {
                Role::Client(c) => turn(c.process_tls_records(&mut input[..]), output, plain),
                Role::Server(s) => turn(s.process_tls_records(&mut input[..]), output, plain),
            };
            input.advance(discard);
            match step? {
                Step::Again => {}
                Step::Transmit => poll_fn(|cx| poll_transmit(&mut self.io, &mut self.output, cx)).await?,
                // A server may send before the client's Finished: that is not the end.
                Step::Traffic if !self.conn.is_handshaking() => return Ok(()),
                Step::NeedInput | Step::Traffic => {
                    if poll_fn(|cx| poll_fill(&mut self.io, &mut self.input, cx)).await? == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof"));
                    }
                }
                Step::PeerClosed => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "tls handshake eof")),
            }
        }
    }

    /// The channel, with rustls's secrets taken over. rustls has processed
    /// every whole record in `input` (it returns `WriteTraffic` only then) and
    /// sent everything it queued, so the rest of `input` is the records this
    /// end opens from here on. On failure the socket comes back, as from
    /// [`connect`], whose result this is.
    #[allow(clippy::result_large_err)]
    fn into_channel(self) -> Result<TlsDataChannel, (io::Error, MeteredStream)> {
        let Handshake { conn, io, input, output, plain } = self;
        let records = match conn {
            Role::Client(c) => c.dangerous_into_kernel_connection().and_then(|(s, k)| Records::new(s, Kernel::Client(k))),
            Role::Server(s) => s.dangerous_into_kernel_connection().and_then(|(s, k)| Records::new(s, Kernel::Server(k))),
        };
        match records {
            Ok(records) => Ok(TlsDataChannel {
                io,
                records,
                input,
                opened: None,
                output,
                plain,
                handshake_message: Vec::new(),
                peer_closed: false,
                close_sent: false,
                failed: None,
            }),
            Err(e) => Err((tls_error(e), io)),
        }
    }
}

/// What one `process_tls_records` found: how much input it consumed, and the step.
fn turn<D>(status: UnbufferedStatus<'_, '_, D>, output: &mut Outgoing, plain: &mut BytesMut) -> (usize, io::Result<Step>) {
    let UnbufferedStatus { discard, state } = status;
    let step = match state {
        Err(e) => Err(tls_error(e)),
        Ok(state) => handle(state, output, plain),
    };
    (discard, step)
}

fn handle<D>(state: ConnectionState<'_, '_, D>, output: &mut Outgoing, plain: &mut BytesMut) -> io::Result<Step> {
    match state {
        ConnectionState::ReadTraffic(mut records) => {
            while let Some(record) = records.next_record() {
                plain.extend_from_slice(record.map_err(tls_error)?.payload);
            }
            Ok(Step::Again)
        }
        ConnectionState::EncodeTlsData(mut encode) => {
            let needed = match encode.encode(&mut []) {
                Err(EncodeError::InsufficientSize(size)) => size.required_size,
                Ok(_) => return Ok(Step::Again),
                Err(e) => return Err(io::Error::other(e)),
            };
            let start = output.buf.len();
            output.buf.resize(start + needed, 0);
            let n = encode.encode(&mut output.buf[start..]).map_err(io::Error::other)?;
            output.buf.truncate(start + n);
            Ok(Step::Again)
        }
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            Ok(Step::Transmit)
        }
        ConnectionState::BlockedHandshake => Ok(Step::NeedInput),
        ConnectionState::WriteTraffic(_) => Ok(Step::Traffic),
        ConnectionState::PeerClosed | ConnectionState::Closed => Ok(Step::PeerClosed),
        other => Err(io::Error::other(format!("unexpected TLS state {other:?}"))),
    }
}

/// Writes out the pending TLS bytes.
fn poll_transmit(io: &mut MeteredStream, output: &mut Outgoing, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
    while !output.is_drained() {
        let pending = [io::IoSlice::new(output.unsent())];
        let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &pending))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        output.sent += n;
    }
    // Drained: the next records start at the front, over the same memory.
    output.buf.clear();
    output.sent = 0;
    Poll::Ready(Ok(()))
}

/// Reads more TLS bytes into `input`: how many, 0 at EOF. A drained buffer is
/// released while nothing arrives.
fn poll_fill(io: &mut MeteredStream, input: &mut BytesMut, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
    if input.capacity() == 0 {
        input.reserve(READ_SIZE + MAX_RECORD);
    } else if input.capacity() - input.len() < MAX_RECORD {
        // Moves what is left (a partial record at most) to the front of the
        // same allocation: it was sized so that this always fits.
        input.reserve(READ_SIZE);
    }
    match tokio_util::io::poll_read_buf(Pin::new(io), cx, input) {
        Poll::Pending => {
            if input.is_empty() {
                *input = BytesMut::new();
            }
            Poll::Pending
        }
        ready => ready,
    }
}

/// TLS bytes on their way out: `buf[sent..]` is not written yet. The memory is
/// kept from write to write within a burst, and given back at each flush.
#[derive(Default)]
struct Outgoing {
    buf: Vec<u8>,
    sent: usize,
}

impl Outgoing {
    fn is_drained(&self) -> bool {
        self.sent == self.buf.len()
    }

    fn unsent(&self) -> &[u8] {
        &self.buf[self.sent..]
    }
}

/// What opening the next record did.
enum Opening {
    /// A record was taken (its data, if any, is in `opened`).
    Took,
    /// No whole record: more input is needed.
    NeedInput,
}

impl TlsDataChannel {
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

    /// Opens the record at the front of `input`, if it is whole, and deals with
    /// what it carries: application data stays in place for the reader, a
    /// post-handshake message or an alert is handled and its record dropped.
    fn open_next(&mut self) -> Result<Opening, rustls::Error> {
        let Some(len) = whole_record(&self.input)? else {
            return Ok(Opening::NeedInput);
        };
        let (content_type, end) = self.records.rx.open(&mut self.input[..len])?;
        let content = HEADER..HEADER + end;
        match content_type {
            APPLICATION_DATA if !self.handshake_message.is_empty() => {
                Err(rustls::Error::PeerMisbehaved(PeerMisbehaved::KeyEpochWithPendingFragment))
            }
            APPLICATION_DATA => {
                if content.is_empty() {
                    self.input.advance(len);
                } else {
                    self.opened = Some(Opened { start: content.start, end: content.end, record_end: len });
                }
                Ok(Opening::Took)
            }
            HANDSHAKE => {
                self.handshake_message.extend_from_slice(&self.input[content]);
                self.input.advance(len);
                self.handle_handshake_messages()?;
                Ok(Opening::Took)
            }
            ALERT => {
                let alert = &self.input[content];
                match alert {
                    [_, 0] => self.peer_closed = true,
                    [_, USER_CANCELED] => {}
                    [_, description] => return Err(rustls::Error::AlertReceived((*description).into())),
                    _ => return Err(rustls::Error::InvalidMessage(InvalidMessage::MessageTooShort)),
                }
                self.input.advance(len);
                Ok(Opening::Took)
            }
            _ => Err(rustls::Error::InvalidMessage(InvalidMessage::InvalidContentType)),
        }
    }

    /// The whole post-handshake messages received: a server's session tickets
    /// (to rustls, for the client's next handshakes) and key updates.
    fn handle_handshake_messages(&mut self) -> Result<(), rustls::Error> {
        let messages = std::mem::take(&mut self.handshake_message);
        let mut rest = &messages[..];
        while let [kind, a, b, c, body @ ..] = rest {
            let len = u32::from_be_bytes([0, *a, *b, *c]) as usize;
            if len > MAX_HANDSHAKE_MESSAGE {
                return Err(rustls::Error::InvalidMessage(InvalidMessage::HandshakePayloadTooLarge));
            }
            let Some(payload) = body.get(..len) else { break };
            let after = &body[len..];
            match *kind {
                NEW_SESSION_TICKET => match &mut self.records.kernel {
                    Kernel::Client(k) => k.handle_new_session_ticket(payload)?,
                    Kernel::Server(_) => {
                        return Err(rustls::Error::InvalidMessage(InvalidMessage::UnexpectedMessage("NewSessionTicket from a client")))
                    }
                },
                KEY_UPDATE => {
                    // The new keys start with the next record: nothing of
                    // this one may follow (RFC 8446 §5.1).
                    if !after.is_empty() {
                        return Err(rustls::Error::PeerMisbehaved(PeerMisbehaved::KeyEpochWithPendingFragment));
                    }
                    let requested = match payload {
                        [0] => false,
                        [1] => true,
                        _ => return Err(rustls::Error::InvalidMessage(InvalidMessage::InvalidKeyUpdate)),
                    };
                    self.records.rx = Protection::new(self.records.kernel.update_rx_secret()?)?;
                    if requested && !self.close_sent {
                        self.records.update_tx(&mut self.output.buf)?;
                    }
                }
                _ => {
                    return Err(rustls::Error::InvalidMessage(InvalidMessage::UnexpectedMessage("a handshake message after the handshake")))
                }
            }
            rest = after;
        }
        self.handshake_message = rest.to_vec();
        Ok(())
    }

    /// Copies opened plaintext into `buf`, dropping each record once it is
    /// read out.
    fn take_opened(&mut self, buf: &mut ReadBuf<'_>) {
        if let Some(opened) = &mut self.opened {
            let n = (opened.end - opened.start).min(buf.remaining());
            buf.put_slice(&self.input[opened.start..opened.start + n]);
            opened.start += n;
            if opened.start == opened.end {
                self.input.advance(opened.record_end);
                self.opened = None;
            }
        }
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
        let start = buf.filled().len();
        loop {
            this.take_opened(buf);
            if this.opened.is_some() || buf.remaining() == 0 || this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            let copied = buf.filled().len() > start;
            if let Some(e) = &this.failed {
                // What came before the bad record goes out first.
                return Poll::Ready(if copied { Ok(()) } else { Err(tls_error(e.clone())) });
            }
            let queued = this.output.buf.len();
            match this.open_next() {
                Ok(Opening::Took) => {
                    // A key update's answer: on its way as the socket takes it.
                    if this.output.buf.len() > queued {
                        if let Poll::Ready(Err(e)) = poll_transmit(&mut this.io, &mut this.output, cx) {
                            return Poll::Ready(Err(e));
                        }
                    }
                }
                Err(e) => this.failed = Some(e),
                Ok(Opening::NeedInput) if copied => return Poll::Ready(Ok(())),
                Ok(Opening::NeedInput) => match ready!(poll_fill(&mut this.io, &mut this.input, cx)) {
                    Err(e) => return Poll::Ready(Err(e)),
                    Ok(0) => {
                        let why = if this.input.is_empty() {
                            "peer closed connection without sending TLS close_notify"
                        } else {
                            "peer closed connection in the middle of a TLS record"
                        };
                        return Poll::Ready(Err(io::Error::new(io::ErrorKind::UnexpectedEof, why)));
                    }
                    Ok(_) => {}
                },
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
        if let Some(e) = &this.failed {
            return Poll::Ready(Err(tls_error(e.clone())));
        }
        // What was sealed before goes first: at most one chunk is held.
        ready!(poll_transmit(&mut this.io, &mut this.output, cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        this.records.seal_data(&mut this.output.buf, data).map_err(tls_error)?;
        // On its way now if the socket takes it; the rest goes with the next
        // write or flush.
        if let Poll::Ready(Err(e)) = poll_transmit(&mut this.io, &mut this.output, cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(poll_transmit(&mut this.io, &mut this.output, cx))?;
        // A burst is over: its buffer goes until the next one, so an exchange
        // that went quiet after a large write holds no 64 KiB. Taking it again
        // costs one allocation per burst and no zeroing (records are appended).
        this.output = Outgoing::default();
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            ready!(poll_transmit(&mut this.io, &mut this.output, cx))?;
            this.records.tx.seal(&mut this.output.buf, ALERT, &CLOSE_NOTIFY).map_err(tls_error)?;
            this.close_sent = true;
        }
        ready!(poll_transmit(&mut this.io, &mut this.output, cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;

    /// Both ends of one data channel, as the daemons make them.
    async fn pair() -> (TlsDataChannel, TlsDataChannel) {
        let certified = rcgen::generate_simple_self_signed(vec!["tunneld".to_string()]).unwrap();
        let cert = rustls::pki_types::CertificateDer::from(certified.cert.der().to_vec());
        let pin = crate::net::tls::fingerprint(&cert);
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(certified.key_pair.serialize_der().into());
        let identity = crate::net::tls::Identity { chain: vec![cert], key, cert_path: "test".into() };
        let server = crate::net::tls::ServerTls::new(crate::net::tls::server_config(identity).unwrap()).data;
        let config = crate::config::ClientConfig { server: "127.0.0.1:1".into(), server_fingerprint: Some(pin), ..Default::default() };
        let (client, name) = crate::net::tls::client_config(&config).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dial = async {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (sent, received) = Metrics::new().tunnel_meters("default");
            match connect(Arc::new(client), name, MeteredStream::new(tcp, sent, received)).await {
                Ok(channel) => channel,
                Err((e, _)) => panic!("client handshake: {e}"),
            }
        };
        let serve = async {
            let (tcp, _) = listener.accept().await.unwrap();
            let (sent, received) = Metrics::new().tunnel_meters("default");
            let mut io = MeteredStream::new(tcp, sent, received);
            let (hello, _) = read_client_hello(&mut io).await.unwrap();
            accept(server, io, hello).await.unwrap()
        };
        tokio::join!(dial, serve)
    }

    /// Near its send keys' confidentiality limit an end moves to new keys and
    /// says so (KeyUpdate); the other end follows, and no byte is lost. The
    /// limit is lowered to 3 records here (AES-128-GCM's is 2^24): some 30
    /// updates each way.
    #[tokio::test]
    async fn each_end_moves_to_new_keys_before_their_limit() {
        let (mut client, mut server) = pair().await;
        carry_across_key_updates(&mut client, &mut server).await;
        carry_across_key_updates(&mut server, &mut client).await;
    }

    async fn carry_across_key_updates(from: &mut TlsDataChannel, to: &mut TlsDataChannel) {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        // Each key seals 3 records: 2 of data, then the KeyUpdate.
        from.records.tx_limit = 3;
        let sending = async {
            for piece in data.chunks(65_536) {
                from.write_all(piece).await.unwrap();
            }
            from.flush().await.unwrap();
        };
        let mut got = vec![0u8; data.len()];
        let (_, read) = tokio::join!(sending, to.read_exact(&mut got));
        read.expect("every byte");
        assert!(got == data, "altered across key updates");
    }
}
