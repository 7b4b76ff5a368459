//! The HTTP API: mapping management, traffic stats (JSON and SSE), health,
//! `/metrics` and the monitor page.
//!
//! Every `/api/*` answer uses the `{success, message, data}` envelope — errors
//! included, even for unknown routes and wrong methods — so scripts can always
//! parse the body.

mod assets;
pub mod guard;
mod history;

use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::core::secret::tokens_equal;
use crate::core::time::unix_now;
use crate::history::Recorder;
use crate::net::socket;
use crate::server::hub::TunnelHub;
use crate::server::mappings::{MappingError, Mappings, NewMapping};
use crate::telemetry::Metrics;

/// Request bodies are tiny JSON objects; anything larger is refused unread.
const MAX_BODY: usize = 16 * 1024;
const DEFAULT_STREAM_INTERVAL: Duration = Duration::from_secs(3);
const MIN_STREAM_INTERVAL: Duration = Duration::from_millis(250);

#[derive(Clone)]
pub struct AppState {
    pub mappings: Arc<Mappings>,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<TunnelHub>,
    /// Traffic history: lifetime totals and the stored buckets.
    pub recorder: Arc<Recorder>,
    /// Empty: no authentication (only allowed on loopback, see config). Swapped
    /// in place on reload.
    pub token: Arc<RwLock<Arc<str>>>,
    /// Ends long-lived responses (SSE) so a graceful shutdown does not hang.
    pub shutdown: CancellationToken,
    /// Host, Origin and CORS rules (see [`guard`]).
    pub guard: Arc<guard::Guard>,
}

/// A client must send its request head within this time, or the connection is
/// closed: idle or slow connections cannot accumulate.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// API connections open at once: an eighth of the descriptor limit, at most 128.
/// Beyond it new ones wait in the listen backlog (costing no descriptor) until
/// one closes, so the API can never starve the forwarders of descriptors.
fn max_api_connections() -> usize {
    let limit = socket::descriptor_limit().unwrap_or(u64::MAX);
    (limit / 8).clamp(4, 128) as usize
}

/// Serves the API on `listener` until `shutdown`, then lets open requests finish.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) -> std::io::Result<()> {
    let app = router(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(max_api_connections()));
    let connections = tokio_util::task::TaskTracker::new();
    loop {
        let slot = tokio::select! {
            _ = shutdown.cancelled() => break,
            slot = slots.clone().acquire_owned() => slot,
        };
        let Ok(slot) = slot else { break };
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = socket::accept(&listener, || {}) => accepted,
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let stop = shutdown.clone();
        connections.spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http1::Builder::new();
            http.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = http.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = stop.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

pub fn router(state: AppState) -> Router {
    let authenticated = Router::new()
        .route("/api/mapping/create", post(create_mapping))
        .route("/api/mapping/remove", post(remove_mapping))
        .route("/api/mapping/update", post(update_mapping))
        .route("/api/mapping/list", get(list_mappings))
        .route("/api/stats/traffic", get(traffic))
        .route("/api/stats/stream", get(traffic_stream))
        .route("/api/stats/history", get(history::history))
        .route("/api/stats/report", get(history::report))
        .route("/api/events", get(events))
        .route("/api/client/create", post(create_client))
        .route("/api/client/remove", post(remove_client))
        .route("/api/client/list", get(list_clients))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    // Open by default (scrapers); behind the token when the operator asks.
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if state.guard.metrics_token_required {
        metrics_route = metrics_route.route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    }
    Router::new()
        .merge(authenticated)
        // The page itself is public: it asks for the token and sends it on.
        .route("/api/stats/monitor", get(assets::monitor_page))
        .route("/assets/{*path}", get(|Path(path): Path<String>| async move { assets::asset(&path) }))
        .route("/health", get(health))
        .merge(metrics_route)
        .fallback(|| async { failure(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async { failure(StatusCode::METHOD_NOT_ALLOWED, "method not allowed for this route") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), guard::check))
        .with_state(state)
}

fn success(message: &str, data: Value) -> Response {
    Json(json!({"success": true, "message": message, "data": data})).into_response()
}

fn failure(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"success": false, "message": message.into()}))).into_response()
}

