//! Spawning `tunneld` servers and clients on free loopback ports, each with its
//! own state dir and `NOTIFY_SOCKET`, and waiting on that socket for the
//! daemon's own readiness (`READY=1`, `STATUS=connected`) rather than sleeping.

use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::net::{free_port, loopback};

pub const BIN: &str = env!("CARGO_BIN_EXE_tunneld");

/// A running `tunneld` process whose stderr is collected and which is killed on drop.
pub struct Daemon {
    pub child: Child,
    pub notify: UnixDatagram,
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
        Self::start_server(tmp, state_dir, Listen::fresh(), secret, extra, envs, &[])
    }

    /// Starts `tunneld server` through `wrapper` (e.g. `nsenter --net=PATH --`, to
    /// run it on another network host) with its tunnel on `tunnel`; waits for `READY=1`.
    pub fn server_wrapped(wrapper: &[String], tunnel: SocketAddr, secret: &str, envs: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state_dir = tmp.path().join("state");
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        Self::start_server(tmp, state_dir, Listen { api: None, tunnel: Some(tunnel) }, secret, &[], envs, &wrapper)
    }

    /// Starts `tunneld client` through `wrapper` against `server`'s tunnel, pinning
    /// its certificate; waits for `READY=1` only.
    pub fn client_wrapped(wrapper: &[String], server: &Daemon, secret: &str) -> Daemon {
        let pin = server.fingerprint();
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        Self::start_client(server.tunnel.expect("a server has a tunnel address"), secret, &["--fingerprint", &pin], &[], &wrapper)
    }

    /// Like [`Daemon::server`], run under `prlimit --nofile=SOFT:HARD`: a real
    /// descriptor limit on the real process.
    pub fn server_with_nofile(soft: u64, hard: u64, secret: &str, extra: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state_dir = tmp.path().join("state");
        let limit = format!("--nofile={soft}:{hard}");
        Self::start_server(tmp, state_dir, Listen::fresh(), secret, extra, &[], &["prlimit", &limit, "--"])
    }

    /// Like [`Daemon::server`], with the state directory on a tmpfs of its own
    /// of `size_kib` KiB: a disk that fills up. The tmpfs is mounted in a user
    /// and mount namespace of the daemon's own (`unshare -Urm`), so no privilege
    /// is needed; the test reaches its files through [`Daemon::state_file`].
    /// `None`, after a loud SKIPPED, where user namespaces are not available.
    pub fn server_on_small_disk(size_kib: u64, secret: &str, extra: &[&str]) -> Option<Daemon> {
        let test = "server_on_small_disk";
        super::tools::external_tool("unshare", test)?;
        let probe = Command::new("unshare").args(["-Urm", "true"]).stderr(Stdio::null()).status();
        if !probe.is_ok_and(|s| s.success()) {
            if std::env::var("CI_REQUIRE_TOOLS").as_deref() == Ok("1") {
                panic!("{test}: `unshare -Urm` (user namespaces) is not available and CI_REQUIRE_TOOLS=1");
            }
            eprintln!("\n*** SKIPPED {test}: `unshare -Urm` (user namespaces) is not available ***\n");
            return None;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let state_dir = tmp.path().join("state");
        // `$0` is the daemon's path, `$@` its arguments (see `spawn`); `exec`
        // keeps the child's pid the daemon's.
        let script = format!(
            "mkdir -p '{dir}' && mount -t tmpfs -o size={size_kib}k tmpfs '{dir}' && exec \"$0\" \"$@\"",
            dir = state_dir.display()
        );
        Some(Self::start_server(tmp, state_dir, Listen::fresh(), secret, extra, &[], &["unshare", "-Urm", "sh", "-c", &script]))
    }

    /// Like [`Daemon::server`], run as under systemd with its stderr connected
    /// to the journal: `JOURNAL_STREAM` names the daemon's stderr (set by a
    /// shell that then execs it, as systemd sets it for a unit), and its
    /// journal entries go to `journal_socket` (`TUNNELD_JOURNAL_SOCKET`, the
    /// daemon's test-only override of journald's socket), where the test reads
    /// them in the native protocol.
    pub fn server_in_journal(secret: &str, extra: &[&str], journal_socket: &Path) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state_dir = tmp.path().join("state");
        let socket = journal_socket.display().to_string();
        let envs = [("TUNNELD_JOURNAL_SOCKET", socket.as_str())];
        let script = "JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2); export JOURNAL_STREAM; exec \"$0\" \"$@\"";
        Self::start_server(tmp, state_dir, Listen::fresh(), secret, extra, &envs, &["sh", "-c", script])
    }

    /// `name` in the state directory as the daemon sees it: through
    /// `/proc/PID/root`, which also reaches into mounts of its own namespace
    /// (see [`Daemon::server_on_small_disk`]).
    pub fn state_file(&self, name: &str) -> PathBuf {
        let inside = self.state_dir.join(name);
        PathBuf::from(format!("/proc/{}/root{}", self.child.id(), inside.display()))
    }

    /// Like [`Daemon::server`] but reuses `state_dir` (to test restarts).
    pub fn server_with_state(state_dir: &Path, secret: &str, extra: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        Self::start_server(tmp, state_dir.to_path_buf(), Listen::fresh(), secret, extra, &[], &[])
    }

    /// [`Daemon::server_with_state`] with extra environment variables.
    pub fn server_with_state_env(state_dir: &Path, secret: &str, extra: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        Self::start_server(tmp, state_dir.to_path_buf(), Listen::fresh(), secret, extra, envs, &[])
    }

    /// A server restarted in place: same state dir and same tunnel address, so a
    /// running client finds it again.
    pub fn server_restarted(state_dir: &Path, tunnel: SocketAddr, secret: &str) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        Self::start_server(tmp, state_dir.to_path_buf(), Listen { api: None, tunnel: Some(tunnel) }, secret, &[], &[], &[])
    }

    /// A server restarted on the API address of one that stopped (same state
    /// dir, a fresh tunnel port): what a page that watched the first one finds
    /// when it reconnects.
    pub fn server_restarted_on_api(state_dir: &Path, api: SocketAddr, secret: &str) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        Self::start_server(tmp, state_dir.to_path_buf(), Listen { api: Some(api), tunnel: None }, secret, &[], &[], &[])
    }

    /// Starts `tunneld server` on `listen`'s addresses (free ports where `None`)
    /// with `state_dir`, the secret unless empty, then `extra`; `wrapper` as in
    /// [`Daemon::spawn`]. Waits for `READY=1`.
    fn start_server(
        tmp: tempfile::TempDir,
        state_dir: PathBuf,
        listen: Listen,
        secret: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Daemon {
        let api = listen.api.unwrap_or_else(|| loopback(free_port()));
        let tunnel = listen.tunnel.unwrap_or_else(|| loopback(free_port()));
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
        let d = Self::spawn(tmp, wrapper, &args, envs, api, Some(tunnel), state_dir);
        d.wait_for_notify("READY=1", Duration::from_secs(20));
        d
    }

    /// Starts `tunneld` with exactly `args` (nothing added) and waits for
    /// `READY=1`; `http` is where the test reaches its API or metrics.
    pub fn with_args(args: &[&str], http: SocketAddr) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = tmp.path().to_path_buf();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let d = Self::spawn(tmp, &[], &args, &[], http, None, state);
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
        Self::start_client(server_tunnel, secret, extra, envs, &[])
    }

    /// Like [`Daemon::client`], run under `prlimit --nofile=SOFT:HARD`: a real
    /// descriptor limit on the real process.
    pub fn client_with_nofile(soft: u64, hard: u64, server: &Daemon, secret: &str) -> Daemon {
        let pin = server.fingerprint();
        let limit = format!("--nofile={soft}:{hard}");
        let tunnel = server.tunnel.expect("a server has a tunnel address");
        let d = Self::start_client(tunnel, secret, &["--fingerprint", &pin], &[], &["prlimit", &limit, "--"]);
        d.wait_for_notify("STATUS=connected", Duration::from_secs(20));
        d
    }

    /// Starts `tunneld client` against `server_tunnel` with `extra` added;
    /// `wrapper` as in [`Daemon::spawn`]. Waits for `READY=1`.
    fn start_client(server_tunnel: SocketAddr, secret: &str, extra: &[&str], envs: &[(&str, &str)], wrapper: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().expect("tempdir");
        let metrics: SocketAddr = loopback(free_port());
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
        let d = Self::spawn(tmp, wrapper, &args, envs, metrics, None, state);
        d.wait_for_notify("READY=1", Duration::from_secs(20));
        d
    }

    /// How many descriptors the daemon process has open now (`/proc/PID/fd`).
    pub fn open_descriptors(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map(|d| d.count()).unwrap_or(0)
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

    /// Spawns the daemon with `args`, its notify socket and log in `tmp`.
    /// `wrapper` (e.g. `prlimit ... --`, or nothing) runs first and execs the
    /// daemon, so the child's pid is the daemon's.
    fn spawn(
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
        Daemon { child, notify, http, tunnel, state_dir, _tmp: tmp, log_path }
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

    /// Waits until the daemon's log contains `needle` and returns the whole log;
    /// panics after `timeout`. For what the daemon only says in its log (a
    /// refusal, a warning); its state changes come through [`Daemon::wait_for_notify`].
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        super::wait_for(&format!("log line {needle:?}"), timeout, || {
            let log = self.log();
            log.contains(needle).then_some(log)
        })
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

/// Where a server listens; `None` picks a free loopback port.
#[derive(Clone, Copy)]
struct Listen {
    api: Option<SocketAddr>,
    tunnel: Option<SocketAddr>,
}

impl Listen {
    fn fresh() -> Listen {
        Listen { api: None, tunnel: None }
    }
}

/// A server, plus a connected client when the test is about tunneled mappings.
pub fn server_and_client(secret: &str, use_tunnel: bool) -> (Daemon, Option<Daemon>) {
    let server = Daemon::server(secret, &[]);
    let client = use_tunnel.then(|| Daemon::client(&server, secret, &[]));
    (server, client)
}
