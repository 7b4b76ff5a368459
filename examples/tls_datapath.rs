//! Prototype for issue 24 §3: what rustls's buffered stream (tokio-rustls, the
//! tunnel's data path today) costs per GB against rustls's unbuffered API.
//!
//! One process, two threads (a sender and a receiver, each on its own
//! current-thread runtime) joined by a loopback TCP connection. The sender writes
//! 64 KiB chunks as the tunnel's exchange does; the receiver reads them into a
//! 64 KiB buffer and drops them. Each thread reports its own CPU time
//! (`/proc/thread-self/schedstat`), so the figures are the TLS path's cost on each side, not
//! the machine's.
//!
//! Modes:
//! - `plain`: TCP only, the floor (kernel copies, no TLS).
//! - `tokio-rustls`: today's path: `tokio_rustls` over a 64 KiB read-ahead.
//! - `tokio-rustls-bufread`: the same, the receiver taking plaintext through
//!   `AsyncBufRead` (no copy into its own buffer).
//! - `unbuffered`: `rustls::unbuffered`; the sender encrypts into a buffer it
//!   owns, the receiver decrypts in the buffer it read into and copies each
//!   record's plaintext into the caller's buffer (what an `AsyncRead` must do).
//! - `unbuffered-ref`: the same, but the receiver takes each record's plaintext
//!   by reference (what a chunk-forwarding data path could do).
//!
//! ```sh
//! cargo run --release --example tls_datapath -- --gib 2 --mode all
//! ```

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::UnbufferedClientConnection;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const CHUNK: usize = 64 * 1024;
/// A full TLS 1.3 record on the wire: 16 KiB of payload, type byte, tag, header.
const MAX_RECORD: usize = 16 * 1024 + 256 + 5;

#[derive(Parser)]
struct Args {
    /// GiB to push through each mode.
    #[arg(long, default_value_t = 1.0)]
    gib: f64,
    /// plain, tokio-rustls, unbuffered, unbuffered-ref or all.
    #[arg(long, default_value = "all")]
    mode: String,
    /// Rounds per mode (alternating order); each is reported.
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Read-ahead under tokio-rustls on both sides, in bytes (the tunnel's is 64 KiB).
    #[arg(long, default_value_t = CHUNK)]
    read_ahead: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let modes: Vec<&str> = match args.mode.as_str() {
        "all" => vec!["plain", "tokio-rustls", "tokio-rustls-bufread", "unbuffered", "unbuffered-ref"],
        some => some.split(',').collect(),
    };
    let bytes = (args.gib * (1u64 << 30) as f64) as u64;
    let (server, client) = configs()?;
    println!("{:<15} {:>9} {:>10} {:>10} {:>10}", "mode", "Gbit/s", "send s/GB", "recv s/GB", "sum s/GB");
    for round in 0..args.rounds {
        let order: Vec<&str> = if round % 2 == 0 { modes.clone() } else { modes.iter().rev().copied().collect() };
        for mode in order {
            let run = run(mode, bytes, args.read_ahead, server.clone(), client.clone())?;
            let gb = bytes as f64 / 1e9;
            println!(
                "{:<15} {:>9.2} {:>10.3} {:>10.3} {:>10.3}",
                mode,
                bytes as f64 * 8.0 / run.wall.as_secs_f64() / 1e9,
                run.send_cpu / gb,
                run.recv_cpu / gb,
                (run.send_cpu + run.recv_cpu) / gb
            );
        }
    }
    Ok(())
}

struct Run {
    wall: Duration,
    send_cpu: f64,
    recv_cpu: f64,
}

/// Seconds this thread has run on a CPU (`/proc/thread-self/schedstat`, as `bench/ab.py` reads it).
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").unwrap_or_default();
    stat.split_whitespace().next().and_then(|ns| ns.parse::<f64>().ok()).unwrap_or(0.0) / 1e9
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime")
}