/// A request that cannot be served: its status and the message for the envelope.
struct ApiError {
    status: StatusCode,
    message: String,
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError { status: StatusCode::BAD_REQUEST, message: message.into() }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // Every 500 is logged once, here: the caller only sees the envelope.
        if self.status.is_server_error() {
            tracing::error!(status = self.status.as_u16(), error = %self.message, "API request failed");
        }
        failure(self.status, self.message)
    }
}

impl From<MappingError> for ApiError {
    fn from(e: MappingError) -> ApiError {
        let status = match &e {
            MappingError::Invalid(_) => StatusCode::BAD_REQUEST,
            MappingError::Conflict(_) => StatusCode::CONFLICT,
            MappingError::NotFound(_) | MappingError::UnknownClient(_) => StatusCode::NOT_FOUND,
            MappingError::Store { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError { status, message: e.to_string() }
    }
}

/// `Authorization: Bearer <token>`, or `?token=` for EventSource, which cannot set
/// headers.
async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let token = state.token.read().map(|t| t.clone()).unwrap_or_else(|poisoned| poisoned.into_inner().clone());
    if token.is_empty() {
        return next.run(req).await;
    }
    let from_header =
        req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).map(str::trim);
    // Percent-decoded, as browsers encode `+`, `/`, `=` in query values.
    let query: Option<Query<std::collections::HashMap<String, String>>> = Query::try_from_uri(req.uri()).ok();
    let from_query = query.as_ref().and_then(|q| q.get("token")).map(String::as_str);
    match from_header.or(from_query) {
        Some(given) if tokens_equal(given, &token) => next.run(req).await,
        Some(_) => failure(StatusCode::UNAUTHORIZED, "invalid API token"),
        None => failure(StatusCode::UNAUTHORIZED, "API token required: send `Authorization: Bearer <token>`"),
    }
}

/// The body of a state-changing request: a JSON object, sent as
/// `application/json` (415 otherwise — a browser cannot send that cross-site
/// without a CORS preflight), without duplicate keys, and checked against the
/// fields its route knows ([`JsonObject::only`]). Every way it can be wrong is a
/// 4xx with a message.
struct JsonObject(serde_json::Map<String, Value>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<JsonObject, ApiError> {
        let json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                message: "send the body as JSON with `Content-Type: application/json`".into(),
            });
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e: BytesRejection| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError { status: StatusCode::PAYLOAD_TOO_LARGE, message: format!("request body exceeds {MAX_BODY} bytes") }
            }
            status => ApiError { status, message: e.body_text() },
        })?;
        match serde_json::from_slice::<Strict>(&bytes) {
            Ok(Strict(Value::Object(map))) => Ok(JsonObject(map)),
            Ok(_) => Err(bad_request("request body must be a JSON object")),
            Err(e) => Err(bad_request(format!("malformed JSON: {e}"))),
        }
    }
}

impl JsonObject {
    /// Refuses a field the route does not know: a typo (`use_tunel`) must not
    /// silently fall back to a default.
    fn only(&self, known: &[&str]) -> Result<&serde_json::Map<String, Value>, ApiError> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(unknown) => Err(bad_request(format!("unknown field `{unknown}` (expected: {})", known.join(", ")))),
            None => Ok(&self.0),
        }
    }
}

/// A JSON value that refuses duplicate keys at any depth (serde_json keeps the
/// last one silently, so `{"port": 1, "port": 2}` would mean whatever a reader
/// guesses).
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Strict, D::Error> {
        d.deserialize_any(StrictVisitor)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Strict;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Strict, E> {
        Ok(Strict(Value::Bool(v)))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_str<E>(self, v: &str) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_string<E>(self, v: String) -> Result<Strict, E> {
        Ok(Strict(Value::from(v)))
    }
    fn visit_unit<E>(self) -> Result<Strict, E> {
        Ok(Strict(Value::Null))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Strict, A::Error> {
        let mut items = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            items.push(v);
        }
        Ok(Strict(Value::Array(items)))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Strict, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if out.contains_key(&key) {
                return Err(serde::de::Error::custom(format!("duplicate key `{key}`")));
            }
            let Strict(value) = map.next_value()?;
            out.insert(key, value);
        }
        Ok(Strict(Value::Object(out)))
    }
}

