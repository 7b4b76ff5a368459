//! The shipped monitoring files against a real Prometheus and real daemons.
//!
//! Starts a tunneld server with two named clients (`default` and `office`; a
//! third, `idle`, is created but never runs), a Prometheus whose configuration
//! is `dist/prometheus/scrape.yml` (targets pointed at those daemons, 1 s
//! scrapes) plus `dist/prometheus/alerts.yml`, pushes traffic through a direct
//! mapping and a tunneled mapping of each client, and then runs every PromQL
//! expression of `grafana/tunneld.json` and of the alert rules through
//! Prometheus's query API: each must parse, and each dashboard query must return
//! data. This is what "import the dashboard and it works the first time" means,
//! checked. The per-client panels must tell the clients apart, and
//! `TunneldTunnelDown` must go pending for `office` alone once it is killed.
//!
//! Needs the `prometheus` binary (Debian package `prometheus`); skips loudly
//! without it unless `CI_REQUIRE_TOOLS=1`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::tools::external_tool;
use common::{
    create_client, create_mapping, create_tunneled_mapping, echo_server, free_port, loopback, post, read_repo_file, repo_path, roundtrip,
    Daemon,
};
use serde_json::{json, Value};

/// The whole test, daemons and Prometheus included, must finish within this.
const TEST_BUDGET: Duration = Duration::from_secs(120);

/// Scrape targets written in scrape.yml, replaced by the test daemons' addresses.
const SERVER_PLACEHOLDER: &str = "tunneld-server.example.com:8080";
const CLIENT_PLACEHOLDER: &str = "tunneld-client.example.com:9101";

/// Concrete values for Grafana's built-in interval variables. With 1 s scrapes a
/// 30 s rate window holds plenty of samples; the range covers the whole test.
const RATE_INTERVAL: &str = "30s";
const INTERVAL: &str = "5s";
const RANGE: &str = "5m";
const RANGE_SECONDS: u64 = 300;

