//! Shared helpers for integration tests that drive the real `tunneld` binary.
//!
//! Readiness comes from the daemon itself: each spawned daemon gets its own
//! `NOTIFY_SOCKET` (a Unix datagram socket in a temp dir) and the helpers wait for
//! `READY=1` / `STATUS=` messages on it instead of sleeping.
#![allow(dead_code)]

pub mod browser;
pub mod tools;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_tunneld");

/// A port that was free a moment ago on 127.0.0.1 (bind port 0, read it, release it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

/// A running `tunneld` process whose stderr is collected and which is killed on drop.
pub struct Daemon {
    pub child: Child,
    pub notify: UnixDatagram,
    pub notify_path: PathBuf,
    /// `--api-listen` for a server, `--metrics-listen` for a client.
    pub http: SocketAddr,
    pub tunnel: Option<SocketAddr>,
    pub state_dir: PathBuf,
    _tmp: tempfile::TempDir,
    log_path: PathBuf,
}

impl Daemon {
    /// Starts `tunneld server` on free loopback ports with its own state dir and
    /// waits for `READY=1`.
    pub fn server(secret: &str, extra: &[&str]) -> Daemon {
        Self::server_env(secret, extra, &[])
    }

    /// Like [`Daemon::server`] with extra environment variables.
    pub fn server_env(secret: &str, extra: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state_dir = tmp.path().join("state");
        Self::server_in(tmp, state_dir, None, secret, extra, envs)
    }

    /// Like [`Daemon::server`], run under `prlimit --nofile=SOFT:HARD`: a real
    /// descriptor limit on the real process.
    pub fn server_with_nofile(soft: u64, hard: u64, secret: &str, extra: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state_dir = tmp.path().join("state");
        let limit = format!("--nofile={soft}:{hard}");
        Self::server_in_wrapped(tmp, state_dir, None, secret, extra, &[], &["prlimit", &limit, "--"])
    }

    /// Like [`Daemon::server`] but reuses `state_dir` (to test restarts).
    pub fn server_with_state(state_dir: &Path, secret: &str, extra: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        Self::server_in(tmp, state_dir.to_path_buf(), None, secret, extra, &[])
    }

