//! The operator files (`dist/`, `grafana/`) checked by the tools an operator would
//! run on them: `promtool` for the alert rules and scrape jobs, `systemd-analyze`
//! for the units, `tunneld check-config` for the example configs, and a structural
//! check of the Grafana dashboard (Grafana itself is not packaged for CI).
//!
//! A missing tool skips its test loudly (see `common::tools`); CI sets
//! `CI_REQUIRE_TOOLS=1` so nothing is skipped there.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::tools::external_tool;
use common::{read_repo_file, repo_path};
use serde_json::Value;

/// The units, with the config file each one passes to the daemon.
const UNITS: [(&str, &str); 2] =
    [("tunneld-server.service", "/etc/tunneld/server.toml"), ("tunneld-client.service", "/etc/tunneld/client.toml")];

/// The jobs alerts and dashboard rely on; scrape.yml must define both.
const JOBS: [&str; 2] = ["tunneld-server", "tunneld-client"];

/// Metrics labelled per client; a panel showing them must follow `$client`.
const PER_CLIENT_METRICS: [&str; 5] = [
    "tunneld_tunnel_rtt",
    "tunneld_tunnel_connected{",
    "tunneld_tunnel_connected_since_timestamp_seconds",
    "tunneld_tunnel_bytes_total",
    "tunneld_tunnel_last_activity_timestamp_seconds",
];

/// Where the units expect the binary; the tests swap in the freshly built one,
/// because `systemd-analyze verify` insists that `ExecStart=` is executable.
const INSTALLED_BIN: &str = "/usr/bin/tunneld";

/// Runs `cmd` and returns its output, panicking with both streams when it fails,
/// so a CI log shows the tool's own complaint.
fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let output = cmd.output().unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n--- stdout ---\n{}\n--- stderr ---\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

#[test]
fn alert_rules_pass_promtool_check() {
    let Some(promtool) = external_tool("promtool", "alert_rules_pass_promtool_check") else { return };
    let out = run_ok(Command::new(promtool).args(["check", "rules"]).arg(repo_path("dist/prometheus/alerts.yml")), "promtool check rules");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("SUCCESS"), "promtool check rules did not report success:\n{text}");
}

#[test]
fn every_alert_passes_its_promtool_unit_tests() {
    let Some(promtool) = external_tool("promtool", "every_alert_passes_its_promtool_unit_tests") else { return };
    run_ok(Command::new(promtool).args(["test", "rules"]).arg(repo_path("dist/prometheus/alerts_test.yml")), "promtool test rules");

    // promtool is happy with an alert that no test mentions; we are not.
    let rules = read_repo_file("dist/prometheus/alerts.yml");
    let tests = read_repo_file("dist/prometheus/alerts_test.yml");
    let alerts = yaml_values(&rules, "- alert:");
    assert!(alerts.len() >= 5, "expected at least the five alerts the issue asks for, found {alerts:?}");
    let tested = yaml_values(&tests, "alertname:");
    let untested: Vec<_> = alerts.difference(&tested).collect();
    assert!(untested.is_empty(), "alerts without a case in alerts_test.yml: {untested:?}");
}

#[test]
fn prometheus_config_with_the_scrape_jobs_and_alerts_is_valid() {
    let Some(promtool) = external_tool("promtool", "prometheus_config_with_the_scrape_jobs_and_alerts_is_valid") else { return };
    // scrape.yml is a complete configuration on its own (usable as is or under
    // `scrape_config_files:`); an operator's prometheus.yml adds globals and the
    // rules, and promtool then checks the rule file as well.
    run_ok(
        Command::new(&promtool).args(["check", "config"]).arg(repo_path("dist/prometheus/scrape.yml")),
        "promtool check config scrape.yml",
    );

    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("prometheus.yml");
    let text = format!(
        "global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\nrule_files:\n  - {}\n{}",
        repo_path("dist/prometheus/alerts.yml").display(),
        read_repo_file("dist/prometheus/scrape.yml")
    );
    std::fs::write(&config, text).expect("write prometheus.yml");
    let out = run_ok(Command::new(&promtool).args(["check", "config"]).arg(&config), "promtool check config with rules");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("rules found"), "promtool did not check the rule file:\n{report}");
}

