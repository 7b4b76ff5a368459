//! `tunneld ctl` against a real server: every subcommand's output, the API's own
//! message and a non-zero exit on refusal, the token from the environment or the
//! config file, and `ctl top` driven in a real pseudo-terminal (tmux).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

const TOKEN: &str = "ctl-test-token-0123456789";

/// Runs `tunneld ctl --api <server> --config <file> ARGS` with `envs`.
fn ctl(server: &Daemon, config: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    Command::new(BIN)
        .arg("ctl")
        .arg("--api")
        .arg(server.url(""))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("TUNNELD_API__TOKEN")
        .envs(envs.iter().copied())
        .output()
        .expect("run tunneld ctl")
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
fn ctl_creates_lists_reports_and_removes_mappings() {
    let server = Daemon::server("s3cret", &[]);
    let (_dir, config) = config_file("");
    let config = Path::new(&config);
    let target = echo_server();
    let port = free_port();
    let target_arg = format!("127.0.0.1:{}", target.port());

    let created = ctl(&server, config, &["create", &port.to_string(), &target_arg], &[]);
    assert!(created.status.success(), "create: {}", stderr(&created));
    assert!(
        stdout(&created).contains(&format!("mapping created: port {port} -> {target_arg} (direct), status active")),
        "{}",
        stdout(&created)
    );

    let listed = ctl(&server, config, &["list"], &[]);
    assert!(listed.status.success(), "list: {}", stderr(&listed));
    let line = row(&stdout(&listed), port);
    assert!(line.contains(&target_arg) && line.contains("direct") && line.contains("active"), "{}", stdout(&listed));
    assert!(stdout(&listed).contains("1 mapping(s)"));

    // 3,000 bytes each way: 2.9 KiB in the stats table, both columns.
    let payload = random_bytes(3000);
    assert_eq!(roundtrip(loopback(port), &payload), payload);
    let stats = wait_for("both directions counted", Duration::from_secs(10), || {
        let out = ctl(&server, config, &["stats"], &[]);
        assert!(out.status.success(), "stats: {}", stderr(&out));
        let text = stdout(&out);
        (row(&text, port).matches("2.9 KiB").count() == 2).then_some(text)
    });
    assert!(row(&stats, port).contains(&target_arg), "{stats}");
    assert!(stats.contains("total: sent 2.9 KiB, received 2.9 KiB"), "{stats}");

    // The server's refusal reaches the operator verbatim, with a non-zero exit.
    let again = ctl(&server, config, &["create", &port.to_string(), &target_arg], &[]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains(&format!("port {port} is already mapped")), "{}", stderr(&again));

    let removed = ctl(&server, config, &["remove", &port.to_string()], &[]);
    assert!(removed.status.success(), "remove: {}", stderr(&removed));
    assert!(stdout(&removed).contains(&format!("mapping on port {port} removed")));
    assert!(stdout(&ctl(&server, config, &["list"], &[])).contains("0 mapping(s)"));
    let missing = ctl(&server, config, &["remove", &port.to_string()], &[]);
    assert!(!missing.status.success());
    assert!(stderr(&missing).contains(&format!("no mapping on port {port}")), "{}", stderr(&missing));

    // Bad input is refused before any request (usage error, exit 2) or by the API.
    let bad_target = ctl(&server, config, &["create", &port.to_string(), "no-port"], &[]);
    assert!(!bad_target.status.success());
    assert!(stderr(&bad_target).contains("target must be HOST:PORT"), "{}", stderr(&bad_target));
    let zero = ctl(&server, config, &["create", "0", &target_arg], &[]);
    assert!(!zero.status.success());
    assert!(stderr(&zero).contains("source_port") && stderr(&zero).contains("between 1 and 65535 (got 0) (HTTP 400)"), "{}", stderr(&zero));
    let orphan_client = ctl(&server, config, &["create", &port.to_string(), &target_arg, "--client", "office"], &[]);
    assert_eq!(orphan_client.status.code(), Some(2), "--client without --tunnel is a usage error");
}

#[test]
fn ctl_creates_lists_and_removes_clients_and_maps_through_them() {
    let server = Daemon::server("s3cret", &[]);
    let (_dir, config) = config_file("");
    let config = Path::new(&config);

    let created = ctl(&server, config, &["client", "create", "office"], &[]);
    assert!(created.status.success(), "client create: {}", stderr(&created));
    let secret = stdout(&created)
        .lines()
        .map(str::trim)
        .find(|l| l.len() == 64 && l.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("a secret line in: {}", stdout(&created)))
        .to_string();
    let again = ctl(&server, config, &["client", "create", "office"], &[]);
    assert!(!again.status.success());
    assert!(stderr(&again).contains("already exists (HTTP 409)"), "{}", stderr(&again));

    let _office = Daemon::client(&server, &secret, &["--name", "office"]);
    let port = free_port();
    let target = echo_server();
    let target_arg = format!("127.0.0.1:{}", target.port());
    let mapped = ctl(&server, config, &["create", &port.to_string(), &target_arg, "--tunnel", "--client", "office"], &[]);
    assert!(mapped.status.success(), "create: {}", stderr(&mapped));
    assert!(stdout(&mapped).contains("(tunnel:office), status active"), "{}", stdout(&mapped));
    assert_eq!(roundtrip(loopback(port), b"via office"), b"via office");

    let listed = stdout(&ctl(&server, config, &["client", "list"], &[]));
    let office = listed.lines().find(|l| l.starts_with("office")).unwrap_or_default();
    assert!(office.contains(" connected") && office.contains("127.0.0.1:") && office.trim_end().ends_with('1'), "{listed}");
    let default = listed.lines().find(|l| l.starts_with("default")).unwrap_or_default();
    assert!(default.contains("not connected"), "{listed}");
    assert!(listed.contains("2 client(s)"), "{listed}");
    assert!(!listed.contains(&secret), "{listed}");

    let refused = ctl(&server, config, &["client", "remove", "office"], &[]);
    assert!(!refused.status.success());
    assert!(stderr(&refused).contains("(HTTP 409)"), "{}", stderr(&refused));
    let removed = ctl(&server, config, &["client", "remove", "office", "--force"], &[]);
    assert!(removed.status.success(), "{}", stderr(&removed));
    assert!(stdout(&removed).contains("client office removed; 1 mapping(s) wait"), "{}", stdout(&removed));
    assert!(stdout(&ctl(&server, config, &["client", "list"], &[])).contains("1 client(s)"));

    // The removal cut office's session: no event (it was on purpose); a client
    // that goes away on its own is one.
    let home_secret = stdout(&ctl(&server, config, &["client", "create", "home"], &[]))
        .lines()
        .map(str::trim)
        .find(|l| l.len() == 64)
        .unwrap_or_default()
        .to_string();
    let mut home = Daemon::client(&server, &home_secret, &["--name", "home"]);
    home.kill();
    let events = wait_for("a client_lost event in ctl events", Duration::from_secs(15), || {
        let out = ctl(&server, config, &["events", "--limit", "5"], &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let text = stdout(&out);
        text.lines()
            .any(|l| l.contains("client_lost") && l.contains("home") && l.contains("tunnel client home disconnected"))
            .then_some(text)
    });
    assert!(!events.contains("office"), "{events}");
    assert!(events.starts_with("TIME"), "{events}");
    let refused = ctl(&server, config, &["events", "--limit", "0"], &[]);
    assert_eq!(refused.status.code(), Some(2), "a usage error");
}

#[test]
fn ctl_takes_the_token_from_the_environment_or_the_config_file() {
    let server = Daemon::server("s3cret", &["--api-token", TOKEN]);
    let (_empty_dir, empty) = config_file("");
    let (_token_dir, with_token) = config_file(&format!("[api]\ntoken = \"{TOKEN}\"\n"));

    let refused = ctl(&server, Path::new(&empty), &["list"], &[]);
    assert_eq!(refused.status.code(), Some(1));
    assert!(stderr(&refused).contains("API token required"), "{}", stderr(&refused));

    let wrong = ctl(&server, Path::new(&empty), &["list"], &[("TUNNELD_API__TOKEN", "not-the-token-at-all")]);
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("invalid API token"), "{}", stderr(&wrong));

    let from_env = ctl(&server, Path::new(&empty), &["list"], &[("TUNNELD_API__TOKEN", TOKEN)]);
    assert!(from_env.status.success(), "{}", stderr(&from_env));
    let from_file = ctl(&server, Path::new(&with_token), &["list"], &[]);
    assert!(from_file.status.success(), "{}", stderr(&from_file));
    assert!(stdout(&from_file).contains("0 mapping(s)"));

    // The packaged layout: server.toml without the token, server.env beside it
    // with the unit's secrets.
    let (env_dir, bare) = config_file("[log]\nlevel = \"info\"\n");
    std::fs::write(env_dir.path().join("tunneld.env"), format!("TUNNELD_SERVER__SECRET=x\nTUNNELD_API__TOKEN=\"{TOKEN}\"\n")).unwrap();
    let from_env_file = ctl(&server, Path::new(&bare), &["list"], &[]);
    assert!(from_env_file.status.success(), "{}", stderr(&from_env_file));
}

#[test]
fn ctl_without_api_reads_api_listen_from_the_config() {
    let server = Daemon::server("s3cret", &[]);
    let (_dir, config) = config_file(&format!("[api]\nlisten = \"{}\"\n", server.http));
    let out = Command::new(BIN).args(["ctl", "--config", &config, "stats"]).env_remove("TUNNELD_API__TOKEN").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("total: sent 0 B, received 0 B"), "{}", stdout(&out));

    let unreachable = Command::new(BIN)
        .args(["ctl", "--config", &config, "--api", &format!("http://127.0.0.1:{}", free_port()), "list"])
        .output()
        .unwrap();
    assert_eq!(unreachable.status.code(), Some(1));
    assert!(stderr(&unreachable).contains("cannot reach the API"), "{}", stderr(&unreachable));
}

