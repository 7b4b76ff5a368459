//! Mappings and clients declared in the server's config file (`[[mappings]]`,
//! `[[clients]]`): served from the start, listed with `"source": "config"`,
//! refused to the API (409 naming the file), reconciled on reload (SIGHUP, what
//! `systemctl reload` sends) without dropping the open connections of a mapping
//! that stays, and kept consistent across a restart.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "default-client-secret";
const OFFICE_SECRET: &str = "office-secret-from-a-file-0123456789";
const HOME_SECRET: &str = "home-secret-from-the-environment-0123";

/// The declared parts of a server config: clients `office` (secret in a file)
/// and `home` (secret in `HOME_SECRET_VAR`), and `mappings` as TOML tables.
fn declared_config(office_secret_file: &Path, mappings: &str) -> String {
    format!(
        r#"
[[clients]]
name = "office"
secret_file = "{}"

[[clients]]
name = "home"
secret_env = "TUNNELD_TEST_HOME_SECRET"

{mappings}
"#,
        office_secret_file.display()
    )
}

fn direct(port: u16, target: std::net::SocketAddr, extra: &str) -> String {
    format!("[[mappings]]\nsource_port = {port}\ntarget_host = \"{}\"\ntarget_port = {}\n{extra}\n", target.ip(), target.port())
}

fn tunneled(port: u16, target: std::net::SocketAddr, client: &str) -> String {
    format!(
        "[[mappings]]\nsource_port = {port}\ntarget_host = \"{}\"\ntarget_port = {}\nuse_tunnel = true\nclient = \"{client}\"\n",
        target.ip(),
        target.port()
    )
}

fn client_listed(server: &Daemon, name: &str) -> Value {
    let list = get_data(server, "/api/client/list");
    list["clients"].as_array().expect("clients").iter().find(|c| c["name"] == name).cloned().unwrap_or(Value::Null)
}

/// Sends `bytes` on an open echo connection and reads them back.
fn echo_on(conn: &mut TcpStream, bytes: &[u8]) {
    conn.write_all(bytes).expect("write on the open connection");
    let mut back = vec![0u8; bytes.len()];
    conn.read_exact(&mut back).expect("read the echo on the open connection");
    assert_eq!(back, bytes, "the open connection echoes");
}

/// SIGHUP, then the daemon's own READY=1 with its status line.
fn reload(server: &Daemon) -> String {
    server.signal("HUP");
    server.wait_for_notify("RELOADING=1", Duration::from_secs(10));
    server.wait_for_notify("READY=1", Duration::from_secs(10))
}

fn ports_listed(server: &Daemon) -> Vec<(u64, String)> {
    let list = get_data(server, "/api/mapping/list");
    list["mappings"]
        .as_array()
        .expect("mappings")
        .iter()
        .map(|m| (m["source_port"].as_u64().unwrap(), m["source"].as_str().unwrap_or("").to_string()))
        .collect()
}

