//! The wire and the contract types agree: every JSON answer of every route, read
//! from the real binary, deserializes into the crate's own types
//! (`tunneld::api::contract`) and serializes back to exactly what the server
//! wrote — same field names, same `null`s and absences, same kinds of number —
//! and the values are the ones that happened. Requests are sent as the request
//! types serialize them, as `tunneld ctl` does.
//!
//! Not JSON, so not here: `/metrics` (tests/metrics.rs), the page and its assets
//! (tests/monitor_page.rs), and the report's CSV form (tests/history.rs).

mod common;

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::time::Duration;

use common::*;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};
use tunneld::api::contract::{
    ClientCreated, ClientList, ClientRemoved, CreateClient, CreateMapping, Envelope, EventList, Health, HealthStatus, History,
    HistoryPoint, Mapping, MappingList, MappingRemoved, MappingStatus, Protocol, RemoveClient, RemoveMapping, Report, TrafficReport,
    UpdateMapping,
};
use tunneld::policy::{Cidr, Quota, QuotaAction, QuotaPeriod};

const SECRET: &str = "contract-test-secret";

/// `T` read from `raw`, after checking that writing it back gives `raw` again:
/// the type knows every field the server wrote, by the same name, with the same
/// `null`s and absences and the same kinds of number.
fn typed<T: DeserializeOwned + Serialize>(what: &str, raw: &Value) -> T {
    let value: T = serde_json::from_value(raw.clone()).unwrap_or_else(|e| panic!("{what}: {e}\n{raw:#}"));
    let written = serde_json::to_value(&value).expect("serialize");
    assert_eq!(written, *raw, "{what}: the type does not write back what the server wrote");
    value
}

/// One answer: its status, the envelope as the contract types read it, and the
/// raw JSON (to pin the field names the types must keep writing).
struct Answer<T> {
    status: u16,
    envelope: Envelope<T>,
    raw: Value,
}

impl<T: std::fmt::Debug> Answer<T> {
    /// The `data` of a successful answer.
    fn data(self) -> T {
        assert_eq!(self.status, 200, "{:?}", self.envelope);
        assert!(self.envelope.success, "{:?}", self.envelope);
        self.envelope.data.unwrap_or_else(|| panic!("a success without data: {}", self.envelope.message))
    }
}

fn get<T: DeserializeOwned + Serialize>(d: &Daemon, path: &str) -> Answer<T> {
    let (status, raw) = http("GET", &d.url(path), None);
    Answer { status, envelope: typed(path, &raw), raw }
}

fn post<T: DeserializeOwned + Serialize>(d: &Daemon, path: &str, body: &impl Serialize) -> Answer<T> {
    let body = serde_json::to_string(body).expect("serialize the request");
    let (status, raw) = http("POST", &d.url(path), Some(&body));
    Answer { status, envelope: typed(path, &raw), raw }
}

/// An object's field names, sorted.
fn keys(object: &Value) -> Vec<&str> {
    let mut keys: Vec<&str> = object.as_object().unwrap_or_else(|| panic!("not an object: {object}")).keys().map(String::as_str).collect();
    keys.sort_unstable();
    keys
}

/// The fields of a mapping without a quota, as documented (DESIGN.md), sorted.
const MAPPING_FIELDS: [&str; 21] = [
    "allow",
    "balance",
    "bandwidth_limit",
    "client",
    "clients",
    "created_at",
    "deny",
    "description",
    "health",
    "health_check",
    "health_reason",
    "members",
    "protocol",
    "proxy_protocol",
    "quota",
    "source",
    "source_port",
    "status",
    "target_host",
    "target_port",
    "use_tunnel",
];

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The first event of `/api/stats/stream`, as raw JSON.
fn first_streamed_report(d: &Daemon) -> Value {
    let response = ureq::get(&d.url("/api/stats/stream?interval_ms=250")).timeout(Duration::from_secs(10)).call().expect("open the stream");
    assert_eq!(response.header("content-type"), Some("text/event-stream"));
    let mut event = None;
    for line in BufReader::new(response.into_reader()).lines() {
        let line = line.expect("read the stream");
        if let Some(name) = line.strip_prefix("event: ") {
            event = Some(name.to_string());
        } else if let Some(data) = line.strip_prefix("data: ") {
            assert_eq!(event.as_deref(), Some("traffic"), "{line}");
            return serde_json::from_str(data).expect("the event's data is JSON");
        }
    }
    panic!("the stream ended before its first event");
}

