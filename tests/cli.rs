//! The command line and configuration contract: precedence, masking, and errors
//! that name the key and where the bad value came from. Plus the systemd
//! notification sequence of the real binary.

mod common;

use std::net::TcpStream;
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tunneld")
}

#[test]
fn version_prints_the_crate_version() {
    let out = run(&["version"], &[]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("tunneld {}", env!("CARGO_PKG_VERSION")));
}

#[test]
fn check_config_applies_precedence_and_masks_secrets() {
    let (_dir, path) = config_file(
        "[server]\nsecret = \"file-secret\"\ntunnel_listen = \"0.0.0.0:7000\"\n[api]\nlisten = \"127.0.0.1:7001\"\n[log]\nlevel = \"debug\"\n",
    );
    let out = run(&["check-config", "--config", &path, "server"], &[("TUNNELD_API__LISTEN", "127.0.0.1:7002")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("tunnel_listen = \"0.0.0.0:7000\""), "file beats default:\n{shown}");
    assert!(shown.contains("listen = \"127.0.0.1:7002\""), "env beats file:\n{shown}");
    assert!(shown.contains("level = \"debug\""), "{shown}");
    assert!(!shown.contains("file-secret"), "secret must be masked:\n{shown}");
    assert!(shown.contains("********"), "{shown}");
}

#[test]
fn flags_beat_env_when_the_server_starts() {
    // The env points the API at an address the flag overrides; the daemon must
    // come up on the flag's port.
    let bogus = format!("127.0.0.1:{}", free_port());
    let server = Daemon::server_env("s", &[], &[("TUNNELD_API__LISTEN", &bogus)]);
    assert_ne!(server.http.to_string(), bogus);
    assert_eq!(http("GET", &server.url("/health"), None).0, 200);
}

#[test]
fn bad_values_name_the_key_and_the_source_and_exit_before_binding() {
    let (_d1, wrong_type) = config_file("[api]\nlisten = 8080\n");
    let out = run(&["check-config", "--config", &wrong_type], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api.listen") && err.contains(&wrong_type), "key and file named: {err}");

    let (_d2, unknown) = config_file("[servre]\nsecret = \"x\"\n");
    let err = String::from_utf8_lossy(&run(&["check-config", "--config", &unknown], &[]).stderr).to_string();
    assert!(err.contains("servre"), "unknown section named: {err}");

    let out = run(&["check-config", "server"], &[("TUNNELD_SERVER__TUNNEL_LISTEN", "nowhere")]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tunnel_listen") && err.contains("TUNNELD_SERVER__TUNNEL_LISTEN"), "env var named: {err}");

    let out = run(&["check-config", "--config", "/nonexistent/tunneld.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));

    // The server refuses to start on a bad flag and binds nothing.
    let port = free_port();
    let out = run(&["server", "--api-listen", &format!("127.0.0.1:{port}"), "--tunnel-listen", "bad"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("server.tunnel_listen") && err.contains("command-line flag"), "{err}");
    assert!(TcpStream::connect(("127.0.0.1", port)).is_err());

    let out = run(&["client", "--secret", "x"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("client.server"));
}

#[test]
fn a_numeric_looking_secret_from_env_stays_a_string() {
    // A bare all-digit fingerprint must survive the environment as text too.
    let pin = "1".repeat(64);
    let out = run(
        &["check-config", "client"],
        &[
            ("TUNNELD_CLIENT__SERVER", "example.com:9000"),
            ("TUNNELD_CLIENT__SECRET", "123456"),
            ("TUNNELD_CLIENT__SERVER_FINGERPRINT", &pin),
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&pin));
}

#[test]
fn notify_ready_after_ports_accept_then_stopping_on_sigterm_and_exit_zero() {
    let (_dir, config) = config_file("[server]\nshutdown_grace_secs = 1\n");
    let mut server = Daemon::server("s", &["--config", &config]);
    // READY=1 has arrived (Daemon::server waited for it): both ports accept now.
    TcpStream::connect(server.http).expect("API accepts after READY=1");
    TcpStream::connect(server.tunnel.unwrap()).expect("tunnel port accepts after READY=1");
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);

    // An open connection must not hold up the stop beyond the grace period.
    let _open = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let pid = server.child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    server.wait_for_notify("STOPPING=1", Duration::from_secs(10));
    let status = server.terminate();
    assert_eq!(status.code(), Some(0), "{}", server.log());
}

#[test]
fn generated_secret_is_stored_private_and_reused() {
    use std::os::unix::fs::PermissionsExt;
    let state = tempfile::tempdir().unwrap();
    let mut server = Daemon::server_with_state(state.path(), "", &[]);
    let path = state.path().join("secret");
    let secret = std::fs::read_to_string(&path).expect("secret file created");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    assert!(server.log().contains(&path.display().to_string()), "log says where the secret is");
    let _client = Daemon::client(&server, secret.trim(), &[]);
    server.terminate();
    let _again = Daemon::server_with_state(state.path(), "", &[]);
    assert_eq!(std::fs::read_to_string(&path).unwrap(), secret, "same secret after restart");
}