#[test]
fn declared_mappings_and_clients_are_served_refused_to_the_api_and_reconciled_on_reload_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let office_file = dir.path().join("office.secret");
    std::fs::write(&office_file, format!("{OFFICE_SECRET}\n")).unwrap();
    let echo = echo_server();
    let (direct_port, office_port, home_port, added_port, api_port) = (free_port(), free_port(), free_port(), free_port(), free_port());
    let config_path = dir.path().join("server.toml");
    let first = format!(
        "{}{}{}",
        direct(direct_port, echo, "description = \"declared direct\"\nbandwidth_limit = 50000000"),
        tunneled(office_port, echo, "office"),
        tunneled(home_port, echo, "home"),
    );
    std::fs::write(&config_path, declared_config(&office_file, &first)).unwrap();
    let config = config_path.display().to_string();
    let env = [("TUNNELD_TEST_HOME_SECRET", HOME_SECRET)];

    let mut server = Daemon::server_env(SECRET, &["--config", &config], &env);
    // Listed with their source.
    for port in [direct_port, office_port, home_port] {
        let m = listed_mapping(&server, port).unwrap_or_else(|| panic!("declared mapping {port} is listed"));
        assert_eq!(m["source"], "config", "{m}");
    }
    assert_eq!(listed_mapping(&server, direct_port).unwrap()["description"], "declared direct");
    assert_eq!(client_listed(&server, "office")["source"], "config");
    assert_eq!(client_listed(&server, "home")["source"], "config");
    assert_eq!(client_listed(&server, "default")["source"], "api");

    // The declared secrets (from the file, from the environment) authenticate.
    let _office = Daemon::client(&server, OFFICE_SECRET, &["--name", "office"]);
    let _home = Daemon::client(&server, HOME_SECRET, &["--name", "home"]);
    for port in [direct_port, office_port, home_port] {
        echo_through(port, 100_000);
    }

    // The API's own mapping, beside them.
    let created = create_mapping(&server, api_port, echo, false);
    assert_eq!(created["data"]["source"], "api", "{created}");
    let api_before = listed_mapping(&server, api_port).unwrap();

    // The API may not change or remove what the file declares.
    for (path, body) in [
        ("/api/mapping/update", json!({"port": direct_port, "description": "changed by the API"})),
        ("/api/mapping/remove", json!({"port": office_port})),
        ("/api/client/remove", json!({"name": "office", "force": true})),
    ] {
        let (status, answer) = post(&server, path, body);
        assert_eq!(status, 409, "{path}: {answer}");
        assert_eq!(answer["code"], "declared_in_config", "{path}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(&config), "{path} names the file: {answer}");
    }
    assert_eq!(listed_mapping(&server, direct_port).unwrap()["description"], "declared direct");

    // A connection open on the mapping whose policy is about to change.
    let mut open = TcpStream::connect(loopback(direct_port)).unwrap();
    open.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    echo_on(&mut open, b"before the reload");

    // Edit the file: the direct mapping's policy changes, the office mapping
    // goes, a new one comes, the home mapping stays as it is.
    let second = format!(
        "{}{}{}",
        direct(direct_port, echo, "description = \"declared direct, edited\"\nbandwidth_limit = 40000000"),
        tunneled(home_port, echo, "home"),
        direct(added_port, echo, ""),
    );
    std::fs::write(&config_path, declared_config(&office_file, &second)).unwrap();
    let status = reload(&server);
    assert!(status.contains("configuration reloaded"), "{status}");

    let edited = listed_mapping(&server, direct_port).unwrap();
    assert_eq!(edited["description"], "declared direct, edited", "{edited}");
    assert_eq!(edited["bandwidth_limit"], 40_000_000, "{edited}");
    echo_on(&mut open, b"after the reload: the open connection still moves bytes");
    assert!(listed_mapping(&server, office_port).is_none(), "the removed mapping is gone");
    assert!(TcpStream::connect(loopback(office_port)).is_err(), "the removed mapping's port is closed");
    assert_eq!(listed_mapping(&server, added_port).unwrap()["source"], "config");
    echo_through(added_port, 50_000);
    echo_through(home_port, 50_000);
    let api_after = listed_mapping(&server, api_port).expect("the API's mapping stays");
    for key in ["source", "created_at", "target_host", "target_port", "description"] {
        assert_eq!(api_after[key], api_before[key], "{key} of the API's mapping: {api_after}");
    }
    let events = get_data(&server, "/api/events");
    let reconciled = events["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "config_reconciled" && e["message"].as_str().unwrap_or("").contains("reload"))
        .cloned()
        .unwrap_or_else(|| panic!("a config_reconciled event for the reload: {events}"));
    assert!(reconciled["message"].as_str().unwrap().contains("mappings: created 1, changed 1, removed 1"), "{reconciled}");

    // A broken file is refused and the running set stays.
    let broken = format!("[[mappings]]\nsource_port = {added_port}\ntarget_host = \"127.0.0.1\"\ntarget_port = 0\n");
    std::fs::write(&config_path, declared_config(&office_file, &broken)).unwrap();
    let status = reload(&server);
    assert!(status.contains("reload rejected"), "{status}");
    let log = server.wait_for_log("reload rejected", Duration::from_secs(5));
    assert!(log.contains(&format!("mappings[0] (source_port {added_port})")), "the log names the entry: {log}");
    let running = ports_listed(&server);
    assert_eq!(running.len(), 4, "{running:?}");
    echo_on(&mut open, b"after a refused reload");

    // A restart with the good file again: the same set, no duplicates.
    std::fs::write(&config_path, declared_config(&office_file, &second)).unwrap();
    let before_restart = ports_listed(&server);
    drop(open);
    server.terminate();
    let state = server.state_dir.clone();
    let restarted = Daemon::server_with_state_env(&state, SECRET, &["--config", &config], &env);
    assert_eq!(ports_listed(&restarted), before_restart);
    let clients = get_data(&restarted, "/api/client/list");
    let names: Vec<&str> = clients["clients"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["default", "home", "office"], "{clients}");
    echo_through(added_port, 10_000);
}

#[test]
fn a_declared_port_takes_over_the_api_mapping_a_changed_target_or_secret_applies_and_a_removed_client_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let office_file = dir.path().join("office.secret");
    std::fs::write(&office_file, format!("{OFFICE_SECRET}\n")).unwrap();
    let config_path = dir.path().join("server.toml");
    // A declared port another process holds: served once it is free, as a stored one is.
    let squatter = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let held_port = squatter.local_addr().unwrap().port();
    let (old_target, new_target, port) = (echo_server(), echo_server(), free_port());
    std::fs::write(&config_path, declared_config(&office_file, &direct(held_port, old_target, ""))).unwrap();
    let config = config_path.display().to_string();
    let env = [("TUNNELD_TEST_HOME_SECRET", HOME_SECRET)];
    let server = Daemon::server_env(SECRET, &["--config", &config], &env);
    let held = listed_mapping(&server, held_port).expect("the declared mapping on a held port is listed");
    assert!(held["status"].as_str().unwrap().contains("port in use"), "{held}");
    drop(squatter);
    wait_for("the held port to be served", Duration::from_secs(20), || {
        (listed_mapping(&server, held_port)?["status"] == "active").then_some(())
    });
    echo_through(held_port, 10_000);

    create_mapping(&server, port, old_target, false);
    let (status, answer) = post(&server, "/api/client/create", json!({"name": "office"}));
    assert_eq!(status, 409, "a declared client's name is taken: {answer}");
    let office = Daemon::client(&server, OFFICE_SECRET, &["--name", "office"]);

    // The file now declares the API's port, moves the held port's target, rotates
    // office's secret, and no longer declares `home`.
    let rotated = "office-secret-rotated-0123456789abcdef";
    std::fs::write(&office_file, format!("{rotated}\n")).unwrap();
    let created_before = listed_mapping(&server, held_port).unwrap()["created_at"].clone();
    let declared = format!("{}{}", direct(port, new_target, ""), direct(held_port, new_target, ""));
    let text = format!("[[clients]]\nname = \"office\"\nsecret_file = \"{}\"\n\n{declared}", office_file.display());
    std::fs::write(&config_path, text).unwrap();
    let status = reload(&server);
    assert!(status.contains("configuration reloaded"), "{status}");
    let m = listed_mapping(&server, port).unwrap();
    assert_eq!(m["source"], "config", "{m}");
    assert_eq!(m["target_port"], new_target.port(), "{m}");
    assert!(server.log().contains("replaces it"), "the takeover is logged");
    echo_through(port, 10_000);
    let moved = listed_mapping(&server, held_port).unwrap();
    assert_eq!(moved["target_port"], new_target.port(), "a changed target applies: {moved}");
    assert!(moved["created_at"].as_i64() >= created_before.as_i64(), "{moved}");
    echo_through(held_port, 10_000);
    assert_eq!(client_listed(&server, "home"), Value::Null, "an undeclared client is removed");

    // The old secret's session ended; the new secret authenticates.
    wait_for("office's old session to end", Duration::from_secs(10), || {
        (client_listed(&server, "office")["connected"] == false).then_some(())
    });
    drop(office);
    let _office = Daemon::client(&server, rotated, &["--name", "office"]);
    assert_eq!(client_listed(&server, "office")["connected"], true);
}

