//! Network namespaces as separate hosts: a server and a client that reach each
//! other only over a veth pair, as two machines on a link would.
//!
//! The test process itself stays in the host's namespace. It opens sockets inside
//! another namespace with [`in_namespace`], which runs a closure on a thread that
//! has joined it (a socket belongs to the namespace it was created in, whatever
//! thread uses it later), and starts daemons inside one with `nsenter --net=PATH`
//! as their wrapper.
//!
//! Needs root and `ip` (iproute2); without them [`NetNs::create`] skips loudly,
//! and with `CI_REQUIRE_TOOLS=1` it fails.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A short name unique to this process and call: interface names are at most
/// 15 characters.
fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed))
}

impl NetNs {
    /// A fresh namespace with its loopback up. `None` (after a SKIPPED banner)
    /// without root or `ip`.
    pub fn create(test: &str) -> Option<NetNs> {
        if unsafe { libc::geteuid() } != 0 {
            super::tools::skip_or_fail(test, "root (network namespaces)");
            return None;
        }
        super::tools::external_tool("ip", test)?;
        let ns = NetNs { name: unique("tdns") };
        ip(&["netns", "add", &ns.name]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        Some(ns)
    }

    /// The namespace's file, for `nsenter --net=` and [`in_namespace`].
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// `nsenter --net=PATH --`: a daemon wrapper that runs it inside.
    pub fn wrapper(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net={}", self.path().display()), "--".into()]
    }

    /// Sets interface `dev` in this namespace up or down: a cable pulled and
    /// plugged back, with both processes still running.
    pub fn set_link(&self, dev: &str, up: bool) {
        ip(&["-n", &self.name, "link", "set", dev, if up { "up" } else { "down" }]);
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Joins `a` and `b` with a veth pair: `a` gets `addr_a`, `b` gets `addr_b` (CIDR,
/// e.g. `10.213.0.1/30`). Returns the interface names (in `a`, in `b`).
pub fn link(a: &NetNs, addr_a: &str, b: &NetNs, addr_b: &str) -> (String, String) {
    let (dev_a, dev_b) = (unique("tdva"), unique("tdvb"));
    ip(&["link", "add", &dev_a, "type", "veth", "peer", "name", &dev_b]);
    ip(&["link", "set", &dev_a, "netns", &a.name]);
    ip(&["link", "set", &dev_b, "netns", &b.name]);
    for (ns, dev, addr) in [(a, &dev_a, addr_a), (b, &dev_b, addr_b)] {
        ip(&["-n", &ns.name, "addr", "add", addr, "dev", dev]);
        ip(&["-n", &ns.name, "link", "set", dev, "up"]);
    }
    (dev_a, dev_b)
}

/// Joins `a` (which gets `addr_a`) with the network namespace of process `pid`
/// (a booted systemd host, say) by a veth pair. Returns the interface names (in
/// `a`, in the other); the caller configures the second from inside.
pub fn link_to_process(a: &NetNs, addr_a: &str, pid: i32) -> (String, String) {
    let (dev_a, dev_b) = (unique("tdva"), unique("tdvb"));
    ip(&["link", "add", &dev_a, "type", "veth", "peer", "name", &dev_b]);
    ip(&["link", "set", &dev_a, "netns", &a.name]);
    ip(&["link", "set", &dev_b, "netns", &pid.to_string()]);
    ip(&["-n", &a.name, "addr", "add", addr_a, "dev", &dev_a]);
    ip(&["-n", &a.name, "link", "set", &dev_a, "up"]);
    (dev_a, dev_b)
}

/// Runs `f` on a thread that has joined the network namespace at `ns`: sockets it
/// opens live in that namespace.
pub fn in_namespace<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns).unwrap_or_else(|e| panic!("open {}: {e}", ns.display()));
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: setns on this thread only, with a namespace file it holds open.
        let joined = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the thread in the namespace panicked")
}

/// An echo server on loopback inside `ns`; returns its address there.
pub fn echo_target_in(ns: &Path) -> SocketAddr {
    let listener: TcpListener = in_namespace(ns, || TcpListener::bind("127.0.0.1:0").expect("bind the target"));
    let addr = listener.local_addr().expect("target address");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut buf = [0u8; 16384];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A TCP connection to `addr` opened inside `ns`.
pub fn connect_in(ns: &Path, addr: SocketAddr) -> std::io::Result<TcpStream> {
    in_namespace(ns, move || TcpStream::connect_timeout(&addr, Duration::from_secs(2)))
}

/// Sends `len` random bytes to `addr` from inside `ns` and checks the echo.
pub fn echo_in(ns: &Path, addr: SocketAddr, len: usize) {
    let mut stream = connect_in(ns, addr).expect("connect to the mapping");
    stream.set_read_timeout(Some(Duration::from_secs(20))).expect("timeout");
    let payload = super::random_bytes(len);
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        let payload = payload.clone();
        std::thread::spawn(move || stream.write_all(&payload).expect("send"))
    };
    let mut echoed = vec![0u8; len];
    stream.read_exact(&mut echoed).expect("the echo");
    writer.join().expect("writer");
    assert!(echoed == payload, "the echo through {addr} differs from what was sent");
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(out.status.success(), "ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}
