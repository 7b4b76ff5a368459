//! Issue 18, item 2: a tunneled mapping that forwards to itself. With its
//! client on the server's own host, a tunneled target on one of the server's
//! listeners is refused — at create, or when such a client attaches — and a loop
//! of any shape the server cannot see (here through a relay outside it) stops at
//! the process-wide visitor bound derived from `RLIMIT_NOFILE`, with the API,
//! `/health` and the tunnel still answering. Under a real `prlimit`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "hardening-loops-secret";

/// Asks for a mapping, which may be refused: the status and the reply.
fn create(server: &Daemon, source_port: u16, host: &str, target_port: u16, use_tunnel: bool) -> (u16, Value) {
    post(
        server,
        "/api/mapping/create",
        json!({"source_port": source_port, "target_host": host, "target_port": target_port, "use_tunnel": use_tunnel}),
    )
}

fn remove(server: &Daemon, port: u16) -> (u16, Value) {
    post(server, "/api/mapping/remove", json!({"port": port}))
}

/// The most descriptors `daemon` had open at any sample, taken every 2 ms from
/// now until the returned guard is read.
struct PeakDescriptors {
    peak: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    sampler: Option<std::thread::JoinHandle<()>>,
}

impl PeakDescriptors {
    fn watch(daemon: &Daemon) -> PeakDescriptors {
        let pid = daemon.child.id();
        let (peak, stop) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicBool::new(false)));
        let (p, s) = (peak.clone(), stop.clone());
        let sampler = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let open = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
                p.fetch_max(open, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        PeakDescriptors { peak, stop, sampler: Some(sampler) }
    }

    fn read(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(sampler) = self.sampler.take() {
            let _ = sampler.join();
        }
        let peak = self.peak.load(Ordering::Relaxed);
        eprintln!("peak descriptors: {peak}");
        peak
    }
}

/// A relay outside the daemon: every connection to it is forwarded to
/// `127.0.0.1:to`, both ways, and closed on both sides as soon as either ends.
/// The daemon cannot know that dialing it comes back to its own port.
fn outside_relay(to: u16) -> u16 {
    let relay = TcpListener::bind("127.0.0.1:0").expect("bind the relay");
    let port = relay.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for inbound in relay.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", to)) else { return };
                let (mut a, mut b) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut a, &mut b);
                    let _ = b.shutdown(Shutdown::Both);
                    let _ = a.shutdown(Shutdown::Both);
                });
                let (mut a, mut b) = (outbound, inbound);
                let _ = std::io::copy(&mut a, &mut b);
                let _ = b.shutdown(Shutdown::Both);
                let _ = a.shutdown(Shutdown::Both);
            });
        }
    });
    port
}

/// `/metrics` if the API answers within 5 s.
fn metrics_if_answering(server: &Daemon) -> Option<String> {
    ureq::get(&server.url("/metrics")).timeout(Duration::from_secs(5)).call().ok()?.into_string().ok()
}

fn refused(text: &str, port: u16, reason: &str) -> f64 {
    metric_value(text, "tunneld_mapping_refused_total", &[("port", &port.to_string()), ("reason", reason)]).unwrap_or(0.0)
}

/// The API still works: `/health` and the list answer 200.
fn assert_api_answers(server: &Daemon) {
    let (status, health) = http("GET", &server.url("/health"), None);
    assert_eq!(status, 200, "/health: {health}");
    let (status, list) = http("GET", &server.url("/api/mapping/list"), None);
    assert_eq!(status, 200, "list: {list}");
}

