//! The Debian package under a real, booted systemd (see `common::systemd`): the
//! life of a server host and of a client-only host as an operator lives it —
//! install, configure, start, use from the shell, reload, crash, hang, upgrade,
//! remove and purge — asserting what systemd, the journal and the network show.
//!
//! The package is the one `dist/debian/check.sh` builds (`target/debian/`), or
//! `TUNNELD_TEST_DEB=/path/to/tunneld_*.deb`. CI builds it before the tests.
mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::netns::in_namespace;
use common::systemd::Host;
use serde_json::Value;

const SERVER: &str = "tunneld-server";
const CLIENT: &str = "tunneld-client";
const BOOT_TIMEOUT: Duration = Duration::from_secs(30);

/// The package to test, or `None` after a SKIPPED banner.
fn package(test: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("TUNNELD_TEST_DEB") {
        return Some(PathBuf::from(path));
    }
    let dir = common::repo_path("target/debian");
    let found = std::fs::read_dir(&dir).ok().and_then(|entries| {
        entries.filter_map(|e| e.ok().map(|e| e.path())).find(|p| {
            p.extension().is_some_and(|x| x == "deb") && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("tunneld_"))
        })
    });
    if found.is_none() {
        common::tools::skip_or_fail(test, "the built package (run `bash dist/debian/check.sh` or `cargo deb` first)");
    }
    found
}

/// The same package with a higher version (`+test1` appended), as an upgrade would
/// bring: unpacked and rebuilt with dpkg-deb inside the host.
fn repack_with_higher_version(host: &Host, deb: &str) -> String {
    host.ok(&format!(
        "set -e; d=$(mktemp -d); dpkg-deb -R {deb} $d/pkg; \
         sed -i 's/^Version: .*/&+test1/' $d/pkg/DEBIAN/control; \
         dpkg-deb -b $d/pkg {}/upgrade.deb >/dev/null",
        common::systemd::SHARED
    ));
    format!("{}/upgrade.deb", common::systemd::SHARED)
}

/// An echo server listening on loopback inside the host; returns its port.
fn echo_target_in(host: &Host) -> u16 {
    common::netns::echo_target_in(&host.net_namespace()).port()
}

/// Sends `len` random bytes through `port` inside the host and checks the echo.
fn echo_through_in(host: &Host, port: u16, len: usize) {
    common::netns::echo_in(&host.net_namespace(), ([127, 0, 0, 1], port).into(), len);
}

/// `tunneld ctl ARGS` inside the host, from the shell with no flags: the packaged
/// paths, as root.
fn ctl(host: &Host, args: &str) -> String {
    host.ok(&format!("tunneld ctl {args}"))
}

/// The API's answer for GET `path`, through curl-less Rust: the test connects
/// inside the host's namespace.
fn api_data(host: &Host, path: &str) -> Value {
    let url = format!("http://127.0.0.1:8080{path}");
    in_namespace(&host.net_namespace(), move || {
        let (status, body) = common::http("GET", &url, None);
        assert_eq!(status, 200, "{url}: {body}");
        body["data"].clone()
    })
}

/// The mapping's row in `/api/stats/traffic`: its policy and its counters.
fn mapping(host: &Host, port: u16) -> Value {
    let traffic = api_data(host, "/api/stats/traffic");
    traffic["mappings"].as_array().and_then(|m| m.iter().find(|m| m["port"] == port).cloned()).unwrap_or(Value::Null)
}

/// A sample of `/metrics` of the server inside the host.
fn metric_in(host: &Host, name: &'static str, labels: &'static [(&'static str, &'static str)]) -> Option<f64> {
    in_namespace(&host.net_namespace(), move || {
        let text = ureq::get("http://127.0.0.1:8080/metrics").call().ok()?.into_string().ok()?;
        common::metric_value(&text, name, labels)
    })
}

fn office_connected(host: &Host) -> bool {
    let list = api_data(host, "/api/client/list");
    list["clients"].as_array().is_some_and(|c| c.iter().any(|c| c["name"] == "office" && c["connected"] == true))
}

fn wait_for_office(host: &Host, what: &str) {
    common::wait_for(what, BOOT_TIMEOUT, || office_connected(host).then_some(()));
}

fn main_pid(host: &Host, unit: &str) -> String {
    host.property(unit, "MainPID")
}

