//! Tunnel protocol v2 end to end: TLS by default and how a client verifies the
//! server, the channel-bound HMAC, data-channel reuse, resets and broken frames on
//! a data channel, and the clear messages across versions and TLS/plain mismatches.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::tunnel::{challenge_as, runtime, tls_connect};
use common::*;
use tokio::io::AsyncWriteExt;
use tunneld::tunnel::auth;
use tunneld::tunnel::frame::{read_frame, write_frame};
use tunneld::tunnel::message::{Auth, Connect, ConnectResult, Opening, Verdict, PROTOCOL_VERSION};

const SECRET: &str = "v2 secret";

/// A TCP relay in front of `to` that counts the connections it accepts: every
/// tunnel connection a client opens (control and data channels).
fn counting_proxy(to: SocketAddr) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            count.fetch_add(1, Ordering::SeqCst);
            let Ok(upstream) = TcpStream::connect(to) else { continue };
            for (mut from, mut into) in [(conn.try_clone().unwrap(), upstream.try_clone().unwrap()), (upstream, conn)] {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut into);
                    let _ = into.shutdown(Shutdown::Write);
                });
            }
        }
    });
    (addr, accepted)
}

fn client_config_file(body: &str) -> (tempfile::TempDir, String) {
    config_file(&format!("[client]\n{body}\n"))
}

// ---------------------------------------------------------------- TLS by default

#[test]
fn the_server_logs_the_exact_client_command_without_the_secret() {
    let state = tempfile::tempdir().unwrap();
    let server = Daemon::server_with_state(state.path(), SECRET, &[]);
    let log = server.wait_for_log("client_command", Duration::from_secs(20));
    let pin = server.fingerprint();
    assert!(pin.starts_with("sha256:") && pin.len() == 7 + 64, "{pin}");
    let tunnel = server.tunnel.unwrap();
    assert!(log.contains(&format!("--server {tunnel} --fingerprint {pin}")), "{log}");
    assert!(!log.contains(SECRET), "the secret must never be logged:\n{log}");
    // The certificate is generated once and reused: same fingerprint after a restart.
    drop(server);
    let again = Daemon::server_with_state(state.path(), SECRET, &[]);
    assert_eq!(again.fingerprint(), pin);
    let key = std::fs::metadata(state.path().join("tls-key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
}

#[test]
fn a_plain_client_is_refused_by_a_default_server_and_both_say_why() {
    let server = Daemon::server(SECRET, &[]);
    let client = Daemon::client_with_env(server.tunnel.unwrap(), SECRET, &[], &[("TUNNELD_CLIENT__TLS", "false")]);
    client.wait_for_log("this server requires TLS", Duration::from_secs(20));
    assert!(client.log().contains("NOT encrypted"), "startup warning: {}", client.log());
    server.wait_for_log("speaks plain TCP but this server requires TLS", Duration::from_secs(20));
    assert!(tunnel_sessions(&server, "tls_error") >= 1.0);
}

#[test]
fn a_tls_client_against_a_plain_server_is_told_the_server_has_tls_off() {
    let server = Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__TLS", "false")]);
    server.wait_for_log("NOT encrypted", Duration::from_secs(20));
    let client = Daemon::client_with(server.tunnel.unwrap(), SECRET, &["--fingerprint", &format!("sha256:{}", "0".repeat(64))]);
    client.wait_for_log("does not speak TLS on its tunnel port", Duration::from_secs(20));
    server.wait_for_log("speaks TLS but this server runs with server.tls = false", Duration::from_secs(20));
    assert!(tunnel_sessions(&server, "tls_error") >= 1.0);
}

#[test]
fn plain_on_both_sides_still_forwards_with_exact_counts() {
    let server = Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__TLS", "false")]);
    let client = Daemon::client_with_env(server.tunnel.unwrap(), SECRET, &[], &[("TUNNELD_CLIENT__TLS", "false")]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    let payload = random_bytes(3 << 20);
    let back = roundtrip(loopback(port), &payload);
    assert_eq!(sha256(&back), sha256(&payload));
    let text = wait_for("connection closed", Duration::from_secs(10), || {
        let t = metrics_text(&server);
        (metric_value(&t, "tunneld_mapping_active_connections", &[("port", &port.to_string())]) == Some(0.0)).then_some(t)
    });
    let p = port.to_string();
    assert_eq!(metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &p), ("direction", "sent")]), Some(payload.len() as f64));
    assert_eq!(metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &p), ("direction", "received")]), Some(payload.len() as f64));
}

