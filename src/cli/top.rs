//! `tunneld ctl top`: a live view of per-mapping rates in the terminal.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::ctl::{human_bytes, mode, table, Api};
use crate::api::contract::TrafficReport;

/// One `/api/stats/traffic` reading, kept to turn the next one into rates.
struct Sample {
    at: f64,
    bytes: std::collections::BTreeMap<u16, (u64, u64)>,
}

impl Sample {
    fn of(report: &TrafficReport) -> Sample {
        let bytes = report.mappings.iter().map(|m| (m.port, (m.bytes_sent, m.bytes_received))).collect();
        Sample { at: report.timestamp, bytes }
    }
}

/// The `ctl top` screen for one reading: mappings ordered by current throughput,
/// rates from the daemon's own timestamps (so a slow terminal does not skew them).
fn top_screen(api_base: &str, report: &TrafficReport, previous: Option<&Sample>) -> String {
    let current = Sample::of(report);
    let elapsed = previous.map(|p| current.at - p.at).filter(|dt| *dt > 0.0);
    let rate = |port: u16, now: u64, pick: fn(&(u64, u64)) -> u64| -> f64 {
        match (elapsed, previous.and_then(|p| p.bytes.get(&port))) {
            (Some(dt), Some(before)) => now.saturating_sub(pick(before)) as f64 / dt,
            _ => 0.0,
        }
    };
    let mut lines: Vec<(f64, Vec<String>)> = report
        .mappings
        .iter()
        .map(|m| {
            let (sent, received) = (m.bytes_sent, m.bytes_received);
            let (up, down) = (rate(m.port, sent, |b| b.0), rate(m.port, received, |b| b.1));
            let row = vec![
                m.port.to_string(),
                format!("{}:{}", m.target_host, m.target_port),
                mode(m.use_tunnel, m.client.as_deref()),
                format!("{}/s", human_bytes(up as u64)),
                format!("{}/s", human_bytes(down as u64)),
                human_bytes(sent),
                human_bytes(received),
                m.active_connections.to_string(),
                m.status.to_string(),
            ];
            (up + down, row)
        })
        .collect();
    lines.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1[0].cmp(&b.1[0])));
    let mut rows = vec![vec![
        "PORT".to_string(),
        "TARGET".into(),
        "MODE".into(),
        "SENT/s".into(),
        "RECV/s".into(),
        "SENT".into(),
        "RECEIVED".into(),
        "OPEN".into(),
        "STATUS".into(),
    ]];
    rows.extend(lines.into_iter().map(|(_, row)| row));
    format!(
        "tunneld top — {api_base} — {} mapping(s), {} open connection(s), tunnel {} — q quits\n\n{}",
        report.mapping_count,
        report.active_connections,
        if report.tunnel.connected { "connected" } else { "not connected" },
        table(&rows)
    )
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
    let mut previous: Option<Sample> = None;
    loop {
        let screen = match api.get::<TrafficReport>("/api/stats/traffic") {
            Ok(report) => {
                let screen = top_screen(&api.base, &report, previous.as_ref());
                previous = Some(Sample::of(&report));
                screen
            }
            Err(e) => format!("tunneld top — {} — q quits\n\n{e:#}\nretrying every {:.0} s\n", api.base, interval.as_secs_f64()),
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
    use crate::api::contract::{MappingHealth, MappingStatus, MappingTraffic, TunnelTraffic};

    fn mapping(port: u16, bytes_sent: u64) -> MappingTraffic {
        MappingTraffic {
            port,
            bytes_sent,
            bytes_received: 0,
            lifetime_sent: bytes_sent,
            lifetime_received: 0,
            last_update: None,
            active_connections: 0,
            connections_total: 0,
            connect_errors: 0,
            refused: Default::default(),
            target_host: "h".into(),
            target_port: port / 1000,
            use_tunnel: false,
            client: None,
            status: MappingStatus::Active,
            health: Some(MappingHealth::Ok),
            health_reason: String::new(),
            description: None,
            bandwidth_limit: None,
            quota: None,
            quota_used: None,
            quota_blocked: None,
            allow: vec![],
            deny: vec![],
        }
    }

    fn reading(timestamp: f64, a: u64, b: u64) -> TrafficReport {
        TrafficReport {
            tunnel: TunnelTraffic { bytes_sent: 0, bytes_received: 0, last_update: None, connected: false, connected_since: None },
            clients: vec![],
            mappings: vec![mapping(1000, a), mapping(2000, b)],
            total_sent: a + b,
            total_received: 0,
            lifetime_sent: a + b,
            lifetime_received: 0,
            started_at: 0.0,
            timestamp,
            mapping_count: 2,
            active_connections: 0,
        }
    }

    #[test]
    fn top_orders_by_current_rate() {
        let before = Sample::of(&reading(10.0, 0, 0));
        let screen = top_screen("http://x", &reading(12.0, 2048, 4 * 1024 * 1024), Some(&before));
        let rows: Vec<&str> = screen.lines().filter(|l| l.starts_with("1000") || l.starts_with("2000")).collect();
        assert!(rows[0].starts_with("2000") && rows[0].contains("2.0 MiB/s"), "{screen}");
        assert!(rows[1].starts_with("1000") && rows[1].contains("1.0 KiB/s"), "{screen}");
    }
}