#[test]
fn dashboard_and_alert_queries_work_against_real_prometheus() {
    let Some(prometheus_bin) = external_tool("prometheus", "dashboard_and_alert_queries_work_against_real_prometheus") else { return };
    let deadline = Instant::now() + TEST_BUDGET;

    let server = Daemon::server("s3cret", &[]);
    let default_client = Daemon::client(&server, "s3cret", &[]);
    // A second site under its own name and secret, and a client that exists on
    // the server but was never deployed: no mapping names it, so it must not alert.
    let office_secret = create_client(&server, "office");
    create_client(&server, "idle");
    let mut office_client = Daemon::client(&server, &office_secret, &["--name", "office"]);
    let echo = echo_server();
    let direct_port = free_port();
    let tunneled_port = free_port();
    let office_port = free_port();
    create_mapping(&server, direct_port, echo, false);
    create_mapping(&server, tunneled_port, echo, true);
    create_tunneled_mapping(&server, office_port, echo, "office");
    let ports = [direct_port, tunneled_port, office_port];
    // UDP beside TCP on the direct port's number, for the UDP panels.
    let udp_echo = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP echo");
    let udp_target = udp_echo.local_addr().expect("its address");
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = udp_echo.recv_from(&mut buf) {
            let _ = udp_echo.send_to(&buf[..n], peer);
        }
    });
    let udp = json!({"source_port": direct_port, "protocol": "udp", "target_host": "127.0.0.1", "target_port": udp_target.port()});
    let (status, reply) = post(&server, "/api/mapping/create", udp);
    assert_eq!(status, 200, "{reply}");
    // And one through the default client, for its UDP transport (QUIC here).
    let udp = json!({"source_port": tunneled_port, "protocol": "udp", "target_host": "127.0.0.1", "target_port": udp_target.port(),
                     "use_tunnel": true});
    let (status, reply) = post(&server, "/api/mapping/create", udp);
    assert_eq!(status, 200, "{reply}");
    // One mapping with a quota, for the quota panel (which lists only those).
    let quota = json!({"port": direct_port, "quota": {"bytes": 1_000_000_000u64, "period": "month", "action": "alert"}});
    let (status, reply) = post(&server, "/api/mapping/update", quota);
    assert_eq!(status, 200, "{reply}");

    let clients = [default_client.http, office_client.http];
    let prometheus = Prometheus::start(&prometheus_bin, &scrape_config(server.http, &clients), deadline);
    // Let Prometheus see the counters at 0 before the traffic, so rates and
    // increases over the dashboard's windows cover the transfer.
    prometheus.wait_until("every target scraped", deadline, |p| {
        p.scalar(r#"sum(up{job="tunneld-server"})"#) == Some(1.0) && p.scalar(r#"sum(up{job="tunneld-client"})"#) == Some(2.0)
    });

    let payload: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
    for port in ports {
        let addr: SocketAddr = loopback(port);
        assert!(roundtrip(addr, &payload) == payload, "echo through mapping {port} came back different");
    }

    let visitor = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP visitor");
    visitor.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
    for port in [direct_port, tunneled_port] {
        visitor.send_to(&payload[..1000], loopback(port)).expect("send a datagram");
        assert_eq!(visitor.recv(&mut [0u8; 2048]).expect("the datagram back"), 1000, "through UDP {port}");
    }

    let len = payload.len() as f64;
    prometheus.wait_until("the traffic and a few more scrapes", deadline, |p| {
        let moved = ports.iter().all(|port| {
            p.scalar(&format!(r#"min(tunneld_mapping_bytes_total{{port="{port}", protocol="tcp"}})"#)).is_some_and(|v| v >= len)
        });
        let scrapes = p.scalar("min(count_over_time(up[1m]))").is_some_and(|n| n >= 5.0);
        moved && scrapes
    });
    prometheus.wait_until("every alert rule evaluated once", deadline, |p| p.rules().iter().all(|r| r["health"] != "unknown"));
    for rule in prometheus.rules() {
        assert_eq!(rule["health"], "ok", "alert {} fails to evaluate: {}", rule["name"], rule["lastError"]);
    }

    // The values Grafana would substitute with every instance and port selected, and client All.
    let instances = [server.http, default_client.http, office_client.http].map(|a| regex_escape(&a.to_string()));
    let variables: BTreeMap<&str, String> = [
        ("instance", format!("({})", instances.join("|"))),
        // Client All: the variable's custom all value, which keeps direct mappings.
        ("client", ".*".to_string()),
        ("port", format!("({direct_port}|{tunneled_port}|{office_port})")),
        ("__rate_interval", RATE_INTERVAL.to_string()),
        ("__interval", INTERVAL.to_string()),
        ("__interval_ms", (parse_seconds(INTERVAL) * 1000).to_string()),
        ("__range", RANGE.to_string()),
        ("__range_s", RANGE_SECONDS.to_string()),
        ("__range_ms", (RANGE_SECONDS * 1000).to_string()),
    ]
    .into_iter()
    .collect();

    let dashboard: Value = serde_json::from_str(&read_repo_file("grafana/tunneld.json")).expect("dashboard JSON");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 10, "expected the dashboard's panels to carry queries, found {}", queries.len());
    let mut failures = Vec::new();
    for (origin, raw) in &queries {
        let expr = substitute(raw, &variables);
        // A day's total that looks ahead from its step (`[1d] offset -1d`) is
        // evaluated where Grafana puts that step: at midnight (UTC here), one
        // step per day.
        let at = expr.contains("offset -1d").then(|| (common::unix_now() / 86_400.0).floor() * 86_400.0);
        match prometheus.query_at(&expr, at) {
            Err(e) => failures.push(format!("{origin}: {expr}\n    does not run: {e}")),
            Ok(result) if result.is_empty() => failures.push(format!("{origin}: {expr}\n    returned no data")),
            Ok(_) => {}
        }
    }

    // The variables must offer what the test created: every daemon, client and port.
    let offered = label_values(&prometheus, &dashboard, "instance", &variables);
    for daemon in [server.http, default_client.http, office_client.http] {
        assert!(offered.contains(&daemon.to_string()), "instance variable does not offer {daemon}: {offered:?}");
    }
    let offered_clients = label_values(&prometheus, &dashboard, "client", &variables);
    assert_eq!(offered_clients, names(["default", "idle", "office"]), "client variable choices (every client the server knows)");
    let offered_ports = label_values(&prometheus, &dashboard, "port", &variables);
    assert_eq!(offered_ports, names(ports.map(|p| p.to_string())), "port variable choices with client All");
    // One client selected: the port choices narrow to its mappings, and so do
    // the per-port panels that filter on $port.
    let mut office_only = variables.clone();
    office_only.insert("client", "office".to_string());
    let office_ports = label_values(&prometheus, &dashboard, "port", &office_only);
    assert_eq!(office_ports, names([office_port.to_string()]), "port variable choices with client office");

    // The per-port totals panel shows the transfer on every mapping.
    let totals_expr = queries
        .iter()
        .map(|(_, e)| e)
        .find(|e| {
            e.contains("sum by (instance, port, protocol, direction) (increase(tunneld_mapping_bytes_total") && e.contains("$__range")
        })
        .expect("a per-port totals query");
    let totals = prometheus.query(&substitute(totals_expr, &variables)).expect("totals query");
    for port in ports {
        for direction in ["sent", "received"] {
            let value = total_of(&totals, "port", &port.to_string(), direction);
            assert!(value >= len, "port {port} {direction}: dashboard total {value} < {len} bytes pushed");
        }
    }

    // Per client: each client's tunneled mapping traffic lands on that client
    // (through tunneld_mapping_info's client label), the direct mapping on none.
    let per_client_totals = find_query(&queries, "sum by (instance, client, direction) (increase(tunneld_mapping_bytes_total");
    let totals = prometheus.query(&substitute(per_client_totals, &variables)).expect("per-client totals query");
    assert_eq!(label_set(&totals, "client"), names(["default", "office"]), "per-client totals: {totals:?}");
    for client in ["default", "office"] {
        for direction in ["sent", "received"] {
            let value = total_of(&totals, "client", client, direction);
            // One 64 KiB echo per client; the direct mapping's must not be added in.
            assert!(value >= len && value < 2.0 * len, "client {client} {direction}: dashboard total {value}, pushed {len} bytes");
        }
    }
    let per_client_rate = find_query(&queries, "sum by (instance, client, direction) (rate(tunneld_mapping_bytes_total");
    let office_rate = prometheus.query(&substitute(per_client_rate, &office_only)).expect("per-client traffic query");
    assert_eq!(label_set(&office_rate, "client"), names(["office"]), "client office selected: {office_rate:?}");

    // Tunnel state per client, from the server (every client it knows) and from
    // each client process (itself).
    let state = prometheus.query(&substitute(find_query(&queries, "tunneld_tunnel_connected{instance"), &variables)).expect("tunnel state");
    let seen: BTreeSet<(String, String, u8)> = state
        .iter()
        .map(|s| {
            let label = |k: &str| s["metric"][k].as_str().unwrap_or("").to_string();
            (label("instance"), label("client"), sample_value(s).unwrap_or(-1.0) as u8)
        })
        .collect();
    // `idle`, known to the server but named by no mapping and not connected,
    // is not shown: nothing waits for it (no red DOWN), as the alerts agree.
    let expected: BTreeSet<(String, String, u8)> =
        [(server.http, "default", 1), (server.http, "office", 1), (default_client.http, "default", 1), (office_client.http, "office", 1)]
            .into_iter()
            .map(|(at, client, up)| (at.to_string(), client.to_string(), up))
            .collect();
    assert_eq!(seen, expected, "tunnel state per client (instance, client, connected)");
    // How the default client carries UDP: over QUIC, as the server says (only the
    // server's view; a client process reports its own sessions instead).
    let transport =
        prometheus.query(&substitute(find_query(&queries, "tunneld_tunnel_udp_transport{"), &variables)).expect("UDP transport per client");
    let transports: BTreeSet<(String, String)> = transport
        .iter()
        .map(|s| {
            let label = |k: &str| s["metric"][k].as_str().unwrap_or("").to_string();
            (label("client"), label("transport"))
        })
        .collect();
    assert_eq!(transports, BTreeSet::from([("default".to_string(), "quic".to_string())]), "UDP transport per client");
    let mappings = prometheus
        .query(&substitute(find_query(&queries, "count by (instance, client) (tunneld_mapping_client_connections_total"), &variables))
        .expect("mappings per client");
    let counts: BTreeMap<String, f64> =
        mappings.iter().filter_map(|s| Some((s["metric"]["client"].as_str()?.to_string(), sample_value(s)?))).collect();
    assert_eq!(
        counts,
        // default: its TCP and its UDP mapping on the tunneled port's number.
        BTreeMap::from([("default".into(), 2.0), ("idle".into(), 0.0), ("office".into(), 1.0)]),
        "tunneled mappings per client"
    );

    // Tunnel down is per client: nothing while idle (no mappings) is away; once
    // office is killed, TunneldTunnelDown goes pending for office alone, on the
    // server, with its one waiting mapping as the value.
    assert!(prometheus.alerts("TunneldTunnelDown").is_empty(), "TunneldTunnelDown active with every mapped client connected");
    office_client.kill();
    prometheus.wait_until("TunneldTunnelDown pending for office", deadline, |p| !p.alerts("TunneldTunnelDown").is_empty());
    let down = prometheus.alerts("TunneldTunnelDown");
    let [alert] = down.as_slice() else { panic!("expected one TunneldTunnelDown alert, got {down:?}") };
    assert_eq!(alert["labels"]["client"], "office", "{alert}");
    assert_eq!(alert["labels"]["instance"], server.http.to_string(), "{alert}");
    assert_eq!(alert["labels"]["job"], "tunneld-server", "{alert}");
    assert_eq!(alert["state"], "pending", "{alert}");
    assert_eq!(alert["value"].as_str().and_then(|v| v.parse::<f64>().ok()), Some(1.0), "one mapping waits for office: {alert}");
    assert!(alert["annotations"]["summary"].as_str().is_some_and(|s| s.contains("client office")), "the summary names the client: {alert}");

    // Alert rules as Prometheus loaded them: all of alerts.yml, all runnable.
    let rules = prometheus.rules();
    let in_file = read_repo_file("dist/prometheus/alerts.yml").lines().filter(|l| l.trim_start().starts_with("- alert:")).count();
    assert_eq!(rules.len(), in_file, "Prometheus loaded {} rules, alerts.yml has {in_file}", rules.len());
    for rule in &rules {
        let name = rule["name"].as_str().unwrap_or("?");
        let expr = rule["query"].as_str().expect("rule query");
        if let Err(e) = prometheus.query(expr) {
            failures.push(format!("alert {name}: {expr}\n    does not run: {e}"));
        }
    }

    // (On any panic, Prometheus's log is printed when it is dropped.)
    assert!(failures.is_empty(), "{} queries failed:\n{}", failures.len(), failures.join("\n"));
    assert!(Instant::now() < deadline, "test overran its {TEST_BUDGET:?} budget");
    drop(prometheus);
    drop(office_client);
    drop(default_client);
    drop(server);
}

/// scrape.yml with the test daemons as targets (every client under the client
/// job), a 1 s interval and the alert rules.
fn scrape_config(server: SocketAddr, clients: &[SocketAddr]) -> String {
    let jobs = read_repo_file("dist/prometheus/scrape.yml");
    for placeholder in [SERVER_PLACEHOLDER, CLIENT_PLACEHOLDER] {
        assert_eq!(jobs.matches(placeholder).count(), 1, "scrape.yml should list {placeholder} once as its example target");
    }
    let jobs: String = jobs
        .lines()
        .flat_map(|line| {
            if line.contains(CLIENT_PLACEHOLDER) {
                clients.iter().map(|c| line.replace(CLIENT_PLACEHOLDER, &c.to_string())).collect()
            } else {
                vec![line.replace(SERVER_PLACEHOLDER, &server.to_string())]
            }
        })
        .map(|line| line + "\n")
        .collect();
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\n{jobs}",
        repo_path("dist/prometheus/alerts.yml").display()
    )
}

