//! A real systemd, booted as PID 1 of its own PID, mount, UTS and network
//! namespaces, for tests of the Debian package as an operator runs it.
//!
//! What it must never do is touch the machine it runs on:
//! - at boot `systemd-tmpfiles` empties `/tmp` (`D /tmp` in `tmp.conf`), so a
//!   private tmpfs is mounted on `/tmp` and `/run` before systemd starts;
//! - `dpkg -i` writes to `/etc`, `/usr` and `/var`, so each is an overlay whose
//!   upper layer is a scratch directory: everything the package and the services
//!   write disappears with the namespace, and the host's package database never
//!   learns of it;
//! - it boots `basic.target` only, so nothing of `multi-user.target` (a Prometheus
//!   installed by apt, say) starts inside.
//!
//! Files the test hands in appear at `/var/local/harness` inside (a bind mount of
//! a scratch directory, so they may be added after boot). The booted systemd
//! shares the host's cgroup hierarchy, so only one runs at a time: [`Host::boot`]
//! holds a lock file for the host's lifetime. Dropping the [`Host`] kills its
//! PID 1, and everything inside dies with it.
//!
//! It needs root, `unshare`, `nsenter` and systemd; without them it skips
//! loudly, and with `CI_REQUIRE_TOOLS=1` it fails instead.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Where the files given with [`Host::share`] appear inside.
pub const SHARED: &str = "/var/local/harness";

/// A booted systemd in its own namespaces.
pub struct Host {
    /// systemd's pid as the host sees it (PID 1 inside).
    pid: i32,
    unshare: Child,
    scratch: tempfile::TempDir,
    _one_at_a_time: File,
}

