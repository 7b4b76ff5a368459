//! One client on several servers (`client.servers`): it holds a session to
//! every server at once, so the same mapping declared on two servers survives
//! the loss of either. Two real servers, each with its own state dir,
//! certificate and fingerprint, declare the same mapping (same port, each on
//! its own loopback address through `server.bind_addr`) for the same client.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const SECRET: &str = "two servers, one client secret";
/// What a visitor of server A dials: the mapping port on A's address.
const A_HOST: &str = "127.0.0.1";
/// Server B binds its mappings on another loopback address, so both declare
/// the very same port.
const B_HOST: &str = "127.0.0.2";

/// A server whose mappings listen on `host` (`server.bind_addr`, from a
/// config file beside its state), with its state in `dir`, on `tunnel` (a
/// restart) or a fresh port.
fn server_on(host: &str, dir: &std::path::Path, tunnel: Option<SocketAddr>) -> Daemon {
    let config = dir.join("server.toml");
    std::fs::write(&config, format!("[server]\nbind_addr = \"{host}\"\n")).expect("write server.toml");
    let state = dir.join("state");
    let (api, tunnel) = (loopback(free_port()), tunnel.unwrap_or_else(|| loopback(free_port())));
    let args = [
        "server",
        "--config",
        &config.display().to_string(),
        "--api-listen",
        &api.to_string(),
        "--tunnel-listen",
        &tunnel.to_string(),
        "--state-dir",
        &state.display().to_string(),
        "--secret",
        SECRET,
    ]
    .map(|a| a.to_string());
    let mut server = Daemon::with_args(&args.iter().map(String::as_str).collect::<Vec<_>>(), api);
    server.tunnel = Some(tunnel);
    server.state_dir = state;
    server
}

/// `[[client.servers]]` entries for `servers` (address, fingerprint).
fn client_config(servers: &[(String, String)]) -> String {
    let mut text = format!("[client]\nname = \"default\"\nsecret = \"{SECRET}\"\npool_size = 2\n");
    for (address, fingerprint) in servers {
        text.push_str(&format!("\n[[client.servers]]\naddress = \"{address}\"\nfingerprint = \"{fingerprint}\"\n"));
    }
    text
}

/// Starts `tunneld client --config` with `servers`; waits for `READY=1` only.
fn start_client(servers: &[(String, String)]) -> (Daemon, tempfile::TempDir) {
    let (dir, path) = config_file(&client_config(servers));
    let metrics = loopback(free_port());
    let client = Daemon::with_args(&["client", "--config", &path, "--metrics-listen", &metrics.to_string()], metrics);
    (client, dir)
}

fn entry(server: &Daemon) -> (String, String) {
    (server.tunnel.expect("a server has a tunnel").to_string(), server.fingerprint())
}

/// One visitor through `host:port` to the echo target: `payload` comes back.
fn echo_at(host: &str, port: u16, payload: &[u8]) -> Result<(), String> {
    let addr: SocketAddr = format!("{host}:{port}").parse().map_err(|e| format!("{e}"))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
    s.write_all(payload).map_err(|e| format!("write {addr}: {e}"))?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).map_err(|e| format!("read {addr}: {e}"))?;
    (back == payload).then_some(()).ok_or_else(|| format!("{addr}: echoed bytes differ"))
}

/// Waits until a visitor through `host:port` reaches the target.
fn wait_until_served(host: &str, port: u16) {
    wait_for(&format!("a visitor through {host}:{port} served"), Duration::from_secs(20), || echo_at(host, port, b"ping").ok());
}

/// The first `STATUS=` line that contains every one of `needles`, waiting
/// (up to 20 s) through the others.
fn status_with(client: &Daemon, needles: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "no STATUS= with {needles:?}\n--- client log ---\n{}", client.log());
        let msg = client.wait_for_notify("STATUS=", left);
        if let Some(line) = msg.lines().find(|l| l.starts_with("STATUS=") && needles.iter().all(|n| l.contains(n))) {
            return line.to_string();
        }
    }
}

/// The client's `tunneld_tunnel_connected` for one server.
fn connected_to(client: &Daemon, server: &str) -> Option<f64> {
    scrape_metric(client, "tunneld_tunnel_connected", &[("server", server)])
}

