//! Reading a daemon's Prometheus exposition on `/metrics`.

use std::time::Duration;

use super::daemon::Daemon;

/// Fetches `/metrics` text.
pub fn metrics_text(d: &Daemon) -> String {
    ureq::get(&d.url("/metrics")).call().expect("GET /metrics").into_string().expect("metrics body")
}

/// Value of one sample in Prometheus text, e.g. `metric_value(t, "tunneld_mapping_bytes_total", &[("port","1"),("direction","sent")])`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        let (metric, label_part) = match series.find('{') {
            Some(i) => (&series[..i], &series[i..]),
            None => (series, ""),
        };
        if metric != name {
            return None;
        }
        let all = labels.iter().all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")));
        all.then(|| value.parse().ok()).flatten()
    })
}

/// One sample as the daemon exports it now (a fresh scrape): [`metric_value`]
/// of [`metrics_text`]. Tests that compare several samples of one moment read
/// the text once instead.
pub fn scrape_metric(d: &Daemon, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metric_value(&metrics_text(d), name, labels)
}

/// `tunneld_tunnel_sessions_total{result}` now. A result the daemon has not
/// exported yet has counted no session, so it reads 0.
pub fn tunnel_sessions(server: &Daemon, result: &str) -> f64 {
    scrape_metric(server, "tunneld_tunnel_sessions_total", &[("result", result)]).unwrap_or(0.0)
}

/// Waits until the history recorder has flushed after `after` (Unix seconds),
/// so everything counted before then is in the history database.
pub fn wait_for_history_flush(d: &Daemon, after: f64) {
    super::wait_for("a history flush", Duration::from_secs(20), || {
        let last = scrape_metric(d, "tunneld_history_last_flush_timestamp_seconds", &[])?;
        (last > after).then_some(())
    });
}

/// The relay paths `/metrics` counts for the TCP mapping on `port`: (splice, copy).
pub fn relayed_paths(server: &Daemon, port: u16) -> (f64, f64) {
    let text = metrics_text(server);
    let p = port.to_string();
    let of = |path| {
        metric_value(&text, "tunneld_mapping_relayed_connections_total", &[("path", path), ("port", &p), ("protocol", "tcp")])
            .unwrap_or(0.0)
    };
    (of("splice"), of("copy"))
}
