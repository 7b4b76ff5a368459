//! `tunneld ctl top`: a live view of per-mapping rates in the terminal.
//!
//! The screen is laid out once for the terminal's width, not for its content:
//! every column has a fixed width (the target takes what is left and is cut
//! with `…`), rows are in port order, so nothing moves between refreshes but
//! the numbers. Rates are averaged over the last few seconds, so a transfer
//! that moves in bursts further apart than the refresh never reads as 0 B/s.

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::ctl::{clients_connected, health_of, Api};
use crate::api::contract::{MappingStatus, TrafficReport};
use crate::core::time::format_utc;

/// How far back a rate looks.
const RATE_WINDOW_SECS: f64 = 5.0;
/// The narrowest screen laid out; a smaller terminal wraps.
const MIN_WIDTH: usize = 80;

/// One `/api/stats/traffic` reading, kept to turn later ones into rates.
struct Sample {
    at: f64,
    bytes: BTreeMap<u16, (u64, u64)>,
}

impl Sample {
    fn of(report: &TrafficReport) -> Sample {
        let bytes = report.mappings.iter().map(|m| (m.port, (m.bytes_sent, m.bytes_received))).collect();
        Sample { at: report.timestamp, bytes }
    }
}

/// The readings of the last [`RATE_WINDOW_SECS`] (and the one just before, so
/// a refresh interval longer than the window still has a baseline).
#[derive(Default)]
struct Readings {
    samples: VecDeque<Sample>,
    started_at: Option<f64>,
}

impl Readings {
    fn push(&mut self, report: &TrafficReport) {
        // A restarted daemon counts from zero again: its old readings mean nothing.
        if self.started_at != Some(report.started_at) {
            self.samples.clear();
            self.started_at = Some(report.started_at);
        }
        self.samples.push_back(Sample::of(report));
        while self.samples.len() > 2 && self.samples[1].at <= report.timestamp - RATE_WINDOW_SECS {
            self.samples.pop_front();
        }
    }

    /// Bytes per second sent and received on `port` over the window; `None`
    /// until there are two readings of it.
    fn rate(&self, port: u16) -> Option<(f64, f64)> {
        let newest = self.samples.back()?;
        let (sent, received) = *newest.bytes.get(&port)?;
        let oldest = self.samples.iter().find(|s| s.bytes.contains_key(&port) && s.at < newest.at)?;
        let (sent_before, received_before) = oldest.bytes[&port];
        let seconds = newest.at - oldest.at;
        Some((sent.saturating_sub(sent_before) as f64 / seconds, received.saturating_sub(received_before) as f64 / seconds))
    }
}

/// The columns after the target, each of a fixed width: (title, width, right-aligned).
const COLUMNS: [(&str, usize, bool); 5] =
    [("VIA", 10, false), ("SENT/s", 9, true), ("RECV/s", 9, true), ("OPEN", 5, true), ("HEALTH", 12, false)];
/// The port column's width: `65535`, and `TOTAL`.
const PORT_WIDTH: usize = 5;
/// Between two columns.
const GAP: &str = "  ";

/// One line of the table: the port, the target (cut to `target_width`), then [`COLUMNS`].
fn table_line(port: &str, target: &str, cells: [&str; 5], target_width: usize) -> String {
    let mut line = format!("{port:<PORT_WIDTH$}{GAP}{:<target_width$}", cut(target, target_width));
    for ((_, width, right), cell) in COLUMNS.iter().zip(cells) {
        let cell = cut(cell, *width);
        if *right {
            let _ = write!(line, "{GAP}{cell:>width$}");
        } else {
            let _ = write!(line, "{GAP}{cell:<width$}");
        }
    }
    line.trim_end().to_string()
}

/// `text`, cut to `width` characters with `…` when longer.
fn cut(text: &str, width: usize) -> String {
    if text.chars().count() <= width {
        text.to_string()
    } else {
        let kept: String = text.chars().take(width.saturating_sub(1)).collect();
        format!("{kept}…")
    }
}

