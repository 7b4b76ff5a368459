//! `tunneld ctl top`: a live view of per-mapping rates in the terminal.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;

use super::ctl::{field, human_bytes, mode, number, table, text, Api};

/// One `/api/stats/traffic` reading, kept to turn the next one into rates.
struct Sample {
    at: f64,
    bytes: std::collections::BTreeMap<u64, (u64, u64)>,
}

impl Sample {
    fn of(data: &Value) -> Sample {
        let bytes = data
            .get("mappings")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| Some((m.get("port")?.as_u64()?, (number(m, "bytes_sent"), number(m, "bytes_received")))))
            .collect();
        Sample { at: data.get("timestamp").and_then(Value::as_f64).unwrap_or(0.0), bytes }
    }
}

/// The `ctl top` screen for one reading: mappings ordered by current throughput,
/// rates from the daemon's own timestamps (so a slow terminal does not skew them).
fn top_screen(api_base: &str, data: &Value, previous: Option<&Sample>) -> String {
    let current = Sample::of(data);
    let elapsed = previous.map(|p| current.at - p.at).filter(|dt| *dt > 0.0);
    let rate = |port: u64, now: u64, pick: fn(&(u64, u64)) -> u64| -> f64 {
        match (elapsed, previous.and_then(|p| p.bytes.get(&port))) {
            (Some(dt), Some(before)) => now.saturating_sub(pick(before)) as f64 / dt,
            _ => 0.0,
        }
    };
    let mut lines: Vec<(f64, Vec<String>)> = data
        .get("mappings")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|m| {
            let port = m.get("port").and_then(Value::as_u64).unwrap_or_default();
            let (sent, received) = (number(m, "bytes_sent"), number(m, "bytes_received"));
            let (up, down) = (rate(port, sent, |b| b.0), rate(port, received, |b| b.1));
            let row = vec![
                port.to_string(),
                format!("{}:{}", text(m, "target_host"), field(m, "target_port")),
                mode(m.get("use_tunnel"), m.get("client")),
                format!("{}/s", human_bytes(up as u64)),
                format!("{}/s", human_bytes(down as u64)),
                human_bytes(sent),
                human_bytes(received),
                field(m, "active_connections"),
                text(m, "status"),
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
    let connected = data.get("tunnel").and_then(|t| t.get("connected")).and_then(Value::as_bool) == Some(true);
    format!(
        "tunneld top — {api_base} — {} mapping(s), {} open connection(s), tunnel {} — q quits\n\n{}",
        field(data, "mapping_count"),
        field(data, "active_connections"),
        if connected { "connected" } else { "not connected" },
        table(&rows)
    )
}

/// `ctl top`: a live view refreshed every `interval` until `q` (or Ctrl-C). A
/// failed poll is shown on screen and retried, so a daemon restart does not end it.
pub fn top(api: &Api, interval: Duration) -> anyhow::Result<()> {
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
        let screen = match api.get("/api/stats/traffic") {
            Ok(data) => {
                let screen = top_screen(&api.base, &data, previous.as_ref());
                previous = Some(Sample::of(&data));
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
    use serde_json::json;

    #[test]
    fn top_orders_by_current_rate() {
        let reading = |t: f64, a: u64, b: u64| {
            json!({"timestamp": t, "mapping_count": 2, "active_connections": 0, "tunnel": {"connected": false},
                   "mappings": [{"port": 1000, "bytes_sent": a, "bytes_received": 0, "target_host": "h", "target_port": 1},
                                {"port": 2000, "bytes_sent": b, "bytes_received": 0, "target_host": "h", "target_port": 2}]})
        };
        let before = Sample::of(&reading(10.0, 0, 0));
        let screen = top_screen("http://x", &reading(12.0, 2048, 4 * 1024 * 1024), Some(&before));
        let rows: Vec<&str> = screen.lines().filter(|l| l.starts_with("1000") || l.starts_with("2000")).collect();
        assert!(rows[0].starts_with("2000") && rows[0].contains("2.0 MiB/s"), "{screen}");
        assert!(rows[1].starts_with("1000") && rows[1].contains("1.0 KiB/s"), "{screen}");
    }
}
