//! `proxy_protocol` on a mapping: the target learns the visitor's real address
//! from a PROXY protocol header (v1 text, v2 binary), direct and through the
//! tunnel, as real parsers read it — HAProxy with `accept-proxy`, nginx with
//! `listen ... proxy_protocol` — and the header is not counted as traffic.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::tools::external_tool;
use common::*;
use serde_json::{json, Value};

const SECRET: &str = "proxy-protocol-test-secret";

/// The two loopback visitors every case is run from (all of 127.0.0.0/8 is loopback).
const VISITORS: [IpAddr; 2] = [IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3))];

/// Creates a mapping on `port` to `target` with `proxy_protocol: version`,
/// direct or through the client `default`; returns the mapping as created.
fn create_proxied(server: &Daemon, port: u16, target: SocketAddr, tunneled: bool, version: &str) -> Value {
    let body = json!({
        "source_port": port,
        "target_host": target.ip().to_string(),
        "target_port": target.port(),
        "use_tunnel": tunneled,
        "proxy_protocol": version,
    });
    let (status, answer) = post(server, "/api/mapping/create", body);
    assert_eq!(status, 200, "create {port} ({version}, tunneled: {tunneled}): {answer}");
    assert_eq!(answer["data"]["proxy_protocol"], version, "{answer}");
    answer["data"].clone()
}

/// An HTTP/1.0 GET through the mapping at `mapping` from `from`: the
/// visitor's own address and the body of the answer.
fn http_get_from(from: IpAddr, mapping: SocketAddr) -> (SocketAddr, String) {
    let port = mapping.port();
    let mut visitor = connect_from(from, mapping);
    let me = visitor.local_addr().expect("the visitor's address");
    visitor.write_all(b"GET / HTTP/1.0\r\nHost: proxied.test\r\n\r\n").expect("send the request");
    let mut answer = Vec::new();
    visitor.read_to_end(&mut answer).unwrap_or_else(|e| panic!("the answer through :{port} from {from}: {e}"));
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let Some((head, body)) = answer.split_once("\r\n\r\n") else { panic!("no HTTP answer through :{port} from {from}: {answer:?}") };
    assert!(head.starts_with("HTTP/1.") && head.contains(" 200 "), "through :{port} from {from}: {head}");
    (me, body.trim().to_string())
}

/// A target program (haproxy, nginx) running in the foreground on a port of
/// its own, with its config and logs in a temp dir; killed on drop.
struct ExternalTarget {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl ExternalTarget {
    /// Runs `program` with `args(dir, config)` and the config `config(dir, port)`
    /// on a free port, retried on another should the port be taken meanwhile;
    /// ready once the port accepts connections.
    fn start(program: &Path, config: impl Fn(&Path, u16) -> String, args: impl Fn(&Path, &Path) -> Vec<String>) -> ExternalTarget {
        let mut last_error = String::new();
        for _ in 0..5 {
            let dir = tempfile::tempdir().expect("tempdir");
            let port = free_port();
            let config_path = dir.path().join("target.conf");
            std::fs::write(&config_path, config(dir.path(), port)).expect("write the config");
            let log = std::fs::File::create(dir.path().join("stderr.log")).expect("a log file");
            let child = Command::new(program)
                .args(args(dir.path(), &config_path))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
            let mut target = ExternalTarget { child, port, dir };
            match target.wait_listening() {
                Ok(()) => return target,
                Err(e) => last_error = e,
            }
        }
        panic!("{} did not start: {last_error}", program.display());
    }

    /// `Ok` once the port accepts a connection; `Err` with its log if the
    /// program exited first (a port taken, a bad config).
    fn wait_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("exited with {status}: {}", self.log()));
            }
            if TcpStream::connect(loopback(self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("not listening on {} after 15 s: {}", self.port, self.log()))
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }
}

