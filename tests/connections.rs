//! Issue 21, parts 1–3, against the real binary on loopback: every open visitor
//! connection listed live with its source and exact byte counts (the same as
//! its mapping's counters), closed through the API with a reset, logged with
//! how it ended (every reason produced for real), the log's cap and off
//! switch, its CSV, and the sources that moved the most.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const SECRET: &str = "connections-test-secret";

fn source(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn open_connections(server: &Daemon, query: &str) -> Value {
    get_data(server, &format!("/api/connections{query}"))
}

fn logged(server: &Daemon, query: &str) -> Vec<Value> {
    get_data(server, &format!("/api/connections/log{query}"))["connections"].as_array().cloned().unwrap_or_default()
}

/// Waits until the log holds `n` connections of `port`; returns them, newest first.
fn wait_for_logged(server: &Daemon, port: u16, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} logged connections of :{port}"), Duration::from_secs(10), || {
        let rows = logged(server, &format!("?port={port}&limit=1000"));
        (rows.len() >= n).then_some(rows)
    })
}

/// Sends `len` bytes and reads the echo back, keeping the connection open.
fn echo_exchange(visitor: &mut TcpStream, len: usize) {
    let payload = vec![7u8; len];
    visitor.write_all(&payload).expect("write");
    let mut back = vec![0u8; len];
    visitor.read_exact(&mut back).expect("echo back");
}

fn create_direct(server: &Daemon, port: u16, target: SocketAddr, extra: Value) {
    let mut body = json!({"source_port": port, "target_host": target.ip().to_string(), "target_port": target.port(), "use_tunnel": false});
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        body[k] = v;
    }
    let (status, reply) = post(server, "/api/mapping/create", body);
    assert_eq!(status, 200, "{reply}");
}

/// A reset instead of a FIN when `stream` is dropped.
fn reset_on_drop(stream: &TcpStream) {
    socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)).expect("SO_LINGER 0");
}

/// Reads until the connection ends; how it ended.
fn read_end(visitor: &mut TcpStream) -> std::io::Result<usize> {
    let mut sink = Vec::new();
    visitor.read_to_end(&mut sink)
}