#[test]
fn alerts_and_dashboard_select_only_jobs_that_scrape_yml_defines() {
    let defined = yaml_values(&read_repo_file("dist/prometheus/scrape.yml"), "- job_name:");
    for job in JOBS {
        assert!(defined.contains(job), "scrape.yml lacks job {job}; defines {defined:?}");
    }
    for file in ["dist/prometheus/alerts.yml", "grafana/tunneld.json"] {
        let text = read_repo_file(file);
        let used = job_names_in_selectors(&text);
        let unknown: Vec<_> = used.difference(&defined).collect();
        assert!(unknown.is_empty(), "{file} selects jobs that scrape.yml does not define: {unknown:?}");
    }
    assert!(!job_names_in_selectors(&read_repo_file("dist/prometheus/alerts.yml")).is_empty(), "alerts.yml should scope its rules by job");
}

#[test]
fn systemd_units_pass_systemd_analyze_verify() {
    let Some(analyze) = external_tool("systemd-analyze", "systemd_units_pass_systemd_analyze_verify") else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    for (unit, _) in UNITS {
        let path = unit_with_built_binary(tmp.path(), unit);
        let out = run_ok(Command::new(&analyze).arg("verify").arg(&path), &format!("systemd-analyze verify {unit}"));
        // verify exits 0 on unknown keys and unparsable values, reporting them only
        // as "<file>:<line>: ..." lines: any line naming our unit is a failure.
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        let complaints: Vec<&str> = report.lines().filter(|l| l.contains(unit)).collect();
        assert!(complaints.is_empty(), "systemd-analyze verify complains about {unit}:\n{}", complaints.join("\n"));
    }
}

#[test]
fn systemd_units_stay_hardened() {
    let Some(analyze) = external_tool("systemd-analyze", "systemd_units_stay_hardened") else { return };
    let tmp = tempfile::tempdir().expect("tempdir");
    for (unit, _) in UNITS {
        let path = unit_with_built_binary(tmp.path(), unit);
        // Exposure is reported as 0.0-10.0 and compared as 0-100: 20 means "2.0, OK",
        // so dropping a sandboxing directive or two fails here.
        run_ok(
            Command::new(&analyze).args(["security", "--offline=yes", "--threshold=20"]).arg(&path),
            &format!("systemd-analyze security {unit} (exposure above 2.0)"),
        );
    }
}