impl Drop for ExternalTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy answering every request with the source address it took from the
/// PROXY header (`accept-proxy` takes v1 and v2 alike).
fn haproxy(program: &Path) -> ExternalTarget {
    let config = |_: &Path, port: u16| {
        format!(
            "global\n\
             \x20   maxconn 64\n\
             defaults\n\
             \x20   mode http\n\
             \x20   timeout connect 5s\n\
             \x20   timeout client 15s\n\
             \x20   timeout server 15s\n\
             frontend proxied\n\
             \x20   bind 127.0.0.1:{port} accept-proxy\n\
             \x20   http-request return status 200 content-type text/plain lf-string \"%[src]:%[src_port]\"\n"
        )
    };
    ExternalTarget::start(program, config, |_, conf| vec!["-db".into(), "-f".into(), conf.display().to_string()])
}

/// nginx answering every request with `$proxy_protocol_addr:$proxy_protocol_port`
/// (a `proxy_protocol` listener takes v1 and v2 alike).
fn nginx(program: &Path) -> ExternalTarget {
    let config = |dir: &Path, port: u16| {
        let dir = dir.display();
        format!(
            "daemon off;\n\
             worker_processes 1;\n\
             pid {dir}/nginx.pid;\n\
             error_log stderr notice;\n\
             events {{ worker_connections 64; }}\n\
             http {{\n\
             \x20   access_log off;\n\
             \x20   client_body_temp_path {dir}/client_body;\n\
             \x20   proxy_temp_path {dir}/proxy;\n\
             \x20   fastcgi_temp_path {dir}/fastcgi;\n\
             \x20   uwsgi_temp_path {dir}/uwsgi;\n\
             \x20   scgi_temp_path {dir}/scgi;\n\
             \x20   server {{\n\
             \x20       listen 127.0.0.1:{port} proxy_protocol;\n\
             \x20       location / {{ return 200 \"$proxy_protocol_addr:$proxy_protocol_port\"; }}\n\
             \x20   }}\n\
             }}\n"
        )
    };
    let args = |dir: &Path, conf: &Path| {
        vec!["-p".into(), dir.display().to_string(), "-c".into(), conf.display().to_string(), "-e".into(), "stderr".into()]
    };
    ExternalTarget::start(program, config, args)
}

/// Four mappings to `target` — v1 and v2, direct and through a real
/// `tunneld client` — each visited from `visitors` (to `mapping_host`): the
/// address and port the target read from the header are the visitor's own.
/// The server listens on `bind_addr`.
fn the_target_sees_each_visitor(target: &ExternalTarget, name: &str, bind_addr: &str, visitors: &[IpAddr], mapping_host: IpAddr) {
    let server = Daemon::server_env(SECRET, &[], &[("TUNNELD_SERVER__BIND_ADDR", bind_addr)]);
    let _client = Daemon::client(&server, SECRET, &[]);
    for tunneled in [false, true] {
        for version in ["v1", "v2"] {
            let port = free_port();
            create_proxied(&server, port, target.addr(), tunneled, version);
            for &from in visitors {
                let (visitor, seen) = http_get_from(from, SocketAddr::new(mapping_host, port));
                assert_eq!(
                    seen,
                    format!("{}:{}", visitor.ip(), visitor.port()),
                    "{name} behind a {version} mapping ({}) saw {seen} for the visitor {visitor}; its log: {}",
                    if tunneled { "tunneled" } else { "direct" },
                    target.log()
                );
            }
        }
    }
}

#[test]
fn haproxy_with_accept_proxy_sees_the_visitors_address_v1_and_v2_direct_and_tunneled() {
    let test = "haproxy_with_accept_proxy_sees_the_visitors_address_v1_and_v2_direct_and_tunneled";
    let Some(program) = external_tool("haproxy", test) else { return };
    let target = haproxy(&program);
    the_target_sees_each_visitor(&target, "haproxy", "0.0.0.0", &VISITORS, IpAddr::V4(Ipv4Addr::LOCALHOST));
}

/// A visitor over IPv6 (`::1`, to a server listening on `::`) is announced as
/// TCP6, v1 and v2, and both parsers read it so.
#[test]
fn ipv6_visitors_are_announced_as_tcp6_to_haproxy_and_nginx() {
    let test = "ipv6_visitors_are_announced_as_tcp6_to_haproxy_and_nginx";
    let (Some(haproxy_program), Some(nginx_program)) = (external_tool("haproxy", test), external_tool("nginx", test)) else { return };
    if TcpListener::bind("[::1]:0").is_err() {
        common::tools::skip_or_fail(test, "IPv6 on loopback (::1)");
        return;
    }
    let ipv6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    the_target_sees_each_visitor(&haproxy(&haproxy_program), "haproxy", "::", &[ipv6], ipv6);
    the_target_sees_each_visitor(&nginx(&nginx_program), "nginx", "::", &[ipv6], ipv6);
}