// ---------------------------------------------------------------- verifying the server

#[test]
fn a_client_with_no_pin_and_no_ca_refuses_to_start_and_says_how_to_get_the_fingerprint() {
    let out = std::process::Command::new(BIN)
        .args(["client", "--server", "127.0.0.1:9", "--secret", "x"])
        .env_remove("TUNNELD_CLIENT__SERVER_FINGERPRINT")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("client.server_fingerprint") && err.contains("tunneld fingerprint"), "{err}");
}

#[test]
fn a_wrong_fingerprint_is_refused_naming_both_and_counted_by_the_server() {
    let server = Daemon::server(SECRET, &[]);
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let client = Daemon::client_with(server.tunnel.unwrap(), SECRET, &["--fingerprint", &wrong]);
    let log = client.wait_for_log("does not match the pinned", Duration::from_secs(20));
    assert!(log.contains(&wrong) && log.contains(&server.fingerprint()), "names both fingerprints:\n{log}");
    wait_for("tls_error counted", Duration::from_secs(20), || (tunnel_sessions(&server, "tls_error") >= 1.0).then_some(()));
    assert_eq!(tunnel_sessions(&server, "ok"), 0.0);
}

/// A CA, and a server certificate for `tunnel.test` it signed (optionally expired).
struct Pki {
    _dir: tempfile::TempDir,
    ca: String,
    cert: String,
    key: String,
}

fn pki(expired: bool) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["tunnel.test".to_string()]).unwrap();
    if expired {
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    }
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let path = |name: &str, text: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    Pki { ca: path("ca.pem", ca.pem()), cert: path("cert.pem", cert.pem()), key: path("key.pem", key.serialize_pem()), _dir: dir }
}

fn server_with_cert(pki: &Pki) -> Daemon {
    Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__TLS_CERT", &pki.cert), ("TUNNELD_SERVER__TLS_KEY", &pki.key)])
}

fn ca_client(server: &Daemon, ca: &str) -> Daemon {
    Daemon::client_with_env(
        server.tunnel.unwrap(),
        SECRET,
        &[],
        &[("TUNNELD_CLIENT__TLS_CA", ca), ("TUNNELD_CLIENT__TLS_SERVER_NAME", "tunnel.test")],
    )
}

#[test]
fn a_ca_signed_server_is_trusted_through_client_tls_ca() {
    let pki = pki(false);
    let server = server_with_cert(&pki);
    let client = ca_client(&server, &pki.ca);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    assert_eq!(roundtrip(loopback(port), b"via a CA"), b"via a CA");
}

#[test]
fn a_server_signed_by_another_ca_is_refused() {
    let (theirs, ours) = (pki(false), pki(false));
    let server = server_with_cert(&theirs);
    let client = ca_client(&server, &ours.ca);
    client.wait_for_log("not signed by client.tls_ca", Duration::from_secs(20));
    wait_for("tls_error counted", Duration::from_secs(20), || (tunnel_sessions(&server, "tls_error") >= 1.0).then_some(()));
}

#[test]
fn a_self_signed_server_without_a_pin_is_refused() {
    let server = Daemon::server(SECRET, &[]);
    let client = ca_client(&server, &pki(false).ca);
    client.wait_for_log("not signed by client.tls_ca", Duration::from_secs(20));
    wait_for("tls_error counted", Duration::from_secs(20), || (tunnel_sessions(&server, "tls_error") >= 1.0).then_some(()));
}

#[test]
fn an_expired_server_certificate_is_refused() {
    let pki = pki(true);
    let server = server_with_cert(&pki);
    let client = ca_client(&server, &pki.ca);
    client.wait_for_log("certificate has expired", Duration::from_secs(20));
    wait_for("tls_error counted", Duration::from_secs(20), || (tunnel_sessions(&server, "tls_error") >= 1.0).then_some(()));
}