#[test]
fn the_server_and_client_packages_live_their_lives_under_a_real_systemd() {
    let test = "the_server_and_client_packages_live_their_lives_under_a_real_systemd";
    let Some(deb) = package(test) else { return };
    let Some(host) = Host::boot(test) else { return };
    let deb = host.share(&deb, "tunneld.deb");

    // Install; the units are installed, not started.
    host.ok(&format!("dpkg -i {deb} >/dev/null"));
    assert_eq!(host.property(SERVER, "ActiveState"), "inactive");
    // A short watchdog for the hang below, as an operator's drop-in would set it.
    host.ok(&format!(
        "mkdir -p /etc/systemd/system/{SERVER}.service.d && printf '[Service]\\nWatchdogSec=3s\\n' > /etc/systemd/system/{SERVER}.service.d/watchdog.conf && systemctl daemon-reload"
    ));

    // Type=notify: `start` returns once READY=1 arrived, and READY=1 comes only
    // after the API listens, so ctl answers at once.
    host.ok(&format!("systemctl enable --now {SERVER}"));
    assert_eq!(host.property(SERVER, "ActiveState"), "active");
    ctl(&host, "list");
    assert_eq!(api_data(&host, "/api/mapping/list")["count"], 0);
    let status = host.property(SERVER, "StatusText");
    assert!(status.starts_with("serving 0 mappings"), "STATUS= after start: {status:?}");

    // The fingerprint from the shell, no flags: the packaged config names the state dir.
    let fingerprint = host.ok("tunneld fingerprint").trim().to_string();
    assert!(fingerprint.starts_with("sha256:") && fingerprint.len() == 71, "tunneld fingerprint: {fingerprint:?}");
    // A named client, its secret into client.env, the pin into client.toml.
    let created = ctl(&host, "client create office");
    let secret =
        created.lines().map(str::trim).find(|l| l.len() >= 32 && !l.contains(' ')).expect("the secret in ctl's answer").to_string();
    host.ok(&format!(
        "sed -i 's|^server = .*|server = \"127.0.0.1:9000\"|; s|^server_fingerprint = .*|server_fingerprint = \"{fingerprint}\"|; s|^name = .*|name = \"office\"|' /etc/tunneld/client.toml \
         && echo 'TUNNELD_CLIENT__SECRET={secret}' >> /etc/tunneld/client.env \
         && systemctl enable --now {CLIENT}"
    ));
    host.wait_until(
        "the client's STATUS=connected",
        BOOT_TIMEOUT,
        &format!("systemctl show -p StatusText --value {CLIENT} | grep -q '^connected to 127.0.0.1:9000 as office'"),
    );

    // Bytes through a tunneled mapping (created from the shell) and a direct one.
    let target = echo_target_in(&host);
    ctl(&host, &format!("create 7001 127.0.0.1:{target} --tunnel --client office"));
    ctl(&host, &format!("create 7002 127.0.0.1:{target}"));
    echo_through_in(&host, 7001, 1 << 20);
    echo_through_in(&host, 7002, 256 << 10);
    common::wait_for("the tunneled bytes counted", Duration::from_secs(10), || {
        (mapping(&host, 7001)["bytes_sent"] == (1u64 << 20)).then_some(())
    });

    // Reload with a changed config: applied. With a broken one: `reload` fails
    // and the daemon keeps serving.
    host.ok("sed -i 's/^level = .*/level = \"debug\"/' /etc/tunneld/server.toml");
    host.ok(&format!("systemctl reload {SERVER}"));
    host.wait_until(
        "the reload in the journal",
        BOOT_TIMEOUT,
        &format!("journalctl -u {SERVER} -o short | grep -q 'configuration reloaded'"),
    );
    let before = main_pid(&host, SERVER);
    host.ok("cp /etc/tunneld/server.toml /root/server.toml.good && echo 'no_such_key = 1' >> /etc/tunneld/server.toml");
    let broken = host.sh(&format!("systemctl reload {SERVER}"));
    assert!(!broken.status.success(), "a reload with an invalid config succeeded");
    assert_eq!(host.property(SERVER, "ActiveState"), "active");
    assert_eq!(main_pid(&host, SERVER), before, "a broken reload restarted the daemon");
    echo_through_in(&host, 7002, 4096);
    host.ok("cp /root/server.toml.good /etc/tunneld/server.toml");

    // Wait for a history flush after the traffic, so that a crash loses nothing.
    let traffic_done = common::unix_now();
    common::wait_for("a history flush after the traffic", Duration::from_secs(30), || {
        let flushed = metric_in(&host, "tunneld_history_last_flush_timestamp_seconds", &[])?;
        (flushed > traffic_done).then_some(())
    });
    let lifetime_before = mapping(&host, 7001)["lifetime_sent"].clone();

    // kill -9: Restart=on-failure brings it back with its mappings and lifetime counters.
    let killed = main_pid(&host, SERVER);
    host.ok(&format!("systemctl kill -s KILL {SERVER}"));
    host.wait_until("the restart after kill -9", BOOT_TIMEOUT, &format!(
        "test \"$(systemctl show -p MainPID --value {SERVER})\" != {killed} && test \"$(systemctl show -p MainPID --value {SERVER})\" != 0 && systemctl is-active -q {SERVER} && tunneld ctl list >/dev/null"
    ));
    let after_kill = mapping(&host, 7001);
    assert_eq!(after_kill["lifetime_sent"], lifetime_before, "lifetime counters after kill -9: {after_kill}");
    assert_eq!(after_kill["bytes_sent"], 0, "the live counters start again at 0: {after_kill}");
    wait_for_office(&host, "the client back after the server's restart");
    echo_through_in(&host, 7001, 64 << 10);

    // SIGSTOP: the watchdog (3 s in the drop-in) kills and restarts it.
    let stopped = main_pid(&host, SERVER);
    host.ok(&format!("systemctl kill -s STOP {SERVER}"));
    host.wait_until("the watchdog's restart", Duration::from_secs(40), &format!(
        "test \"$(systemctl show -p MainPID --value {SERVER})\" != {stopped} && systemctl is-active -q {SERVER} && tunneld ctl list >/dev/null"
    ));
    let journal = host.journal(SERVER);
    assert!(journal.contains("Watchdog timeout"), "no watchdog timeout in the journal:\n{journal}");

    // Upgrade over the running service: restarted once, mappings, history and secret kept.
    let secret_file = host.ok("sha256sum /var/lib/tunneld/secret");
    let starts_before = host.journal(SERVER).matches("Started tunneld-server").count();
    let pid_before = main_pid(&host, SERVER);
    let upgrade = repack_with_higher_version(&host, &deb);
    host.ok(&format!("dpkg -i {upgrade} >/dev/null"));
    assert!(host.ok("dpkg-query -W -f '${Version}' tunneld").ends_with("+test1"));
    host.wait_until(
        "the server active after the upgrade",
        BOOT_TIMEOUT,
        &format!("systemctl is-active -q {SERVER} && tunneld ctl list >/dev/null"),
    );
    assert_ne!(main_pid(&host, SERVER), pid_before, "the upgrade did not restart the server");
    let starts_after = host.journal(SERVER).matches("Started tunneld-server").count();
    assert_eq!(starts_after, starts_before + 1, "the upgrade should restart the server exactly once");
    assert_eq!(host.ok("sha256sum /var/lib/tunneld/secret"), secret_file, "the upgrade changed the secret");
    let upgraded = mapping(&host, 7001);
    assert!(upgraded["lifetime_sent"].as_u64() >= lifetime_before.as_u64(), "history lost in the upgrade: {upgraded}");
    assert_eq!(mapping(&host, 7002)["target_port"], target, "a mapping lost in the upgrade");
    wait_for_office(&host, "the client back after the upgrade");
    echo_through_in(&host, 7001, 64 << 10);

    // The journal's default output (`journalctl -u`, no -o verbose) carries what
    // the operator needs: the fingerprint, the client command line, the restore counts.
    let journal = host.journal(SERVER);
    for needle in [fingerprint.as_str(), "tunneld client --server", "mappings restored"] {
        assert!(journal.contains(needle), "`journalctl -u {SERVER}` lacks {needle:?}:\n{journal}");
    }
    // What an operator reads, for the record (`--nocapture`).
    for needle in [
        "tunnel TLS certificate",
        "start a client with",
        "mappings restored",
        "Watchdog timeout",
        "configuration reloaded",
        "reload rejected",
    ] {
        for line in journal.lines().filter(|l| l.contains(needle)).take(2) {
            eprintln!("journal: {line}");
        }
    }
    let restored = journal.lines().find(|l| l.contains("mappings restored")).unwrap_or_default();
    assert!(restored.contains("restored=0"), "restore counts not in the text: {restored}");

    // Remove: the services stop, the binary and units go, state and secrets stay.
    host.ok("dpkg -r tunneld >/dev/null");
    assert_eq!(host.property(SERVER, "ActiveState"), "inactive");
    assert_eq!(host.property(CLIENT, "ActiveState"), "inactive");
    host.ok("test ! -e /usr/bin/tunneld && test ! -e /usr/lib/systemd/system/tunneld-server.service");
    host.ok("test -f /var/lib/tunneld/secret && grep -q TUNNELD_CLIENT__SECRET /etc/tunneld/client.env");
    // Purge: nothing is left.
    host.ok("dpkg --purge tunneld >/dev/null");
    let left = host.sh_out(
        "ls -d /etc/tunneld /var/lib/tunneld /var/lib/private/tunneld /etc/systemd/system/multi-user.target.wants/tunneld-* 2>/dev/null",
    );
    assert!(left.trim().is_empty(), "left behind after purge: {left}");
}