#[test]
fn nginx_with_proxy_protocol_sees_the_visitors_address_v1_and_v2_direct_and_tunneled() {
    let test = "nginx_with_proxy_protocol_sees_the_visitors_address_v1_and_v2_direct_and_tunneled";
    let Some(program) = external_tool("nginx", test) else { return };
    let target = nginx(&program);
    the_target_sees_each_visitor(&target, "nginx", "0.0.0.0", &VISITORS, IpAddr::V4(Ipv4Addr::LOCALHOST));
}

/// A PROXY header as a target parses it: its version, source and destination.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    version: u8,
    source: SocketAddr,
    destination: SocketAddr,
    length: usize,
}

/// Reads one PROXY header (v1 or v2, TCP over IPv4 or IPv6) off `conn`, by the
/// specification, byte by byte so nothing past it is consumed.
fn read_header(conn: &mut TcpStream) -> Header {
    let mut first = [0u8; 1];
    conn.read_exact(&mut first).expect("the header's first byte");
    if first[0] == b'P' {
        let mut line = vec![b'P'];
        while !line.ends_with(b"\r\n") {
            assert!(line.len() <= 107, "a v1 line longer than 107 bytes: {line:?}");
            conn.read_exact(&mut first).expect("the v1 line");
            line.push(first[0]);
        }
        let text = String::from_utf8(line.clone()).expect("an ASCII line");
        let fields: Vec<&str> = text.trim_end().split(' ').collect();
        assert_eq!(fields.len(), 6, "{text:?}");
        assert_eq!(fields[0], "PROXY", "{text:?}");
        let ip = |t: &str| -> IpAddr { t.parse().unwrap_or_else(|_| panic!("{t:?} in {text:?}")) };
        let (source, destination) = (ip(fields[2]), ip(fields[3]));
        assert_eq!(fields[1], if source.is_ipv4() { "TCP4" } else { "TCP6" }, "{text:?}");
        let port = |t: &str| -> u16 { t.parse().unwrap_or_else(|_| panic!("{t:?} in {text:?}")) };
        return Header {
            version: 1,
            source: SocketAddr::new(source, port(fields[4])),
            destination: SocketAddr::new(destination, port(fields[5])),
            length: line.len(),
        };
    }
    let mut fixed = [0u8; 16];
    fixed[0] = first[0];
    conn.read_exact(&mut fixed[1..]).expect("the v2 header");
    assert_eq!(&fixed[..12], b"\r\n\r\n\0\r\nQUIT\n", "the v2 signature");
    assert_eq!(fixed[12], 0x21, "version 2, command PROXY");
    let length = u16::from_be_bytes([fixed[14], fixed[15]]) as usize;
    let mut addresses = vec![0u8; length];
    conn.read_exact(&mut addresses).expect("the v2 addresses");
    let (source, destination, ports) = match fixed[13] {
        0x11 => {
            assert_eq!(length, 12);
            let ip = |b: &[u8]| IpAddr::from(<[u8; 4]>::try_from(b).unwrap());
            (ip(&addresses[0..4]), ip(&addresses[4..8]), &addresses[8..12])
        }
        0x21 => {
            assert_eq!(length, 36);
            let ip = |b: &[u8]| IpAddr::from(Ipv6Addr::from(<[u8; 16]>::try_from(b).unwrap()));
            (ip(&addresses[0..16]), ip(&addresses[16..32]), &addresses[32..36])
        }
        other => panic!("family/transport {other:#x} is not TCP over IPv4 or IPv6"),
    };
    Header {
        version: 2,
        source: SocketAddr::new(source, u16::from_be_bytes([ports[0], ports[1]])),
        destination: SocketAddr::new(destination, u16::from_be_bytes([ports[2], ports[3]])),
        length: 16 + length,
    }
}

