//! Issue 24 §3: what a TLS data channel (`tunneld::net::tls_channel`) copies and
//! allocates per byte, and what must not change while it copies less.
//!
//! After rustls's handshake the channel seals and opens records itself, in its
//! own buffers: no allocation per record either way (rustls's unbuffered API
//! allocates a `Vec` per record sent and per record received). Counted here with
//! an allocator that counts the calls made on the test's own thread, both ends
//! of a channel on one current-thread runtime.
//!
//! And with that: every byte crosses at record and write boundaries each way,
//! through partial writes to a slow reader; half-closes each way; key updates
//! from a rustls peer; every cipher suite; session tickets still resume the next
//! handshake; and the same through the real daemons.
mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::tunnel::{data_channel_identity, flush_tls};
use common::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tunneld::net::metered::MeteredStream;
use tunneld::net::tls_channel::{self, TlsDataChannel};
use tunneld::telemetry::Metrics;

// ------------------------------------------------- allocations, counted per thread

/// The system allocator, counting the allocations each thread makes.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

fn count_one() {
    let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
}

fn allocations() -> u64 {
    ALLOCATIONS.with(|n| n.get())
}

// SAFETY: every call goes to `System` unchanged; counting touches only a
// thread-local `Cell` that has no destructor and allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_one();
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_one();
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

// ------------------------------------------------- a channel's two ends, in process

/// A fresh identity (`common::tunnel::data_channel_identity`), shared.
fn identity(suite: Option<rustls::SupportedCipherSuite>) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let (server, client) = data_channel_identity(suite);
    (Arc::new(server), Arc::new(client))
}

/// Socket buffers this small make the kernel take a 64 KiB write in pieces, so
/// the channel's writes end partly sent.
const SMALL_BUFFER: usize = 8 * 1024;

/// The client's and the server's ends of one data channel over loopback TCP,
/// as the daemons make them; with `small_buffers`, each socket's buffers are
/// [`SMALL_BUFFER`].
async fn channel_pair(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    small_buffers: bool,
) -> (TlsDataChannel, TlsDataChannel) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shrink = |tcp: &tokio::net::TcpStream| {
        if small_buffers {
            let sock = socket2::SockRef::from(tcp);
            sock.set_send_buffer_size(SMALL_BUFFER).unwrap();
            sock.set_recv_buffer_size(SMALL_BUFFER).unwrap();
        }
    };
    let dial = async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        shrink(&tcp);
        let (sent, received) = Metrics::new().tunnel_meters("default");
        let name = rustls::pki_types::ServerName::try_from("tunneld").unwrap();
        match tls_channel::connect(client, name, MeteredStream::new(tcp, sent, received)).await {
            Ok(channel) => channel,
            Err((e, _)) => panic!("the client's handshake: {e}"),
        }
    };
    let serve = async {
        let (tcp, _) = listener.accept().await.unwrap();
        shrink(&tcp);
        let (sent, received) = Metrics::new().tunnel_meters("default");
        let mut io = MeteredStream::new(tcp, sent, received);
        let (hello, offers_data) = tls_channel::read_client_hello(&mut io).await.expect("a ClientHello");
        assert!(offers_data);
        tls_channel::accept(server, io, hello).await.expect("the server's handshake")
    };
    let both = async { tokio::join!(dial, serve) };
    tokio::time::timeout(Duration::from_secs(10), both).await.expect("the handshake hangs")
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Writes `data` in pieces of the sizes in `pieces` (in turn), flushing after
/// every third, then flushes.
async fn write_in_pieces(writer: &mut (impl AsyncWrite + Unpin), data: &[u8], pieces: &[usize]) {
    let (mut at, mut i) = (0, 0);
    while at < data.len() {
        let n = pieces[i % pieces.len()].min(data.len() - at);
        writer.write_all(&data[at..at + n]).await.expect("a write");
        if i % 3 == 2 {
            writer.flush().await.expect("a flush");
        }
        at += n;
        i += 1;
    }
    writer.flush().await.expect("the last flush");
}

/// Reads until the peer's close_notify with buffers of the sizes in `pieces`
/// (in turn), pausing now and then like a slow reader: the bytes, and how it
/// ended.
async fn read_slowly(reader: &mut (impl AsyncRead + Unpin), pieces: &[usize]) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = vec![0u8; pieces.iter().copied().max().unwrap_or(1)];
    for i in 0.. {
        if i % 64 == 63 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let n = pieces[i % pieces.len()];
        let read = tokio::time::timeout(Duration::from_secs(20), reader.read(&mut buf[..n])).await.expect("a read hangs");
        match read {
            Ok(0) => return (got, Ok(())),
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) => return (got, Err(e)),
        }
    }
    unreachable!()
}

