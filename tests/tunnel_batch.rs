//! Issue 24 §2, the plain tunnel's spliced data path in batches: the sending
//! end fills its pipe with several chunks' worth in one splice and sends them
//! as header + splice per chunk; the receiving end splices several chunks'
//! payloads into its pipe (reading each header in between) before one splice
//! out to the socket. The wire format (chunks of at most 64 KiB) is unchanged.
//!
//! Checked here: the system calls per MiB of a bulk transfer (counted by
//! `strace -c -f` on the real daemons: counts, not timings), every byte intact
//! and counted at batch boundaries, and that a one-byte visitor's exchange
//! reads the data channel no more often than the copying path does.
mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use common::strace::Strace;
use common::*;
use serde_json::{json, Value};

const SECRET: &str = "tunnel-batch-secret";

/// A plain-tunnel server and its connected plain client, both with `envs`.
fn plain_pair_with(envs: &[(&str, &str)]) -> (Daemon, Daemon) {
    plain_pair_each(envs, envs)
}

/// A plain-tunnel server with `server_envs` and its connected plain client with `client_envs`.
fn plain_pair_each(server_envs: &[(&str, &str)], client_envs: &[(&str, &str)]) -> (Daemon, Daemon) {
    let mut server_env = vec![("TUNNELD_SERVER__TLS", "false")];
    server_env.extend_from_slice(server_envs);
    let server = Daemon::server_env(SECRET, &[], &server_env);
    let mut client_env = vec![("TUNNELD_CLIENT__TLS", "false")];
    client_env.extend_from_slice(client_envs);
    let client = Daemon::client_with_env(server.tunnel.unwrap(), SECRET, &[], &client_env);
    client.wait_for_notify("STATUS=connected", Duration::from_secs(20));
    (server, client)
}

/// Waits until the connection log holds `n` connections of `port`; returns them, newest first.
fn logged(server: &Daemon, port: u16, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} logged connections of :{port}"), Duration::from_secs(15), || {
        let rows = get_data(server, &format!("/api/connections/log?port={port}&limit=100"))["connections"].as_array()?.clone();
        (rows.len() >= n).then_some(rows)
    })
}

fn wait_closed(server: &Daemon, port: u16) {
    wait_for("the visitors' connections to close", Duration::from_secs(15), || {
        (traffic_entry(server, port)?["active_connections"].as_u64()? == 0).then_some(())
    });
}

/// The newest logged connection ended `closed` with exactly these user bytes,
/// and the mapping's totals agree in `/api/stats/traffic` and `/metrics`.
fn assert_counted(server: &Daemon, port: u16, n: usize, sent: u64, received: u64, totals: (u64, u64)) {
    let row = &logged(server, port, n)[0];
    assert_eq!(
        (row["end"].as_str(), row["bytes_sent"].as_u64(), row["bytes_received"].as_u64()),
        (Some("closed"), Some(sent), Some(received)),
        "{row}"
    );
    let traffic = traffic_entry(server, port).expect("traffic entry");
    assert_eq!((traffic["bytes_sent"].as_u64(), traffic["bytes_received"].as_u64()), (Some(totals.0), Some(totals.1)), "{traffic}");
    let text = metrics_text(server);
    for (direction, total) in [("sent", totals.0), ("received", totals.1)] {
        let counted = metric_value(&text, "tunneld_mapping_bytes_total", &[("port", &port.to_string()), ("direction", direction)]);
        assert_eq!(counted, Some(total as f64), "{direction}");
    }
}

/// A target that reads the visitor's upload to its end, then sends `download`
/// bytes of noise and closes; it reports how many bytes it read.
fn sink_then_source(download: usize) -> (SocketAddr, mpsc::Receiver<Vec<u8>>) {
    let (read, read_rx) = mpsc::channel::<Vec<u8>>();
    let read = Arc::new(Mutex::new(read));
    let addr = spawn_target(move |mut conn| {
        let mut upload = Vec::new();
        conn.read_to_end(&mut upload).expect("the upload");
        let _ = read.lock().unwrap().send(upload);
        conn.write_all(&noise(download, 7)).expect("the download");
        let _ = conn.shutdown(Shutdown::Write);
    });
    (addr, read_rx)
}