/// What the raw target got on one connection: the header and the payload.
type Received = (Header, Vec<u8>);

const PAYLOAD: usize = 5000;
const RESPONSE: usize = 3210;

/// A raw TCP target that reads the PROXY header, then exactly [`PAYLOAD`]
/// bytes, reports both, answers [`RESPONSE`] bytes, and closes once the
/// visitor has.
fn raw_target() -> (SocketAddr, mpsc::Receiver<Received>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the raw target");
    let addr = listener.local_addr().expect("its address");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                conn.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let header = read_header(&mut conn);
                let mut payload = vec![0u8; PAYLOAD];
                conn.read_exact(&mut payload).expect("the payload");
                let _ = tx.send((header, payload));
                conn.write_all(&vec![b'r'; RESPONSE]).expect("answer");
                let mut rest = Vec::new();
                let _ = conn.read_to_end(&mut rest);
                assert!(rest.is_empty(), "nothing after the payload: {} bytes", rest.len());
            });
        }
    });
    (addr, rx)
}

/// The open connection from `source` on `port`, as `/api/connections` shows it.
fn open_connection(server: &Daemon, port: u16, source: SocketAddr) -> Option<Value> {
    let data = get_data(server, &format!("/api/connections?port={port}"));
    data["connections"].as_array()?.iter().find(|c| c["source"] == source.to_string()).cloned()
}

/// A raw target reads the header, then the payload: the header names the
/// visitor and the address it connected to, and the live connection's bytes,
/// the mapping's counters, its metric and its quota count the payload only —
/// v1 and v2, direct and tunneled.
#[test]
fn the_header_carries_the_visitor_and_is_not_counted_as_traffic() {
    let server = Daemon::server(SECRET, &[]);
    let _client = Daemon::client(&server, SECRET, &[]);
    let (target, received) = raw_target();
    let payload: Vec<u8> = (0..PAYLOAD).map(|i| (i % 253) as u8).collect();
    for tunneled in [false, true] {
        for (version, number) in [("v1", 1), ("v2", 2)] {
            let case = format!("{version}, {}", if tunneled { "tunneled" } else { "direct" });
            let port = free_port();
            create_proxied(&server, port, target, tunneled, version);
            let quota = json!({"port": port, "quota": {"bytes": 1_000_000_000u64, "period": "day", "action": "alert"}});
            let (status, answer) = post(&server, "/api/mapping/update", quota);
            assert_eq!(status, 200, "{answer}");
            let mut visitor = connect_from(VISITORS[0], loopback(port));
            let me = visitor.local_addr().unwrap();
            visitor.write_all(&payload).unwrap();
            let (header, got) = received.recv_timeout(Duration::from_secs(15)).unwrap_or_else(|e| panic!("{case}: {e}"));
            assert_eq!(header.version, number, "{case}");
            assert_eq!(header.source, me, "{case}: the visitor's address and port");
            assert_eq!(header.destination, loopback(port), "{case}: the address the visitor connected to");
            assert!(got == payload, "{case}: the payload follows the header unchanged");
            let mut answer = vec![0u8; RESPONSE];
            visitor.read_exact(&mut answer).unwrap();
            // Open still: its live bytes are the payload and the answer, without the header.
            let live = wait_for(&format!("{case}: live bytes"), Duration::from_secs(10), || {
                let c = open_connection(&server, port, me)?;
                let counted = |field: &str| c[field].as_u64().unwrap_or(0);
                (counted("bytes_sent") >= PAYLOAD as u64 && counted("bytes_received") >= RESPONSE as u64).then_some(c)
            });
            assert_eq!(live["bytes_sent"], PAYLOAD, "{case}: the header ({} bytes) is not traffic: {live}", header.length);
            assert_eq!(live["bytes_received"], RESPONSE, "{case}: {live}");
            visitor.shutdown(std::net::Shutdown::Write).unwrap();
            let mut rest = Vec::new();
            visitor.read_to_end(&mut rest).unwrap();
            assert!(rest.is_empty(), "{case}");
            let entry = wait_for(&format!("{case}: the connection ends"), Duration::from_secs(10), || {
                traffic_entry(&server, port).filter(|t| t["active_connections"] == 0)
            });
            assert_eq!(entry["bytes_sent"], PAYLOAD, "{case}: the header ({} bytes) is not traffic: {entry}", header.length);
            assert_eq!(entry["bytes_received"], RESPONSE as u64, "{case}: {entry}");
            let text = metrics_text(&server);
            let port_label = port.to_string();
            let sent = metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &port_label), ("direction", "sent")]);
            assert_eq!(sent, Some(PAYLOAD as f64), "{case}: the metric counts the payload only");
            // The quota counts the same bytes, both ways (checked once a second).
            let used = wait_for(&format!("{case}: the quota's use"), Duration::from_secs(10), || {
                listed_mapping(&server, port)?["quota_used"].as_u64().filter(|used| *used >= (PAYLOAD + RESPONSE) as u64)
            });
            assert_eq!(used, (PAYLOAD + RESPONSE) as u64, "{case}: the quota does not count the header");
        }
    }
}