fn port_field(body: &serde_json::Map<String, Value>, key: &str) -> Result<u16, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Err(bad_request(format!("missing field `{key}`"))),
        Some(Value::Number(n)) if n.as_i64().is_some_and(|p| (1..=65535).contains(&p)) => Ok(n.as_i64().unwrap_or_default() as u16),
        Some(other) => Err(bad_request(format!("`{key}` must be an integer between 1 and 65535 (got {other})"))),
    }
}

fn string_field(body: &serde_json::Map<String, Value>, key: &str) -> Result<String, ApiError> {
    optional_string_field(body, key)?.ok_or_else(|| bad_request(format!("missing field `{key}`")))
}

fn optional_string_field(body: &serde_json::Map<String, Value>, key: &str) -> Result<Option<String>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(bad_request(format!("`{key}` must be a string"))),
    }
}

/// An absent or `null` flag is `false`.
fn flag_field(body: &serde_json::Map<String, Value>, key: &str) -> Result<bool, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(bad_request(format!("`{key}` must be true or false"))),
    }
}

fn new_mapping(body: &JsonObject) -> Result<NewMapping, ApiError> {
    let body = body.only(&[
        "source_port",
        "target_host",
        "target_port",
        "use_tunnel",
        "client",
        "description",
        "bandwidth_limit",
        "quota",
        "allow",
        "deny",
    ])?;
    let source_port = port_field(body, "source_port")?;
    let target_port = port_field(body, "target_port")?;
    let target_host = string_field(body, "target_host")?;
    let use_tunnel = flag_field(body, "use_tunnel")?;
    let client = optional_string_field(body, "client")?;
    let mut policy = crate::policy::Policy::default();
    policy.apply(body).map_err(bad_request)?;
    Ok(NewMapping { source_port, target_host, target_port, use_tunnel, client, policy })
}

async fn update_mapping(State(state): State<AppState>, body: JsonObject) -> Result<Response, ApiError> {
    let mut known = vec!["port"];
    known.extend(crate::policy::FIELDS);
    let body = body.only(&known)?;
    let port = port_field(body, "port")?;
    let view = state.mappings.update(port, |policy| policy.apply(body)).await?;
    Ok(success("mapping updated", json!(view)))
}

async fn create_mapping(State(state): State<AppState>, body: JsonObject) -> Result<Response, ApiError> {
    let view = state.mappings.create(new_mapping(&body)?).await?;
    Ok(success("mapping created", json!(view)))
}

async fn remove_mapping(State(state): State<AppState>, body: JsonObject) -> Result<Response, ApiError> {
    let port = port_field(body.only(&["port"])?, "port")?;
    // The mapping's series vanish with it: record what it moved since the last
    // flush first, and flush again after, so a new mapping on the same port
    // counts from its own zero.
    state.recorder.flush_logged().await;
    state.mappings.remove(port).await?;
    state.recorder.flush_logged().await;
    Ok(success("mapping removed", json!({"port": port})))
}

async fn create_client(State(state): State<AppState>, body: JsonObject) -> Result<Response, ApiError> {
    let name = string_field(body.only(&["name"])?, "name")?;
    let secret = state.mappings.create_client(&name).await?;
    Ok(success(
        "client created; its secret is shown only now: give it to the client (client.secret) with client.name set to this name",
        json!({"name": name, "secret": secret}),
    ))
}

async fn remove_client(State(state): State<AppState>, body: JsonObject) -> Result<Response, ApiError> {
    let body = body.only(&["name", "force"])?;
    let name = string_field(body, "name")?;
    let force = flag_field(body, "force")?;
    // The client's tunnel series vanish with it: record what it moved first.
    state.recorder.flush_logged().await;
    let waiting = state.mappings.remove_client(&name, force).await?;
    state.recorder.flush_logged().await;
    Ok(success("client removed", json!({"name": name, "mappings_waiting": waiting})))
}