#[test]
fn bad_declarations_are_named_by_check_config_and_stop_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_server();
    let port = free_port();
    let cases = [
        // A field the API would refuse, named with the entry.
        (
            format!("{}{}", direct(free_port(), echo, ""), direct(port, echo, "bandwidth_limit = \"fast\"")),
            format!("mappings[1] (source_port {port})"),
            "bandwidth_limit",
        ),
        (
            format!("{}{}", direct(port, echo, ""), direct(port, echo, "")),
            format!("mappings[1] (source_port {port})"),
            "declared by mappings[0]",
        ),
        (tunneled(port, echo, "nobody"), format!("mappings[0] (source_port {port})"), "nobody"),
        (
            "[[clients]]\nname = \"office\"\nsecret = \"inline-secret-value\"\n".to_string(),
            "clients[0] (name \"office\")".into(),
            "secret_file",
        ),
        (
            "[[clients]]\nname = \"office\"\nsecret_env = \"TUNNELD_TEST_UNSET_VARIABLE\"\n".to_string(),
            "clients[0] (name \"office\")".into(),
            "TUNNELD_TEST_UNSET_VARIABLE is not set",
        ),
    ];
    for (text, entry, detail) in cases {
        let (_guard, path) = config_file(&text);
        let check = Command::new(BIN).args(["check-config", "--config", &path, "server"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&check.stderr);
        assert_eq!(check.status.code(), Some(2), "check-config: {stderr}");
        assert!(stderr.contains(&entry) && stderr.contains(detail), "check-config names {entry} and {detail}: {stderr}");

        let state = tempfile::tempdir().unwrap();
        let start = Command::new(BIN)
            .args(["server", "--config", &path, "--api-listen", "127.0.0.1:0", "--tunnel-listen", "127.0.0.1:0"])
            .args(["--state-dir", &state.path().display().to_string()])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&start.stderr);
        assert_eq!(start.status.code(), Some(2), "start: {stderr}");
        assert!(stderr.contains(&entry), "the start names {entry}: {stderr}");
    }
    // A good declaration passes and is shown (without any secret).
    let file = dir.path().join("office.secret");
    std::fs::write(&file, format!("{OFFICE_SECRET}\n")).unwrap();
    let (_guard, path) = config_file(&declared_config(&file, &direct(port, echo, "")));
    let check = Command::new(BIN)
        .args(["check-config", "--config", &path, "server"])
        .env("TUNNELD_TEST_HOME_SECRET", HOME_SECRET)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    assert!(stdout.contains("[[mappings]]") && stdout.contains("secret_env = \"TUNNELD_TEST_HOME_SECRET\""), "{stdout}");
    assert!(!stdout.contains(OFFICE_SECRET) && !stdout.contains(HOME_SECRET), "no secret shown: {stdout}");
}