/// Every query of the dashboard as (where it is, raw expression): panel targets,
/// and the selector inside each `label_values(selector, label)` variable.
fn dashboard_queries(dashboard: &Value) -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let mut panels: Vec<&Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                queries.push((format!("panel {title:?} {}", target["refId"].as_str().unwrap_or("")), expr.to_string()));
            }
        }
    }
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        // The data source variable lists data sources, not series.
        if var["type"] == "datasource" {
            continue;
        }
        if let Some(name) = var["name"].as_str() {
            queries.push((format!("variable {name}"), label_values_selector(dashboard, name)));
        }
    }
    queries
}

/// `label_values(tunneld_build_info, instance)` -> `tunneld_build_info`: the
/// series a variable's choices come from, as a PromQL query.
fn label_values_selector(dashboard: &Value, name: &str) -> String {
    let var = dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == name)
        .unwrap_or_else(|| panic!("no variable {name}"));
    let query = var["query"].as_str().or_else(|| var["query"]["query"].as_str()).expect("variable query");
    let inner = query
        .trim()
        .strip_prefix("label_values(")
        .and_then(|q| q.strip_suffix(')'))
        .unwrap_or_else(|| panic!("variable {name}: expected label_values(selector, label), got {query}"));
    let (selector, _label) = inner.rsplit_once(',').unwrap_or_else(|| panic!("variable {name}: no label in {query}"));
    selector.trim().to_string()
}

