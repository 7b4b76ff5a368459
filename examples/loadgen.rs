//! Load generator and echo target for the benchmark harness (`bench/run.py`).
//!
//! One binary plays both ends so every forwarding path under test (raw loopback,
//! HAProxy, tunneld direct, tunneld tunnel) is driven by exactly the same client and
//! answered by exactly the same target; only the forwarder in between changes.
//!
//! Subcommands:
//! - `echo`: the target; echoes every byte back and propagates half-close.
//! - `connrate`: sequential connect → 1-byte echo → close; connections/s and latency.
//! - `concurrent`: many simultaneous connections each echoing random data, verified.
//! - `hold`: opens connections, proves each with one echo, and keeps them open so
//!   the harness can measure the forwarder's memory per connection.
//!
//! Measuring subcommands print one JSON object on stdout (with `--json`, or always
//! for `hold`, whose output is read by a program while it runs).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use rand::RngCore;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Barrier;
use tokio::task::JoinSet;

/// Bound on any single connection's work, so a forwarder that loses a connection
/// shows up as a counted failure instead of a benchmark that never ends.
const CONN_TIMEOUT: Duration = Duration::from_secs(30);

/// How many distinct error messages a report keeps: enough to diagnose, not a flood.
const MAX_ERRORS: usize = 5;

#[derive(Parser)]
#[command(about = "Load generator and echo target for the tunneld benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Echo server: writes back everything it reads; prints `listening on ADDR` when bound.
    Echo {
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Sequential connect → 1-byte echo → close, `count` times. With several
    /// `--target`s the connections take them in turn (a load spread over mappings).
    Connrate {
        #[arg(long, required = true)]
        target: Vec<SocketAddr>,
        #[arg(long, default_value_t = 2000)]
        count: usize,
        /// Print the report as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// `conns` simultaneous connections, each echoing `bytes` random bytes, verified.
    Concurrent {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
        #[arg(long, default_value_t = 16384)]
        bytes: usize,
        /// Print the report as JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Opens `conns` connections, echoes one byte on each, prints a JSON ready line,
    /// and holds them until stdin closes or SIGINT/SIGTERM arrives.
    Hold {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 1000)]
        conns: usize,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    raise_fd_limit();
    match cli.command {
        Command::Echo { listen } => echo(listen).await,
        Command::Connrate { target, count, json } => report(&connrate(target, count).await?, json),
        Command::Concurrent { target, conns, bytes, json } => report(&concurrent(target, conns, bytes).await?, json),
        Command::Hold { target, conns } => hold(target, conns).await,
    }
}

/// A thousand connections need more descriptors than the usual soft limit of 1024;
/// the hard limit is what an unprivileged process may raise it to. Failure is not
/// fatal: the harness raises the limit for its children too, and a real shortage
/// shows up as counted connection failures.
fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: both calls only read or write the `rlimit` struct we pass, which is
    // valid and properly initialised for the duration of each call.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                eprintln!("loadgen: could not raise RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
            }
        }
    }
}

fn report<T: Serialize + std::fmt::Debug>(value: &T, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(value)?);
    } else {
        println!("{value:#?}");
    }
    Ok(())
}

async fn echo(listen: SocketAddr) -> Result<()> {
    let listener = listen_deep(listen).with_context(|| format!("bind {listen}"))?;
    // The harness waits for this line: it is the readiness signal, and with port 0
    // it is also how the caller learns the port.
    println!("listening on {}", listener.local_addr()?);
    loop {
        let (mut stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            // Running out of descriptors or a connection reset before accept is a
            // per-connection problem; the target must keep serving the others.
            Err(e) => {
                eprintln!("loadgen echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            // The 1-byte connrate reply must leave at once, not wait for Nagle.
            let _ = stream.set_nodelay(true);
            let (mut rd, mut wr) = stream.split();
            if tokio::io::copy(&mut rd, &mut wr).await.is_ok() {
                // Propagate the client's half-close so it sees the end of the echo.
                let _ = wr.shutdown().await;
            }
        });
    }
}

/// Binds with a backlog deeper than tokio's default of 1024: `concurrent` opens a
/// thousand connections at once, and an overflowing accept queue drops SYNs that
/// are then retried only after a 1 s timeout — the target must never be the cause.
fn listen_deep(addr: SocketAddr) -> Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    Ok(socket.listen(4096)?)
}

/// Collects failures as a count plus the first few distinct messages.
#[derive(Debug, Default, Serialize)]
struct Failures {
    failures: usize,
    errors: Vec<String>,
}

impl Failures {
    fn record(&mut self, error: &anyhow::Error) {
        self.failures += 1;
        let message = format!("{error:#}");
        if self.errors.len() < MAX_ERRORS && !self.errors.contains(&message) {
            self.errors.push(message);
        }
    }
}

