//! Traffic-history benchmark (not a test; see bench/README.md).
//!
//! 1. Size: drives the real recorder (`tunneld::history::Recorder`) over one
//!    simulated year of 100 mappings that all carry traffic every minute, at the
//!    default retention, with an injected clock, and reports the database size.
//!    The simulation flushes once per simulated minute (the default 10 s interval
//!    writes into the same minute buckets, so the rows and the size are the same)
//!    and runs on /dev/shm so it takes minutes, not days of fsyncs.
//! 2. Flush time: 1,000 mappings carrying traffic, on the state disk (fsync and
//!    all), on a fresh database and on the year-old one, in alternating rounds; the
//!    baseline in the same run is a flush in which no mapping moved bytes (one
//!    transaction, one fsync).
//!
//! `cargo run --release --example history_bench -- [--days N] [--flushes N]`

use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tunneld::config::HistoryConfig;
use tunneld::history::{Clock, Recorder};
use tunneld::store::Store;
use tunneld::telemetry::{MappingMetrics, Metrics};

const START: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

struct Rig {
    recorder: Recorder,
    mappings: Vec<MappingMetrics>,
    now: Arc<AtomicI64>,
}

async fn rig(dir: &Path, mappings: u16, start: i64) -> Rig {
    let store = Store::open(dir).expect("open store");
    let metrics = Arc::new(Metrics::new());
    let now = Arc::new(AtomicI64::new(start));
    let clock_now = now.clone();
    let clock: Clock = Arc::new(move || clock_now.load(Ordering::SeqCst));
    let settings = HistoryConfig::default().settings().expect("default history settings");
    let recorder = Recorder::new(store, metrics.clone(), settings, clock).await.expect("recorder");
    let mappings = (0..mappings)
        .map(|i| {
            metrics.add_mapping(
                tunneld::core::protocol::MappingKey { port: 10_000 + i, protocol: tunneld::core::protocol::Protocol::Tcp },
                ["127.0.0.1:9", "direct", "", ""],
            )
        })
        .collect();
    Rig { recorder, mappings, now }
}

fn move_bytes(rig: &Rig, round: u64) {
    for (i, m) in rig.mappings.iter().enumerate() {
        m.sent.inc_by(1_000 + (round * 7 + i as u64) % 50_000);
        m.received.inc_by(5_000 + (round * 13 + i as u64) % 200_000);
    }
}

fn db_size(dir: &Path) -> u64 {
    ["tunneld.db", "tunneld.db-wal"].iter().filter_map(|f| std::fs::metadata(dir.join(f)).ok()).map(|m| m.len()).sum()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Times `flushes` flushes (ms, unsorted), moving bytes before each when `busy`.
async fn time_flushes(rig: &Rig, flushes: usize, busy: bool) -> Vec<f64> {
    let mut times = Vec::with_capacity(flushes);
    for round in 0..flushes {
        if busy {
            move_bytes(rig, round as u64);
        }
        rig.now.fetch_add(10, Ordering::SeqCst);
        let started = Instant::now();
        rig.recorder.flush().await.expect("flush");
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times
}

fn report(label: &str, t: &[f64]) {
    println!("{label:<52} median {:>7.2} ms   p90 {:>7.2} ms   max {:>7.2} ms", percentile(t, 0.5), percentile(t, 0.9), t[t.len() - 1]);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut days: i64 = 365;
    let mut flushes: usize = 50;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next().and_then(|v| v.parse::<i64>().ok())) {
            ("--days", Some(n)) if n > 0 => days = n,
            ("--flushes", Some(n)) if n > 0 => flushes = n as usize,
            _ => {
                eprintln!("usage: history_bench [--days N] [--flushes N]");
                std::process::exit(2);
            }
        }
    }

    // 1. One simulated year of 100 busy mappings.
    let shm = Path::new("/dev/shm");
    let year_dir = if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("temp dir");
    let year = rig(year_dir.path(), 100, START).await;
    let minutes = days * 1440;
    let started = Instant::now();
    for minute in 0..minutes {
        move_bytes(&year, minute as u64);
        year.now.store(START + minute * 60, Ordering::SeqCst);
        year.recorder.flush().await.expect("flush");
        if minute % (30 * 1440) == 0 && minute > 0 {
            eprintln!("  simulated {} days, database {:.1} MiB", minute / 1440, db_size(year_dir.path()) as f64 / 1048576.0);
        }
    }
    let size = db_size(year_dir.path());
    println!(
        "database after {days} simulated days of 100 busy mappings (default retention): {:.1} MiB ({size} bytes; simulated in {:.0} s)",
        size as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );

    // 2. Flush time on the real disk: a fresh database and a copy of the year-old
    // one, measured in alternating rounds so machine noise hits both alike.
    drop(year);
    let fresh_dir = tempfile::tempdir_in(".").expect("temp dir on the state disk");
    let aged_dir = tempfile::tempdir_in(".").expect("temp dir on the state disk");
    for file in ["tunneld.db", "tunneld.db-wal"] {
        if year_dir.path().join(file).exists() {
            std::fs::copy(year_dir.path().join(file), aged_dir.path().join(file)).expect("copy the year-old database");
        }
    }
    let fresh = rig(fresh_dir.path(), 1000, START).await;
    let aged = rig(aged_dir.path(), 1000, START + minutes * 60).await;
    for r in [&fresh, &aged] {
        move_bytes(r, 0);
        r.recorder.flush().await.expect("warm-up flush");
    }
    let rounds = 5;
    let per_round = flushes.div_ceil(rounds);
    let (mut idle, mut busy, mut aged_busy) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        idle.extend(time_flushes(&fresh, per_round, false).await);
        busy.extend(time_flushes(&fresh, per_round, true).await);
        aged_busy.extend(time_flushes(&aged, per_round, true).await);
    }
    for t in [&mut idle, &mut busy, &mut aged_busy] {
        t.sort_by(f64::total_cmp);
    }
    report("baseline: flush with nothing moved", &idle);
    report("1,000 mappings carrying traffic, fresh database", &busy);
    report(&format!("1,000 mappings carrying traffic, {days}-day-old database"), &aged_busy);
    println!(
        "ratios (median, {rounds} alternating rounds): busy/baseline {:.2}x, {days}-day-old/fresh {:.2}x",
        percentile(&busy, 0.5) / percentile(&idle, 0.5),
        percentile(&aged_busy, 0.5) / percentile(&busy, 0.5)
    );
}