    /// A server restarted in place: same state dir and same tunnel address, so a
    /// running client finds it again.
    pub fn server_restarted(state_dir: &Path, tunnel: SocketAddr, secret: &str) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        Self::server_in(tmp, state_dir.to_path_buf(), Some(tunnel), secret, &[], &[])
    }

    fn server_in(
        tmp: tempfile::TempDir,
        state_dir: PathBuf,
        tunnel: Option<SocketAddr>,
        secret: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Daemon {
        Self::server_in_wrapped(tmp, state_dir, tunnel, secret, extra, envs, &[])
    }

    fn server_in_wrapped(
        tmp: tempfile::TempDir,
        state_dir: PathBuf,
        tunnel: Option<SocketAddr>,
        secret: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Daemon {
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let tunnel = tunnel.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()).parse().unwrap());
        let mut args: Vec<String> = vec![
            "server".into(),
            "--api-listen".into(),
            api.to_string(),
            "--tunnel-listen".into(),
            tunnel.to_string(),
            "--state-dir".into(),
            state_dir.display().to_string(),
        ];
        if !secret.is_empty() {
            args.push("--secret".into());
            args.push(secret.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let d = Self::spawn_wrapped(tmp, wrapper, &args, envs, api, Some(tunnel), state_dir);
        d.wait_for_notify("READY=1", Duration::from_secs(20));
        d
    }

    /// Starts `tunneld` with exactly `args` (nothing added) and waits for
    /// `READY=1`; `http` is where the test reaches its API or metrics.
    pub fn with_args(args: &[&str], http: SocketAddr) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = tmp.path().to_path_buf();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let d = Self::spawn(tmp, &args, &[], http, None, state);
        d.wait_for_notify("READY=1", Duration::from_secs(20));
        d
    }

    /// Starts `tunneld client` against `server`'s tunnel, pinning its certificate
    /// (read with `tunneld fingerprint --state-dir`, as an operator would), and
    /// waits until it reports an authenticated session (`STATUS=connected ...`).
    pub fn client(server: &Daemon, secret: &str, extra: &[&str]) -> Daemon {
        let d = Self::client_unconnected(server, secret, extra);
        d.wait_for_notify("STATUS=connected", Duration::from_secs(20));
        d
    }

    /// Starts `tunneld client` for `server` and waits only for `READY=1` (it may
    /// never connect).
    pub fn client_unconnected(server: &Daemon, secret: &str, extra: &[&str]) -> Daemon {
        let pin = server.fingerprint();
        let mut args = vec!["--fingerprint", pin.as_str()];
        args.extend_from_slice(extra);
        Self::client_with(server.tunnel.expect("a server has a tunnel address"), secret, &args)
    }

    /// Starts `tunneld client` against `server_tunnel` with exactly `extra` added
    /// (no fingerprint), waiting only for `READY=1`.
    pub fn client_with(server_tunnel: SocketAddr, secret: &str, extra: &[&str]) -> Daemon {
        Self::client_with_env(server_tunnel, secret, extra, &[])
    }

    /// [`Daemon::client_with`] with extra environment variables.
    pub fn client_with_env(server_tunnel: SocketAddr, secret: &str, extra: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args: Vec<String> = vec![
            "client".into(),
            "--server".into(),
            server_tunnel.to_string(),
            "--secret".into(),
            secret.into(),
            "--metrics-listen".into(),
            metrics.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let state = tmp.path().to_path_buf();
        let d = Self::spawn(tmp, &args, envs, metrics, None, state);
        d.wait_for_notify("READY=1", Duration::from_secs(20));
        d
    }

    /// This server's tunnel certificate fingerprint, via `tunneld fingerprint`.
    pub fn fingerprint(&self) -> String {
        let out = Command::new(BIN)
            .args(["fingerprint", "--state-dir", &self.state_dir.display().to_string()])
            .env_remove("TUNNELD_SERVER__STATE_DIR")
            .output()
            .expect("run tunneld fingerprint");
        assert!(out.status.success(), "tunneld fingerprint failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8").trim().to_string()
    }

    fn spawn(
        tmp: tempfile::TempDir,
        args: &[String],
        envs: &[(&str, &str)],
        http: SocketAddr,
        tunnel: Option<SocketAddr>,
        state_dir: PathBuf,
    ) -> Daemon {
        Self::spawn_wrapped(tmp, &[], args, envs, http, tunnel, state_dir)
    }

    /// `wrapper` (e.g. `prlimit ... --`) runs first and execs the daemon, so the
    /// child's pid is the daemon's.
    fn spawn_wrapped(
        tmp: tempfile::TempDir,
        wrapper: &[&str],
        args: &[String],
        envs: &[(&str, &str)],
        http: SocketAddr,
        tunnel: Option<SocketAddr>,
        state_dir: PathBuf,
    ) -> Daemon {
        let notify_path = tmp.path().join("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
        let log_path = tmp.path().join("daemon.log");
        let log = std::fs::File::create(&log_path).expect("log file");
        let mut command = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = command
            .args(args)
            .env("NOTIFY_SOCKET", &notify_path)
            .env("RUST_LOG", "info,tunneld=debug")
            .env_remove("JOURNAL_STREAM")
            .env_remove("WATCHDOG_USEC")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn tunneld");
        Daemon { child, notify, notify_path, http, tunnel, state_dir, _tmp: tmp, log_path }
    }

    /// Blocks until a notify datagram contains `needle`; panics with the daemon's
    /// log after `timeout`.
    pub fn wait_for_notify(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buf = [0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("timed out waiting for notify {needle:?}\n--- daemon log ---\n{}", self.log());
            }
            self.notify.set_read_timeout(Some(left.min(Duration::from_millis(500)))).unwrap();
            match self.notify.recv(&mut buf) {
                Ok(n) => {
                    let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                    if msg.lines().any(|l| l.starts_with(needle)) {
                        return msg;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    if let Ok(Some(status)) = self.child_status() {
                        panic!("daemon exited ({status}) while waiting for {needle:?}\n--- daemon log ---\n{}", self.log());
                    }
                }
                Err(e) => panic!("notify recv: {e}"),
            }
        }
    }

    fn child_status(&self) -> std::io::Result<Option<std::process::ExitStatus>> {
        // `try_wait` needs &mut; peek through /proc instead to keep `&self`.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()));
        match stat {
            Ok(s) if s.split_whitespace().nth(2) == Some("Z") => Ok(Some(std::process::ExitStatus::default())),
            Ok(_) => Ok(None),
            Err(_) => Ok(Some(std::process::ExitStatus::default())),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.http, path)
    }

    /// Sends SIGTERM and waits (bounded) for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id() as i32;
        // SAFETY-free: use the `kill` command rather than libc in tests.
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("daemon did not exit within 20 s of SIGTERM\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal by name (`HUP`, `TERM`, ...).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- daemon log ({}) ---\n{}", self.http, self.log());
        }
    }
}

