//! Secrets stay out of `ps`, logs and `check-config` (issue 18, item 5): both
//! roles read their secret from a file, a secret on the command line is warned
//! about, the server's start-up line recommends the file, and the webhook URL's
//! credentials are masked where it is printed or a delivery fails.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::json;

const SECRET: &str = "file-secret-0123456789abcdef";

/// `/proc/PID/cmdline` of `d`, as `ps` shows it to every user.
fn cmdline(d: &Daemon) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{}/cmdline", d.child.id())).unwrap()).replace('\0', " ")
}

#[test]
fn both_roles_take_the_secret_from_a_file_and_keep_it_off_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("secret");
    std::fs::write(&file, format!("{SECRET}\n")).unwrap();
    let file = file.display().to_string();

    let server = Daemon::server("", &["--secret-file", &file]);
    let log = server.wait_for_log("client_command", Duration::from_secs(20));
    let line = log.lines().find(|l| l.contains("client_command")).unwrap();
    assert!(line.contains("--secret-file FILE"), "the start-up line recommends a file: {line}");
    assert!(!line.contains("--secret ") && !line.contains("$(cat"), "no secret on a command line: {line}");
    assert!(!log.contains("given with --secret"), "no warning without the flag:\n{log}");

    let metrics = loopback(free_port());
    let (tunnel, pin, metrics_arg) = (server.tunnel.unwrap().to_string(), server.fingerprint(), metrics.to_string());
    let client = Daemon::with_args(
        &["client", "--server", &tunnel, "--fingerprint", &pin, "--secret-file", &file, "--metrics-listen", &metrics_arg],
        metrics,
    );
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    for d in [&server, &client] {
        assert!(!cmdline(d).contains(SECRET), "{}", cmdline(d));
        assert!(!d.log().contains(SECRET), "the secret must never be logged");
    }
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    assert_eq!(roundtrip(loopback(port), b"through the tunnel"), b"through the tunnel");
}

#[test]
fn a_secret_given_as_a_flag_is_warned_about() {
    let server = Daemon::server(SECRET, &[]);
    let log = server.wait_for_log("given with --secret", Duration::from_secs(20));
    assert!(log.contains("--secret-file"), "the warning says what to use instead:\n{log}");
}

#[test]
fn a_secret_file_that_cannot_serve_is_refused_with_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();
    let check = |args: &[&str], envs: &[(&str, &str)]| {
        let out = Command::new(BIN).args(["check-config", "client"]).args(args).envs(envs.iter().copied()).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let server = ("TUNNELD_CLIENT__SERVER", "127.0.0.1:9");
    let pin = ("TUNNELD_CLIENT__TLS", "false");
    let empty_file = ("TUNNELD_CLIENT__SECRET_FILE", empty.to_str().unwrap());
    let (code, err) = check(&[], &[server, pin, empty_file]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("client.secret_file") && err.contains("is empty"), "{err}");
    let (code, err) = check(&[], &[server, pin, ("TUNNELD_CLIENT__SECRET_FILE", "/nonexistent/secret")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot read /nonexistent/secret"), "{err}");
    let both = ("TUNNELD_CLIENT__SECRET", "x");
    let (code, err) = check(&[], &[server, pin, both, ("TUNNELD_CLIENT__SECRET_FILE", "/etc/hostname")]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("not both"), "{err}");
}

#[test]
fn the_webhook_url_credentials_are_masked_in_check_config_and_delivery_errors() {
    // Nothing listens on port 9 of loopback: every delivery fails.
    let url = "http://alice:hook-password@127.0.0.1:9/services/T0/hook-path-key?key=query-key";
    let leaks = ["hook-password", "hook-path-key", "query-key", "alice"];
    let (_dir, config) = config_file(&format!("[alerts]\nwebhook_url = \"{url}\"\n"));

    let out = Command::new(BIN).args(["check-config", "--config", &config, "server"]).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(shown.contains("webhook_url = \"http://********@127.0.0.1:9/********\""), "{shown}");
    for leak in leaks {
        assert!(!shown.contains(leak), "check-config printed {leak}:\n{shown}");
    }

    // An event (a quota's 80 % warning) whose delivery fails.
    let server = Daemon::server("policy-secret-123456", &["--config", &config]);
    let port = free_port();
    let (status, body) = post(
        &server,
        "/api/mapping/create",
        json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo_server().port(),
               "quota": {"bytes": 1000, "period": "month", "action": "alert"}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(roundtrip(loopback(port), &[7u8; 900]).len(), 900);
    let log = server.wait_for_log("webhook delivery failed", Duration::from_secs(30));
    let failure = log.lines().find(|l| l.contains("webhook delivery failed")).unwrap();
    assert!(failure.contains("error="), "the failure says why: {failure}");
    for leak in leaks {
        assert!(!log.contains(leak), "the log shows {leak}:\n{failure}");
    }
}