#[test]
fn every_json_route_answers_in_the_contract_types() {
    let server = Daemon::server(SECRET, &[]);

    let (status, raw) = http("GET", &server.url("/health"), None);
    assert_eq!(status, 200);
    assert_eq!(keys(&raw), ["reasons", "status", "tunnel_connected", "tunnel_enabled"]);
    let health: Health = typed("/health", &raw);
    assert_eq!(health, Health { status: HealthStatus::Ok, reasons: vec![], tunnel_enabled: true, tunnel_connected: false });
    let empty = get::<MappingList>(&server, "/api/mapping/list");
    assert_eq!(keys(&empty.raw), ["data", "message", "success"]);
    assert_eq!(empty.data(), MappingList { mappings: vec![], count: 0 });

    // A refusal: the same envelope, without data, naming the field.
    let refused = post::<Mapping>(&server, "/api/mapping/create", &json!({"source_port": 0, "target_host": "127.0.0.1", "target_port": 9}));
    assert_eq!(refused.status, 400);
    assert_eq!(keys(&refused.raw), ["message", "success"]);
    assert!(!refused.envelope.success && refused.envelope.data.is_none(), "{:?}", refused.envelope);
    assert!(refused.envelope.message.contains("`source_port`"), "{}", refused.envelope.message);
    let unknown = get::<()>(&server, "/api/nothing/here");
    assert_eq!((unknown.status, unknown.envelope.success, unknown.envelope.message.as_str()), (404, false, "no such route"));

    // A direct mapping with every policy field set.
    let echo = echo_server();
    let direct = free_port();
    let quota = Quota { bytes: 10_000_000, period: QuotaPeriod::Month, action: QuotaAction::Alert };
    let loopback = Cidr::parse("127.0.0.0/8").expect("a CIDR block");
    let request = CreateMapping {
        source_port: direct,
        target_host: "127.0.0.1".into(),
        target_port: echo.port(),
        description: Some(Some("office ssh".into())),
        bandwidth_limit: Some(Some(1_000_000)),
        quota: Some(Some(quota)),
        allow: Some(Some(vec![loopback])),
        ..CreateMapping::default()
    };
    let answer = post::<Mapping>(&server, "/api/mapping/create", &request);
    let mut with_quota = MAPPING_FIELDS.to_vec();
    with_quota.extend(["quota_blocked", "quota_used"]);
    with_quota.sort_unstable();
    assert_eq!(keys(&answer.raw["data"]), with_quota);
    assert_eq!(answer.raw["data"]["client"], Value::Null, "a direct mapping's client is null, not absent");
    assert_eq!(answer.raw["data"]["quota"], json!({"bytes": 10_000_000, "period": "month", "action": "alert"}));
    assert_eq!(answer.raw["data"]["allow"], json!(["127.0.0.0/8"]));
    let created = answer.data();
    assert_eq!(
        (created.source_port, created.target_host.as_str(), created.target_port, created.use_tunnel, created.client.as_deref()),
        (direct, "127.0.0.1", echo.port(), false, None)
    );
    assert_eq!(created.status, MappingStatus::Active);
    assert!(created.created_at > 1_600_000_000, "{created:?}");
    assert_eq!(
        (created.description.as_deref(), created.bandwidth_limit, created.quota),
        (Some("office ssh"), Some(1_000_000), Some(quota))
    );
    assert_eq!((created.allow.clone(), created.deny.clone()), (vec![loopback], vec![]));
    assert_eq!((created.quota_used, created.quota_blocked), (Some(0), Some(false)), "shown with a quota");

    // A tunneled mapping waits for its client.
    let tunneled = free_port();
    let request = CreateMapping {
        source_port: tunneled,
        target_host: "127.0.0.1".into(),
        target_port: echo.port(),
        use_tunnel: true,
        ..Default::default()
    };
    let answer = post::<Mapping>(&server, "/api/mapping/create", &request);
    assert_eq!(keys(&answer.raw["data"]), MAPPING_FIELDS, "quota_used and quota_blocked are left out without a quota");
    assert_eq!(answer.raw["data"]["status"], "waiting_for_tunnel");
    let waiting = answer.data();
    assert_eq!(waiting.status, MappingStatus::WaitingForTunnel);
    assert_eq!(waiting.client.as_deref(), Some("default"));
    assert_eq!((waiting.quota_used, waiting.quota_blocked), (None, None));

    // Update: `null` removes a field, an absent one stays as it is.
    let change = UpdateMapping { port: direct, bandwidth_limit: Some(None), ..UpdateMapping::default() };
    assert_eq!(serde_json::to_value(&change).unwrap(), json!({"port": direct, "bandwidth_limit": null}), "absent is not sent, null is");
    let updated: Mapping = post(&server, "/api/mapping/update", &change).data();
    assert_eq!(updated.bandwidth_limit, None, "null removed it");
    assert_eq!((updated.description.as_deref(), updated.quota, updated.allow.clone()), (Some("office ssh"), Some(quota), vec![loopback]));
    let change = UpdateMapping { port: direct, description: Some(Some("db".into())), quota: Some(None), ..UpdateMapping::default() };
    let updated: Mapping = post(&server, "/api/mapping/update", &change).data();
    assert_eq!((updated.description.as_deref(), updated.quota, updated.bandwidth_limit), (Some("db"), None, None));
    assert_eq!((updated.quota_used, updated.quota_blocked), (None, None), "gone with the quota");
    assert_eq!(updated.allow, vec![loopback], "absent: kept");

    let list = get::<MappingList>(&server, "/api/mapping/list");
    assert_eq!(keys(&list.raw["data"]), ["count", "mappings"]);
    let mut expected = vec![updated.clone(), waiting.clone()];
    expected.sort_by_key(|m| m.source_port);
    assert_eq!(list.data(), MappingList { mappings: expected, count: 2 });

    // Traffic, as JSON and as the stream's first event.
    let payload = random_bytes(3000);
    assert_eq!(roundtrip(local(direct), &payload), payload);
    let answer = wait_for("3,000 bytes each way in the report", Duration::from_secs(10), || {
        let answer = get::<TrafficReport>(&server, "/api/stats/traffic");
        let report = answer.envelope.data.as_ref()?;
        (report.total_sent == 3000 && report.total_received == 3000).then_some(answer)
    });
    let raw = &answer.raw["data"];
    assert_eq!(
        keys(raw),
        [
            "active_connections",
            "clients",
            "lifetime_received",
            "lifetime_sent",
            "mapping_count",
            "mappings",
            "started_at",
            "timestamp",
            "total_received",
            "total_sent",
            "tunnel"
        ]
    );
    assert_eq!(keys(&raw["tunnel"]), ["bytes_received", "bytes_sent", "connected", "connected_since", "last_update"]);
    assert_eq!(
        keys(&raw["clients"][0]),
        [
            "bytes_received",
            "bytes_sent",
            "connected",
            "connected_since",
            "last_update",
            "mappings",
            "name",
            "peer",
            "rtt_seconds",
            "source",
            "udp_transport"
        ]
    );
    for m in raw["mappings"].as_array().expect("mappings") {
        assert_eq!(
            keys(m),
            [
                "active_connections",
                "allow",
                "balance",
                "bandwidth_limit",
                "bytes_received",
                "bytes_sent",
                "client",
                "clients",
                "connect_errors",
                "connect_p50_seconds",
                "connect_p99_seconds",
                "connections_total",
                "deny",
                "description",
                "health",
                "health_reason",
                "last_update",
                "lifetime_received",
                "lifetime_sent",
                "members",
                "port",
                "protocol",
                "proxy_protocol",
                "quota",
                "quota_blocked",
                "quota_used",
                "refused",
                "source",
                "status",
                "target_host",
                "target_port",
                "use_tunnel"
            ],
            "here quota_used and quota_blocked are null without a quota, not left out"
        );
    }
    let report = answer.data();
    assert_eq!((report.mapping_count, report.active_connections), (2, 0));
    assert!(report.timestamp >= report.started_at && report.started_at > 1.6e9, "{report:?}");
    assert!(report.lifetime_sent >= 3000 && report.lifetime_received >= 3000, "{report:?}");
    let m = report.mappings.iter().find(|m| m.port == direct).expect("the direct mapping");
    assert_eq!((m.bytes_sent, m.bytes_received, m.connections_total, m.active_connections, m.connect_errors), (3000, 3000, 1, 0, 0));
    assert!(m.last_update.is_some_and(|t| t >= report.started_at), "{m:?}");
    assert_eq!(
        (m.status.clone(), m.description.as_deref(), m.quota_used, m.allow.clone()),
        (MappingStatus::Active, Some("db"), None, vec![loopback])
    );
    let t = report.mappings.iter().find(|m| m.port == tunneled).expect("the tunneled mapping");
    assert_eq!(
        (t.status.clone(), t.client.as_deref(), t.bytes_sent, t.last_update),
        (MappingStatus::WaitingForTunnel, Some("default"), 0, None)
    );
    assert!(!report.tunnel.connected && report.tunnel.connected_since.is_none(), "{report:?}");
    assert_eq!(report.clients.len(), 1);
    assert_eq!((report.clients[0].name.as_str(), report.clients[0].connected, report.clients[0].mappings), ("default", false, 1));
    let streamed: TrafficReport = typed("/api/stats/stream", &first_streamed_report(&server));
    assert_eq!((streamed.mapping_count, streamed.total_sent, streamed.total_received), (2, 3000, 3000));
    assert_eq!(streamed.mappings.iter().map(|m| m.port).collect::<Vec<_>>(), report.mappings.iter().map(|m| m.port).collect::<Vec<_>>());

    // Clients: created (the secret shown once), listed connected or not, removed.
    let answer = post::<ClientCreated>(&server, "/api/client/create", &CreateClient { name: "lab".into() });
    assert_eq!(keys(&answer.raw["data"]), ["name", "secret"]);
    let lab = answer.data();
    assert_eq!(lab.name, "lab");
    assert!(lab.secret.len() == 64 && lab.secret.chars().all(|c| c.is_ascii_hexdigit()), "{lab:?}");
    let lab_port = free_port();
    let request = CreateMapping {
        source_port: lab_port,
        target_host: "127.0.0.1".into(),
        target_port: echo.port(),
        use_tunnel: true,
        client: Some("lab".into()),
        ..CreateMapping::default()
    };
    assert_eq!(post::<Mapping>(&server, "/api/mapping/create", &request).data().client.as_deref(), Some("lab"));
    let _client = Daemon::client(&server, SECRET, &[]);
    let answer = get::<ClientList>(&server, "/api/client/list");
    assert_eq!(keys(&answer.raw["data"]), ["clients", "count"]);
    let clients = answer.data();
    assert_eq!(clients.count, 2);
    let default = clients.clients.iter().find(|c| c.name == "default").expect("default is listed");
    assert!(default.connected && default.connected_since.is_some_and(|t| t > 1.6e9), "{default:?}");
    assert_eq!(default.peer.map(|p| p.ip()), Some(IpAddr::from([127, 0, 0, 1])));
    let lab_listed = clients.clients.iter().find(|c| c.name == "lab").expect("lab is listed");
    assert_eq!((lab_listed.connected, lab_listed.peer, lab_listed.connected_since, lab_listed.mappings), (false, None, None, 1));
    let list: MappingList = get(&server, "/api/mapping/list").data();
    let status = |port: u16| list.mappings.iter().find(|m| m.source_port == port).map(|m| m.status.clone());
    assert_eq!((status(tunneled), status(lab_port)), (Some(MappingStatus::Active), Some(MappingStatus::WaitingForTunnel)));
    let (status, health) = http("GET", &server.url("/health"), None);
    assert_eq!(status, 200);
    let health: Health = typed("/health", &health);
    assert_eq!((health.status, health.tunnel_connected), (HealthStatus::Degraded, true));
    assert!(health.reasons.len() == 1 && health.reasons[0].contains("tunnel client lab is not connected"), "{health:?}");
    let answer = post::<ClientRemoved>(&server, "/api/client/remove", &RemoveClient { name: "lab".into(), force: true });
    assert_eq!(keys(&answer.raw["data"]), ["mappings_waiting", "name"]);
    assert_eq!(answer.data(), ClientRemoved { name: "lab".into(), mappings_waiting: vec![lab_port] });

    // Removing a mapping flushes its history: the series and the report have it.
    let answer = post::<MappingRemoved>(&server, "/api/mapping/remove", &RemoveMapping { port: direct, protocol: Protocol::Tcp });
    assert_eq!(answer.raw["data"], json!({"port": direct, "protocol": "tcp"}));
    assert_eq!(answer.data(), MappingRemoved { port: direct, protocol: Protocol::Tcp });
    let answer = get::<History>(&server, &format!("/api/stats/history?port={direct}&step=minute"));
    assert_eq!(keys(&answer.raw["data"]), ["as_of", "from", "interval_secs", "points", "port", "step", "to", "unrecorded", "utc_offset"]);
    assert_eq!(keys(&answer.raw["data"]["points"][0]), ["bytes_received", "bytes_sent", "t"]);
    let history = answer.data();
    assert_eq!(
        (history.step.as_str(), history.port, history.utc_offset.as_str(), history.interval_secs),
        ("minute", Some(direct), "+00:00", 10)
    );
    assert!(history.from < history.to, "{history:?}");
    let sum =
        |points: &[HistoryPoint]| points.iter().fold((0, 0), |(sent, received), p| (sent + p.bytes_sent, received + p.bytes_received));
    assert_eq!(sum(&history.points), (3000, 3000), "{history:?}");
    let all: History = get(&server, "/api/stats/history").data();
    assert_eq!((all.step.as_str(), all.port), ("hour", None));
    assert_eq!(sum(&all.points), (3000, 3000), "{all:?}");
    let answer = get::<Report>(&server, "/api/stats/report?period=day");
    assert_eq!(keys(&answer.raw["data"]), ["as_of", "from", "period", "rows", "to", "utc_offset"]);
    assert_eq!(keys(&answer.raw["data"]["rows"][0]), ["bytes_received", "bytes_sent", "period", "period_start", "port", "protocol"]);
    let report = answer.data();
    assert_eq!((report.period.as_str(), report.utc_offset.as_str()), ("day", "+00:00"));
    let row = report.rows.iter().find(|r| r.port == direct).expect("a row for the removed mapping");
    assert_eq!((row.bytes_sent, row.bytes_received), (3000, 3000));
    assert!(row.period_start >= report.from - 86_400 && row.period_start < report.to, "{report:?}");
}

