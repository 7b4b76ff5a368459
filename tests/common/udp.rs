//! UDP targets and visitors on loopback, shared by the UDP test files: an echo
//! target, visitors from chosen addresses of 127.0.0.0/8 (so each one's replies
//! can be told apart), one exchange through a mapping, a UDP mapping's series,
//! and a port free for both TCP and UDP (dnsmasq listens on both).

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use super::{free_port, loopback, metrics_text, scrape_metric, wait_for, Daemon};

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

/// A UDP mapping's series `name` with `extra` labels beside port and protocol.
pub fn udp_metric(server: &Daemon, name: &str, port: u16, extra: &[(&str, &str)]) -> f64 {
    let p = port.to_string();
    let mut labels = vec![("port", p.as_str()), ("protocol", "udp")];
    labels.extend_from_slice(extra);
    scrape_metric(server, name, &labels).unwrap_or_else(|| panic!("{name} {labels:?} is exported in\n{}", metrics_text(server)))
}

/// A port free for TCP and for UDP.
pub fn free_udp_port() -> u16 {
    wait_for("a port free for TCP and UDP", Duration::from_secs(5), || {
        let port = free_port();
        UdpSocket::bind(("127.0.0.1", port)).ok().map(|_| port)
    })
}