/// The dashboard query containing `fragment` (the first, in panel order).
fn find_query<'a>(queries: &'a [(String, String)], fragment: &str) -> &'a str {
    queries
        .iter()
        .map(|(_, e)| e.as_str())
        .find(|e| e.contains(fragment))
        .unwrap_or_else(|| panic!("no dashboard query contains {fragment}"))
}

/// The choices a `label_values(selector, label)` variable offers with `variables` filled in.
fn label_values(prometheus: &Prometheus, dashboard: &Value, name: &str, variables: &BTreeMap<&str, String>) -> BTreeSet<String> {
    let series = prometheus
        .query(&substitute(&label_values_selector(dashboard, name), variables))
        .unwrap_or_else(|e| panic!("variable {name}: {e}"));
    label_set(&series, name)
}

/// The value of the sample whose `label` is `value` and whose direction is `direction`.
fn total_of(samples: &[Value], label: &str, value: &str, direction: &str) -> f64 {
    samples
        .iter()
        .find(|s| s["metric"][label] == value && s["metric"]["direction"] == direction)
        .and_then(sample_value)
        .unwrap_or_else(|| panic!("no total for {label} {value} {direction} in {samples:?}"))
}

/// The values of `label` across `samples`.
fn label_set(samples: &[Value], label: &str) -> BTreeSet<String> {
    samples.iter().filter_map(|s| s["metric"][label].as_str().map(str::to_string)).collect()
}