/// A hand-made client from before the feature: authenticates without
/// announcing `proxy_header` and keeps a data channel open.
fn old_client(
    server: &Daemon,
    rt: &tokio::runtime::Runtime,
) -> (tunneld::net::transport::TunnelStream, tokio::task::JoinHandle<Option<String>>) {
    use tunneld::tunnel::frame::{read_frame, write_frame};
    use tunneld::tunnel::message::{Auth, Connect, Opening, Verdict, PROTOCOL_VERSION};
    let (tunnel, pin) = (server.tunnel.unwrap(), server.fingerprint());
    let (control, token) = rt.block_on(async {
        let mut control = common::tunnel::tls_connect(tunnel, &pin).await;
        let nonce = common::tunnel::challenge_as(&mut control, "default").await;
        let mac = tunneld::tunnel::auth::sign(SECRET, &nonce, &control.binding());
        write_frame(&mut control, &Auth::Auth { mac }).await.unwrap();
        match read_frame(&mut control).await.unwrap().0 {
            Verdict::Welcome { session, .. } => (control, session),
            other => panic!("{other:?}"),
        }
    });
    // What the data channel is asked, if anything: the host of a `connect`.
    let channel = rt.spawn(async move {
        let mut channel = common::tunnel::tls_connect(tunnel, &pin).await;
        write_frame(&mut channel, &Opening::Data { version: PROTOCOL_VERSION, session: token }).await.unwrap();
        match tokio::time::timeout(Duration::from_secs(2), read_frame::<Connect, _>(&mut channel)).await {
            Ok(Ok((Connect::Connect { host, .. }, _))) => Some(host),
            _ => None,
        }
    });
    (control, channel)
}

#[test]
fn a_client_that_cannot_write_headers_is_sent_none_and_its_visitors_are_refused() {
    let server = Daemon::server(SECRET, &[]);
    let rt = common::tunnel::runtime();
    let (_control, channel) = old_client(&server, &rt);
    wait_for("the old client's session", Duration::from_secs(10), || {
        get_data(&server, "/api/client/list")["clients"].as_array()?.iter().find(|c| c["connected"] == true).cloned()
    });
    let port = free_port();
    create_proxied(&server, port, echo_server(), true, "v2");
    let answer = visit(port, b"hello");
    assert!(answer.is_empty(), "the visitor is refused, not served bare: {answer:?}");
    assert_eq!(rt.block_on(channel).unwrap(), None, "no `connect` reached the old client");
    let entry = wait_for("a connect error", Duration::from_secs(10), || traffic_entry(&server, port).filter(|t| t["connect_errors"] == 1));
    assert_eq!(entry["bytes_sent"], 0, "{entry}");
    server.wait_for_log("too old to write PROXY protocol headers", Duration::from_secs(10));
}