/// Parsed JSON body plus status of an HTTP call; never panics on 4xx/5xx.
pub fn http(method: &str, url: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let req = ureq::request(method, url).timeout(Duration::from_secs(10));
    let res = match body {
        Some(b) => req.set("Content-Type", "application/json").send_string(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {url}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap_or_default();
    let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
    (status, json)
}

/// Creates a mapping through the API and asserts it succeeded.
pub fn create_mapping(server: &Daemon, source_port: u16, target: SocketAddr, use_tunnel: bool) -> serde_json::Value {
    let body = serde_json::json!({
        "source_port": source_port,
        "target_host": target.ip().to_string(),
        "target_port": target.port(),
        "use_tunnel": use_tunnel,
    });
    let (status, json) = http("POST", &server.url("/api/mapping/create"), Some(&body.to_string()));
    assert_eq!(status, 200, "create mapping: {json}");
    json
}

/// Creates a named tunnel client through the API and returns its secret (shown
/// only in this answer).
pub fn create_client(server: &Daemon, name: &str) -> String {
    let body = serde_json::json!({ "name": name }).to_string();
    let (status, json) = http("POST", &server.url("/api/client/create"), Some(&body));
    assert_eq!(status, 200, "create client {name}: {json}");
    assert_eq!(json["data"]["name"], name, "{json}");
    json["data"]["secret"].as_str().unwrap_or_else(|| panic!("create client {name}: no secret in {json}")).to_string()
}

/// Creates a tunneled mapping served by the client named `client`; returns the
/// mapping as the API shows it.
pub fn create_tunneled_mapping(server: &Daemon, source_port: u16, target: SocketAddr, client: &str) -> serde_json::Value {
    let body = serde_json::json!({
        "source_port": source_port,
        "target_host": target.ip().to_string(),
        "target_port": target.port(),
        "use_tunnel": true,
        "client": client,
    });
    let (status, json) = http("POST", &server.url("/api/mapping/create"), Some(&body.to_string()));
    assert_eq!(status, 200, "create mapping for client {client}: {json}");
    json["data"].clone()
}

/// Fetches `/metrics` text.
pub fn metrics_text(d: &Daemon) -> String {
    ureq::get(&d.url("/metrics")).call().expect("GET /metrics").into_string().expect("metrics body")
}

/// Value of one sample in Prometheus text, e.g. `metric_value(t, "tunneld_mapping_bytes_total", &[("port","1"),("direction","sent")])`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_part) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
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

/// A TCP echo target; it half-closes after the visitor does.
pub fn echo_server() -> SocketAddr {
    target(|mut conn| {
        let mut reader = conn.try_clone().expect("clone");
        let _ = std::io::copy(&mut reader, &mut conn);
        let _ = conn.shutdown(std::net::Shutdown::Write);
    })
}

/// A server, plus a connected client when the test is about tunneled mappings.
pub fn server_and_client(secret: &str, use_tunnel: bool) -> (Daemon, Option<Daemon>) {
    let server = Daemon::server(secret, &[]);
    let client = use_tunnel.then(|| Daemon::client(&server, secret, &[]));
    (server, client)
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

/// Reads lines of a child's stream (used by tests that watch logs).
pub fn read_lines(r: impl Read) -> Vec<String> {
    BufReader::new(r).lines().map_while(Result::ok).collect()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics with `what` after
/// `timeout`. For conditions the daemon has no event for (a counter reaching a
/// value); never a fixed sleep.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A config file with `text` in a fresh temp dir (kept alive by the returned guard).
pub fn config_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tunneld.toml");
    std::fs::write(&path, text).expect("write config");
    let path = path.display().to_string();
    (dir, path)
}

/// `n` random bytes.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut v);
    v
}

/// SHA-256 of `data`, for comparing what arrived with what was sent.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// `data` field of a successful envelope from GET `path`.
pub fn get_data(d: &Daemon, path: &str) -> serde_json::Value {
    let (status, json) = http("GET", &d.url(path), None);
    assert_eq!(status, 200, "GET {path}: {json}");
    assert_eq!(json["success"], true, "GET {path}: {json}");
    json["data"].clone()
}