async fn connect(target: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(target).await.with_context(|| format!("connect {target}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One connect → 1-byte echo exchange; returns the open stream.
async fn ping(target: SocketAddr) -> Result<TcpStream> {
    let mut stream = connect(target).await?;
    stream.write_all(b"x").await.context("write")?;
    let mut reply = [0u8; 1];
    stream.read_exact(&mut reply).await.context("read echo")?;
    ensure!(&reply == b"x", "echo returned {reply:?}");
    Ok(stream)
}

async fn with_timeout<T>(work: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::time::timeout(CONN_TIMEOUT, work).await.with_context(|| format!("timed out after {CONN_TIMEOUT:?}"))?
}

#[derive(Debug, Serialize)]
struct ConnrateReport {
    count: usize,
    #[serde(flatten)]
    failures: Failures,
    elapsed_s: f64,
    conns_per_s: f64,
    /// Latency is connect start → echo byte received, i.e. connection setup through
    /// the forwarder (including its dial of the target) plus one round trip.
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

async fn connrate(targets: Vec<SocketAddr>, count: usize) -> Result<ConnrateReport> {
    let mut latencies = Vec::with_capacity(count);
    let mut failures = Failures::default();
    let start = Instant::now();
    for target in targets.iter().cycle().take(count) {
        let t0 = Instant::now();
        match with_timeout(ping(*target)).await {
            // Closing is part of the cycle (and of the rate), not of the latency.
            Ok(stream) => {
                latencies.push(t0.elapsed());
                drop(stream);
            }
            Err(e) => failures.record(&e),
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    if latencies.is_empty() {
        bail!("all {count} connections failed: {:?}", failures.errors);
    }
    latencies.sort_unstable();
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    Ok(ConnrateReport {
        count,
        elapsed_s: elapsed,
        conns_per_s: latencies.len() as f64 / elapsed,
        p50_us: micros(percentile(&latencies, 50.0)),
        p99_us: micros(percentile(&latencies, 99.0)),
        max_us: micros(latencies[latencies.len() - 1]),
        failures,
    })
}

/// Nearest-rank percentile of an ascending, non-empty slice.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Debug, Serialize)]
struct ConcurrentReport {
    conns: usize,
    bytes_per_conn: usize,
    #[serde(flatten)]
    failures: Failures,
    /// Until every connection was established (or had failed).
    connect_s: f64,
    /// Start to the last verified echo: connect phase plus the data phase.
    elapsed_s: f64,
}

async fn concurrent(target: SocketAddr, conns: usize, bytes: usize) -> Result<ConcurrentReport> {
    // Every task waits here after connecting, so all `conns` connections are open
    // at the same moment before any data moves: the forwarder really holds them all.
    // The main task is one more party, to timestamp the end of the connect phase.
    let barrier = Arc::new(Barrier::new(conns + 1));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        let barrier = barrier.clone();
        tasks.spawn(async move {
            let stream = with_timeout(connect(target)).await;
            barrier.wait().await;
            with_timeout(echo_verified(stream?, bytes)).await
        });
    }
    barrier.wait().await;
    let connect_s = start.elapsed().as_secs_f64();
    let mut failures = Failures::default();
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined.context("task panicked").and_then(|r| r) {
            failures.record(&e);
        }
    }
    Ok(ConcurrentReport { conns, bytes_per_conn: bytes, failures, connect_s, elapsed_s: start.elapsed().as_secs_f64() })
}

/// Sends `bytes` random bytes, half-closes, and checks the reply is exactly the
/// same bytes followed by EOF — which also proves the forwarder relays half-close.
async fn echo_verified(mut stream: TcpStream, bytes: usize) -> Result<()> {
    let mut payload = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut payload);
    let (mut rd, mut wr) = stream.split();
    // Write and read concurrently: a payload larger than the socket buffers along
    // the path would otherwise deadlock against the echo.
    let send = async {
        wr.write_all(&payload).await.context("write")?;
        wr.shutdown().await.context("half-close")
    };
    let receive = async {
        let mut echoed = Vec::with_capacity(bytes);
        rd.read_to_end(&mut echoed).await.context("read echo")?;
        Ok(echoed)
    };
    let ((), echoed) = tokio::try_join!(send, receive)?;
    ensure!(echoed.len() == bytes, "echo returned {} of {bytes} bytes", echoed.len());
    ensure!(echoed == payload, "echoed data differs from what was sent");
    Ok(())
}

#[derive(Serialize)]
struct HoldReady {
    ready: bool,
    open: usize,
    #[serde(flatten)]
    failures: Failures,
    open_s: f64,
}

async fn hold(target: SocketAddr, conns: usize) -> Result<()> {
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..conns {
        // The echo proves the whole path exists (for a tunnel: the data channel and
        // the client's dial of the target), not just the visitor-side accept.
        tasks.spawn(with_timeout(ping(target)));
    }
    let mut streams = Vec::with_capacity(conns);
    let mut failures = Failures::default();
    while let Some(joined) = tasks.join_next().await {
        match joined.context("task panicked").and_then(|r| r) {
            Ok(stream) => streams.push(stream),
            Err(e) => failures.record(&e),
        }
    }
    let ready = HoldReady { ready: true, open: streams.len(), failures, open_s: start.elapsed().as_secs_f64() };
    println!("{}", serde_json::to_string(&ready)?);

    // Stdin closing means the harness is done (or died): never outlive it. A plain
    // thread, not `tokio::io::stdin`, whose blocking read would keep the runtime
    // from shutting down when a signal ends the hold instead.
    let (stdin_closed, stdin_eof) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
        let _ = stdin_closed.send(());
    });
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = stdin_eof => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm.recv() => {}
    }
    drop(streams);
    Ok(())
}