// ---------------------------------------------------------------- protocol versions

#[test]
fn a_version_1_client_is_told_to_upgrade() {
    let server = Daemon::server(SECRET, &[]);
    let mut conn = TcpStream::connect(server.tunnel.unwrap()).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = br#"{"type":"hello","version":1}"#;
    conn.write_all(&(hello.len() as u32).to_be_bytes()).unwrap();
    conn.write_all(hello).unwrap();
    let mut reply = Vec::new();
    let _ = conn.read_to_end(&mut reply);
    let text = String::from_utf8_lossy(&reply);
    assert!(text.contains("protocol version 1 is not supported by this server (2); upgrade the client"), "{text}");
    assert!(tunnel_sessions(&server, "version_mismatch") >= 1.0);
}

/// A stand-in for a version-1 server: answers the first frame as v1 did.
fn v1_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut len = [0u8; 4];
            if conn.read_exact(&mut len).is_err() || u32::from_be_bytes(len) > 16 * 1024 {
                continue; // v1 dropped oversized "frames" (a TLS ClientHello) silently
            }
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            let _ = conn.read_exact(&mut body);
            let reply = br#"{"type":"rejected","reason":"protocol version 2 is not supported (server speaks 1)"}"#;
            let _ = conn.write_all(&(reply.len() as u32).to_be_bytes());
            let _ = conn.write_all(reply);
        }
    });
    addr
}

#[test]
fn a_version_1_server_makes_the_client_say_upgrade_the_server() {
    let old = v1_server();
    let plain = Daemon::client_with_env(old, SECRET, &[], &[("TUNNELD_CLIENT__TLS", "false")]);
    plain.wait_for_log("protocol version 2 is not supported by this server (1); upgrade the server", Duration::from_secs(20));
    let tls = Daemon::client_with(old, SECRET, &["--fingerprint", &format!("sha256:{}", "1".repeat(64))]);
    tls.wait_for_log("older than protocol version 2 (upgrade the server)", Duration::from_secs(20));
}

// ---------------------------------------------------------------- reuse

/// `pool_size` through a config file; the fingerprint still by flag.
fn client_via_proxy(server: &Daemon, proxy: SocketAddr, pool_size: usize) -> (Daemon, tempfile::TempDir) {
    let (dir, file) = client_config_file(&format!("pool_size = {pool_size}"));
    let pin = server.fingerprint();
    let client = Daemon::client_with(proxy, SECRET, &["--config", &file, "--fingerprint", &pin]);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    (client, dir)
}

#[test]
fn a_thousand_sequential_visitors_reuse_the_pooled_channels() {
    const POOL: usize = 4;
    let server = Daemon::server(SECRET, &[]);
    let (proxy, accepted) = counting_proxy(server.tunnel.unwrap());
    let (_client, _cfg) = client_via_proxy(&server, proxy, POOL);
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    let addr: SocketAddr = loopback(port);
    for i in 0..1000u32 {
        let msg = format!("visitor {i}");
        assert_eq!(roundtrip(addr, msg.as_bytes()), msg.as_bytes());
    }
    let opened = accepted.load(Ordering::SeqCst);
    // One control channel, the pool, and a few replacements at most.
    assert!(opened <= 1 + POOL + 3, "1,000 visitors opened {opened} tunnel connections");
    let text = metrics_text(&server);
    assert_eq!(metric_value(&text, "tunneld_mapping_connections_total", &[("port", &port.to_string())]), Some(1000.0));
}

#[test]
fn idle_pooled_channels_time_out_and_are_replaced() {
    const POOL: usize = 2;
    let server =
        Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__POOL_IDLE_SECS", "1"), ("TUNNELD_SERVER__HEARTBEAT_INTERVAL_SECS", "1")]);
    let (proxy, accepted) = counting_proxy(server.tunnel.unwrap());
    let (_client, _cfg) = client_via_proxy(&server, proxy, POOL);
    let first = wait_for("the pool to be open", Duration::from_secs(10), || {
        let n = accepted.load(Ordering::SeqCst);
        (n > POOL).then_some(n)
    });
    // The server closes idle channels after a second (checked every heartbeat);
    // the client opens fresh ones in their place.
    wait_for("expired channels to be replaced", Duration::from_secs(20), || {
        (accepted.load(Ordering::SeqCst) >= first + POOL).then_some(())
    });
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    assert_eq!(roundtrip(loopback(port), b"fresh channel"), b"fresh channel");
}