/// Sizes around a record's plaintext (16 KiB), a chunk (64 KiB) and the most
/// one write takes, and odd ones.
const WRITES: [usize; 9] = [1, 16_383, 16_384, 16_385, 65_532, 65_536, 65_537, 200_000, 3];
/// Reads of a chunk header, of odd sizes, and of more than a record.
const READS: [usize; 6] = [4, 1, 4_093, 65_540, 16_384, 7];

// ------------------------------------------------- the tests

/// The firm bound: sending 32 MiB through a channel, one end to the other,
/// allocates at most once per 64 KiB chunk (the receive buffer, taken
/// again after the reader caught up with the socket), not per 16 KiB record.
/// rustls's unbuffered path allocated a `Vec` for each record it sealed and
/// each it opened: at least 128 per MiB.
#[test]
fn a_channel_allocates_no_buffer_per_record() {
    current_thread().block_on(async {
        let (server, client) = identity(None);
        let (mut client, mut server) = channel_pair(server, client, false).await;
        for (direction, per_mib) in [
            ("client → server", allocations_per_mib(&mut client, &mut server).await),
            ("server → client", allocations_per_mib(&mut server, &mut client).await),
        ] {
            assert!(per_mib <= 16.0, "{direction}: {per_mib:.2} allocations per MiB; at most one per 64 KiB chunk");
        }
    });
}

/// Allocations on this thread per MiB while 32 MiB go `from` → `to` in 64 KiB
/// writes, read into one 64 KiB buffer (after a warm-up chunk).
async fn allocations_per_mib(from: &mut TlsDataChannel, to: &mut TlsDataChannel) -> f64 {
    const MIB: usize = 32;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut buf = vec![0u8; 64 * 1024 + 4];
    from.write_all(&chunk).await.unwrap();
    from.flush().await.unwrap();
    to.read_exact(&mut buf[..chunk.len()]).await.unwrap();
    let before = allocations();
    let sending = async {
        for _ in 0..MIB * 16 {
            from.write_all(&chunk).await.unwrap();
        }
        from.flush().await.unwrap();
    };
    let receiving = async {
        let mut left = MIB << 20;
        while left > 0 {
            let n = to.read(&mut buf).await.unwrap();
            assert!(n > 0, "the channel ended early");
            left -= n;
        }
    };
    tokio::join!(sending, receiving);
    let made = allocations() - before;
    eprintln!("{made} allocations for {MIB} MiB");
    made as f64 / MIB as f64
}

/// Every byte, each way, written at record and chunk boundaries with flushes
/// in between, through socket buffers small enough that writes end partly
/// sent, to a reader that takes odd sizes and pauses; then the close_notify
/// ends each direction cleanly.
#[test]
fn every_byte_crosses_record_and_flush_boundaries_each_way_to_a_slow_reader() {
    current_thread().block_on(async {
        let (server, client) = identity(None);
        let (client, server) = channel_pair(server, client, true).await;
        let (mut client_reads, mut client_writes) = tokio::io::split(client);
        let (mut server_reads, mut server_writes) = tokio::io::split(server);
        let up = random_bytes((3 << 20) + 5);
        let down = random_bytes((3 << 20) + 11);
        let upload = async {
            write_in_pieces(&mut client_writes, &up, &WRITES).await;
            client_writes.shutdown().await.expect("the client's close_notify");
        };
        let download = async {
            write_in_pieces(&mut server_writes, &down, &WRITES[3..]).await;
            server_writes.shutdown().await.expect("the server's close_notify");
        };
        let (_, _, (got_up, up_ended), (got_down, down_ended)) =
            tokio::join!(upload, download, read_slowly(&mut server_reads, &READS), read_slowly(&mut client_reads, &READS[2..]));
        up_ended.expect("the client's close_notify ends the upload cleanly");
        down_ended.expect("the server's close_notify ends the download cleanly");
        assert_eq!(got_up.len(), up.len(), "upload");
        assert!(got_up == up, "the upload arrived altered");
        assert_eq!(got_down.len(), down.len(), "download");
        assert!(got_down == down, "the download arrived altered");
    });
}