/// A mapping for `client` "default" on `port` to `target`, on `server`.
fn declare(server: &Daemon, port: u16, target: SocketAddr) {
    create_tunneled_mapping(server, port, target, "default");
}

#[test]
fn visitors_through_either_server_survive_the_loss_of_one_and_its_return() {
    let target = echo_server();
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut a = server_on(A_HOST, state_a.path(), None);
    let b = server_on(B_HOST, state_b.path(), None);
    assert_ne!(a.fingerprint(), b.fingerprint(), "each server has its own certificate");
    // The same mapping on both: the same port, each on its server's address.
    let port = free_port();
    declare(&a, port, target);
    declare(&b, port, target);

    let (entry_a, entry_b) = (entry(&a), entry(&b));
    let (client, _config) = start_client(&[entry_a.clone(), entry_b.clone()]);
    client.wait_for_notify("STATUS=connected to 2 of 2 servers", Duration::from_secs(20));
    wait_until_served(A_HOST, port);
    wait_until_served(B_HOST, port);
    assert_eq!(connected_to(&client, &entry_a.0), Some(1.0));
    assert_eq!(connected_to(&client, &entry_b.0), Some(1.0));
    let (_, health) = http("GET", &client.url("/health"), None);
    assert_eq!(health["tunnel_connected"], true, "{health}");
    assert_eq!(health["servers"].as_array().map(Vec::len), Some(2), "{health}");

    // A visitor of B mid-conversation while A dies, and new visitors of B
    // one after another across the kill: none of them notices.
    let mut open = TcpStream::connect((B_HOST, port)).expect("visitor of B");
    open.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut converse = |round: u8| {
        let msg = [round; 64];
        open.write_all(&msg).expect("the open visitor of B writes");
        let mut back = [0u8; 64];
        open.read_exact(&mut back).expect("the open visitor of B reads");
        assert_eq!(back, msg);
    };
    converse(1);
    let tunnel_a = a.tunnel.expect("tunnel");
    a.kill(); // SIGKILL: no goodbye on the tunnel
    let killed = Instant::now();
    let (mut served, mut slowest) = (0, Duration::ZERO);
    while killed.elapsed() < Duration::from_secs(2) {
        let started = Instant::now();
        echo_at(B_HOST, port, b"through B while A is gone").unwrap_or_else(|e| panic!("B's visitor failed after A died: {e}"));
        slowest = slowest.max(started.elapsed());
        served += 1;
    }
    converse(2);
    eprintln!("after A's kill: {served} visitors of B in 2 s, none failed, the slowest {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "a visitor of B took {slowest:?}");
    assert!(served > 5, "only {served} visitors of B in 2 s");
    let status = client.wait_for_notify("STATUS=connected to 1 of 2 servers", Duration::from_secs(10));
    assert!(status.contains(&format!("disconnected from {}", entry_a.0)), "{status}");
    wait_for("the client's metrics to show A down", Duration::from_secs(10), || {
        (connected_to(&client, &entry_a.0) == Some(0.0)).then_some(())
    });
    assert_eq!(connected_to(&client, &entry_b.0), Some(1.0));
    let log = client.log();
    let a_field = format!("server={}", entry_a.0);
    let gone = log.lines().any(|l| l.contains(&a_field) && (l.contains("tunnel session ended") || l.contains("tunnel session failed")));
    assert!(gone, "the client's log names the server that went away:\n{log}");

    // A comes back on the same tunnel port with its state: the client finds
    // it again and A's visitors are served once more.
    let a = server_on(A_HOST, state_a.path(), Some(tunnel_a));
    let restarted = Instant::now();
    client.wait_for_notify("STATUS=connected to 2 of 2 servers", Duration::from_secs(20));
    eprintln!("A ready again: the client's session with it {:?} later", restarted.elapsed());
    wait_until_served(A_HOST, port);
    assert_eq!(connected_to(&client, &entry_a.0), Some(1.0));
    converse(3);
    drop(a);
}

#[test]
fn an_unreachable_server_does_not_hold_up_the_others() {
    let target = echo_server();
    let state = tempfile::tempdir().unwrap();
    let good = server_on(A_HOST, state.path(), None);
    let port = free_port();
    declare(&good, port, target);
    // One address refuses connections outright; another accepts TCP and then
    // never says a word, so its TLS handshake hangs until the client's timeout.
    let refused = loopback(free_port());
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind a silent listener");
    let silent_addr = silent.local_addr().unwrap();
    let pin = good.fingerprint();
    let servers = [(silent_addr.to_string(), pin.clone()), (refused.to_string(), pin.clone()), entry(&good)];
    let started = Instant::now();
    let (client, _config) = start_client(&servers);
    let status = client.wait_for_notify("STATUS=connected to 1 of 3 servers", Duration::from_secs(20));
    let took = started.elapsed();
    eprintln!("connected to the good server {took:?} after the client's start, while the silent one hangs");
    // The silent server's handshake takes 10 s to time out; the good one must
    // not wait for it.
    assert!(took < Duration::from_secs(5), "connected to the good server after {took:?}: {status}");
    wait_until_served(A_HOST, port);
    assert_eq!(connected_to(&client, &good.tunnel.unwrap().to_string()), Some(1.0));
    assert_eq!(connected_to(&client, &refused.to_string()), Some(0.0));
    assert_eq!(connected_to(&client, &silent_addr.to_string()), Some(0.0));
    let unreachable = wait_for("the refusing server's failure counted", Duration::from_secs(10), || {
        let n = scrape_metric(
            &client,
            "tunneld_client_connect_failures_total",
            &[("server", &refused.to_string()), ("reason", "unreachable")],
        )?;
        (n >= 1.0).then_some(n)
    });
    assert!(unreachable >= 1.0);
    drop(silent);
}

#[test]
fn a_wrong_fingerprint_is_reported_for_that_server_only() {
    let target = echo_server();
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = server_on(A_HOST, state_a.path(), None);
    let b = server_on(B_HOST, state_b.path(), None);
    let port = free_port();
    declare(&a, port, target);
    let (entry_a, mut entry_b) = (entry(&a), entry(&b));
    // B pinned with A's certificate: the wrong one.
    entry_b.1 = entry_a.1.clone();
    let (client, _config) = start_client(&[entry_a.clone(), entry_b.clone()]);
    let status = status_with(&client, &["STATUS=connected to 1 of 2 servers", &format!("disconnected from {}", entry_b.0)]);
    wait_until_served(A_HOST, port);
    let pin_error =
        |server: &str| scrape_metric(&client, "tunneld_client_last_connect_error", &[("server", server), ("reason", "pin_mismatch")]);
    wait_for("B's pin mismatch in the metrics", Duration::from_secs(10), || (pin_error(&entry_b.0) == Some(1.0)).then_some(()));
    assert_eq!(pin_error(&entry_a.0), Some(0.0), "A's pin is right");
    let log = client.wait_for_log("does not match the pinned", Duration::from_secs(10));
    let line = log.lines().find(|l| l.contains("does not match the pinned")).unwrap();
    assert!(line.contains(&format!("server={}", entry_b.0)), "the failure names B: {line}");
    assert!(!log.lines().any(|l| l.contains("does not match") && l.contains(&format!("server={}", entry_a.0))), "{log}");
    assert!(status.contains(&format!("disconnected from {}", entry_b.0)) && status.contains("does not match the pinned"), "{status}");
    // A reload says so and still where each server stands.
    client.signal("HUP");
    client.wait_for_notify("STATUS=running (configuration reloaded); connected to 1 of 2 servers", Duration::from_secs(10));
}

#[test]
fn check_config_takes_a_server_list_and_refuses_both_forms() {
    let pin = format!("sha256:{}", "ab".repeat(32));
    let servers = [("a.example:9000".to_string(), pin.clone()), ("b.example:9000".to_string(), pin.clone())];
    let (_dir, path) = config_file(&client_config(&servers));
    let run = |envs: &[(&str, &str)]| {
        let mut cmd = Command::new(BIN);
        cmd.args(["check-config", "--config", &path, "client"]);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().expect("run check-config")
    };
    let ok = run(&[]);
    let shown = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    assert!(shown.contains("address = \"a.example:9000\"") && shown.contains("address = \"b.example:9000\""), "{shown}");
    assert!(!shown.contains("server = \"\""), "no empty one-server form beside the list: {shown}");

    // Both forms at once: which server would be meant is a guess.
    let both = run(&[("TUNNELD_CLIENT__SERVER", "c.example:9000")]);
    assert_eq!(both.status.code(), Some(2));
    let err = String::from_utf8_lossy(&both.stderr);
    assert!(err.contains("client.servers") && err.contains("not both"), "{err}");

    // The list from the environment replaces the file's.
    let list = format!("[{{address=\"env.example:9000\", fingerprint=\"{pin}\"}}]");
    let env = run(&[("TUNNELD_CLIENT__SERVERS", &list)]);
    let shown = String::from_utf8_lossy(&env.stdout);
    assert!(env.status.success(), "{}", String::from_utf8_lossy(&env.stderr));
    assert!(shown.contains("env.example:9000") && !shown.contains("a.example"), "{shown}");

    // Each entry is checked: a bad address, a bad pin, one twice, no trust.
    for (bad, why) in [
        (format!("[{{address=\"no-port\", fingerprint=\"{pin}\"}}]"), "host:port"),
        ("[{address=\"a.example:9000\", fingerprint=\"sha256:12\"}]".to_string(), "fingerprint must be"),
        (format!("[{{address=\"a:1\", fingerprint=\"{pin}\"}}, {{address=\"a:1\", fingerprint=\"{pin}\"}}]"), "twice"),
        ("[{address=\"a.example:9000\"}]".to_string(), "no way to verify"),
    ] {
        let out = run(&[("TUNNELD_CLIENT__SERVERS", &bad)]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains(why), "{bad}: {err}");
    }
}

/// The client configurations the high-availability guide and the operations
/// guide show are accepted as written (with a secret from the environment,
/// where the guides put it).
#[test]
fn the_documented_client_configurations_pass_check_config() {
    let mut checked = 0;
    for doc in ["docs/high-availability.md", "docs/operations.md"] {
        let text = read_repo_file(doc);
        for block in text.split("```toml\n").skip(1).filter_map(|rest| rest.split("```").next()) {
            if !block.contains("servers = [") {
                continue;
            }
            let (_dir, path) = config_file(block);
            let out = Command::new(BIN)
                .args(["check-config", "--config", &path, "client"])
                .env("TUNNELD_CLIENT__SECRET", "the client's secret")
                .output()
                .expect("run check-config");
            assert!(out.status.success(), "{doc}:\n{block}\n{}", String::from_utf8_lossy(&out.stderr));
            checked += 1;
        }
    }
    assert_eq!(checked, 2, "one client example in each guide");
}

/// The server files of the guides (`[[mappings]]` with a client group,
/// `[[clients]]` with secrets from files and the environment) are what a
/// server accepts: their secret files are made where the guide puts them
/// (under a temporary directory), their environment variables set.
#[test]
fn the_documented_server_configurations_pass_check_config() {
    let mut checked = 0;
    for doc in ["docs/high-availability.md", "docs/operations.md"] {
        let text = read_repo_file(doc);
        for block in text.split("```toml\n").skip(1).filter_map(|rest| rest.split("```").next()) {
            if !block.contains("[[mappings]]") {
                continue;
            }
            let secrets = tempfile::tempdir().expect("a directory for the secrets");
            let mut command = Command::new(BIN);
            let mut lines = Vec::new();
            for line in block.lines() {
                let value = |key: &str| {
                    let rest = line.trim().strip_prefix(key)?.trim_start().strip_prefix('=')?;
                    rest.trim().strip_prefix('"')?.split('"').next().map(str::to_string)
                };
                if let Some(path) = value("secret_file") {
                    let file = secrets.path().join(path.trim_start_matches('/').replace('/', "_"));
                    std::fs::write(&file, "a documented client's secret\n").expect("write a secret file");
                    lines.push(format!("secret_file = {:?}", file.display().to_string()));
                    continue;
                }
                if let Some(variable) = value("secret_env") {
                    command.env(variable, "a documented client's secret");
                }
                lines.push(line.to_string());
            }
            let (_dir, path) = config_file(&lines.join("\n"));
            let out = command.args(["check-config", "--config", &path, "server"]).output().expect("run check-config");
            assert!(out.status.success(), "{doc}:\n{block}\n{}", String::from_utf8_lossy(&out.stderr));
            let shown = String::from_utf8_lossy(&out.stdout);
            assert!(shown.contains("mappings") && !shown.contains("a documented client's secret"), "{doc}: {shown}");
            checked += 1;
        }
    }
    assert!(checked >= 2, "a server example in each guide, found {checked}");
}