#[test]
fn a_client_only_host_runs_the_packaged_client_against_a_server_across_a_link() {
    let test = "a_client_only_host_runs_the_packaged_client_against_a_server_across_a_link";
    let Some(deb) = package(test) else { return };
    let Some(server_host) = common::netns::NetNs::create(test) else { return };
    let Some(host) = Host::boot(test) else { return };
    let deb = host.share(&deb, "tunneld.deb");
    let (_, client_link) = common::netns::link_to_process(&server_host, "10.214.0.1/30", host.pid());
    host.ok(&format!("ip addr add 10.214.0.2/30 dev {client_link} && ip link set {client_link} up"));

    // The server: this build, on the other host; its API on that host's loopback.
    const SECRET: &str = "client-only-host-secret-0123456789";
    let tunnel: SocketAddr = "10.214.0.1:9000".parse().expect("address");
    let server = common::Daemon::server_wrapped(&server_host.wrapper(), tunnel, SECRET, &[]);
    let fingerprint = server.fingerprint();

    // The client host: the package, configured as the docs say, client unit only.
    host.ok(&format!("dpkg -i {deb} >/dev/null"));
    host.ok(&format!(
        "sed -i 's|^server = .*|server = \"10.214.0.1:9000\"|; s|^server_fingerprint = .*|server_fingerprint = \"{fingerprint}\"|' /etc/tunneld/client.toml \
         && echo 'TUNNELD_CLIENT__SECRET={SECRET}' >> /etc/tunneld/client.env \
         && systemctl enable --now {CLIENT}"
    ));
    host.wait_until(
        "the client's STATUS=connected",
        BOOT_TIMEOUT,
        &format!("systemctl show -p StatusText --value {CLIENT} | grep -q '^connected to 10.214.0.1:9000 as default'"),
    );
    assert_eq!(host.property(SERVER, "ActiveState"), "inactive", "the server unit runs on a client-only host");

    // A target on the client's side only, reached from the server's side.
    let target = echo_target_in(&host);
    let create = server.url("/api/mapping/create");
    let body = serde_json::json!({"source_port": 7101, "target_host": "127.0.0.1", "target_port": target, "use_tunnel": true}).to_string();
    let (status, answer) = in_namespace(&server_host.path(), move || common::http("POST", &create, Some(&body)));
    assert_eq!(status, 200, "{answer}");
    let mapping: SocketAddr = "127.0.0.1:7101".parse().expect("address");
    let payload = common::random_bytes(128 << 10);
    let echoed = {
        let payload = payload.clone();
        in_namespace(&server_host.path(), move || common::roundtrip(mapping, &payload))
    };
    assert!(echoed == payload, "the echo through the packaged client differs");

    // The packaged client's own /metrics (client.toml: 127.0.0.1:9101) on its host.
    let connected = in_namespace(&host.net_namespace(), || {
        let text = ureq::get("http://127.0.0.1:9101/metrics").call().ok()?.into_string().ok()?;
        common::metric_value(&text, "tunneld_tunnel_connected", &[("client", "default")])
    });
    assert_eq!(connected, Some(1.0), "the packaged client's /metrics");

    // Reload, and a crash: restarted, and back on the tunnel by itself.
    host.ok(&format!("systemctl reload {CLIENT}"));
    let killed = main_pid(&host, CLIENT);
    host.ok(&format!("systemctl kill -s KILL {CLIENT}"));
    host.wait_until("the client restarted and connected", BOOT_TIMEOUT, &format!(
        "test \"$(systemctl show -p MainPID --value {CLIENT})\" != {killed} && systemctl show -p StatusText --value {CLIENT} | grep -q '^connected'"
    ));
    let payload = common::random_bytes(4096);
    let echoed = {
        let payload = payload.clone();
        in_namespace(&server_host.path(), move || common::roundtrip(mapping, &payload))
    };
    assert!(echoed == payload, "the echo after the client's restart differs");
    let journal = host.journal(CLIENT);
    assert!(journal.contains("10.214.0.1:9000"), "`journalctl -u {CLIENT}` does not name the server:\n{journal}");

    host.ok("dpkg --purge tunneld >/dev/null");
    let left = host.sh_out("ls -d /etc/tunneld /var/lib/tunneld /var/lib/private/tunneld /usr/bin/tunneld 2>/dev/null");
    assert!(left.trim().is_empty(), "left behind after purge: {left}");
}
