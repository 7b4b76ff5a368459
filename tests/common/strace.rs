//! `strace -c -f` on a running daemon: how many system calls of each kind it
//! made while a test drove it — counts fixed by the code, not by the load.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `strace -c -f` attached to one process, until [`Strace::finish`].
pub struct Strace {
    child: Child,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Strace {
    /// Attached to every thread of `pid` before it returns.
    pub fn attach(strace: &Path, pid: u32) -> Strace {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("counts.txt");
        let mut child = Command::new(strace)
            .args(["-c", "-f", "-o"])
            .arg(&out)
            .args(["-p", &pid.to_string()])
            .stderr(Stdio::piped())
            .spawn()
            .expect("run strace");
        // strace says so on stderr once it holds every thread.
        let mut stderr = BufReader::new(child.stderr.take().expect("strace stderr"));
        let mut line = String::new();
        loop {
            line.clear();
            let n = stderr.read_line(&mut line).expect("read strace's stderr");
            assert!(n > 0, "strace exited before attaching (is ptrace allowed here?)");
            if line.contains("attached") {
                break;
            }
        }
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Strace { child, out, _dir: dir }
    }

    /// Detaches and returns the calls made meanwhile, by name.
    pub fn finish(mut self) -> BTreeMap<String, u64> {
        let status = Command::new("kill").args(["-INT", &self.child.id().to_string()]).status().expect("run kill");
        assert!(status.success());
        self.child.wait().expect("strace to exit");
        let text = std::fs::read_to_string(&self.out).expect("strace's summary");
        let mut calls = BTreeMap::new();
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors,] syscall
            if fields.len() >= 5 && fields[0].parse::<f64>().is_ok() {
                if let (Ok(n), Some(name)) = (fields[3].parse::<u64>(), fields.last()) {
                    calls.insert(name.to_string(), n);
                }
            }
        }
        assert!(!calls.is_empty(), "no counts in strace's summary:\n{text}");
        calls
    }
}

/// Calls named `name` per unit of work (`units` visitors, MiB...).
pub fn per(calls: &BTreeMap<String, u64>, name: &str, units: usize) -> f64 {
    calls.get(name).copied().unwrap_or(0) as f64 / units as f64
}

/// Every call per unit of work, for a failing assertion's message.
pub fn table(calls: &BTreeMap<String, u64>, units: usize) -> String {
    calls
        .iter()
        .filter(|(name, _)| *name != "total")
        .map(|(name, n)| format!("{name} {:.2}", *n as f64 / units as f64))
        .collect::<Vec<_>>()
        .join(", ")
}