#[test]
fn open_connections_show_their_source_and_exact_bytes_and_end_in_the_log() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    let other = free_port();
    let echo = echo_server();
    create_direct(&server, port, echo, json!({}));
    create_direct(&server, other, echo, json!({}));

    let sizes = [(2u8, 1_000usize), (3, 20_000), (4, 300_000)];
    let mut visitors: Vec<TcpStream> = sizes
        .iter()
        .map(|&(last, len)| {
            let mut v = connect_from(source(last), loopback(port));
            echo_exchange(&mut v, len);
            v
        })
        .collect();

    let list = wait_for("three open connections with their bytes", Duration::from_secs(10), || {
        let list = open_connections(&server, &format!("?port={port}"));
        let conns = list["connections"].as_array()?;
        let settled = conns.len() == 3
            && conns.iter().all(|c| {
                let ip = c["source"].as_str().unwrap_or("").rsplit_once(':').map(|(ip, _)| ip.to_string()).unwrap_or_default();
                let len = sizes.iter().find(|(last, _)| source(*last).to_string() == ip).map(|(_, len)| *len as u64);
                Some(c["bytes_sent"].as_u64().unwrap_or(0)) == len && Some(c["bytes_received"].as_u64().unwrap_or(0)) == len
            });
        settled.then_some(list)
    });
    assert_eq!(list["count"], 3, "{list}");
    let conns = list["connections"].as_array().unwrap();
    for c in conns {
        assert_eq!(c["port"], port, "{c}");
        assert_eq!(c["protocol"], "tcp", "{c}");
        assert!(c["client"].is_null(), "a direct mapping has no client: {c}");
        assert!(c["started_at"].as_f64().unwrap() > unix_now() - 60.0, "{c}");
        assert!(c["sent_rate"].as_f64().is_some() && c["received_rate"].as_f64().is_some(), "{c}");
    }
    let ids: Vec<u64> = conns.iter().map(|c| c["id"].as_u64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "unique ids, oldest first: {ids:?}");
    // The same counting: the connections of the port add up to its counters.
    let traffic = traffic_entry(&server, port).expect("traffic entry");
    let total: u64 = sizes.iter().map(|(_, len)| *len as u64).sum();
    assert_eq!(traffic["bytes_sent"], total, "{traffic}");
    assert_eq!(traffic["bytes_received"], total, "{traffic}");
    let text = metrics_text(&server);
    let port_label = port.to_string();
    assert_eq!(metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &port_label), ("direction", "sent")]), Some(total as f64));

    // Filters and the bound: `count` is the total, `limit` bounds the list.
    let limited = open_connections(&server, &format!("?port={port}&limit=1"));
    assert_eq!((limited["count"].as_u64(), limited["connections"].as_array().unwrap().len()), (Some(3), 1), "{limited}");
    assert_eq!(open_connections(&server, &format!("?port={other}"))["count"], 0);
    assert_eq!(open_connections(&server, "?client=office")["count"], 0, "direct connections have no client");
    let (status, _) = http("GET", &server.url("/api/connections?limit=0"), None);
    assert_eq!(status, 400);

    // Each ends cleanly (the visitor half-closes, the echo follows): logged as
    // `closed`, with the same bytes.
    for v in &mut visitors {
        v.shutdown(std::net::Shutdown::Write).unwrap();
        assert_eq!(read_end(v).expect("a clean end"), 0);
    }
    let rows = wait_for_logged(&server, port, 3);
    wait_for("no open connections", Duration::from_secs(5), || (open_connections(&server, "")["count"] == 0).then_some(()));
    let mut logged_ids: Vec<u64> = rows.iter().map(|r| r["id"].as_u64().unwrap()).collect();
    logged_ids.sort_unstable();
    assert_eq!(logged_ids, ids, "the same ids in the log");
    for row in &rows {
        assert_eq!(row["end"], "closed", "{row}");
        assert!(row["reason"].is_null(), "{row}");
        assert!(row["ended_at"].as_f64().unwrap() >= row["started_at"].as_f64().unwrap(), "{row}");
    }
    let logged_total: u64 = rows.iter().map(|r| r["bytes_sent"].as_u64().unwrap()).sum();
    assert_eq!(logged_total, total, "the log's bytes are the counters' bytes");
    let logged_received: u64 = rows.iter().map(|r| r["bytes_received"].as_u64().unwrap()).sum();
    assert_eq!(logged_received, total);
    for &(last, len) in &sizes {
        let from_ip = logged(&server, &format!("?source={}", source(last)));
        assert_eq!(from_ip.len(), 1, "source filter on {}: {from_ip:?}", source(last));
        assert_eq!(from_ip[0]["bytes_sent"], len as u64);
    }
}

#[test]
fn closing_a_connection_through_the_api_resets_its_visitor() {
    const TOKEN: &str = "connections-close-token-0123";
    let server = Daemon::server(SECRET, &["--api-token", TOKEN]);
    let port = free_port();
    let echo = echo_server();
    let body = json!({"source_port": port, "target_host": "127.0.0.1", "target_port": echo.port(), "use_tunnel": false});
    let (status, reply) = post_with_token(&server, "/api/mapping/create", TOKEN, body);
    assert_eq!(status, 200, "{reply}");
    let mut visitor = connect_from(source(2), loopback(port));
    echo_exchange(&mut visitor, 100);
    let id = wait_for("the open connection", Duration::from_secs(5), || {
        get_data_with_token(&server, "/api/connections", TOKEN)["connections"][0]["id"].as_u64()
    });

    let (status, _) = post(&server, "/api/connection/close", json!({"id": id}));
    assert_eq!(status, 401, "closing is token-protected like every mutating call");
    let (status, reply) = post_with_token(&server, "/api/connection/close", TOKEN, json!({"id": id + 1000}));
    assert_eq!(status, 404, "{reply}");
    let (status, reply) = post_with_token(&server, "/api/connection/close", TOKEN, json!({"id": id, "extra": 1}));
    assert_eq!(status, 400, "unknown fields are refused: {reply}");
    let (status, reply) = post_with_token(&server, "/api/connection/close", TOKEN, json!({"id": id}));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["data"]["id"], id);

    let end = read_end(&mut visitor);
    assert_eq!(end.map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset), "the visitor gets a reset, not an EOF");
    let row = wait_for("the closed connection in the log", Duration::from_secs(10), || {
        get_data_with_token(&server, "/api/connections/log", TOKEN)["connections"].as_array()?.first().cloned()
    });
    assert_eq!(row["id"], id);
    assert_eq!(row["end"], "closed_by_api", "{row}");
    assert_eq!((row["bytes_sent"].as_u64(), row["bytes_received"].as_u64()), (Some(100), Some(100)), "{row}");
    assert_eq!(get_data_with_token(&server, "/api/connections", TOKEN)["count"], 0);
}