/// One visitor: uploads `upload` (then half-closes), reads the download to its end.
fn up_then_down(port: u16, upload: &[u8], chunked: Option<&[usize]>) -> Vec<u8> {
    let mut visitor = TcpStream::connect(loopback(port)).expect("connect");
    visitor.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    match chunked {
        None => visitor.write_all(upload).expect("upload"),
        Some(pieces) => {
            let mut at = 0;
            for (i, piece) in pieces.iter().cycle().enumerate() {
                if at >= upload.len() {
                    break;
                }
                let end = (at + piece).min(upload.len());
                visitor.write_all(&upload[at..end]).expect("upload");
                at = end;
                // Now and then a pause, so the server's fill finds a short queue.
                if i % 7 == 3 {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }
    visitor.shutdown(Shutdown::Write).unwrap();
    let mut back = Vec::new();
    visitor.read_to_end(&mut back).expect("the download, then a clean end");
    back
}

/// Calls on the data path of a spliced bulk transfer: the splices, the
/// headers' `sendto` and `recvfrom`. Not `epoll_wait` or `futex`, which depend
/// on how the scheduler interleaves the processes.
fn data_path_calls(calls: &BTreeMap<String, u64>) -> u64 {
    ["splice", "sendto", "recvfrom"].iter().map(|name| calls.get(*name).copied().unwrap_or(0)).sum()
}

fn table(calls: &BTreeMap<String, u64>, per: f64) -> String {
    calls
        .iter()
        .filter(|(name, n)| *name != "total" && **n as f64 / per >= 0.05)
        .map(|(name, n)| format!("{name} {:.2}", *n as f64 / per))
        .collect::<Vec<_>>()
        .join(", ")
}

/// 32 MiB up, then 32 MiB down through a plain tunnel, each traced on its
/// own: the sending end (the server on the upload, the client on the
/// download) makes at most 40 data-path calls per MiB. Chunk by chunk (main)
/// each 64 KiB costs it a splice in, a header and a splice out: 48 per MiB at
/// the least. In batches of four chunks (a 256 KiB pipe) it is 36. What the
/// receiving end makes depends on how often it finds a chunk only half
/// arrived (it is printed; main's floor is 48 too: a header, a splice in and
/// one out per chunk), so it is held only to a loose bound. The bytes arrive
/// intact and count exactly.
#[test]
fn a_bulk_transfer_through_a_plain_tunnel_costs_fewer_calls_per_mib() {
    let Some(strace) = tools::external_tool("strace", "a_bulk_transfer_through_a_plain_tunnel_costs_fewer_calls_per_mib") else {
        return;
    };
    const MIB: usize = 32;
    let (server, client) = plain_pair_with(&[]);
    let (target, uploads) = sink_then_source(MIB << 20);
    let port = create_mapping_with(&server, target, true, json!({}));
    // The first visitor opens what is opened once (channels, pipes); not counted.
    let back = up_then_down(port, b"warm", None);
    assert_eq!(uploads.recv_timeout(Duration::from_secs(60)).unwrap(), b"warm");
    assert_eq!(back.len(), MIB << 20);
    wait_closed(&server, port);

    // The upload: the visitor sends, the target sends nothing back.
    let (sink, sunk) = sink_then_source(0);
    let sink_port = create_mapping_with(&server, sink, true, json!({}));
    let upload = noise(MIB << 20, 3);
    let traces = [Strace::attach(&strace, server.child.id()), Strace::attach(&strace, client.child.id())];
    let nothing = up_then_down(sink_port, &upload, None);
    let arrived = sunk.recv_timeout(Duration::from_secs(60)).expect("the target read the upload");
    wait_closed(&server, sink_port);
    let [server_up, client_up] = traces.map(Strace::finish);
    assert!(nothing.is_empty());
    assert!(arrived == upload, "the upload arrived altered ({} of {} bytes)", arrived.len(), upload.len());

    // The download: the visitor sends nothing, the target 32 MiB.
    let traces = [Strace::attach(&strace, server.child.id()), Strace::attach(&strace, client.child.id())];
    let back = up_then_down(port, b"", None);
    assert_eq!(uploads.recv_timeout(Duration::from_secs(60)).expect("the target's EOF"), b"");
    wait_closed(&server, port);
    let [server_down, client_down] = traces.map(Strace::finish);
    assert!(back == noise(MIB << 20, 7), "the download arrived altered ({} bytes)", back.len());

    let mib = (MIB << 20) as u64;
    assert_counted(&server, sink_port, 1, mib, 0, (mib, 0));
    assert_counted(&server, port, 2, 0, mib, (4, 2 * mib));

    let per_mib = |calls: &BTreeMap<String, u64>| data_path_calls(calls) as f64 / MIB as f64;
    for (what, sender, receiver) in
        [("upload (server sends)", &server_up, &client_up), ("download (client sends)", &client_down, &server_down)]
    {
        let (sending, receiving) = (per_mib(sender), per_mib(receiver));
        eprintln!(
            "plain tunnel {what}, per MiB: sender {sending:.1} data-path calls ({}); receiver {receiving:.1} ({})",
            table(sender, MIB as f64),
            table(receiver, MIB as f64)
        );
        assert!(sending <= 40.0, "{what}: {sending:.1} splice + sendto + recvfrom per MiB in the sender: {}", table(sender, MIB as f64));
        assert!(
            receiving <= 64.0,
            "{what}: {receiving:.1} splice + sendto + recvfrom per MiB in the receiver: {}",
            table(receiver, MIB as f64)
        );
    }
}

/// Sizes around the chunk (64 KiB), the batch (a 256 KiB pipe) and several
/// batches, uploaded in uneven writes with pauses (so batches end in the
/// middle of chunks and of writes) and downloaded whole, one visitor after
/// another on the pooled channels: every byte arrives in order, and each
/// visitor and the mapping count exactly.
#[test]
fn bytes_arrive_intact_and_counted_across_batch_boundaries() {
    let (server, _client) = plain_pair_with(&[]);
    let sizes = [65_535usize, 65_536, 65_537, 196_608, 262_143, 262_144, 262_148, 262_145, 524_292, 1_048_579];
    let mut totals = (0u64, 0u64);
    let pieces = [1usize, 70_000, 4, 262_144, 13, 65_536, 300_001, 4_096];
    for (i, &size) in sizes.iter().enumerate() {
        let (target, uploads) = sink_then_source(size + 3);
        let port_totals = (size as u64, size as u64 + 3);
        let port = create_mapping_with(&server, target, true, json!({}));
        let upload = noise(size, 50 + i as u64);
        let back = up_then_down(port, &upload, Some(&pieces));
        let arrived = uploads.recv_timeout(Duration::from_secs(60)).expect("the target read the upload");
        assert!(arrived == upload, "size {size}: the upload arrived altered ({} bytes)", arrived.len());
        assert!(back == noise(size + 3, 7), "size {size}: the download arrived altered ({} bytes)", back.len());
        assert_counted(&server, port, 1, port_totals.0, port_totals.1, port_totals);
        totals = (totals.0 + port_totals.0, totals.1 + port_totals.1);
    }
    // Every one of them went through the pooled, spliced channels.
    let text = metrics_text(&server);
    let sum = |direction| {
        text.lines()
            .filter(|l| l.starts_with("tunneld_mapping_bytes_total{") && l.contains(&format!("direction=\"{direction}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!((sum("sent"), sum("received")), (totals.0 as f64, totals.1 as f64));
}

/// The wire format is the copy path's: a batching end and a copying one
/// (`TUNNELD_FORCE_COPY=1`, chunks of 65,532 bytes written whole, as TLS
/// peers and copying builds send them) carry uploads and downloads of sizes
/// around chunks and batches intact both ways round, counted exactly.
#[test]
fn a_batching_end_and_a_copying_end_understand_each_other() {
    let copy = [("TUNNELD_FORCE_COPY", "1")];
    for (copying, (server_envs, client_envs)) in [("client", (&[][..], &copy[..])), ("server", (&copy[..], &[][..]))] {
        let (server, _client) = plain_pair_each(server_envs, client_envs);
        for (i, size) in [1usize, 65_532, 65_537, 262_145, 1_048_579].into_iter().enumerate() {
            let (target, uploads) = sink_then_source(size + 5);
            let port = create_mapping_with(&server, target, true, json!({}));
            let upload = noise(size, 90 + i as u64);
            let back = up_then_down(port, &upload, None);
            let arrived = uploads.recv_timeout(Duration::from_secs(60)).expect("the target read the upload");
            assert!(arrived == upload, "copying {copying}, size {size}: the upload arrived altered ({} bytes)", arrived.len());
            assert!(back == noise(size + 5, 7), "copying {copying}, size {size}: the download arrived altered ({} bytes)", back.len());
            assert_counted(&server, port, 1, size as u64, size as u64 + 5, (size as u64, size as u64 + 5));
        }
    }
}