#[test]
fn systemd_units_declare_the_service_contract() {
    for (unit, config) in UNITS {
        let text = read_repo_file(&format!("dist/{unit}"));
        let settings = unit_settings(&text);
        let values = |key: &str| -> Vec<&str> { settings.iter().filter(|(k, _)| k == key).map(|(_, v)| v.as_str()).collect() };
        let one = |key: &str| -> String {
            let v = values(key);
            assert_eq!(v.len(), 1, "{unit}: expected exactly one {key}=, found {v:?}");
            v[0].to_string()
        };
        let role = if unit.contains("server") { "server" } else { "client" };

        assert_eq!(one("ExecStart"), format!("{INSTALLED_BIN} {role} --config {config}"), "{unit}: ExecStart");
        assert!(values("ExecReload").contains(&"/bin/kill -HUP $MAINPID"), "{unit}: reload must be SIGHUP to the main process");
        for (key, want) in [
            ("Type", "notify"),
            ("NotifyAccess", "main"),
            ("Restart", "on-failure"),
            ("DynamicUser", "yes"),
            ("ConfigurationDirectory", "tunneld"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("PrivateDevices", "yes"),
            ("NoNewPrivileges", "yes"),
            ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
            ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("MemoryDenyWriteExecute", "yes"),
            ("LockPersonality", "yes"),
            ("RestrictNamespaces", "yes"),
            ("SystemCallArchitectures", "native"),
            ("UMask", "0077"),
            ("LimitNOFILE", "1048576"),
        ] {
            assert_eq!(one(key), want, "{unit}: {key}");
        }
        assert!(values("SystemCallFilter").contains(&"@system-service"), "{unit}: SystemCallFilter=@system-service");
        assert!(!one("StateDirectory").is_empty(), "{unit}: StateDirectory");
        // The daemon pings at half the interval; it must be long enough to never
        // trip on a busy but healthy machine.
        let watchdog = one("WatchdogSec");
        let secs: u64 = watchdog.trim_end_matches('s').parse().unwrap_or_else(|_| panic!("{unit}: WatchdogSec={watchdog} is not N or Ns"));
        assert!((10..=120).contains(&secs), "{unit}: WatchdogSec={watchdog} out of the sensible 10-120 s range");
    }
}

#[test]
fn grafana_dashboard_is_importable_and_shows_what_operators_need() {
    let text = read_repo_file("grafana/tunneld.json");
    let dash: Value = serde_json::from_str(&text).expect("grafana/tunneld.json is valid JSON");
    // A data source variable, not an import-time input: `${DS_PROMETHEUS}`
    // resolves only through the UI import, so a provisioned file broke.
    const DS: &str = "${datasource}";
    assert!(!text.contains("${DS_"), "import-time data source inputs left in the dashboard");
    assert!(dash.get("__inputs").is_none(), "no __inputs: the data source is the `datasource` variable");
    assert!(dash["id"].is_null(), "an importable dashboard has id null");
    assert!(dash["uid"].as_str().is_some_and(|u| !u.is_empty()), "stable uid so re-imports replace the dashboard");

    let variables = dash["templating"]["list"].as_array().expect("templating.list");
    let source = variables.first().expect("template variables");
    assert_eq!(
        (source["name"].as_str(), source["type"].as_str(), source["query"].as_str()),
        (Some("datasource"), Some("datasource"), Some("prometheus"))
    );
    for name in ["instance", "client", "port"] {
        let var = variables.iter().find(|v| v["name"] == name).unwrap_or_else(|| panic!("template variable {name} missing"));
        assert_eq!(var["type"], "query", "variable {name} is a query variable");
        assert_eq!(var["datasource"]["uid"], DS, "variable {name} uses the imported data source");
        assert!(var_query(var).starts_with("label_values("), "variable {name}: {}", var_query(var));
    }
    let port_var = variables.iter().find(|v| v["name"] == "port").expect("port variable");
    assert!(var_query(port_var).contains("$instance"), "port choices follow the selected instances");
    assert!(var_query(port_var).contains(r#"client=~"$client""#), "port choices follow the selected clients: {}", var_query(port_var));

    // One dashboard for every client of a server: pick one, several or All.
    let client_var = variables.iter().find(|v| v["name"] == "client").expect("client variable");
    let client_query = var_query(client_var);
    assert!(
        client_query.starts_with("label_values(tunneld_tunnel_connected{") && client_query.ends_with(", client)"),
        "client choices are the clients the tunnel gauge knows: {client_query}"
    );
    assert!(client_query.contains("$instance"), "client choices follow the selected instances");
    assert_eq!(client_var["multi"], true, "several clients can be selected");
    assert_eq!(client_var["includeAll"], true, "the client variable offers All");
    // With All, `client=~"$client"` must still match direct mappings, whose
    // tunneld_mapping_info has client="": Grafana's default All (the list of
    // client names) would drop them from every per-port panel.
    assert_eq!(client_var["allValue"], ".*", "client All must match the empty client label of direct mappings");
    let position = |name: &str| variables.iter().position(|v| v["name"] == name);
    assert!(position("client") < position("port"), "client comes before port, which depends on it");

    let panels = all_panels(&dash);
    let mut ids = BTreeSet::new();
    let mut areas: Vec<(String, [i64; 4])> = Vec::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or("<untitled>").to_string();
        assert!(ids.insert(panel["id"].as_i64().expect("numeric panel id")), "duplicate panel id in {title}");
        let grid = &panel["gridPos"];
        let rect = ["x", "y", "w", "h"].map(|k| grid[k].as_i64().unwrap_or_else(|| panel_fail(&title, &format!("gridPos.{k}"))));
        assert!(
            rect[0] >= 0 && rect[0] + rect[2] <= 24 && rect[2] > 0 && rect[3] > 0,
            "{title}: gridPos {grid} outside the 24-column grid"
        );
        if let Some((other, _)) = areas.iter().find(|(_, r)| overlaps(r, &rect)) {
            panic!("panels {other:?} and {title:?} overlap");
        }
        areas.push((title.clone(), rect));
        if panel["type"] == "row" {
            continue;
        }

        assert_eq!(panel["datasource"]["uid"], DS, "{title}: panel data source");
        assert_eq!(panel["datasource"]["type"], "prometheus", "{title}: panel data source type");
        let unit = panel["fieldConfig"]["defaults"]["unit"].as_str().unwrap_or("");
        assert!(!unit.is_empty(), "{title}: fieldConfig.defaults.unit is not set");
        let targets = panel["targets"].as_array().filter(|t| !t.is_empty()).unwrap_or_else(|| panel_fail(&title, "targets"));
        for target in targets {
            let expr = target["expr"].as_str().unwrap_or("");
            assert!(!expr.trim().is_empty(), "{title}: a target without expr");
            assert_eq!(target["datasource"]["uid"], DS, "{title}: target data source");
            assert!(target["legendFormat"].as_str().is_some_and(|l| !l.is_empty()), "{title}: target {expr} has no legend");
            assert!(expr.contains(r#"instance=~"$instance""#), "{title}: {expr} ignores the instance variable");
            // The tunnel metrics are per client: every panel of them follows
            // the client variable and tells the clients apart.
            if PER_CLIENT_METRICS.iter().any(|m| expr.contains(m)) {
                assert!(expr.contains(r#"client=~"$client""#), "{title}: {expr} ignores the client variable");
                let legend = target["legendFormat"].as_str().unwrap_or("");
                assert!(legend.contains("{{client}}"), "{title}: legend {legend:?} does not name the client");
            }
        }
    }

    // What the issue asks the dashboard to show: (PromQL fragment, unit it must carry).
    let wanted = [
        ("tunneld_tunnel_connected{", None),
        ("tunneld_tunnel_connected_since_timestamp_seconds", Some("dateTimeFromNow")),
        // IEC units (KiB/s, MiB/s), as the monitor page shows them.
        ("sum by (direction) (rate(tunneld_mapping_bytes_total", Some("binBps")),
        ("port, protocol, direction) (rate(tunneld_mapping_bytes_total", Some("binBps")),
        ("up{job=~\"tunneld-server|tunneld-client\"", None),
        ("group_left (target, mode, client) (max by (instance, port, protocol, target, mode, client) (tunneld_mapping_info", None),
        // Per client: the tunnel's own counters, and the user traffic of each
        // client's tunneled mappings through tunneld_mapping_info's client label.
        ("sum by (job, instance, client, direction) (rate(tunneld_tunnel_bytes_total", Some("binBps")),
        (
            "sum by (instance, client, direction) (rate(tunneld_mapping_bytes_total{instance=~\"$instance\"}[$__rate_interval]) * on (instance, port, protocol) group_left (client) max by (instance, port, protocol, client) (tunneld_mapping_info{instance=~\"$instance\", mode=\"tunnel\", client=~\"$client\"})",
            Some("binBps"),
        ),
        ("sum by (instance, client, direction) (increase(tunneld_mapping_bytes_total{instance=~\"$instance\"}[$__range]) * on (instance, port, protocol) group_left (client)", Some("bytes")),
        ("count by (instance, client) (tunneld_mapping_client_connections_total{instance=~\"$instance\"", None),
        ("rate(tunneld_mapping_connect_errors_total{instance=~\"$instance\", port=~\"$port\"}[$__rate_interval])) / sum by (instance, port, protocol) (rate(tunneld_mapping_connections_total", Some("percentunit")),
        ("topk(5, sum by (instance, port, protocol) (rate(tunneld_mapping_bytes_total", Some("binBps")),
        ("sum by (instance, port, protocol, client) (rate(tunneld_mapping_client_connections_total", Some("cps")),
        ("(increase(tunneld_mapping_bytes_total{instance=~\"$instance\", port=~\"$port\"}[1d] offset -1d))", Some("bytes")),
        ("tunneld_history_last_flush_timestamp_seconds", Some("s")),
        ("(increase(tunneld_mapping_bytes_total", Some("bytes")),
        ("tunneld_mapping_active_connections", None),
        ("rate(tunneld_mapping_connections_total", None),
        ("tunneld_tunnel_sessions_total", None),
        ("process_resident_memory_bytes", Some("bytes")),
        ("rate(process_cpu_seconds_total", None),
        ("tunneld_mapping_up{", None),
        ("tunneld_mapping_quota_used_ratio{", Some("percentunit")),
        ("rate(tunneld_mapping_connect_duration_seconds_bucket", Some("s")),
        ("rate(tunneld_mapping_connection_duration_seconds_bucket", Some("s")),
        ("rate(tunneld_tunnel_rtt_seconds_bucket", Some("s")),
    ];
    for (fragment, unit) in wanted {
        let showing: Vec<&Value> = panels.iter().filter(|p| panel_exprs(p).iter().any(|e| e.contains(fragment))).copied().collect();
        assert!(!showing.is_empty(), "no panel queries {fragment}");
        if let Some(unit) = unit {
            assert!(
                showing.iter().any(|p| p["fieldConfig"]["defaults"]["unit"] == unit),
                "the panel querying {fragment} should have unit {unit}"
            );
        }
    }
    let range_totals =
        panels.iter().flat_map(|p| panel_exprs(p)).any(|e| e.contains("increase(tunneld_mapping_bytes_total") && e.contains("[$__range]"));
    assert!(range_totals, "per-port totals must cover the selected range ($__range)");
    let timelines: Vec<String> =
        panels.iter().filter(|p| p["type"] == "state-timeline").flat_map(|p| panel_exprs(p)).map(str::to_string).collect();
    for wanted in ["up{", "tunneld_tunnel_connected{"] {
        assert!(timelines.iter().any(|e| e.starts_with(wanted)), "no state timeline of {wanted}: {timelines:?}");
    }
    let si_units: Vec<String> = panels
        .iter()
        .filter_map(|p| p["fieldConfig"]["defaults"]["unit"].as_str())
        .filter(|u| ["Bps", "decbytes", "KBs", "MBs"].contains(u))
        .map(str::to_string)
        .collect();
    assert!(si_units.is_empty(), "byte units must be IEC like the page: {si_units:?}");
}

#[test]
fn example_configs_pass_check_config() {
    for (file, role, secret_var) in
        [("dist/server.toml", "server", "TUNNELD_SERVER__SECRET"), ("dist/client.toml", "client", "TUNNELD_CLIENT__SECRET")]
    {
        // Run it as the unit would: systemd starts services with a clean
        // environment plus the EnvironmentFile, which provides the secret.
        // check-config must accept the pair and never print the secret.
        let secret = "example-secret-that-must-not-be-printed";
        let mut cmd = Command::new(common::BIN);
        cmd.args(["check-config", "--config"]).arg(repo_path(file)).arg(role).env_clear().env(secret_var, secret);
        let out = run_ok(&mut cmd, &format!("tunneld check-config {file} {role}"));
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(!printed.trim().is_empty(), "check-config printed no effective config for {file}");
        assert!(!printed.contains(secret), "check-config printed the secret for {file}:\n{printed}");
    }
}

#[test]
fn example_configs_have_only_their_roles_sections_and_explain_every_key() {
    for (file, sections) in
        [("dist/server.toml", &["server", "api", "history", "alerts", "log"][..]), ("dist/client.toml", &["client", "log"][..])]
    {
        let text = read_repo_file(file);
        let parsed: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{file} is not TOML: {e}"));
        let found: BTreeSet<&str> = parsed.keys().map(String::as_str).collect();
        assert_eq!(found, sections.iter().copied().collect(), "{file}: sections");

        // Every key, set or shown commented out, sits right under a comment.
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        for (i, line) in lines.iter().enumerate() {
            let key_line = line.trim_start_matches("# ");
            let is_key = !line.starts_with('[')
                && key_line.split_once(" = ").is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
            if is_key {
                assert!(i > 0 && lines[i - 1].starts_with('#'), "{file}:{}: `{line}` has no comment above it", i + 1);
            }
        }
    }
}

// ---- helpers -----------------------------------------------------------------

/// Copies `dist/<unit>` into `dir` with the installed binary path replaced by the
/// one cargo just built.
fn unit_with_built_binary(dir: &Path, unit: &str) -> PathBuf {
    let text = read_repo_file(&format!("dist/{unit}"));
    assert!(text.contains(INSTALLED_BIN), "{unit} no longer runs {INSTALLED_BIN}");
    let path = dir.join(unit);
    std::fs::write(&path, text.replace(INSTALLED_BIN, common::BIN)).expect("write unit copy");
    path
}

/// `Key=Value` assignments of a unit file, comments and section headers dropped.
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';') && !l.starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect()
}

/// Values after `prefix` on lines of a simple YAML file (`- alert: Foo` -> `Foo`),
/// enough for the flat shapes of our own files without a YAML parser.
fn yaml_values(text: &str, prefix: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(prefix))
        .map(|v| v.split(" #").next().unwrap_or(v).trim().trim_matches(['"', '\'']).to_string())
        .collect()
}

/// Job names in `job="a"` and `job=~"a|b"` selectors (JSON-escaped quotes too).
fn job_names_in_selectors(text: &str) -> BTreeSet<String> {
    let text = text.replace("\\\"", "\"");
    let mut names = BTreeSet::new();
    for (start, _) in text.match_indices("job=") {
        let rest = text[start + 4..].trim_start_matches('~');
        let Some(quoted) = rest.strip_prefix('"') else { continue };
        let Some(end) = quoted.find('"') else { continue };
        names.extend(quoted[..end].split('|').map(str::to_string));
    }
    names
}

/// Every panel, including those nested in collapsed rows.
fn all_panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels array") {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(nested);
        }
    }
    out
}

fn panel_exprs(panel: &Value) -> Vec<&str> {
    panel["targets"].as_array().map(|t| t.iter().filter_map(|t| t["expr"].as_str()).collect()).unwrap_or_default()
}

/// A variable's query: a plain string in older exports, `{query: ...}` in newer.
fn var_query(var: &Value) -> &str {
    var["query"].as_str().or_else(|| var["query"]["query"].as_str()).unwrap_or("")
}

fn overlaps(a: &[i64; 4], b: &[i64; 4]) -> bool {
    a[0] < b[0] + b[2] && b[0] < a[0] + a[2] && a[1] < b[1] + b[3] && b[1] < a[1] + a[3]
}

fn panel_fail(title: &str, what: &str) -> ! {
    panic!("panel {title:?}: missing or empty {what}")
}