/// A tmux server of its own (`-L`), killed with the test.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux").arg("-L").arg(&self.socket).args(args).output().expect("run tmux")
    }

    fn screen(&self) -> String {
        stdout(&self.run(&["capture-pane", "-p", "-t", "top"]))
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn ctl_top_shows_live_rates_and_quits_on_q() {
    if tools::external_tool("tmux", "ctl_top_shows_live_rates_and_quits_on_q").is_none() {
        return;
    }
    let server = Daemon::server("s3cret", &[]);
    let target = echo_server();
    let port = free_port();
    create_mapping(&server, port, target, false);
    let (dir, config) = config_file("");
    let exit_file = dir.path().join("exit-code");

    let tmux = Tmux { socket: format!("tunneld-ctl-test-{}-{port}", std::process::id()) };
    // The shell creates the redirect target before `echo` writes to it, so the code is
    // written beside it and renamed into place: the test never reads a half-made file.
    let command = format!(
        "{BIN} ctl --api {} --config {config} top --interval 0.3; echo $? > {exit}.part && mv {exit}.part {exit}",
        server.url(""),
        exit = exit_file.display()
    );
    let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "160", "-y", "40", &command]);
    assert!(started.status.success(), "tmux: {}", stderr(&started));
    wait_for("the top screen with the mapping", Duration::from_secs(15), || {
        let screen = tmux.screen();
        (screen.contains("tunneld top") && row(&screen, port).contains(&format!("127.0.0.1:{}", target.port()))).then_some(())
    });

    // Steady traffic through the mapping until the screen shows a non-zero rate.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut conn = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            let mut reader = conn.try_clone().unwrap();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 * 1024];
                while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
            });
            let chunk = vec![7u8; 64 * 1024];
            while !stop.load(Ordering::Relaxed) {
                conn.write_all(&chunk).expect("write");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // Rates are in the SENT/s and RECV/s columns: the cells carry the unit.
    let screen = wait_for("a live rate in KiB or MiB (per second)", Duration::from_secs(20), || {
        let screen = tmux.screen();
        let line = row(&screen, port);
        (line.contains("KiB") || line.contains("MiB")).then_some(screen)
    });
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();
    assert!(screen.contains("1 mapping(s)"), "{screen}");

    let sent = tmux.run(&["send-keys", "-t", "top", "q"]);
    assert!(sent.status.success());
    let code = wait_for("ctl top to exit after q", Duration::from_secs(10), || std::fs::read_to_string(&exit_file).ok());
    assert_eq!(code.trim(), "0", "ctl top exit code");
}