/// In a group, a member too old to write the header is passed over: the
/// visitor goes to the next member that can, header first.
#[test]
fn a_group_passes_over_a_member_that_cannot_write_headers() {
    let server = Daemon::server(SECRET, &[]);
    let rt = common::tunnel::runtime();
    let (_control, channel) = old_client(&server, &rt);
    let (status, answer) = post(&server, "/api/client/create", json!({"name": "office"}));
    assert_eq!(status, 200, "{answer}");
    let office_secret = answer["data"]["secret"].as_str().expect("the new client's secret").to_string();
    let _office = Daemon::client(&server, &office_secret, &["--name", "office"]);
    let (target, received) = raw_target();
    let port = free_port();
    let body = json!({"source_port": port, "target_host": target.ip().to_string(), "target_port": target.port(), "use_tunnel": true,
                      "clients": ["default", "office"], "balance": "failover", "proxy_protocol": "v2"});
    let (status, answer) = post(&server, "/api/mapping/create", body);
    assert_eq!(status, 200, "{answer}");
    let mut visitor = connect_from(VISITORS[0], loopback(port));
    let me = visitor.local_addr().unwrap();
    visitor.write_all(&vec![7u8; PAYLOAD]).unwrap();
    let (header, got) = received.recv_timeout(Duration::from_secs(15)).expect("the target is reached through office");
    assert_eq!((header.version, header.source), (2, me), "the header names the visitor");
    assert_eq!(got.len(), PAYLOAD);
    assert_eq!(rt.block_on(channel).unwrap(), None, "no `connect` reached the old client");
    let mut answer = vec![0u8; RESPONSE];
    visitor.read_exact(&mut answer).expect("the target's answer");
    drop(visitor);
    let served = wait_for("the visitor logged", Duration::from_secs(10), || {
        let log = get_data(&server, &format!("/api/connections/log?port={port}"));
        log["connections"].as_array()?.first().cloned()
    });
    assert_eq!(served["client"], "office", "{served}");
}

#[test]
fn proxy_protocol_is_set_changed_and_removed_through_the_api_and_ctl_and_kept_across_a_restart() {
    let state = tempfile::tempdir().expect("tempdir");
    let mut server = Daemon::server_with_state(state.path(), SECRET, &[]);
    let port = free_port();
    create_proxied(&server, port, echo_server(), false, "v1");
    assert_eq!(listed_mapping(&server, port).unwrap()["proxy_protocol"], "v1");
    assert_eq!(traffic_entry(&server, port).unwrap()["proxy_protocol"], "v1");

    let (status, answer) = post(&server, "/api/mapping/update", json!({"port": port, "proxy_protocol": "v3"}));
    assert_eq!(status, 400, "{answer}");
    let message = answer["message"].to_string();
    assert!(message.contains("proxy_protocol") && message.contains("v3") && message.contains("v1"), "{answer}");

    let (status, answer) = post(&server, "/api/mapping/update", json!({"port": port, "proxy_protocol": "v2"}));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["data"]["proxy_protocol"], "v2");
    let (_, answer) = post(&server, "/api/mapping/update", json!({"port": port, "description": "kept"}));
    assert_eq!(answer["data"]["proxy_protocol"], "v2", "absent keeps it: {answer}");

    let ctl = |args: &[&str]| {
        let out = Command::new(BIN).arg("ctl").arg("--api").arg(server.url("")).args(args).output().expect("run tunneld ctl");
        assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let listed = ctl(&["list"]);
    assert!(listed.lines().any(|l| l.starts_with(&port.to_string()) && l.contains("direct+proxy_v2")), "{listed}");

    // Kept across a restart, from the store.
    assert!(server.terminate().success());
    let server = Daemon::server_with_state(state.path(), SECRET, &[]);
    assert_eq!(listed_mapping(&server, port).unwrap()["proxy_protocol"], "v2");

    let updated = Command::new(BIN)
        .arg("ctl")
        .arg("--api")
        .arg(server.url(""))
        .args(["update", &port.to_string(), "--no-proxy-protocol"])
        .output()
        .expect("run tunneld ctl");
    let shown = String::from_utf8_lossy(&updated.stdout);
    assert!(updated.status.success() && shown.contains("proxy protocol"), "{shown}");
    assert_eq!(listed_mapping(&server, port).unwrap()["proxy_protocol"], Value::Null, "null removes it");
}