#[test]
fn a_tunneled_self_target_with_a_client_on_this_host_is_refused_at_create() {
    let (server, _client) = server_and_client(SECRET, true);
    let port = free_port();
    // Its own port, by address, by a name resolving to a local address, by
    // another loopback address and by the wildcard.
    for host in ["127.0.0.1", "localhost", "127.0.0.2", "0.0.0.0"] {
        let (status, body) = create(&server, port, host, port, true);
        assert_eq!(status, 400, "{host}: {body}");
        let message = body["message"].as_str().unwrap_or_default();
        assert!(message.contains("forward to itself"), "{host}: {message}");
        assert!(message.contains("own port") && message.contains("connected from this host"), "{host}: {message}");
    }
    // The API's and the tunnel's ports, through the client, are the daemon's too.
    let (status, body) = create(&server, port, "127.0.0.1", server.http.port(), true);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains("API port"), "{body}");
    // A direct↔tunneled pair: the direct half first (its target is not mapped
    // yet), then the tunneled half that would close the loop.
    let direct = free_port();
    assert_eq!(create(&server, direct, "127.0.0.1", port, false).0, 200);
    let (status, body) = create(&server, port, "127.0.0.1", direct, true);
    assert_eq!(status, 400, "{body}");
    assert!(body["message"].as_str().unwrap_or_default().contains(&format!("mapping on port {direct}")), "{body}");
    assert_eq!(mapping_count(&server), 1, "only the direct half exists");
    // A tunneled target that is not the daemon's is fine through the same client.
    create_mapping(&server, port, echo_server(), true);
    assert_eq!(roundtrip(loopback(port), b"not a loop"), b"not a loop");
}

#[test]
fn a_client_attaching_from_this_host_turns_a_tunneled_self_target_into_a_refusing_error() {
    let server = Daemon::server_with_nofile(256, 256, SECRET, &[]);
    let port = free_port();
    // No client yet: the server cannot know where it will run.
    let (status, body) = create(&server, port, "127.0.0.1", port, true);
    assert_eq!(status, 200, "{body}");
    assert_eq!(listed_mapping(&server, port).unwrap()["status"], "waiting_for_tunnel");
    let _client = Daemon::client(&server, SECRET, &[]);
    // The client hears its welcome just before the server installs its session.
    let mapping = wait_for("the mapping to leave waiting_for_tunnel", Duration::from_secs(10), || {
        listed_mapping(&server, port).filter(|m| m["status"] != "waiting_for_tunnel")
    });
    let status = mapping["status"].as_str().unwrap_or_default();
    assert!(status.starts_with("error: ") && status.contains("forward to itself"), "{mapping}");
    assert!(status.contains("connected from this host"), "{mapping}");
    let log = server.wait_for_log("refuses every visitor", Duration::from_secs(10));
    let line = log.lines().find(|l| l.contains("refuses every visitor")).unwrap();
    assert!(line.contains(&format!("port={port}")) && line.contains("client=default"), "{line}");
    let (_, health) = http("GET", &server.url("/health"), None);
    assert_eq!(health["status"], "degraded", "{health}");
    assert!(health["reasons"].to_string().contains(&format!("mapping on port {port} refuses every visitor")), "{health}");

    let peak = PeakDescriptors::watch(&server);
    assert_eq!(visit(port, b"hello"), b"", "the visitor is refused");
    let text = metrics_if_answering(&server).expect("the API answers");
    assert_eq!(refused(&text, port, "loop"), 1.0, "{text}");
    let peak = peak.read();
    assert!(peak < 64, "one visitor, no loop: {peak} descriptors at most");
    assert_api_answers(&server);
    assert_eq!(remove(&server, port).0, 200);
}