fn run(mode: &str, bytes: u64, read_ahead: usize, server: Arc<rustls::ServerConfig>, client: Arc<rustls::ClientConfig>) -> Result<Run> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mode_r = mode.to_string();
    let receiver = std::thread::spawn(move || -> Result<(u64, f64)> {
        runtime().block_on(async move {
            let listener = TcpListener::from_std({
                listener.set_nonblocking(true)?;
                listener
            })?;
            let (tcp, _) = listener.accept().await?;
            tcp.set_nodelay(true)?;
            let start = thread_cpu();
            let got = match mode_r.as_str() {
                "plain" => drain(tcp).await?,
                "tokio-rustls" => {
                    let tls = tokio_rustls::TlsAcceptor::from(server).accept(BufReader::with_capacity(read_ahead, tcp)).await?;
                    drain(tls).await?
                }
                "tokio-rustls-bufread" => {
                    let tls = tokio_rustls::TlsAcceptor::from(server).accept(BufReader::with_capacity(read_ahead, tcp)).await?;
                    drain_by_reference(tls).await?
                }
                "unbuffered" | "unbuffered-ref" => {
                    let conn = UnbufferedServerConnection::new(server)?;
                    let mut channel = Unbuffered::new(Side::Server(conn), tcp);
                    channel.handshake().await?;
                    channel.drain(mode_r == "unbuffered-ref").await?
                }
                other => bail!("unknown mode {other}"),
            };
            Ok((got, thread_cpu() - start))
        })
    });
    let mode_s = mode.to_string();
    let sender = std::thread::spawn(move || -> Result<(Duration, f64)> {
        runtime().block_on(async move {
            let tcp = TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let start = thread_cpu();
            let began = Instant::now();
            let chunk = vec![0x5au8; CHUNK];
            match mode_s.as_str() {
                "plain" => push(tcp, &chunk, bytes).await?,
                "tokio-rustls" | "tokio-rustls-bufread" => {
                    let name = ServerName::try_from("tunneld")?;
                    let tls = tokio_rustls::TlsConnector::from(client).connect(name, BufReader::with_capacity(read_ahead, tcp)).await?;
                    push(tls, &chunk, bytes).await?
                }
                _ => {
                    let conn = UnbufferedClientConnection::new(client, ServerName::try_from("tunneld")?)?;
                    let mut channel = Unbuffered::new(Side::Client(conn), tcp);
                    channel.handshake().await?;
                    let mut sent = 0;
                    while sent < bytes {
                        let n = chunk.len().min((bytes - sent) as usize);
                        channel.send(&chunk[..n]).await?;
                        sent += n as u64;
                    }
                    channel.close().await?;
                }
            }
            Ok((began.elapsed(), thread_cpu() - start))
        })
    });
    let (wall, send_cpu) = sender.join().map_err(|_| anyhow!("sender panicked"))??;
    let (got, recv_cpu) = receiver.join().map_err(|_| anyhow!("receiver panicked"))??;
    if got != bytes {
        bail!("{mode}: received {got} of {bytes} bytes");
    }
    Ok(Run { wall, send_cpu, recv_cpu })
}

async fn push<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, chunk: &[u8], bytes: u64) -> io::Result<()> {
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        stream.write_all(&chunk[..n]).await?;
        sent += n as u64;
    }
    stream.shutdown().await?;
    // Read what the peer sent (its session tickets) until it closes: closing with
    // unread bytes would reset the connection under the receiver.
    let mut rest = [0u8; 4096];
    while matches!(stream.read(&mut rest).await, Ok(n) if n > 0) {}
    Ok(())
}

async fn drain<S: AsyncRead + Unpin>(mut stream: S) -> io::Result<u64> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        match stream.read(&mut buf).await? {
            0 => return Ok(got),
            n => got += n as u64,
        }
    }
}

/// Takes each record's plaintext where rustls holds it (`AsyncBufRead`), no copy out.
async fn drain_by_reference<S: tokio::io::AsyncBufRead + Unpin>(mut stream: S) -> io::Result<u64> {
    use tokio::io::AsyncBufReadExt;
    let mut got = 0;
    loop {
        let n = stream.fill_buf().await?.len();
        if n == 0 {
            return Ok(got);
        }
        stream.consume(n);
        got += n as u64;
    }
}

enum Side {
    Client(UnbufferedClientConnection),
    Server(UnbufferedServerConnection),
}

/// What a state asked for, carried out after its borrow of the input ends.
enum Step {
    Nothing,
    ReadMore,
    Transmit,
    HandshakeDone,
    PeerClosed,
}

/// A TCP connection driven through rustls's unbuffered API.
struct Unbuffered {
    side: Side,
    tcp: TcpStream,
    /// Received TLS bytes: `input[start..end]` is not processed yet.
    input: Vec<u8>,
    start: usize,
    end: usize,
    /// TLS bytes to send: `output[..out]`.
    output: Vec<u8>,
    out: usize,
    /// Plaintext copied out of records, for `unbuffered` (not `-ref`).
    sink: Vec<u8>,
    /// Application bytes that arrived with the peer's last handshake flight
    /// (the client's data can follow its Finished in one read).
    early: u64,
}

macro_rules! with_status {
    ($self:ident, |$status:ident| $body:expr) => {{
        let input = &mut $self.input[$self.start..$self.end];
        match &mut $self.side {
            Side::Client(c) => {
                let $status = c.process_tls_records(input);
                $body
            }
            Side::Server(c) => {
                let $status = c.process_tls_records(input);
                $body
            }
        }
    }};
}