async fn list_clients(State(state): State<AppState>) -> Response {
    let clients = client_views(&state, &state.metrics.traffic()).await;
    let count = clients.len();
    success("ok", json!({"clients": clients, "count": count}))
}

/// Every client as the API shows it: who is connected from where, since when,
/// what crossed its tunnel, and how many mappings it serves.
async fn client_views(state: &AppState, snap: &crate::telemetry::TrafficSnapshot) -> Vec<Value> {
    let per_client = state.mappings.mappings_per_client().await;
    state
        .hub
        .clients()
        .into_iter()
        .map(|c| {
            let t = snap.clients.get(&c.name).cloned().unwrap_or_default();
            json!({
                "name": c.name,
                "connected": c.peer.is_some(),
                "peer": c.peer.map(|p| p.to_string()),
                "connected_since": c.connected_since,
                "bytes_sent": t.bytes_sent,
                "bytes_received": t.bytes_received,
                "last_update": t.last_update,
                "mappings": per_client.get(&c.name).copied().unwrap_or(0),
            })
        })
        .collect()
}

async fn list_mappings(State(state): State<AppState>) -> Response {
    let mappings = state.mappings.list().await;
    let count = mappings.len();
    success("ok", json!({"mappings": mappings, "count": count}))
}

/// The traffic report, every number read from the registry.
async fn traffic_data(state: &AppState) -> Value {
    let snap = state.metrics.traffic();
    let lifetime = state.recorder.lifetime();
    let views = state.mappings.list().await;
    let mut total_sent = 0u64;
    let mut total_received = 0u64;
    let (mut lifetime_sent, mut lifetime_received) = (0u64, 0u64);
    let mut active = 0u64;
    let mappings: Vec<Value> = views
        .iter()
        .map(|view| {
            let port = view.spec.source_port;
            let t = snap.mappings.get(&port).cloned().unwrap_or_default();
            total_sent += t.bytes_sent;
            total_received += t.bytes_received;
            active += t.active_connections;
            // Never below since-start: bytes counted after the last flush are in both.
            let (life_sent, life_received) = lifetime.get(&port).map(|t| (t.sent, t.received)).unwrap_or_default();
            let (life_sent, life_received) = (life_sent.max(t.bytes_sent), life_received.max(t.bytes_received));
            lifetime_sent += life_sent;
            lifetime_received += life_received;
            json!({
                "port": port,
                "bytes_sent": t.bytes_sent,
                "bytes_received": t.bytes_received,
                "lifetime_sent": life_sent,
                "lifetime_received": life_received,
                "last_update": t.last_update,
                "active_connections": t.active_connections,
                "connections_total": t.connections_total,
                "connect_errors": t.connect_errors,
                "target_host": view.spec.target_host,
                "target_port": view.spec.target_port,
                "use_tunnel": view.spec.use_tunnel,
                "client": view.spec.client,
                "status": view.status,
                "description": view.policy.description,
                "bandwidth_limit": view.policy.bandwidth_limit,
                "quota": view.policy.quota,
                "quota_used": view.quota_used,
                "quota_blocked": view.quota_blocked,
                "allow": view.policy.allow,
                "deny": view.policy.deny,
            })
        })
        .collect();
    let tunnel = snap.tunnel();
    json!({
        "tunnel": {
            "bytes_sent": tunnel.bytes_sent,
            "bytes_received": tunnel.bytes_received,
            "last_update": tunnel.last_update,
            "connected": tunnel.connected,
            "connected_since": tunnel.connected_since,
        },
        "clients": client_views(state, &snap).await,
        "mappings": mappings,
        "total_sent": total_sent,
        "total_received": total_received,
        "lifetime_sent": lifetime_sent,
        "lifetime_received": lifetime_received,
        "started_at": state.metrics.started_at(),
        "timestamp": unix_now(),
        "mapping_count": views.len(),
        "active_connections": active,
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsParams {
    limit: Option<u32>,
    /// The API token may come as `?token=` (see [`require_token`]).
    #[serde(rename = "token")]
    _token: Option<String>,
}

/// Recent events, newest first (`?limit=`, default 100, at most the 1,000 kept).
async fn events(
    State(state): State<AppState>,
    params: Result<Query<EventsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let limit = match params {
        Ok(Query(EventsParams { limit, .. })) => limit.unwrap_or(100).clamp(1, crate::store::events::KEEP as u32),
        Err(e) => return Err(bad_request(e.body_text())),
    };
    let events = state
        .recorder_store()
        .events(limit)
        .await
        .map_err(|e| ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: format!("cannot read events: {e}") })?;
    Ok(success("ok", json!({"events": events, "count": events.len()})))
}

async fn traffic(State(state): State<AppState>) -> Response {
    success("ok", traffic_data(&state).await)
}

#[derive(Deserialize)]
struct StreamParams {
    interval_ms: Option<u64>,
}

/// Server-Sent Events: one `traffic` event now, then one per interval, until the
/// client leaves or the daemon stops.
async fn traffic_stream(
    State(state): State<AppState>,
    params: Result<Query<StreamParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let interval = match params {
        Ok(Query(StreamParams { interval_ms: Some(ms) })) => Duration::from_millis(ms).max(MIN_STREAM_INTERVAL),
        Ok(_) => DEFAULT_STREAM_INTERVAL,
        Err(e) => return failure(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let shutdown = state.shutdown.clone();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let events = stream::unfold((state, ticker), move |(state, mut ticker)| {
        let shutdown = shutdown.clone();
        async move {
            tokio::select! {
                _ = shutdown.cancelled() => None,
                _ = ticker.tick() => {
                    let data = traffic_data(&state).await;
                    let event = Event::default().event("traffic").json_data(&data).unwrap_or_else(|_| Event::default().comment("encode error"));
                    Some((Ok::<_, Infallible>(event), (state, ticker)))
                }
            }
        }
    });
    sse(events).into_response()
}

fn sse<S: Stream<Item = Result<Event, Infallible>> + Send + 'static>(events: S) -> impl IntoResponse {
    let mut headers = HeaderMap::new();
    // Reverse proxies (nginx) would otherwise buffer the stream.
    headers.insert("X-Accel-Buffering", header::HeaderValue::from_static("no"));
    (headers, Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

impl AppState {
    fn recorder_store(&self) -> &crate::store::Store {
        self.recorder.store()
    }
}

/// `ok`, or `degraded` (still 200: the daemon runs) with a reason per problem an
/// operator should act on.
async fn health(State(state): State<AppState>) -> Response {
    let clients = state.hub.clients();
    let connected = clients.iter().any(|c| c.peer.is_some());
    let mut reasons = Vec::new();
    for (port, error) in state.mappings.unbound().await {
        reasons.push(format!("mapping on port {port} is not listening: {error}"));
    }
    let mut waiting: std::collections::BTreeMap<String, Vec<u16>> = Default::default();
    for m in state.mappings.list().await {
        if let Some(client) = m.spec.client.filter(|c| !state.hub.connected(c)) {
            waiting.entry(client).or_default().push(m.spec.source_port);
        }
    }
    for (client, ports) in waiting {
        reasons.push(format!("tunnel client {client} is not connected; its mappings wait: {ports:?}"));
    }
    for (client, f) in state.hub.flapping() {
        reasons.push(format!(
            "tunnel client {client} is flapping: {} and {} replaced each other {} times in the last minute (one name on two clients?)",
            f.previous, f.latest, f.replacements
        ));
    }
    let status = if reasons.is_empty() { "ok" } else { "degraded" };
    Json(json!({"status": status, "reasons": reasons, "tunnel_enabled": true, "tunnel_connected": connected})).into_response()
}

async fn metrics(State(state): State<AppState>) -> Response {
    metrics_response(&state.metrics)
}

/// `/metrics` for both roles.
pub fn metrics_response(metrics: &Metrics) -> Response {
    ([(header::CONTENT_TYPE, crate::telemetry::content_type())], metrics.render()).into_response()
}