/// A target that reads what arrives, then resets.
fn resetting_target() -> SocketAddr {
    target(|mut conn| {
        let mut buf = [0u8; 16];
        let _ = conn.read(&mut buf);
        reset_on_drop(&conn);
    })
}

/// A target that accepts and then waits for the visitor, silent.
fn silent_target() -> SocketAddr {
    target(|mut conn| {
        let mut sink = Vec::new();
        let _ = conn.read_to_end(&mut sink);
    })
}

/// A port nothing listens on.
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

#[test]
fn every_way_a_connection_ends_is_logged() {
    let (_dir, config) = config_file("[server]\nidle_timeout_secs = 3\nshutdown_grace_secs = 1\n");
    let mut server = Daemon::server(SECRET, &["--config", &config]);
    let echo = echo_server();
    let client_secret = create_client(&server, "office");
    let _client = Daemon::client(&server, &client_secret, &["--name", "office"]);

    // visitor_reset: the visitor resets mid-connection.
    let visitor_port = free_port();
    create_direct(&server, visitor_port, echo, json!({}));
    let mut v = connect_from(source(2), loopback(visitor_port));
    echo_exchange(&mut v, 10);
    reset_on_drop(&v);
    drop(v);

    // target_reset: the target resets after reading.
    let target_port = free_port();
    create_direct(&server, target_port, resetting_target(), json!({}));
    let mut v = connect_from(source(3), loopback(target_port));
    v.write_all(b"hello").unwrap();
    assert!(read_end(&mut v).is_err(), "the target's reset reaches the visitor as one");

    // idle_timeout: nothing moves for 3 s.
    let idle_port = free_port();
    create_direct(&server, idle_port, silent_target(), json!({}));
    let mut v = connect_from(source(4), loopback(idle_port));
    assert!(read_end(&mut v).is_err(), "an idle connection is cut with a reset");

    // target_unreachable: nothing listens on the target.
    let unreachable_port = free_port();
    create_direct(&server, unreachable_port, closed_port(), json!({}));
    let mut v = connect_from(source(2), loopback(unreachable_port));
    let _ = read_end(&mut v);

    // refused (acl): 127.0.0.3 is denied.
    let acl_port = free_port();
    create_direct(&server, acl_port, echo, json!({"deny": ["127.0.0.3/32"]}));
    let mut v = connect_from(source(3), loopback(acl_port));
    let _ = read_end(&mut v);

    // mapping_removed: an open connection of a mapping that is removed.
    let removed_port = free_port();
    create_direct(&server, removed_port, echo, json!({}));
    let mut removed_visitor = connect_from(source(4), loopback(removed_port));
    echo_exchange(&mut removed_visitor, 10);
    wait_for("the connection is open", Duration::from_secs(5), || {
        (open_connections(&server, &format!("?port={removed_port}"))["count"] == 1).then_some(())
    });
    let (status, reply) = post(&server, "/api/mapping/remove", json!({"port": removed_port}));
    assert_eq!(status, 200, "{reply}");
    assert!(read_end(&mut removed_visitor).is_err());

    // client_removed: a tunneled connection whose client is removed; its bytes
    // while open are its mapping's too.
    let tunneled_port = free_port();
    create_tunneled_mapping(&server, tunneled_port, echo, "office");
    let mut tunneled_visitor = connect_from(source(2), loopback(tunneled_port));
    echo_exchange(&mut tunneled_visitor, 5_000);
    let open = wait_for("the tunneled connection's bytes", Duration::from_secs(5), || {
        let list = open_connections(&server, "?client=office");
        (list["connections"][0]["bytes_received"] == 5_000).then_some(list)
    });
    assert_eq!(open["connections"][0]["client"], "office", "{open}");
    assert_eq!(open["connections"][0]["bytes_sent"], 5_000, "{open}");
    assert_eq!(traffic_entry(&server, tunneled_port).unwrap()["bytes_sent"], 5_000);
    let (status, reply) = post(&server, "/api/client/remove", json!({"name": "office", "force": true}));
    assert_eq!(status, 200, "{reply}");
    assert!(read_end(&mut tunneled_visitor).is_err());

    let end_of = |port: u16| -> Value { wait_for_logged(&server, port, 1)[0].clone() };
    assert_eq!(end_of(visitor_port)["end"], "visitor_reset", "{}", end_of(visitor_port));
    assert_eq!(end_of(target_port)["end"], "target_reset", "{}", end_of(target_port));
    assert_eq!(end_of(target_port)["bytes_sent"], 5, "the bytes that reached the target");
    assert_eq!(end_of(idle_port)["end"], "idle_timeout", "{}", end_of(idle_port));
    let unreachable = end_of(unreachable_port);
    assert_eq!(unreachable["end"], "target_unreachable", "{unreachable}");
    assert!(unreachable["reason"].as_str().is_some_and(|r| !r.is_empty()), "{unreachable}");
    let refused = end_of(acl_port);
    assert_eq!((refused["end"].as_str(), refused["reason"].as_str()), (Some("refused"), Some("acl")), "{refused}");
    assert_eq!(refused["source"].as_str().map(|s| s.starts_with("127.0.0.3:")), Some(true), "{refused}");
    assert_eq!(end_of(removed_port)["end"], "mapping_removed", "{}", end_of(removed_port));
    let removed_client = end_of(tunneled_port);
    assert_eq!(removed_client["end"], "client_removed", "{removed_client}");
    assert_eq!(removed_client["client"], "office", "{removed_client}");
    assert_eq!(removed_client["bytes_sent"], 5_000, "{removed_client}");

    // shutdown: still open when the grace period runs out; the record is
    // written before the process exits.
    let shutdown_port = free_port();
    create_direct(&server, shutdown_port, echo, json!({}));
    let mut last = connect_from(source(3), loopback(shutdown_port));
    echo_exchange(&mut last, 10);
    wait_for("the connection is open", Duration::from_secs(5), || {
        (open_connections(&server, &format!("?port={shutdown_port}"))["count"] == 1).then_some(())
    });
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
    let restarted = Daemon::server_with_state(&server.state_dir, SECRET, &[]);
    let row = wait_for_logged(&restarted, shutdown_port, 1)[0].clone();
    assert_eq!(row["end"], "shutdown", "{row}");
    assert_eq!(row["bytes_sent"], 10, "{row}");
    // Ids carry on across the restart.
    let new_port = free_port();
    create_direct(&restarted, new_port, echo, json!({}));
    echo_through(new_port, 10);
    let newest = wait_for_logged(&restarted, new_port, 1)[0].clone();
    assert!(newest["id"].as_u64() > row["id"].as_u64(), "{newest} after {row}");
}

