//! UDP targets and visitors on loopback, shared by the UDP test files: an echo
//! target, visitors from chosen addresses of 127.0.0.0/8 (so each one's replies
//! can be told apart), one exchange through a mapping, a UDP mapping's series,
//! a port free for both TCP and UDP, a target that records what it gets, and dnsmasq with dig as a real DNS
//! server and client.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{free_port, loopback, metric_value, metrics_text, wait_for, Daemon};

/// A UDP echo target on 127.0.0.1: every datagram goes back to its sender as it came.
pub fn udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind the UDP echo");
    let addr = socket.local_addr().expect("the echo's address");
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 70_000];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
    addr
}

/// A visitor socket on `127.0.0.{last}`.
pub fn visitor(last: u8) -> UdpSocket {
    let socket = UdpSocket::bind(SocketAddr::from(([127, 0, 0, last], 0))).expect("bind a visitor");
    socket.set_read_timeout(Some(Duration::from_secs(5))).expect("a read timeout");
    socket
}

/// Sends `payload` to the mapping and returns the reply, or `None` after `wait`.
pub fn exchange(socket: &UdpSocket, port: u16, payload: &[u8], wait: Duration) -> Option<Vec<u8>> {
    socket.set_read_timeout(Some(wait)).expect("a read timeout");
    socket.send_to(payload, loopback(port)).expect("send");
    let mut buf = vec![0u8; 70_000];
    match socket.recv_from(&mut buf) {
        Ok((n, from)) => {
            assert_eq!(from, loopback(port), "the reply comes from the mapping's own port");
            Some(buf[..n].to_vec())
        }
        Err(_) => None,
    }
}

/// A UDP mapping's series `name` with `extra` labels beside port and protocol,
/// in the scraped exposition `text`.
pub fn udp_sample(text: &str, name: &str, port: u16, extra: &[(&str, &str)]) -> f64 {
    let p = port.to_string();
    let mut labels = vec![("port", p.as_str()), ("protocol", "udp")];
    labels.extend_from_slice(extra);
    metric_value(text, name, &labels).unwrap_or_else(|| panic!("{name} {labels:?} is exported in\n{text}"))
}

/// A UDP mapping's series `name` now (see [`udp_sample`]).
pub fn udp_metric(server: &Daemon, name: &str, port: u16, extra: &[(&str, &str)]) -> f64 {
    udp_sample(&metrics_text(server), name, port, extra)
}

/// A port free for TCP and for UDP.
pub fn free_udp_port() -> u16 {
    wait_for("a port free for TCP and UDP", Duration::from_secs(5), || {
        let port = free_port();
        UdpSocket::bind(("127.0.0.1", port)).ok().map(|_| port)
    })
}

/// A real DNS server (Debian's dnsmasq) on 127.0.0.1 at [`DnsMasq::port`],
/// answering only `www.example.test A` with [`DnsMasq::ANSWER`]; stopped
/// however the test ends.
pub struct DnsMasq {
    child: Child,
    pub port: u16,
}

impl DnsMasq {
    /// What it answers for `www.example.test`.
    pub const ANSWER: &'static str = "192.0.2.7";

    pub fn start(dnsmasq: &Path) -> DnsMasq {
        let port = free_udp_port();
        let child = Command::new(dnsmasq)
            .args([
                "--no-daemon",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--user=",
                &format!("--address=/example.test/{}", Self::ANSWER),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dnsmasq");
        DnsMasq { child, port }
    }

    /// `dig`'s answer for `www.example.test` asked of `127.0.0.1:port`, asking
    /// again until one comes within `within` (the first queries may come
    /// before the mapping or dnsmasq is ready); fails at once should dnsmasq
    /// have exited.
    pub fn resolve_through(&mut self, dig: &Path, port: u16, within: Duration) -> String {
        wait_for("dig to get an answer through the mapping", within, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                let mut stderr = String::new();
                if let Some(mut e) = self.child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut stderr);
                }
                panic!("dnsmasq exited: {status}: {stderr}");
            }
            let out = Command::new(dig)
                .args(["@127.0.0.1", "-p", &port.to_string(), "+short", "+tries=1", "+time=1", "www.example.test", "A"])
                .output()
                .expect("run dig");
            let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (!text.is_empty()).then_some(text)
        })
    }
}

impl Drop for DnsMasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A datagram as a [`Recorder`] got it, with its source (one per session).
pub type Arrival = (SocketAddr, Vec<u8>);

/// A target on 127.0.0.1 that keeps every datagram with its source, in
/// arrival order, read by a thread of its own into a 4 MiB buffer so it drops
/// nothing itself.
pub struct Recorder {
    pub addr: SocketAddr,
    got: Arc<Mutex<Vec<Arrival>>>,
}

impl Recorder {
    pub fn start() -> Recorder {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("a UDP socket");
        socket.set_recv_buffer_size(4 << 20).expect("a 4 MiB receive buffer");
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into()).expect("bind the recorder");
        let socket: UdpSocket = socket.into();
        let addr = socket.local_addr().expect("the recorder's address");
        let got = Arc::new(Mutex::new(Vec::new()));
        let keep = got.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 70_000];
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                keep.lock().unwrap().push((from, buf[..n].to_vec()));
            }
        });
        Recorder { addr, got }
    }

    /// How many datagrams have arrived so far.
    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Everything received, once `n` datagrams have arrived (at most `within`).
    pub fn after(&self, n: usize, within: Duration) -> Vec<Arrival> {
        wait_for(&format!("{n} datagrams at the target"), within, || (self.count() >= n).then_some(()));
        self.got.lock().unwrap().clone()
    }
}