/// A half-close each way: the end that sent close_notify still reads what the
/// other sends after it, every byte, until that end's own close_notify; and
/// it may not write after its own.
#[test]
fn half_closes_each_way() {
    current_thread().block_on(async {
        for client_first in [true, false] {
            let (server, client) = identity(None);
            let (client, server) = channel_pair(server, client, true).await;
            let (mut first, mut second) = if client_first { (client, server) } else { (server, client) };
            let before = random_bytes(100_003);
            let after = random_bytes(300_007);
            let closing = async {
                write_in_pieces(&mut first, &before, &WRITES).await;
                first.shutdown().await.unwrap();
            };
            let (_, (got, ended)) = tokio::join!(closing, read_slowly(&mut second, &READS));
            ended.expect("close_notify is a clean end");
            let err = first.write_all(b"late").await.expect_err("a write after close_notify");
            assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
            assert!(got == before, "client first {client_first}: {} of {} bytes before the half-close", got.len(), before.len());
            // The other way is still open.
            let writing = async {
                write_in_pieces(&mut second, &after, &WRITES).await;
                second.shutdown().await.unwrap();
            };
            let (_, (got, ended)) = tokio::join!(writing, read_slowly(&mut first, &READS));
            ended.expect("the second close_notify is a clean end");
            assert!(got == after, "client first {client_first}: {} of {} bytes after the half-close", got.len(), after.len());
        }
    });
}

/// Each cipher suite the daemon offers carries bytes both ways (the record
/// layer picks the AEAD from the secrets rustls hands over).
#[test]
fn every_offered_cipher_suite_carries_bytes_both_ways() {
    use rustls::crypto::ring::cipher_suite::{TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256};
    current_thread().block_on(async {
        for suite in [TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256] {
            let (server, client) = identity(Some(suite));
            let (mut client, mut server) = channel_pair(server, client, false).await;
            let data = random_bytes(200_001);
            assert!(carry(&mut client, &mut server, &data).await == data, "{:?}: altered client → server", suite.suite());
            assert!(carry(&mut server, &mut client, &data).await == data, "{:?}: altered server → client", suite.suite());
        }
    });
}

/// `data` from one end to the other: what arrived.
async fn carry(from: &mut TlsDataChannel, to: &mut TlsDataChannel, data: &[u8]) -> Vec<u8> {
    let mut got = vec![0u8; data.len()];
    let (_, read) = tokio::join!(write_in_pieces(from, data, &WRITES), to.read_exact(&mut got));
    read.expect("the bytes");
    got
}

/// The next connection on `listener`, served by a plain rustls server (the
/// record layer an older tunneld runs) once its handshake is done.
fn rustls_peer_accepts(listener: &std::net::TcpListener, config: Arc<rustls::ServerConfig>) -> (TcpStream, rustls::ServerConnection) {
    let (mut tcp, _) = listener.accept().unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut conn = rustls::ServerConnection::new(config).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).unwrap();
    }
    (tcp, conn)
}

/// A rustls peer that updates its keys and asks for ours (TLS 1.3 KeyUpdate,
/// update_requested) in the middle of an echo: the channel follows to the new
/// receive keys, answers with its own update, and every byte comes back.
#[test]
fn key_updates_from_the_peer_are_followed_and_answered() {
    let (server, client) = identity(None);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut tcp, mut conn) = rustls_peer_accepts(&listener, server);
        let mut echoed = 0usize;
        let mut updates = 0;
        let mut buf = vec![0u8; 1 << 16];
        loop {
            if conn.read_tls(&mut tcp).unwrap() == 0 {
                return updates;
            }
            let state = conn.process_new_packets().expect("the channel's records (after its key update too)");
            while let Ok(n) = conn.reader().read(&mut buf) {
                if n == 0 {
                    conn.send_close_notify();
                    flush_tls(&mut conn, &mut tcp);
                    let _ = tcp.shutdown(Shutdown::Write);
                    return updates;
                }
                conn.writer().write_all(&buf[..n]).unwrap();
                // Every 256 KiB echoed, new keys both ways.
                if (echoed + n) / (256 << 10) > echoed / (256 << 10) {
                    conn.refresh_traffic_keys().unwrap();
                    updates += 1;
                }
                echoed += n;
            }
            flush_tls(&mut conn, &mut tcp);
            if state.peer_has_closed() {
                return updates;
            }
        }
    });
    current_thread().block_on(async {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sent, received) = Metrics::new().tunnel_meters("default");
        let name = rustls::pki_types::ServerName::try_from("tunneld").unwrap();
        let channel = match tls_channel::connect(client, name, MeteredStream::new(tcp, sent, received)).await {
            Ok(channel) => channel,
            Err((e, _)) => panic!("handshake: {e}"),
        };
        let (mut reads, mut writes) = tokio::io::split(channel);
        let data = random_bytes((2 << 20) + 9);
        let writing = async {
            write_in_pieces(&mut writes, &data, &WRITES).await;
            writes.shutdown().await.unwrap();
        };
        let (_, (got, ended)) = tokio::join!(writing, read_slowly(&mut reads, &READS));
        ended.expect("the echo ends on the peer's close_notify");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "the echo came back altered across key updates");
    });
    let updates = echo.join().expect("the rustls peer");
    assert!(updates >= 4, "the peer updated its keys {updates} times");
}