#[test]
fn the_log_keeps_its_row_cap_and_stores_nothing_when_off() {
    let (_dir, capped) = config_file("[history]\nconnection_log_max_rows = 3\n");
    let server = Daemon::server(SECRET, &["--config", &capped]);
    let port = free_port();
    create_direct(&server, port, echo_server(), json!({}));
    for len in 1..=5 {
        echo_through(port, len);
        // Ended on the server's side too before the next begins, so the log's
        // order by end is the order they were made in (under load, a relay
        // may see its close after the next connection has come and gone).
        wait_for(&format!("connection {len} to end"), Duration::from_secs(10), || {
            (open_connections(&server, &format!("?port={port}"))["count"] == 0).then_some(())
        });
    }
    wait_for("the newest rows only", Duration::from_secs(10), || {
        let rows = logged(&server, "?limit=100");
        let sent: Vec<u64> = rows.iter().map(|r| r["bytes_sent"].as_u64().unwrap()).collect();
        (sent == [5, 4, 3]).then_some(())
    });

    let (_dir2, off) = config_file("[history]\nconnection_log = false\n");
    let quiet = Daemon::server(SECRET, &["--config", &off]);
    let port = free_port();
    create_direct(&quiet, port, echo_server(), json!({"deny": ["127.0.0.3/32"]}));
    echo_through(port, 100);
    let _ = read_end(&mut connect_from(source(3), loopback(port)));
    let log = get_data(&quiet, "/api/connections/log");
    assert_eq!(log["enabled"], false, "{log}");
    assert_eq!(log["count"], 0, "{log}");
    assert_eq!(get_data(&quiet, "/api/stats/sources")["sources"], json!([]));
    // And nothing is on disk (read once the daemon has let go of the file).
    let mut quiet = quiet;
    assert!(quiet.terminate().success());
    if let Some(sqlite3) = tools::external_tool("sqlite3", "the_log_keeps_its_row_cap_and_stores_nothing_when_off") {
        let db = quiet.state_dir.join("tunneld.db");
        let out = std::process::Command::new(sqlite3).arg(&db).arg("SELECT COUNT(*) FROM connection_log").output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "rows with the log off: {out:?}");
    }
}