/// Server under `prlimit --nofile=256:256`; the client on this host. A direct
/// mapping B → A and a tunneled mapping A → an outside relay → B: a loop the
/// server cannot see. One visitor goes round until the process-wide bound
/// refuses it, well before the descriptor limit; the API, `/health` and the
/// tunnel keep working and both halves can be removed.
#[test]
fn a_loop_the_server_cannot_see_stops_at_the_process_bound() {
    let server = Daemon::server_with_nofile(256, 256, SECRET, &[]);
    let _client = Daemon::client(&server, SECRET, &[]);
    let (tunneled, direct) = (free_port(), free_port());
    assert_eq!(create(&server, direct, "127.0.0.1", tunneled, false).0, 200);
    let relay = outside_relay(direct);
    let (status, body) = create(&server, tunneled, "127.0.0.1", relay, true);
    assert_eq!(status, 200, "the server cannot see through the relay: {body}");

    let peak = PeakDescriptors::watch(&server);
    let mut visitor = TcpStream::connect(("127.0.0.1", tunneled)).unwrap();
    visitor.write_all(b"round and round").unwrap();
    let (process_limit, no_descriptors) = wait_for("the loop to be refused", Duration::from_secs(60), || {
        let text = metrics_if_answering(&server)?;
        let process_limit = refused(&text, tunneled, "process_limit") + refused(&text, direct, "process_limit");
        let no_descriptors = refused(&text, tunneled, "no_descriptors") + refused(&text, direct, "no_descriptors");
        (process_limit + no_descriptors >= 1.0).then_some((process_limit, no_descriptors))
    });
    // The refusal unwinds the whole chain back to the visitor.
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut rest = Vec::new();
    match visitor.read_to_end(&mut rest) {
        Ok(_) => {}
        Err(e) => assert!(!matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut), "the visitor is let go: {e}"),
    }
    assert_api_answers(&server);
    assert_eq!(remove(&server, tunneled).0, 200, "the tunneled half is removed");
    assert_eq!(remove(&server, direct).0, 200, "the direct half is removed");
    let peak = peak.read();
    assert!(peak < 256 - 32, "the server stayed well below its limit of 256: {peak} descriptors at most");
    assert!(process_limit >= 1.0, "refused at the process bound ({process_limit}), not out of descriptors ({no_descriptors})");
    assert_eq!(no_descriptors, 0.0, "never out of descriptors");
    let log = server.log();
    assert!(!log.contains("accept failed"), "never out of descriptors:\n{log}");
    assert!(log.contains("visitor refused: all mappings' visitors together hold the descriptors kept for them"), "{log}");
    // The tunnel still carries visitors.
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    assert_eq!(roundtrip(loopback(port), b"still tunneling"), b"still tunneling");
}

/// The client under `prlimit --nofile=256:256`, the server with room to spare:
/// the same loop the server cannot see now stops at the client's own bound on
/// data channels and targets; the client stays connected and keeps serving.
#[test]
fn the_client_keeps_its_channels_and_targets_within_its_descriptor_limit() {
    let server = Daemon::server_with_nofile(4096, 4096, SECRET, &[]);
    let client = Daemon::client_with_nofile(256, 256, &server, SECRET);
    let (tunneled, direct) = (free_port(), free_port());
    assert_eq!(create(&server, direct, "127.0.0.1", tunneled, false).0, 200);
    let relay = outside_relay(direct);
    assert_eq!(create(&server, tunneled, "127.0.0.1", relay, true).0, 200);

    let peak = PeakDescriptors::watch(&client);
    let mut visitor = TcpStream::connect(("127.0.0.1", tunneled)).unwrap();
    visitor.write_all(b"round and round").unwrap();
    // The client's refusal reaches the server as a target it could not reach.
    let p = tunneled.to_string();
    wait_for("the loop to be cut short", Duration::from_secs(60), || {
        scrape_metric(&server, "tunneld_mapping_connect_errors_total", &[("port", &p)]).filter(|v| *v >= 1.0)
    });
    visitor.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = visitor.read_to_end(&mut Vec::new());
    assert_api_answers(&server);
    assert_eq!(remove(&server, tunneled).0, 200);
    assert_eq!(remove(&server, direct).0, 200);
    let peak = peak.read();
    let log = client.log();
    assert!(!log.contains("Too many open files"), "never out of descriptors:\n{log}");
    assert!(peak < 256 - 32, "the client stayed well below its limit of 256: {peak} descriptors at most");
    assert!(log.contains("data channels and targets hold all the descriptors kept for them"), "{log}");
    // Still connected, still serving.
    let (_, health) = http("GET", &client.url("/health"), None);
    assert_eq!(health["tunnel_connected"], true, "{health}");
    let port = free_port();
    create_mapping(&server, port, echo_server(), true);
    assert_eq!(roundtrip(loopback(port), b"still tunneling"), b"still tunneling");
}