/// Handles one status; `deliver` gets each application record's plaintext.
fn handle<D>(
    status: UnbufferedStatus<'_, '_, D>,
    output: &mut Vec<u8>,
    out: &mut usize,
    mut deliver: impl FnMut(&[u8]),
) -> Result<(usize, Step)> {
    let UnbufferedStatus { discard, state } = status;
    let step = match state.context("TLS")? {
        ConnectionState::EncodeTlsData(mut encode) => loop {
            match encode.encode(&mut output[*out..]) {
                Ok(n) => {
                    *out += n;
                    break Step::Nothing;
                }
                Err(EncodeError::InsufficientSize(need)) => output.resize(*out + need.required_size, 0),
                Err(e) => bail!("encode: {e}"),
            }
        },
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            Step::Transmit
        }
        ConnectionState::BlockedHandshake => Step::ReadMore,
        ConnectionState::WriteTraffic(_) => Step::HandshakeDone,
        ConnectionState::ReadTraffic(mut read) => {
            while let Some(record) = read.next_record() {
                deliver(record.context("TLS record")?.payload);
            }
            Step::Nothing
        }
        ConnectionState::PeerClosed | ConnectionState::Closed => Step::PeerClosed,
        other => bail!("unexpected TLS state {other:?}"),
    };
    Ok((discard, step))
}

impl Unbuffered {
    fn new(side: Side, tcp: TcpStream) -> Unbuffered {
        Unbuffered {
            side,
            tcp,
            input: vec![0; CHUNK + MAX_RECORD],
            start: 0,
            end: 0,
            output: vec![0; CHUNK + 4 * 256],
            out: 0,
            sink: vec![0; CHUNK],
            early: 0,
        }
    }

    async fn read_more(&mut self) -> Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.input.len() - self.end < MAX_RECORD {
            // Only the tail of a partial record moves.
            self.input.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let n = self.tcp.read(&mut self.input[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }

    async fn transmit(&mut self) -> Result<()> {
        self.tcp.write_all(&self.output[..self.out]).await?;
        self.out = 0;
        Ok(())
    }

    async fn handshake(&mut self) -> Result<()> {
        loop {
            let (discard, step) = {
                let (output, out, early) = (&mut self.output, &mut self.out, &mut self.early);
                with_status!(self, |status| handle(status, output, out, |payload| *early += payload.len() as u64)?)
            };
            self.start += discard;
            match step {
                Step::Nothing => {}
                Step::Transmit => self.transmit().await?,
                Step::ReadMore => {
                    if !self.read_more().await? {
                        bail!("closed during the handshake");
                    }
                }
                Step::HandshakeDone => return Ok(()),
                Step::PeerClosed => bail!("closed during the handshake"),
            }
        }
    }

    async fn send(&mut self, data: &[u8]) -> Result<()> {
        let (output, out) = (&mut self.output, &mut self.out);
        let input = &mut self.input[self.start..self.end];
        macro_rules! encrypt {
            ($c:expr) => {{
                let UnbufferedStatus { discard, state } = $c.process_tls_records(input);
                match state.context("TLS")? {
                    ConnectionState::WriteTraffic(mut write) => {
                        (discard, write.encrypt(data, &mut output[*out..]).map_err(|e| anyhow!("{e}"))?)
                    }
                    other => bail!("not writable: {other:?}"),
                }
            }};
        }
        let (discard, n) = match &mut self.side {
            Side::Client(c) => encrypt!(c),
            Side::Server(c) => encrypt!(c),
        };
        self.start += discard;
        self.out += n;
        self.transmit().await
    }

    async fn close(&mut self) -> Result<()> {
        let (output, out) = (&mut self.output, &mut self.out);
        let input = &mut self.input[self.start..self.end];
        let n = match &mut self.side {
            Side::Client(c) => match c.process_tls_records(input).state.context("TLS")? {
                ConnectionState::WriteTraffic(mut write) => write.queue_close_notify(&mut output[*out..]).map_err(|e| anyhow!("{e}"))?,
                other => bail!("not writable: {other:?}"),
            },
            Side::Server(_) => 0,
        };
        self.out += n;
        self.transmit().await?;
        self.tcp.shutdown().await?;
        let mut rest = [0u8; 4096];
        while self.tcp.read(&mut rest).await? > 0 {}
        Ok(())
    }

    async fn drain(&mut self, by_reference: bool) -> Result<u64> {
        let mut got = self.early;
        loop {
            let (discard, step) = {
                let (output, out, sink) = (&mut self.output, &mut self.out, &mut self.sink);
                let deliver = |payload: &[u8]| {
                    if !by_reference {
                        sink[..payload.len()].copy_from_slice(payload);
                    }
                    got += payload.len() as u64;
                };
                with_status!(self, |status| handle(status, output, out, deliver)?)
            };
            self.start += discard;
            match step {
                Step::Nothing => {}
                Step::Transmit => self.transmit().await?,
                Step::ReadMore | Step::HandshakeDone => {
                    if !self.read_more().await? {
                        bail!("TCP closed without close_notify after {got} bytes");
                    }
                }
                Step::PeerClosed => return Ok(got),
            }
        }
    }
}

fn configs() -> Result<(Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = rcgen::generate_simple_self_signed(vec!["tunneld".to_string()])?;
    let cert = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)?;
    let verifier = AnyCert(provider.signature_verification_algorithms);
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    Ok((Arc::new(server), Arc::new(client)))
}

/// Benchmark only: trusts any certificate (the handshake signature is still checked).
#[derive(Debug)]
struct AnyCert(rustls::crypto::WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not offered".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}