#[test]
fn the_page_and_ctl_show_which_mappings_the_config_file_declares() {
    let dir = tempfile::tempdir().unwrap();
    let echo = echo_server();
    let (declared_port, api_port) = (free_port(), free_port());
    let config_path = dir.path().join("server.toml");
    std::fs::write(&config_path, direct(declared_port, echo, "description = \"declared in the file\"\nbandwidth_limit = 1048576")).unwrap();
    let config = config_path.display().to_string();
    let server = Daemon::server(SECRET, &["--config", &config]);
    create_mapping(&server, api_port, echo, false);

    // `ctl list` has a SOURCE column.
    let listed = Command::new(BIN).args(["ctl", "--api", &server.http.to_string(), "list"]).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let row = |port: u16| listed.lines().find(|l| l.split_whitespace().next() == Some(&port.to_string())).unwrap_or_default().to_string();
    assert!(listed.lines().next().unwrap_or_default().contains("SOURCE"), "{listed}");
    assert!(row(declared_port).split_whitespace().any(|w| w == "config"), "{listed}");
    assert!(row(api_port).split_whitespace().any(|w| w == "api"), "{listed}");

    let Some(chromium) = common::tools::external_tool("chromium", "declared") else { return };
    let mut browser = common::browser::Browser::launch(&chromium, &[], None);
    for (width, height, mobile) in [(1440, 900, false), (390, 844, true)] {
        browser.set_viewport(width, height, mobile);
        browser.navigate(&server.url("/api/stats/monitor?interval_ms=250"));
        let declared_row = format!(r#"document.querySelector('[data-testid="mapping-row"][data-port="{declared_port}"]')"#);
        let api_row = format!(r#"document.querySelector('[data-testid="mapping-row"][data-port="{api_port}"]')"#);
        browser.wait_for("both mappings on the page", &format!("!!{declared_row} && !!{api_row}"));
        let shown = browser.eval(&format!(
            r#"({{ badge: {declared_row}.querySelector('[data-role="source"]')?.textContent ?? null,
                 declared_edit: !!{declared_row}.querySelector('[data-role="edit-policy"]'),
                 api_badge: !!{api_row}.querySelector('[data-role="source"]'),
                 api_edit: !!{api_row}.querySelector('[data-role="edit-policy"]') }})"#
        ));
        assert_eq!(shown, json!({"badge": "config", "declared_edit": false, "api_badge": false, "api_edit": true}), "at {width} px");
        browser.eval(&format!("{declared_row}.scrollIntoView({{block: 'center'}})"));
        browser.screenshot(&format!("declared-mappings-{width}.png"));
    }
    let thrown = browser.events_named("Runtime.exceptionThrown");
    assert!(thrown.is_empty(), "page threw: {thrown:?}");
}