fn names<const N: usize>(values: [impl Into<String>; N]) -> BTreeSet<String> {
    values.into_iter().map(Into::into).collect()
}

/// Replaces Grafana variables (`$name`, `${name}`, `${name:format}`, `[[name]]`)
/// like Grafana does; an unknown variable fails the test rather than reaching
/// Prometheus as a confusing parse error.
fn substitute(expr: &str, variables: &BTreeMap<&str, String>) -> String {
    let lookup = |name: &str| -> &str {
        variables.get(name).unwrap_or_else(|| panic!("query uses ${name}, which the test does not know how to fill: {expr}"))
    };
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(at) = rest.find(['$', '[']) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        if let Some(braced) = tail.strip_prefix("${") {
            let end = braced.find('}').unwrap_or_else(|| panic!("unclosed ${{ in {expr}"));
            let name = braced[..end].split(':').next().unwrap_or_default();
            out.push_str(lookup(name));
            rest = &braced[end + 1..];
        } else if let Some(bracketed) = tail.strip_prefix("[[") {
            let end = bracketed.find("]]").unwrap_or_else(|| panic!("unclosed [[ in {expr}"));
            out.push_str(lookup(&bracketed[..end]));
            rest = &bracketed[end + 2..];
        } else if let Some(plain) = tail.strip_prefix('$') {
            let len = plain.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(plain.len());
            out.push_str(lookup(&plain[..len]));
            rest = &plain[len..];
        } else {
            out.push('[');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

/// Grafana's escaping of a multi-value variable for `=~`: regex metacharacters
/// get a backslash, itself escaped for a PromQL string.
fn regex_escape(value: &str) -> String {
    value.chars().fold(String::new(), |mut s, c| {
        if "\\^$.|?*+()[]{}".contains(c) {
            s.push_str("\\\\");
        }
        s.push(c);
        s
    })
}

fn parse_seconds(duration: &str) -> u64 {
    duration.strip_suffix('s').and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{duration} is not whole seconds"))
}

/// The value of one vector sample, `{"value": [ts, "1.5"]}`.
fn sample_value(sample: &Value) -> Option<f64> {
    sample["value"][1].as_str()?.parse().ok()
}

/// A Prometheus server on a free loopback port with its own data dir; killed on drop.
struct Prometheus {
    child: Child,
    base: String,
    log_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(bin: &Path, config: &str, deadline: Instant) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");
        let log_path = dir.path().join("prometheus.log");
        let log = std::fs::File::create(&log_path).expect("prometheus log");
        let listen = format!("127.0.0.1:{}", free_port());
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={listen}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
        let mut prometheus = Prometheus { child, base: format!("http://{listen}"), log_path, _dir: dir };
        // Polled by hand rather than with `wait_until` so that a Prometheus that
        // exits (a config it rejects, a port it cannot bind) fails at once.
        loop {
            if let Some(status) = prometheus.child.try_wait().expect("try_wait prometheus") {
                panic!("prometheus exited ({status}) before it was ready");
            }
            if matches!(prometheus.get("/-/ready"), Ok((200, _))) {
                return prometheus;
            }
            assert!(Instant::now() < deadline, "prometheus not ready in time");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// GET a path; transport errors (not yet listening) are `Err`, HTTP errors
    /// come back with their status so callers can show Prometheus's message.
    fn get(&self, path_and_query: &str) -> Result<(u16, String), String> {
        let url = format!("{}{path_and_query}", self.base);
        match ureq::get(&url).timeout(Duration::from_secs(10)).call() {
            Ok(r) => Ok((r.status(), r.into_string().map_err(|e| e.to_string())?)),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string().unwrap_or_default())),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Runs an instant query; `Ok` holds the result as a list of samples (a
    /// scalar or string result counts as one), `Err` Prometheus's error text.
    fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        self.query_at(expr, None)
    }

    /// [`Prometheus::query`] evaluated at `time` (Unix seconds; `None`: now).
    fn query_at(&self, expr: &str, time: Option<f64>) -> Result<Vec<Value>, String> {
        let url = format!("{}/api/v1/query", self.base);
        let mut request = ureq::get(&url).query("query", expr);
        if let Some(time) = time {
            request = request.query("time", &time.to_string());
        }
        let response = match request.timeout(Duration::from_secs(10)).call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => return Err(format!("transport: {e}")),
        };
        let body: Value = response.into_json().map_err(|e| format!("unreadable response: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"].as_str().unwrap_or("error"), body["error"].as_str().unwrap_or("")));
        }
        let data = &body["data"];
        match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => Ok(data["result"].as_array().cloned().unwrap_or_default()),
            _ => Ok(vec![data["result"].clone()]),
        }
    }

    /// The single value of a query that returns one sample, if it does.
    fn scalar(&self, expr: &str) -> Option<f64> {
        match self.query(expr).ok()?.as_slice() {
            [one] => sample_value(one),
            _ => None,
        }
    }

    /// Every rule Prometheus loaded, from `/api/v1/rules`.
    fn rules(&self) -> Vec<Value> {
        let (status, body) = self.get("/api/v1/rules").expect("GET /api/v1/rules");
        assert_eq!(status, 200, "GET /api/v1/rules: {body}");
        let body: Value = serde_json::from_str(&body).expect("rules JSON");
        body["data"]["groups"].as_array().into_iter().flatten().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect()
    }

    /// Alerts of `name` that are pending or firing, from `/api/v1/alerts`.
    fn alerts(&self, name: &str) -> Vec<Value> {
        let (status, body) = self.get("/api/v1/alerts").expect("GET /api/v1/alerts");
        assert_eq!(status, 200, "GET /api/v1/alerts: {body}");
        let body: Value = serde_json::from_str(&body).expect("alerts JSON");
        body["data"]["alerts"].as_array().into_iter().flatten().filter(|a| a["labels"]["alertname"] == name).cloned().collect()
    }

    /// Polls `condition` until it holds; panics when the test's deadline passes
    /// first (and `Drop` then prints the Prometheus log).
    fn wait_until(&self, what: &str, deadline: Instant, condition: impl Fn(&Prometheus) -> bool) {
        loop {
            if condition(self) {
                return;
            }
            if Instant::now() >= deadline {
                panic!("timed out waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- prometheus log ---\n{}", self.log());
        }
    }
}
