//! The loopback network around a daemon: free ports, targets for its mappings,
//! and visitors that go through them.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

/// A port that was free a moment ago on every address, chosen below the kernel's
/// ephemeral range: a port the kernel hands out (bind port 0) is one that the
/// outgoing connections of tests running in parallel — hundreds at a time in
/// some — can take before the daemon binds it ("port in use by another process").
/// A port is never handed out twice in one test process: a daemon's API and
/// tunnel ports are both chosen before it binds either, and a random draw that
/// repeats would give it the same port twice.
pub fn free_port() -> u16 {
    use rand::Rng;
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let mut handed_out = HANDED_OUT.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    if ephemeral_start > 10_000 {
        for _ in 0..1000 {
            let port = rand::thread_rng().gen_range(10_000..ephemeral_start);
            if !handed_out.contains(&port) && TcpListener::bind(("0.0.0.0", port)).is_ok() {
                handed_out.insert(port);
                return port;
            }
        }
    }
    loop {
        let port = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0");
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// `127.0.0.1:port`: where a mapping on `port` (or anything the tests bind)
/// is reached.
pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A target on 127.0.0.1:0 that runs `serve` on a thread per accepted connection.
pub fn target(serve: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind target");
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || serve(conn));
        }
    });
    addr
}

/// A target on 127.0.0.1 that serves each connection with `serve` on a thread
/// (a closure, unlike [`target`]'s function).
pub fn spawn_target(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind target");
    let addr = listener.local_addr().unwrap();
    let serve = std::sync::Arc::new(serve);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || serve(conn));
        }
    });
    addr
}

/// A TCP echo target; it half-closes after the visitor does.
pub fn echo_server() -> SocketAddr {
    target(|mut conn| {
        let mut reader = conn.try_clone().expect("clone");
        let _ = std::io::copy(&mut reader, &mut conn);
        let _ = conn.shutdown(std::net::Shutdown::Write);
    })
}

/// Sends `payload` to `addr`, half-closes, and returns everything read back.
pub fn roundtrip(addr: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut conn = TcpStream::connect(addr).expect("connect");
    conn.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut reader = conn.try_clone().unwrap();
    let payload = payload.to_vec();
    let writer = std::thread::spawn(move || {
        conn.write_all(&payload).expect("write");
        conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut out = Vec::new();
    reader.read_to_end(&mut out).expect("read");
    writer.join().unwrap();
    out
}

/// Pushes `len` known bytes through the mapping on `port` (whose target is an
/// echo server) and asserts they all came back unchanged: traffic of a known
/// size for the counters to show.
pub fn echo_through(port: u16, len: usize) {
    let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    let back = roundtrip(loopback(port), &payload);
    assert_eq!(back.len(), payload.len(), "echo through :{port} came back short");
    assert!(back == payload, "echo through :{port} came back altered");
}

/// A visitor that connects to `port`, says `hello`, and reads until the
/// connection closes; returns what came back (a refused visitor gets nothing).
pub fn visit(port: u16, hello: &[u8]) -> Vec<u8> {
    let mut visitor = TcpStream::connect(("127.0.0.1", port)).expect("connect to mapping");
    visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    // The write may fail once the daemon has closed: that is a refusal too.
    let _ = visitor.write_all(hello);
    let mut buf = Vec::new();
    let _ = visitor.read_to_end(&mut buf);
    buf
}

/// A TCP connection to `to` from the source address `from` (all of 127.0.0.0/8
/// is loopback, so tests can play several sources), with a 15 s read timeout.
pub fn connect_from(from: IpAddr, to: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let domain = if from.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let socket = Socket::new(domain, Type::STREAM, None).expect("a socket");
    socket.bind(&SocketAddr::new(from, 0).into()).unwrap_or_else(|e| panic!("bind the source address {from}: {e}"));
    socket.connect(&to.into()).unwrap_or_else(|e| panic!("connect from {from} to {to}: {e}"));
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    stream
}

/// The rows of a kernel socket table (`/proc/net/tcp`, `/proc/net/udp`) that
/// `wanted` picks, split into fields, each socket once.
///
/// The kernel hands such a table out a page per `read` and does not hold it
/// still in between: while other tests open and close sockets, one reading can
/// show a row twice or skip it (a CI run once saw the mapping's socket twice).
/// So rows are told apart by their inode, and the table is read again until two
/// readings in a row pick the same sockets.
pub fn socket_table_rows(path: &str, wanted: impl Fn(&[&str]) -> bool) -> Vec<Vec<String>> {
    const INODE: usize = 9;
    let read = || {
        let table = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let mut rows: Vec<Vec<String>> = Vec::new();
        for line in table.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() > INODE && wanted(&fields) && !rows.iter().any(|r| r[INODE] == fields[INODE]) {
                rows.push(fields.iter().map(|f| f.to_string()).collect());
            }
        }
        rows
    };
    let inodes = |rows: &[Vec<String>]| rows.iter().map(|r| r[INODE].clone()).collect::<std::collections::BTreeSet<_>>();
    let mut last = read();
    for _ in 0..50 {
        let now = read();
        if inodes(&now) == inodes(&last) {
            return now;
        }
        last = now;
    }
    last
}