#[test]
fn the_page_shows_which_header_a_mappings_targets_receive() {
    let Some(chromium) = external_tool("chromium", "the_page_shows_which_header_a_mappings_targets_receive") else { return };
    let server = Daemon::server(SECRET, &[]);
    let (plain, proxied) = (free_port(), free_port());
    create_mapping(&server, plain, echo_server(), false);
    create_proxied(&server, proxied, echo_server(), false, "v2");
    let mut browser = common::browser::Browser::launch(&chromium, &[], None);
    browser.navigate(&server.url("/api/stats/monitor?interval_ms=250"));
    let badge = |port: u16| {
        format!(
            r#"(() => {{ const row = [...document.querySelectorAll('tr')].find((r) => r.textContent.includes(':{port}'));
                 const badge = row?.querySelector('[data-role="proxy-protocol"]');
                 return badge ? [badge.textContent, badge.title] : null; }})()"#
        )
    };
    browser.wait_for("the proxied mapping's badge", &format!("{} !== null", badge(proxied)));
    let shown = browser.eval(&badge(proxied));
    assert_eq!(shown[0], "PROXY v2", "{shown}");
    assert!(shown[1].as_str().unwrap_or_default().contains("visitor's address"), "{shown}");
    assert_eq!(browser.eval(&badge(plain)), Value::Null, "no badge without proxy_protocol");
    for (width, height, mobile) in [(1440, 900, false), (390, 844, true)] {
        browser.set_viewport(width, height, mobile);
        browser.wait_for("the badge after the resize", &format!("{} !== null", badge(proxied)));
        browser.eval(
            r#"(() => { document.querySelector('[data-role="proxy-protocol"]').scrollIntoView({block: 'center'}); return true; })()"#,
        );
        browser.screenshot(&format!("proxy-protocol-badge-{width}.png"));
    }

    // The policy dialog shows the setting and changes it.
    browser.set_viewport(1440, 900, false);
    browser.eval(&format!(
        r#"(() => {{ document.querySelector('[data-role="edit-policy"][data-port="{proxied}"]').click(); return true; }})()"#
    ));
    browser.wait_for("the policy dialog", r#"!document.querySelector('[data-testid="policy-dialog"]').hidden"#);
    assert_eq!(browser.eval("document.querySelector('#policy-proxy').value"), "v2");
    browser.eval(r#"(() => { document.querySelector('#policy-proxy').value = 'v1'; document.querySelector('#policy-proxy').scrollIntoView({block: 'center'}); return true; })()"#);
    browser.screenshot("proxy-protocol-dialog-1440.png");
    browser.set_viewport(390, 844, true);
    browser.eval(r#"(() => { document.querySelector('#policy-proxy').scrollIntoView({block: 'center'}); return true; })()"#);
    browser.screenshot("proxy-protocol-dialog-390.png");
    browser.set_viewport(1440, 900, false);
    browser.eval(r#"(() => { document.querySelector('#policy-form').requestSubmit(); return true; })()"#);
    browser.wait_for("the dialog to close", r#"document.querySelector('[data-testid="policy-dialog"]').hidden"#);
    let m = listed_mapping(&server, proxied).expect("the mapping");
    assert_eq!(m["proxy_protocol"], "v1", "{m}");
    assert_eq!(m["description"], Value::Null, "only the changed field was sent: {m}");
    browser.wait_for("the badge to follow", &format!("{}?.[0] === 'PROXY v1'", badge(proxied)));
    // And `none` removes it.
    browser.eval(&format!(
        r#"(() => {{ document.querySelector('[data-role="edit-policy"][data-port="{proxied}"]').click(); return true; }})()"#
    ));
    browser.wait_for("the policy dialog", r#"!document.querySelector('[data-testid="policy-dialog"]').hidden"#);
    browser.eval(r#"(() => { document.querySelector('#policy-proxy').value = ''; document.querySelector('#policy-form').requestSubmit(); return true; })()"#);
    browser.wait_for("the dialog to close", r#"document.querySelector('[data-testid="policy-dialog"]').hidden"#);
    browser.wait_for("the badge gone", &format!("{} === null", badge(proxied)));
    assert_eq!(listed_mapping(&server, proxied).expect("the mapping")["proxy_protocol"], Value::Null);
}
