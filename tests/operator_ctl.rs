//! What a newcomer meets on the command line (issue 19, section 7): `ctl --api`
//! in the `host:port` form every other flag takes, refusals phrased in ctl's own
//! flags (`--token`, `--force`, `ctl client create`, "did you mean"), `ctl
//! update` and `ctl create --description`, the description in `ctl list`, the
//! monitor page's URL in the ready line, the generated secret file, and `ctl
//! top` in a real 80x24 terminal (tmux).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const TOKEN: &str = "operator-ctl-token-0123456789";

/// `tunneld ctl --config <empty file> ARGS`: nothing from this host's
/// `/etc/tunneld` or environment leaks in.
fn ctl(args: &[&str]) -> Output {
    let (_dir, config) = config_file("");
    Command::new(BIN)
        .arg("ctl")
        .arg("--config")
        .arg(&config)
        .args(args)
        .env_remove("TUNNELD_API__TOKEN")
        .env_remove("TUNNELD_API__LISTEN")
        .output()
        .expect("run tunneld ctl")
}

/// `ctl --api <server's URL> ARGS`.
fn ctl_at(server: &Daemon, args: &[&str]) -> Output {
    let api = server.url("");
    let mut all = vec!["--api", api.as_str()];
    all.extend_from_slice(args);
    ctl(&all)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The line of a table that starts with `port`.
fn row(table: &str, port: u16) -> String {
    table.lines().find(|l| l.split_whitespace().next() == Some(&port.to_string())).unwrap_or_default().to_string()
}

#[test]
fn ctl_takes_the_api_as_host_port_or_as_a_url() {
    let server = Daemon::server("s3cret", &[]);
    let wildcard = format!("0.0.0.0:{}", server.http.port());
    for api in [server.http.to_string(), server.url(""), server.url("/"), wildcard] {
        let out = ctl(&["--api", &api, "list"]);
        assert!(out.status.success(), "--api {api}: {}", stderr(&out));
        assert!(stdout(&out).contains("0 mapping(s)"), "--api {api}: {}", stdout(&out));
    }
    let nonsense = ctl(&["--api", "ftp://example.com", "list"]);
    assert_eq!(nonsense.status.code(), Some(2), "a usage error: {}", stderr(&nonsense));
    assert!(stderr(&nonsense).contains("HOST:PORT"), "{}", stderr(&nonsense));
}

#[test]
fn refusals_name_ctl_flags_not_api_fields() {
    let server = Daemon::server("s3cret", &["--api-token", TOKEN]);

    // No token: the advice is ctl's flag and variable, not an HTTP header.
    let refused = ctl_at(&server, &["list"]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("--token"), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("TUNNELD_API__TOKEN"), "{}", stderr(&refused));
    assert!(!stderr(&refused).contains("Authorization"), "{}", stderr(&refused));
    let wrong = ctl_at(&server, &["--token", "not-the-token-at-all", "list"]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(stderr(&wrong).contains("invalid API token") && stderr(&wrong).contains("--token"), "{}", stderr(&wrong));
    let listed = ctl_at(&server, &["--token", TOKEN, "list"]);
    assert!(listed.status.success(), "{}", stderr(&listed));

    // A client still used by a mapping: the way out is --force.
    let created = ctl_at(&server, &["--token", TOKEN, "client", "create", "office"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let port = free_port();
    let target = format!("127.0.0.1:{}", free_port());
    let mapped = ctl_at(&server, &["--token", TOKEN, "create", &port.to_string(), &target, "--tunnel", "--client", "office"]);
    assert!(mapped.status.success(), "{}", stderr(&mapped));
    let in_use = ctl_at(&server, &["--token", TOKEN, "client", "remove", "office"]);
    assert_eq!(in_use.status.code(), Some(1));
    let text = stderr(&in_use);
    assert!(text.contains("--force") && text.contains(&port.to_string()), "{text}");
    assert!(!text.contains("\"force\": true"), "{text}");

    // An unknown client name: the closest one, and how to create it with ctl.
    let other = free_port().to_string();
    let typo = ctl_at(&server, &["--token", TOKEN, "create", &other, &target, "--tunnel", "--client", "ofice"]);
    assert_eq!(typo.status.code(), Some(1));
    let text = stderr(&typo);
    assert!(text.contains("did you mean \"office\"?"), "{text}");
    assert!(text.contains("tunneld ctl client create ofice"), "{text}");
    assert!(!text.contains("/api/client/create"), "{text}");
    let typo = ctl_at(&server, &["--token", TOKEN, "client", "remove", "offce"]);
    assert_eq!(typo.status.code(), Some(1));
    assert!(stderr(&typo).contains("did you mean \"office\"?"), "{}", stderr(&typo));
}

#[test]
fn ctl_update_changes_what_it_is_given_and_removes_what_it_is_told() {
    let server = Daemon::server("s3cret", &[]);
    let port = free_port();
    let p = port.to_string();
    let target = format!("127.0.0.1:{}", free_port());

    let created = ctl_at(&server, &["create", &p, &target, "--description", "lab ssh"]);
    assert!(created.status.success(), "{}", stderr(&created));
    let listed = stdout(&ctl_at(&server, &["list"]));
    assert!(listed.lines().next().unwrap_or_default().contains("DESCRIPTION"), "{listed}");
    assert!(row(&listed, port).contains("lab ssh"), "{listed}");

    let mapping = || listed_mapping(&server, port).expect("the mapping");
    let update = |args: &[&str]| {
        let mut all = vec!["update", p.as_str()];
        all.extend_from_slice(args);
        ctl_at(&server, &all)
    };

    // Units round-trip exactly: 8 Mbit/s is 1,000,000 B/s, 300 MB is 3e8 bytes.
    let out = update(&["--bandwidth-limit", "8Mbit/s", "--quota", "300MB/month:block"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = mapping();
    assert_eq!(m["bandwidth_limit"], 1_000_000, "{m}");
    assert_eq!(m["quota"], json!({"bytes": 300_000_000u64, "period": "month", "action": "block"}), "{m}");
    assert_eq!(m["description"], "lab ssh", "untouched: {m}");
    assert!(stdout(&out).contains("1000000 B/s"), "says what it stored: {}", stdout(&out));

    let out = update(&["--allow", "10.0.0.0/8,192.168.1.7", "--deny", "10.9.0.0/16", "--bandwidth-limit", "1.5MiB"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = mapping();
    assert_eq!(m["allow"], json!(["10.0.0.0/8", "192.168.1.7/32"]), "{m}");
    assert_eq!(m["deny"], json!(["10.9.0.0/16"]), "{m}");
    assert_eq!(m["bandwidth_limit"], 1_572_864, "{m}");
    assert_eq!(m["quota"]["bytes"], 300_000_000u64, "untouched: {m}");

    let out = update(&["--no-description", "--no-bandwidth-limit"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = mapping();
    assert!(m["description"].is_null() && m["bandwidth_limit"].is_null(), "{m}");
    assert_eq!(m["allow"], json!(["10.0.0.0/8", "192.168.1.7/32"]), "untouched: {m}");
    assert_eq!(m["quota"]["action"], "block", "untouched: {m}");

    let out = update(&["--no-quota", "--no-allow", "--no-deny"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let m = mapping();
    assert!(m["quota"].is_null(), "{m}");
    assert_eq!((m["allow"].clone(), m["deny"].clone()), (json!([]), json!([])), "{m}");

    // Usage errors (exit 2) before any request.
    for bad in [
        vec![],
        vec!["--bandwidth-limit", "1.5B"],
        vec!["--bandwidth-limit", "fast"],
        vec!["--quota", "300MB"],
        vec!["--description", "x", "--no-description"],
    ] {
        let out = update(&bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {}", stderr(&out));
    }
    let missing = ctl_at(&server, &["update", &free_port().to_string(), "--description", "x"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(stderr(&missing).contains("no mapping on port"), "{}", stderr(&missing));
}

#[test]
fn the_ready_line_gives_the_monitor_page_url() {
    let server = Daemon::server("s3cret", &[]);
    let log = server.wait_for_log("tunneld server ready", Duration::from_secs(10));
    let ready = log.lines().find(|l| l.contains("tunneld server ready")).unwrap_or_default();
    assert!(ready.contains(&format!("http://{}/api/stats/monitor", server.http)), "{ready}");
}

#[test]
fn the_generated_secret_file_ends_with_a_newline_and_old_files_still_work() {
    let server = Daemon::server("", &[]);
    let text = std::fs::read_to_string(server.state_dir.join("secret")).expect("the generated secret");
    assert!(text.ends_with('\n'), "{text:?}");
    assert_eq!(text.trim_end().len(), 64, "{text:?}");
    let _client = Daemon::client(&server, text.trim_end(), &[]);

    // A file written by an earlier version, without the newline, still serves.
    let state = tempfile::tempdir().unwrap();
    std::fs::write(state.path().join("secret"), "an-old-secret-without-newline").unwrap();
    let old = Daemon::server_with_state(state.path(), "", &[]);
    let _client = Daemon::client(&old, "an-old-secret-without-newline", &[]);
    assert_eq!(std::fs::read_to_string(state.path().join("secret")).unwrap(), "an-old-secret-without-newline");
}

/// A tmux server of its own (`-L`), killed with the test.
struct Tmux {
    socket: String,
}

impl Tmux {
    /// `command` in a detached session `top` of `width` x `height`.
    fn start(name: &str, width: u16, height: u16, command: &str) -> Tmux {
        let tmux = Tmux { socket: format!("tunneld-{name}-{}", std::process::id()) };
        let (w, h) = (width.to_string(), height.to_string());
        let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", &w, "-y", &h, command]);
        assert!(started.status.success(), "tmux: {}", stderr(&started));
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("run tmux")
    }

    /// The pane's text with wrapped lines joined (`-J`): a line wider than the
    /// terminal shows as one long line, not as two.
    fn screen(&self) -> String {
        stdout(&self.run(&["capture-pane", "-p", "-J", "-t", "top"]))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Writes `chunk` bytes to `port` every `every` until the returned flag is set;
/// the echo that comes back is drained.
fn steady_transfer(port: u16, chunk: usize, every: Duration) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let mut reader = conn.try_clone().expect("clone");
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
        });
        let bytes = vec![7u8; chunk];
        while !flag.load(Ordering::Relaxed) {
            conn.write_all(&bytes).expect("write");
            std::thread::sleep(every);
        }
    });
    (stop, handle)
}

/// `ctl top` against `server` in an 80x24 tmux pane, refreshing every 0.3 s.
fn top_in_tmux(server: &Daemon, name: &str) -> Tmux {
    let (dir, config) = config_file("");
    let command = format!("{BIN} ctl --api {} --config {config} top --interval 0.3; sleep 60", server.url(""));
    let tmux = Tmux::start(name, 80, 24, &command);
    // The config file must outlive the start of ctl: keep its dir until the screen is up.
    wait_for("the top screen", Duration::from_secs(15), || tmux.screen().contains("tunneld top").then_some(()));
    drop(dir);
    tmux
}

/// Where each header word starts on the header line (`PORT TARGET ...`).
fn column_starts(screen: &str) -> Vec<usize> {
    let header = screen.lines().find(|l| l.starts_with("PORT")).unwrap_or_default();
    let mut starts = Vec::new();
    let mut previous = ' ';
    for (i, c) in header.chars().enumerate() {
        if c != ' ' && previous == ' ' {
            starts.push(i);
        }
        previous = c;
    }
    starts
}

/// `HH:MM:SS` somewhere in the first line.
fn clock(screen: &str) -> Option<String> {
    let first: Vec<char> = screen.lines().next()?.chars().collect();
    first.windows(8).find_map(|w| {
        let ok = w.iter().enumerate().all(|(i, c)| if i == 2 || i == 5 { *c == ':' } else { c.is_ascii_digit() });
        ok.then(|| w.iter().collect())
    })
}

#[test]
fn ctl_top_fits_80_columns_keeps_its_layout_and_shows_totals_clients_and_a_clock() {
    if tools::external_tool("tmux", "ctl_top_fits_80_columns_keeps_its_layout_and_shows_totals_clients_and_a_clock").is_none() {
        return;
    }
    let server = Daemon::server("s3cret", &[]);
    let office = create_client(&server, "office");
    let _office = Daemon::client(&server, &office, &["--name", "office"]);
    let target = echo_server();
    let (low, high) = {
        let (a, b) = (free_port(), free_port());
        (a.min(b), a.max(b))
    };
    // A long target name must be cut, not wrap the line.
    let (status, json) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": low, "target_host": "a-rather-long-target-host-name.internal.example.com", "target_port": 22, "use_tunnel": true, "client": "office"}),
    );
    assert_eq!(status, 200, "{json}");
    create_mapping(&server, high, target, false);
    // Traffic on the higher port only: a busiest-first order would put it on top.
    let (stop, sender) = steady_transfer(high, 32 * 1024, Duration::from_millis(20));

    let tmux = top_in_tmux(&server, "top80");
    let first = wait_for("a screen with a live rate on the busy mapping", Duration::from_secs(20), || {
        let screen = tmux.screen();
        (row(&screen, high).contains("KiB") || row(&screen, high).contains("MiB")).then_some(screen)
    });
    let first_clock = clock(&first).unwrap_or_else(|| panic!("a clock in the header:\n{first}"));
    let second = wait_for("a later refresh (another second on the clock)", Duration::from_secs(10), || {
        let screen = tmux.screen();
        clock(&screen).filter(|c| *c != first_clock).map(|_| screen)
    });
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();

    for screen in [&first, &second] {
        for line in screen.lines() {
            assert!(line.chars().count() <= 80, "a line wider than the terminal ({} columns):\n{screen}", line.chars().count());
        }
        assert!(screen.contains("1 of 2 clients connected"), "{screen}");
        let low_at = screen.lines().position(|l| l.starts_with(&low.to_string()));
        let high_at = screen.lines().position(|l| l.starts_with(&high.to_string()));
        assert!(matches!((low_at, high_at), (Some(l), Some(h)) if l < h), "rows by port:\n{screen}");
        assert!(screen.lines().any(|l| l.starts_with("TOTAL")), "a totals line:\n{screen}");
        assert!(row(screen, low).contains('…'), "the long target is cut:\n{screen}");
    }
    assert_eq!(column_starts(&first), column_starts(&second), "columns stay put:\n{first}\n{second}");
    assert!(column_starts(&first).len() >= 6, "{first}");
}

#[test]
fn ctl_top_shows_a_moving_rate_for_a_slow_steady_transfer() {
    if tools::external_tool("tmux", "ctl_top_shows_a_moving_rate_for_a_slow_steady_transfer").is_none() {
        return;
    }
    let server = Daemon::server("s3cret", &[]);
    let target = echo_server();
    let port = free_port();
    create_mapping(&server, port, target, false);
    // 3,000 bytes every 0.7 s: slower than the 0.3 s refresh, steady over seconds.
    let (stop, sender) = steady_transfer(port, 3000, Duration::from_millis(700));
    let tmux = top_in_tmux(&server, "topslow");
    wait_for("a first non-zero rate", Duration::from_secs(20), || {
        let line = row(&tmux.screen(), port);
        (line.contains("KiB") && !line.contains(" 0 B")).then_some(())
    });
    // From then on, for 3 s (10 refreshes), the rate never drops to zero.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        let screen = tmux.screen();
        let line = row(&screen, port);
        assert!(!line.is_empty() && !line.contains(" 0 B"), "a zero rate while bytes move:\n{screen}");
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
}