#[test]
fn the_log_downloads_as_csv_and_sources_rank_by_bytes() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    let other = free_port();
    let echo = echo_server();
    create_direct(&server, port, echo, json!({}));
    create_direct(&server, other, echo, json!({}));
    // .2: one big connection; .3: three small ones; .4: one tiny; the other
    // port's traffic counts only when no port is asked for.
    let plan: [(u8, usize, usize); 3] = [(2, 1, 30_000), (3, 3, 2_000), (4, 1, 100)];
    for (last, times, len) in plan {
        for _ in 0..times {
            let mut v = connect_from(source(last), loopback(port));
            echo_exchange(&mut v, len);
            v.shutdown(std::net::Shutdown::Write).unwrap();
            read_end(&mut v).unwrap();
        }
    }
    let mut v = connect_from(source(4), loopback(other));
    echo_exchange(&mut v, 100_000);
    drop(v);
    wait_for_logged(&server, port, 5);
    wait_for_logged(&server, other, 1);

    let sources = get_data(&server, &format!("/api/stats/sources?port={port}"));
    let ranked: Vec<(String, u64, u64)> = sources["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["source"].as_str().unwrap().to_string(), s["connections"].as_u64().unwrap(), s["bytes_sent"].as_u64().unwrap()))
        .collect();
    assert_eq!(ranked, vec![("127.0.0.2".into(), 1, 30_000), ("127.0.0.3".into(), 3, 6_000), ("127.0.0.4".into(), 1, 100)], "{sources}");
    let everywhere = get_data(&server, "/api/stats/sources?limit=1");
    assert_eq!(everywhere["sources"][0]["source"], "127.0.0.4", "the other port's big transfer: {everywhere}");
    assert_eq!(everywhere["sources"].as_array().unwrap().len(), 1);
    let future = get_data(&server, &format!("/api/stats/sources?from={}&to={}", unix_now() as i64 + 3600, unix_now() as i64 + 7200));
    assert_eq!(future["sources"], json!([]));

    // CSV: RFC 4180, the same rows as JSON.
    let json_rows = logged(&server, &format!("?port={port}"));
    let response = ureq::get(&server.url(&format!("/api/connections/log?port={port}&format=csv"))).call().expect("csv");
    assert!(response.header("content-type").unwrap_or("").starts_with("text/csv"));
    assert!(response.header("content-disposition").unwrap_or("").contains("attachment"));
    let text = response.into_string().unwrap();
    assert!(text.contains("\r\n"), "CRLF line ends");
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let headers = reader.headers().unwrap().clone();
    assert_eq!(
        headers.iter().collect::<Vec<_>>(),
        ["id", "port", "protocol", "client", "source", "started_at", "ended_at", "bytes_sent", "bytes_received", "end", "reason"]
    );
    let records: Vec<csv::StringRecord> = reader.records().map(|r| r.expect("a well-formed record")).collect();
    assert_eq!(records.len(), json_rows.len());
    for (record, row) in records.iter().zip(&json_rows) {
        assert_eq!(record[0].parse::<u64>().ok(), row["id"].as_u64());
        assert_eq!(record[4], *row["source"].as_str().unwrap());
        assert_eq!(record[7].parse::<u64>().ok(), row["bytes_sent"].as_u64());
        assert_eq!(&record[9], "closed");
    }
    // Filters: time range and source.
    let none = logged(&server, &format!("?port={port}&to={}", unix_now() as i64 - 3600));
    assert!(none.is_empty());
    assert_eq!(logged(&server, &format!("?port={port}&source=127.0.0.3")).len(), 3);
    let (status, _) = http("GET", &server.url("/api/connections/log?format=xml"), None);
    assert_eq!(status, 400);
}