#[test]
fn a_mapping_that_cannot_listen_is_an_error_status_an_event_and_degraded_health() {
    let mut first = Daemon::server(SECRET, &[]);
    let port = free_port();
    create_mapping(&first, port, echo_server(), false);
    first.terminate();
    let _blocker = TcpListener::bind(("0.0.0.0", port)).expect("take the mapping's port");
    let server = Daemon::server_with_state(&first.state_dir, SECRET, &[]);

    let answer = get::<MappingList>(&server, "/api/mapping/list");
    assert_eq!(answer.raw["data"]["mappings"][0]["status"], "error: port in use by another process");
    let list = answer.data();
    assert_eq!(list.count, 1);
    assert_eq!(list.mappings[0].status, MappingStatus::Error("port in use by another process".into()));

    let (status, health) = http("GET", &server.url("/health"), None);
    assert_eq!(status, 200, "degraded is still 200");
    let health: Health = typed("/health", &health);
    assert_eq!(health.status, HealthStatus::Degraded);
    assert!(health.reasons.iter().any(|r| r.contains(&format!("mapping on port {port} is not listening"))), "{health:?}");

    let answer = wait_for("a mapping_down event", Duration::from_secs(20), || {
        let answer = get::<EventList>(&server, "/api/events");
        answer.envelope.data.as_ref()?.events.iter().any(|e| e.kind == "mapping_down").then_some(answer)
    });
    assert_eq!(keys(&answer.raw["data"]), ["count", "events"]);
    let raw_down = answer.raw["data"]["events"].as_array().and_then(|events| events.iter().find(|e| e["kind"] == "mapping_down"));
    assert_eq!(keys(raw_down.expect("the mapping_down event")), ["kind", "message", "port", "time"], "no client: left out, not null");
    let events = answer.data();
    assert_eq!(events.count, events.events.len());
    let down = events.events.iter().find(|e| e.kind == "mapping_down").expect("found above");
    assert_eq!((down.port, down.client.as_deref()), (Some(port), None));
    assert!(down.message.contains("cannot listen") && down.time > 1.6e9, "{down:?}");
    let newest: EventList = get(&server, "/api/events?limit=1").data();
    assert_eq!((newest.count, newest.events.len()), (1, 1));
}