/// A rate in at most 9 characters: `999.9 KiB`, `12.0 MiB`, `0 B`.
fn rate_text(bytes_per_second: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes_per_second.max(0.0);
    let mut unit = 0;
    while value >= 999.95 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The health column: the server's `health` when it reports one, else what
/// the listening status says, in words that fit the column.
fn health_text(health: Option<&str>, status: &MappingStatus) -> String {
    let word = match health {
        Some(health) => health.split(':').next().unwrap_or(health).trim().to_string(),
        None => match status {
            MappingStatus::Active => "active".into(),
            MappingStatus::WaitingForTunnel => "waiting_for_tunnel".into(),
            MappingStatus::Error(_) => "down".into(),
        },
    };
    match word.as_str() {
        "target_failing" => "target fails".into(),
        "waiting_for_tunnel" => "waiting".into(),
        other => other.replace('_', " "),
    }
}

/// The `ctl top` screen for one reading, `width` columns wide and at most
/// `height` lines: a title with the clock, a summary, the table by port, and a
/// totals line.
fn top_screen(api_base: &str, report: &TrafficReport, raw: &serde_json::Value, readings: &Readings, width: usize, height: usize) -> String {
    // The last column is left free: a line that fills it would wrap in some terminals.
    let width = width.max(MIN_WIDTH) - 1;
    let fixed = PORT_WIDTH + COLUMNS.iter().map(|(_, w, _)| GAP.len() + w).sum::<usize>() + GAP.len();
    let target_width = width.saturating_sub(fixed).max(8);
    let clock = format_utc(report.timestamp as i64);
    let clock = clock.split(' ').nth(1).unwrap_or_default();
    let mut out = String::new();
    let _ = writeln!(out, "{}", cut(&format!("tunneld top  {clock} UTC  rates over {RATE_WINDOW_SECS:.0} s  {api_base}"), width));
    let _ = writeln!(
        out,
        "{}",
        cut(
            &format!(
                "{} mapping(s), {} open connection(s), {}; q quits",
                report.mapping_count,
                report.active_connections,
                clients_connected(report)
            ),
            width
        )
    );
    out.push('\n');
    let titles: Vec<&str> = COLUMNS.iter().map(|(title, _, _)| *title).collect();
    let _ = writeln!(out, "{}", table_line("PORT", "TARGET", [titles[0], titles[1], titles[2], titles[3], titles[4]], target_width));

    // Title, summary, blank, header, totals: the rest is for mappings.
    let room = height.saturating_sub(6).max(1);
    let mut mappings: Vec<(usize, &crate::api::contract::MappingTraffic)> = report.mappings.iter().enumerate().collect();
    mappings.sort_by_key(|(_, m)| m.port);
    let shown = if mappings.len() > room { room.saturating_sub(1) } else { mappings.len() };
    let (mut total_sent, mut total_received) = (0.0, 0.0);
    for (row, (i, m)) in mappings.iter().enumerate() {
        let rate = readings.rate(m.port);
        if let Some((sent, received)) = rate {
            total_sent += sent;
            total_received += received;
        }
        if row >= shown {
            continue;
        }
        let via = if m.use_tunnel { m.client.clone().unwrap_or_else(|| "tunnel".into()) } else { "direct".into() };
        let (sent, received) = match rate {
            Some((sent, received)) => (rate_text(sent), rate_text(received)),
            None => ("-".into(), "-".into()),
        };
        let health = health_text(health_of(&raw["mappings"][*i]).as_deref(), &m.status);
        let target = format!("{}:{}", m.target_host, m.target_port);
        let open = m.active_connections.to_string();
        let _ = writeln!(out, "{}", table_line(&m.port.to_string(), &target, [&via, &sent, &received, &open, &health], target_width));
    }
    if mappings.len() > shown {
        let _ = writeln!(out, "{}", cut(&format!("… and {} more mapping(s)", mappings.len() - shown), width));
    }
    let open = report.active_connections.to_string();
    let _ = write!(out, "{}", table_line("TOTAL", "", ["", &rate_text(total_sent), &rate_text(total_received), &open, ""], target_width));
    out
}

/// `ctl top`: a live view refreshed every `interval` until `q` (or Ctrl-C). A
/// failed poll is shown on screen and retried, so a daemon restart does not end it.
pub(super) fn top(api: &Api, interval: Duration) -> anyhow::Result<()> {
    use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
    use crossterm::{cursor, execute, terminal};

    let mut out = std::io::stdout();
    terminal::enable_raw_mode().context("`ctl top` needs a terminal")?;
    // Restores the terminal however the loop ends (error or panic included).
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = execute!(std::io::stdout(), cursor::Show, terminal::LeaveAlternateScreen);
            let _ = terminal::disable_raw_mode();
        }
    }
    let _restore = Restore;
    execute!(out, terminal::EnterAlternateScreen, cursor::Hide)?;
    let mut readings = Readings::default();
    loop {
        let (width, height) = terminal::size().map(|(w, h)| (usize::from(w), usize::from(h))).unwrap_or((MIN_WIDTH, 24));
        let reading = api.get::<serde_json::Value>("/api/stats/traffic").and_then(|raw| {
            let report: TrafficReport = serde_json::from_value(raw.clone()).context("cannot read the traffic report")?;
            Ok((raw, report))
        });
        let screen = match reading {
            Ok((raw, report)) => {
                readings.push(&report);
                top_screen(&api.base, &report, &raw, &readings, width, height)
            }
            Err(e) => format!("tunneld top  {}  q quits\n\n{e:#}\nretrying every {:.1} s\n", api.base, interval.as_secs_f64()),
        };
        // Raw mode: lines need an explicit carriage return.
        execute!(out, cursor::MoveTo(0, 0), terminal::Clear(terminal::ClearType::All))?;
        out.write_all(screen.replace('\n', "\r\n").as_bytes())?;
        out.flush()?;
        let deadline = Instant::now() + interval;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if !event::poll(left)? {
                break;
            }
            if let Event::Key(key) = event::read()? {
                let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if key.kind == KeyEventKind::Press && (matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) || ctrl_c) {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A traffic report with `mappings` as (port, bytes each way) at `timestamp`.
    fn reading(timestamp: f64, mappings: &[(u16, u64)]) -> (TrafficReport, serde_json::Value) {
        let mappings: Vec<serde_json::Value> = mappings
            .iter()
            .map(|(port, bytes)| {
                serde_json::json!({
                    "port": port, "bytes_sent": bytes, "bytes_received": bytes, "lifetime_sent": bytes, "lifetime_received": bytes,
                    "last_update": null, "active_connections": 1, "connections_total": 1, "connect_errors": 0,
                    "target_host": if *port == 1000 { "a-very-long-host-name.in.a.far.away.domain.example.com" } else { "10.0.0.5" },
                    "target_port": 22, "use_tunnel": *port == 1000, "client": if *port == 1000 { Some("office") } else { None },
                    "status": "active", "description": null, "bandwidth_limit": null, "quota": null, "quota_used": null,
                    "quota_blocked": null, "allow": [], "deny": [], "health": if *port == 1000 { "target_failing" } else { "ok" },
                })
            })
            .collect();
        let count = mappings.len();
        let raw = serde_json::json!({
            "tunnel": {"bytes_sent": 0, "bytes_received": 0, "last_update": null, "connected": true, "connected_since": null},
            "clients": [
                {"name": "default", "connected": false, "peer": null, "connected_since": null, "bytes_sent": 0, "bytes_received": 0, "last_update": null, "mappings": 0},
                {"name": "office", "connected": true, "peer": "127.0.0.1:5000", "connected_since": 1.0, "bytes_sent": 0, "bytes_received": 0, "last_update": null, "mappings": 1},
            ],
            "mappings": mappings, "total_sent": 0, "total_received": 0, "lifetime_sent": 0, "lifetime_received": 0,
            "started_at": 1.0, "timestamp": timestamp, "mapping_count": count, "active_connections": count,
        });
        (serde_json::from_value(raw.clone()).expect("a traffic report"), raw)
    }

    fn screen_after(steps: &[(f64, &[(u16, u64)])]) -> String {
        let mut readings = Readings::default();
        let mut screen = String::new();
        for (at, mappings) in steps {
            let (report, raw) = reading(*at, mappings);
            readings.push(&report);
            screen = top_screen("http://127.0.0.1:8080", &report, &raw, &readings, 80, 24);
        }
        screen
    }

    #[test]
    fn the_screen_fits_80_columns_in_port_order_with_totals() {
        let screen = screen_after(&[(10.0, &[(2000, 0), (1000, 0)]), (12.0, &[(2000, 4 << 20), (1000, 2048)])]);
        assert!(screen.lines().all(|l| l.chars().count() < 80), "{screen}");
        let rows: Vec<&str> = screen.lines().filter(|l| l.starts_with("1000") || l.starts_with("2000")).collect();
        assert!(rows[0].starts_with("1000") && rows[0].contains("1.0 KiB") && rows[0].contains('…'), "{screen}");
        assert!(rows[0].contains("office") && rows[0].contains("target fails"), "{screen}");
        assert!(rows[1].starts_with("2000") && rows[1].contains("2.0 MiB") && rows[1].contains("ok"), "{screen}");
        let total = screen.lines().last().unwrap_or_default();
        assert!(total.starts_with("TOTAL") && total.contains("2.0 MiB"), "{screen}");
        assert!(screen.lines().next().unwrap_or_default().contains("00:00:12 UTC"), "{screen}");
        assert!(screen.contains("1 of 2 clients connected"), "{screen}");
    }

    #[test]
    fn columns_do_not_move_with_the_numbers() {
        let header = |s: &str| s.lines().find(|l| l.starts_with("PORT")).unwrap_or_default().to_string();
        let quiet = screen_after(&[(10.0, &[(2000, 0)]), (11.0, &[(2000, 10)])]);
        let busy = screen_after(&[(10.0, &[(2000, 0)]), (11.0, &[(2000, 900 << 30)])]);
        assert_eq!(header(&quiet), header(&busy));
        let row = |s: &str| s.lines().find(|l| l.starts_with("2000")).unwrap_or_default().to_string();
        assert_eq!(row(&quiet).find("ok"), row(&busy).find("ok"), "{quiet}\n{busy}");
    }

    #[test]
    fn a_bursty_transfer_keeps_a_rate_between_its_bursts() {
        // 3,000 bytes at 10.0 s, then nothing new in the readings at 10.3 and 10.6 s.
        let screen = screen_after(&[(9.0, &[(2000, 0)]), (10.0, &[(2000, 3000)]), (10.3, &[(2000, 3000)]), (10.6, &[(2000, 3000)])]);
        let row = screen.lines().find(|l| l.starts_with("2000")).unwrap_or_default();
        assert!(row.contains("1.8 KiB"), "3,000 bytes over 1.6 s: {screen}");
        assert_eq!(rate_text(0.0), "0 B");
        assert_eq!(rate_text(1023.0), "1.0 KiB");
        assert_eq!(rate_text(999.0 * 1024.0), "999.0 KiB");
    }
}