impl Host {
    /// Boots systemd to `basic.target` in fresh namespaces, with only a loopback
    /// interface (so the packaged default ports cannot collide with anything), and
    /// waits until it has finished starting up. `None` (after a SKIPPED banner)
    /// where it cannot run.
    pub fn boot(test: &str) -> Option<Host> {
        let systemd = Path::new("/lib/systemd/systemd");
        let missing = if unsafe { libc::geteuid() } != 0 {
            Some("root (namespaces and mounts)".to_string())
        } else if !systemd.is_file() {
            Some("systemd (/lib/systemd/systemd)".to_string())
        } else {
            ["unshare", "nsenter", "dpkg-deb"]
                .into_iter()
                .find(|tool| super::tools::find_tool(tool).is_none())
                .map(|tool| format!("`{tool}`"))
        };
        if let Some(missing) = missing {
            super::tools::skip_or_fail(test, &missing);
            return None;
        }

        let lock = File::create(std::env::temp_dir().join("tunneld-test-systemd.lock")).expect("create the harness lock file");
        // SAFETY: flock on a descriptor this function owns.
        let locked = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(locked, 0, "flock the systemd harness lock: {}", std::io::Error::last_os_error());

        let scratch = tempfile::Builder::new().prefix("tunneld-systemd-").tempdir().expect("scratch dir");
        let root = scratch.path();
        std::fs::create_dir_all(root.join("shared")).expect("shared dir");
        let mut script = String::from("set -e\nmount --make-rprivate /\n");
        for dir in ["etc", "usr", "var"] {
            let (upper, work) = (root.join(format!("{dir}.upper")), root.join(format!("{dir}.work")));
            std::fs::create_dir_all(&upper).expect("overlay upper dir");
            std::fs::create_dir_all(&work).expect("overlay work dir");
            script +=
                &format!("mount -t overlay overlay -o lowerdir=/{dir},upperdir={},workdir={} /{dir}\n", upper.display(), work.display());
        }
        script += &format!("mkdir -p {SHARED}\nmount --bind {} {SHARED}\n", root.join("shared").display());
        // The journal of the host machine (if any) is not this one's.
        script += "rm -rf /var/log/journal/*\n";
        script += "mount -t tmpfs -o mode=1777 tmpfs /tmp\nmount -t tmpfs -o mode=755 tmpfs /run\n";
        script += "exec /lib/systemd/systemd --unit=basic.target\n";
        let console = File::create(root.join("console.log")).expect("console log");
        let unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--mount", "--mount-proc", "--uts", "--net", "--", "/bin/sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("console log"))
            .stderr(console)
            .spawn()
            .expect("spawn unshare");
        let unshare_pid = unshare.id();
        let pid = super::wait_for("systemd to start in its namespace", Duration::from_secs(20), || {
            let children = std::fs::read_to_string(format!("/proc/{unshare_pid}/task/{unshare_pid}/children")).ok()?;
            let pid: i32 = children.split_whitespace().next()?.parse().ok()?;
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
            (comm.trim() == "systemd").then_some(pid)
        });
        let host = Host { pid, unshare, scratch, _one_at_a_time: lock };
        // The manager's socket appears a moment after exec; then `--wait` blocks
        // until start-up has finished.
        super::wait_for("systemd's private bus socket", Duration::from_secs(20), || {
            host.sh("test -S /run/systemd/private").status.success().then_some(())
        });
        let booted = host.sh("timeout 60 systemctl is-system-running --wait");
        let state = String::from_utf8_lossy(&booted.stdout).trim().to_string();
        assert!(
            state == "running",
            "systemd in the namespace did not come up (state {state:?}); failed units:\n{}\nconsole:\n{}",
            host.sh_out("systemctl --failed --no-pager"),
            std::fs::read_to_string(host.scratch.path().join("console.log")).unwrap_or_default()
        );
        Some(host)
    }

    /// Runs `script` with `/bin/sh -c` inside every namespace of the host, as root.
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-a", "--", "/bin/sh", "-c", script])
            .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("TUNNELD_API__TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run nsenter")
    }

    /// Runs `script` and returns its stdout and stderr together, whatever its exit.
    pub fn sh_out(&self, script: &str) -> String {
        let out = self.sh(script);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    /// Runs `script`, which must succeed; returns its stdout. On failure it panics
    /// with the output and the end of the journal.
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        if !out.status.success() {
            panic!(
                "inside the systemd host, `{script}` failed ({}):\n{}{}\n--- journal (last 60 lines) ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.sh_out("journalctl --no-pager -n 60")
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Polls `script` every 100 ms until it succeeds; returns its stdout. Panics
    /// with `what` and the journal after `timeout`.
    pub fn wait_until(&self, what: &str, timeout: Duration, script: &str) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.sh(script);
            if out.status.success() {
                return String::from_utf8_lossy(&out.stdout).into_owned();
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for {what} (`{script}`: {}{})\n--- journal (last 80 lines) ---\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr),
                    self.sh_out("journalctl --no-pager -n 80")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A unit's property (`systemctl show -p NAME --value`).
    pub fn property(&self, unit: &str, name: &str) -> String {
        self.ok(&format!("systemctl show -p {name} --value {unit}")).trim().to_string()
    }

    /// The unit's journal as `journalctl -u UNIT` shows it by default: what an
    /// operator reads.
    pub fn journal(&self, unit: &str) -> String {
        self.ok(&format!("journalctl -u {unit} --no-pager -o short"))
    }

    /// Copies `file` into the host, at `/var/local/harness/NAME`, and returns that path.
    pub fn share(&self, file: &Path, name: &str) -> String {
        std::fs::copy(file, self.scratch.path().join("shared").join(name)).expect("copy a file into the systemd host");
        format!("{SHARED}/{name}")
    }

    /// Writes `text` into the host at `/var/local/harness/NAME` and returns that path.
    pub fn share_text(&self, name: &str, text: &str) -> String {
        std::fs::write(self.scratch.path().join("shared").join(name), text).expect("write a file for the systemd host");
        format!("{SHARED}/{name}")
    }

    /// systemd's pid as the machine sees it.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The host's network namespace, for sockets opened from the test
    /// (see [`super::netns::NetNs`]).
    pub fn net_namespace(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/ns/net", self.pid))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // SAFETY: signals a process this harness started; killing a namespace's
        // PID 1 ends every process in it.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = self.unshare.wait();
    }
}