/// `tunneld ctl ARGS` against `server`; its stdout (asserting it succeeded).
fn ctl(server: &Daemon, args: &[&str]) -> String {
    let out = std::process::Command::new(BIN)
        .arg("ctl")
        .arg("--api")
        .arg(server.url(""))
        .args(args)
        .env_remove("TUNNELD_API__TOKEN")
        .output()
        .expect("run tunneld ctl");
    assert!(out.status.success(), "ctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn ctl_lists_closes_and_logs_connections_and_ranks_sources() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    create_direct(&server, port, echo_server(), json!({}));
    let mut first = connect_from(source(2), loopback(port));
    echo_exchange(&mut first, 2048);
    let mut second = connect_from(source(3), loopback(port));
    echo_exchange(&mut second, 10);
    wait_for("both connections counted", Duration::from_secs(5), || {
        let list = open_connections(&server, "");
        let conns = list["connections"].as_array()?;
        (conns.len() == 2 && conns[0]["bytes_received"] == 2048 && conns[1]["bytes_received"] == 10).then_some(())
    });

    let listed = ctl(&server, &["conns", &port.to_string()]);
    println!("{listed}");
    let lines: Vec<&str> = listed.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("SOURCE") && lines[0].contains("RECEIVED"), "{listed}");
    assert!(lines[1].contains("127.0.0.2:") && lines[1].contains("2.0 KiB"), "{listed}");
    assert!(lines[2].contains("127.0.0.3:") && lines[2].contains("10 B"), "{listed}");
    assert!(listed.ends_with("2 open connection(s)\n"), "{listed}");
    let limited = ctl(&server, &["conns", "--limit", "1"]);
    assert!(limited.contains("2 open connection(s) (1 shown; --limit for more)"), "{limited}");

    let id: u64 = lines[2].split_whitespace().next().unwrap().parse().unwrap();
    assert_eq!(ctl(&server, &["close", &id.to_string()]), format!("connection {id} reset\n"));
    assert_eq!(read_end(&mut second).map_err(|e| e.kind()), Err(ErrorKind::ConnectionReset));
    let unknown = std::process::Command::new(BIN).args(["ctl", "--api", &server.url(""), "close", "999999"]).output().unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no open connection has id 999999"), "{unknown:?}");

    first.shutdown(std::net::Shutdown::Write).unwrap();
    read_end(&mut first).unwrap();
    wait_for_logged(&server, port, 2);
    let log = ctl(&server, &["log", "--port", &port.to_string()]);
    println!("{log}");
    let lines: Vec<&str> = log.lines().collect();
    assert!(lines[0].starts_with("ID") && lines[0].contains("END"), "{log}");
    assert!(lines[1].contains("127.0.0.2:") && lines[1].trim_end().ends_with("closed"), "newest first: {log}");
    assert!(lines[2].contains("127.0.0.3:") && lines[2].trim_end().ends_with("closed_by_api"), "{log}");
    assert!(log.ends_with("2 connection(s)\n"), "{log}");
    let from_one = ctl(&server, &["log", "--source", "127.0.0.3"]);
    assert!(from_one.ends_with("1 connection(s)\n"), "{from_one}");

    let sources = ctl(&server, &["sources", &port.to_string()]);
    println!("{sources}");
    let lines: Vec<&str> = sources.lines().collect();
    assert!(lines[0].starts_with("SOURCE"), "{sources}");
    assert!(lines[1].starts_with("127.0.0.2 ") && lines[1].contains("4.0 KiB"), "most bytes first: {sources}");
    assert!(lines[2].starts_with("127.0.0.3 "), "{sources}");
}