/// Streams bytes until the peer goes away; records whether it ended by a reset.
fn firehose(reset_seen: Arc<AtomicBool>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let seen = reset_seen.clone();
            std::thread::spawn(move || {
                let chunk = vec![b'F'; 64 * 1024];
                loop {
                    if let Err(e) = conn.write_all(&chunk) {
                        if matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe) {
                            seen.store(true, Ordering::SeqCst);
                        }
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn reset(conn: TcpStream) {
    socket2::SockRef::from(&conn).set_linger(Some(Duration::ZERO)).unwrap();
    drop(conn);
}

#[test]
fn a_reset_mid_exchange_reaches_the_target_and_the_next_visitor_gets_clean_bytes() {
    let server = Daemon::server(SECRET, &[]);
    let (proxy, _) = counting_proxy(server.tunnel.unwrap());
    // One pooled channel, so the next visitor would get the reset one if it came back.
    let (_client, _cfg) = client_via_proxy(&server, proxy, 1);
    let reset_seen = Arc::new(AtomicBool::new(false));
    let (hose, echo) = (free_port(), free_port());
    create_mapping(&server, hose, firehose(reset_seen.clone()), true);
    create_mapping(&server, echo, echo_server(), true);
    for round in 0..10 {
        let mut visitor = TcpStream::connect(("127.0.0.1", hose)).unwrap();
        visitor.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut got = vec![0u8; 200_000];
        visitor.read_exact(&mut got).unwrap();
        assert!(got.iter().all(|b| *b == b'F'));
        reset(visitor);
        let payload = random_bytes(100_000 + round);
        let back = roundtrip(loopback(echo), &payload);
        assert_eq!(back.len(), payload.len(), "round {round}: no leftovers of the reset exchange");
        assert_eq!(sha256(&back), sha256(&payload));
    }
    wait_for("the target to see a reset", Duration::from_secs(10), || reset_seen.load(Ordering::SeqCst).then_some(()));
}

#[test]
fn a_target_reset_reaches_the_visitor_as_a_reset() {
    let server = Daemon::server(SECRET, &[]);
    let _client = Daemon::client(&server, SECRET, &[]);
    let rude = target(|mut conn| {
        let mut buf = [0u8; 5];
        let _ = conn.read_exact(&mut buf);
        reset(conn);
    });
    let port = free_port();
    create_mapping(&server, port, rude, true);
    let mut visitor = TcpStream::connect(("127.0.0.1", port)).unwrap();
    visitor.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    visitor.write_all(b"hello").unwrap();
    let mut buf = [0u8; 16];
    let err = visitor.read(&mut buf).expect_err("a reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert_eq!(roundtrip_after_reset(&server), b"still fine");
}

fn roundtrip_after_reset(server: &Daemon) -> Vec<u8> {
    let port = free_port();
    create_mapping(server, port, echo_server(), true);
    roundtrip(loopback(port), b"still fine")
}

// ---------------------------------------------------------------- in-process peers

#[test]
fn a_relayed_hmac_answer_from_another_tls_session_is_refused() {
    let server = Daemon::server(SECRET, &[]);
    let (tunnel, pin) = (server.tunnel.unwrap(), server.fingerprint());
    runtime().block_on(async {
        // The victim's session B answers its own challenge; the attacker on
        // session A relays that challenge/answer pair as if it were A's.
        let mut a = tls_connect(tunnel, &pin).await;
        let mut b = tls_connect(tunnel, &pin).await;
        let nonce_a = challenge_as(&mut a, "default").await;
        let _ = challenge_as(&mut b, "default").await;
        let relayed = auth::sign(SECRET, &nonce_a, &b.binding());
        write_frame(&mut a, &Auth::Auth { mac: relayed }).await.unwrap();
        match read_frame(&mut a).await.unwrap().0 {
            Verdict::Rejected { reason } => assert!(reason.contains("authentication failed"), "{reason}"),
            other => panic!("a relayed answer must be refused, got {other:?}"),
        }
        // The same secret, bound to the right session, is accepted.
        let mut c = tls_connect(tunnel, &pin).await;
        let nonce_c = challenge_as(&mut c, "default").await;
        let own = auth::sign(SECRET, &nonce_c, &c.binding());
        write_frame(&mut c, &Auth::Auth { mac: own }).await.unwrap();
        assert!(matches!(read_frame(&mut c).await.unwrap().0, Verdict::Welcome { .. }));
    });
    assert!(tunnel_sessions(&server, "auth_failed") >= 1.0);
}

/// What a hostile or broken client sends on a data channel after `connect_result`.
#[derive(Clone, Copy, Debug)]
enum Breakage {
    Garbage,
    Oversized,
    Truncated,
}

#[test]
fn garbage_oversized_and_truncated_frames_close_only_that_data_channel() {
    let server = Daemon::server(SECRET, &[]);
    let (tunnel, pin) = (server.tunnel.unwrap(), server.fingerprint());
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    let rt = runtime();
    // A hand-made client: authenticates, then serves each visitor on a fresh
    // data channel with one kind of breakage.
    let (control, token) = rt.block_on(async {
        let mut control = tls_connect(tunnel, &pin).await;
        let nonce = challenge_as(&mut control, "default").await;
        let mac = auth::sign(SECRET, &nonce, &control.binding());
        write_frame(&mut control, &Auth::Auth { mac }).await.unwrap();
        match read_frame(&mut control).await.unwrap().0 {
            Verdict::Welcome { session, .. } => (control, session),
            other => panic!("{other:?}"),
        }
    });
    for breakage in [Breakage::Garbage, Breakage::Oversized, Breakage::Truncated] {
        let (pin, token) = (pin.clone(), token.clone());
        let channel = rt.spawn(async move {
            let mut channel = tls_connect(tunnel, &pin).await;
            write_frame(&mut channel, &Opening::Data { version: PROTOCOL_VERSION, session: token.clone() }).await.unwrap();
            let (connect, _): (Connect, _) = read_frame(&mut channel).await.unwrap();
            assert!(matches!(connect, Connect::Connect { .. }), "{connect:?}");
            let bad: Vec<u8> = match breakage {
                // Junk where the `connect_result` frame belongs.
                Breakage::Garbage => [&8u32.to_be_bytes()[..], b"%%junk%%"].concat(),
                Breakage::Oversized => (10u32 << 20).to_be_bytes().to_vec(),
                Breakage::Truncated => [&100u32.to_be_bytes()[..], b"only ten b"].concat(),
            };
            if !matches!(breakage, Breakage::Garbage) {
                write_frame(&mut channel, &ConnectResult::ConnectResult { error: None }).await.unwrap();
            }
            channel.write_all(&bad).await.unwrap();
            channel.flush().await.unwrap();
            if matches!(breakage, Breakage::Truncated) {
                let _ = channel.shutdown().await;
            }
            channel
        });
        let mut visitor = TcpStream::connect(("127.0.0.1", port)).unwrap();
        visitor.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        visitor.write_all(b"hi").unwrap();
        let mut got = Vec::new();
        let result = visitor.read_to_end(&mut got);
        let _channel = rt.block_on(channel).unwrap();
        assert!(result.is_err() || got.len() < 100, "{breakage:?}: the visitor is cut off, not served garbage ({} bytes)", got.len());
        if let Err(e) = result {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{breakage:?}: {e}");
        }
    }
    // The session is untouched: still connected, and the control channel alive.
    let text = metrics_text(&server);
    assert_eq!(metric_value(&text, "tunneld_tunnel_connected", &[]), Some(1.0));
    assert_eq!(tunnel_sessions(&server, "ok"), 1.0);
    drop(control);
}