/// The session tickets a server sends after the handshake reach the client's
/// session cache through the channel (rustls keeps them after the handover):
/// the next data channel's handshake resumes.
#[test]
fn session_tickets_still_resume_the_next_handshake() {
    let (server, client) = identity(None);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let (mut tcp, mut conn) = rustls_peer_accepts(&listener, server.clone());
            kinds.push(conn.handshake_kind());
            // Tickets went with the handshake; a record after them, then close.
            conn.writer().write_all(b"after the tickets").unwrap();
            conn.send_close_notify();
            flush_tls(&mut conn, &mut tcp);
            let mut rest = Vec::new();
            let _ = tcp.read_to_end(&mut rest);
        }
        kinds
    });
    current_thread().block_on(async {
        for _ in 0..2 {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (sent, received) = Metrics::new().tunnel_meters("default");
            let name = rustls::pki_types::ServerName::try_from("tunneld").unwrap();
            let mut channel = match tls_channel::connect(client.clone(), name, MeteredStream::new(tcp, sent, received)).await {
                Ok(channel) => channel,
                Err((e, _)) => panic!("handshake: {e}"),
            };
            let (got, ended) = read_slowly(&mut channel, &[1024]).await;
            ended.expect("close_notify");
            assert_eq!(got, b"after the tickets");
            channel.shutdown().await.unwrap();
        }
    });
    let kinds = peer.join().expect("the rustls peer");
    assert_eq!(kinds, [Some(rustls::HandshakeKind::Full), Some(rustls::HandshakeKind::Resumed)]);
}

// ------------------------------------------------- through the daemons

const SECRET: &str = "tls copies secret";

/// Through the real server and client: a download to a visitor that reads
/// slowly (the target half-closes after it), and an
/// upload to a target that reads so (the visitor half-closes after it, and the
/// target's digest of what it read comes back): exact to the byte each way,
/// and counted so.
#[test]
fn every_byte_crosses_the_daemons_each_way_to_a_slow_reader() {
    const LEN: usize = (6 << 20) + 3;
    let (server, _client) = server_and_client(SECRET, true);
    let data = Arc::new(random_bytes(LEN));
    let served = data.clone();
    // The visitor's first byte says which: `d` download, `u` upload.
    let target = spawn_target(move |mut conn| {
        let mut which = [0u8; 1];
        conn.read_exact(&mut which).unwrap();
        if &which == b"d" {
            conn.write_all(&served).unwrap();
            conn.shutdown(Shutdown::Write).unwrap();
            let _ = conn.read_to_end(&mut Vec::new());
        } else {
            let got = read_slowly_blocking(&mut conn);
            conn.write_all(&sha256(&got)).unwrap();
        }
    });
    let port = free_port();
    create_mapping(&server, port, target, true);
    let visitor = || {
        let visitor = TcpStream::connect(loopback(port)).unwrap();
        visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        visitor
    };

    let mut downloader = visitor();
    downloader.write_all(b"d").unwrap();
    let download = read_slowly_blocking(&mut downloader);
    assert_eq!(download.len(), LEN, "the download");
    assert!(download == *data, "the download arrived altered");
    drop(downloader);

    let mut uploader = visitor();
    uploader.write_all(b"u").unwrap();
    uploader.write_all(&data).unwrap();
    uploader.shutdown(Shutdown::Write).unwrap();
    let mut digest = Vec::new();
    uploader.read_to_end(&mut digest).expect("the target's answer after the visitor's half-close");
    assert!(digest == sha256(&data), "the upload arrived altered or cut");

    let text = wait_for("both exchanges to end", Duration::from_secs(10), || {
        let t = metrics_text(&server);
        (metric_value(&t, "tunneld_mapping_active_connections", &[("port", &port.to_string())]) == Some(0.0)).then_some(t)
    });
    let bytes =
        |direction: &str| metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &port.to_string()), ("direction", direction)]);
    assert_eq!(bytes("sent"), Some((LEN + 2) as f64), "counted visitor → target");
    assert_eq!(bytes("received"), Some((LEN + 32) as f64), "counted target → visitor");
}

/// Reads a socket to its end in odd sizes, pausing now and then.
fn read_slowly_blocking(conn: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_540];
    for i in 0.. {
        if i % 64 == 63 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let n = READS[i % READS.len()];
        match conn.read(&mut buf[..n]) {
            Ok(0) => break,
            Ok(k) => got.extend_from_slice(&buf[..k]),
            Err(e) => panic!("a slow reader's read after {} bytes: {e}", got.len()),
        }
    }
    got
}
