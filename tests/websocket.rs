//! Issue 21 §5: `GET /api/stats/ws`, the traffic stream over a WebSocket, driven
//! with a real client library (tokio-tungstenite) and from Chromium on other
//! origins: the same JSON as the SSE stream at the asked interval; the token as
//! a `bearer.<base64url>` subprotocol beside `tunneld` (the only one echoed);
//! a foreign `Origin` refused unless in `api.cors_origins`; one cap shared with
//! SSE; pings answered, oversized messages closed on, a close frame on shutdown.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::browser::Browser;
use common::tools::external_tool;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream as AsyncTcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, Response};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tunneld::api::contract::TrafficReport;

const SECRET: &str = "websocket-secret";
/// A token with characters a subprotocol name may not hold, whose base64 has
/// `+`, `/` and padding (`dDBrZW4rLz0/Pz8+Pj53cw==`), so the encoding is tested.
const TOKEN: &str = "t0ken+/=???>>>ws";
/// How long a test waits for one message it expects.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

type Socket = WebSocketStream<MaybeTlsStream<AsyncTcpStream>>;
/// What a handshake gives: the socket and the server's answer, or the error.
type Opened = Result<(Socket, Response<Option<Vec<u8>>>), WsError>;

/// The token as the subprotocol carries it: base64url without padding.
fn encoded(token: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token)
}

/// Opens `/api/stats/ws{query}` with the given extra handshake headers.
async fn open(api: SocketAddr, query: &str, headers: &[(&str, &str)]) -> Opened {
    let mut request = format!("ws://{api}/api/stats/ws{query}").into_client_request().unwrap();
    for (name, value) in headers {
        request.headers_mut().append(HeaderName::from_bytes(name.as_bytes()).unwrap(), HeaderValue::from_str(value).unwrap());
    }
    tokio::time::timeout(MESSAGE_TIMEOUT, tokio_tungstenite::connect_async(request)).await.expect("handshake answered")
}

/// The HTTP status a refused handshake got.
fn refused_with(result: Opened) -> (u16, String) {
    match result {
        Err(WsError::Http(response)) => {
            let body = response.body().as_deref().map(|b| String::from_utf8_lossy(b).into_owned()).unwrap_or_default();
            (response.status().as_u16(), body)
        }
        Err(e) => panic!("expected an HTTP refusal, got {e}"),
        Ok((_, response)) => panic!("expected a refusal, the handshake succeeded: {response:?}"),
    }
}

/// The next data message (pings and pongs skipped), parsed.
async fn next_report(socket: &mut Socket) -> Value {
    loop {
        let message = tokio::time::timeout(MESSAGE_TIMEOUT, socket.next()).await.expect("a message in time");
        match message.expect("the socket is open").expect("a valid message") {
            Message::Text(text) => return serde_json::from_str(&text).expect("the message is JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected message {other:?}"),
        }
    }
}

/// The first `data:` line of `/api/stats/stream`, parsed.
fn first_sse_report(api: SocketAddr) -> Value {
    let mut conn = TcpStream::connect(api).unwrap();
    conn.set_read_timeout(Some(MESSAGE_TIMEOUT)).unwrap();
    write!(conn, "GET /api/stats/stream HTTP/1.1\r\nHost: {api}\r\n\r\n").unwrap();
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        if let Some(json) = line.unwrap().strip_prefix("data: ") {
            return serde_json::from_str(json).unwrap();
        }
    }
    panic!("the stream ended without an event");
}

fn keys(value: &Value) -> BTreeSet<String> {
    value.as_object().unwrap_or_else(|| panic!("an object: {value}")).keys().cloned().collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn websocket_sends_the_stream_json_at_the_interval_and_answers_pings() {
    let server = Daemon::server(SECRET, &[]);
    let port = free_port();
    create_mapping(&server, port, echo_server(), false);
    echo_through(port, 1000);
    let sse = first_sse_report(server.http);
    runtime().block_on(async {
        let (mut socket, response) = open(server.http, "?interval_ms=1000", &[]).await.expect("a tokenless local API opens");
        assert!(response.headers().get("sec-websocket-protocol").is_none(), "nothing offered, nothing selected");
        let first = next_report(&mut socket).await;
        let opened = Instant::now();
        // The same JSON as the SSE stream: same keys, at the top and per mapping.
        assert_eq!(keys(&first), keys(&sse), "ws {first}\nsse {sse}");
        let (ws_mapping, sse_mapping) = (&first["mappings"][0], &sse["mappings"][0]);
        assert_eq!(keys(ws_mapping), keys(sse_mapping));
        assert_eq!(ws_mapping["port"], json!(port));
        assert_eq!(ws_mapping["bytes_sent"], json!(1000));
        // And the API's contract type reads it whole and writes it back the same.
        let typed: TrafficReport = serde_json::from_value(first.clone()).unwrap_or_else(|e| panic!("{e}: {first}"));
        assert_eq!(serde_json::to_value(&typed).unwrap(), first);

        // A ping is answered with its payload, between reports.
        socket.send(Message::Ping(b"are you there".to_vec().into())).await.unwrap();
        let pong = loop {
            match tokio::time::timeout(MESSAGE_TIMEOUT, socket.next()).await.expect("pong in time").unwrap().unwrap() {
                Message::Pong(payload) => break payload,
                Message::Text(_) => continue,
                other => panic!("unexpected {other:?}"),
            }
        };
        assert_eq!(&pong[..], b"are you there");

        // Then one report a second (the asked interval), small text ignored.
        socket.send(Message::text("hello")).await.unwrap();
        let mut arrivals = Vec::new();
        for _ in 0..3 {
            next_report(&mut socket).await;
            arrivals.push(opened.elapsed());
        }
        let span = arrivals[2] - arrivals[0];
        assert!(
            span >= Duration::from_millis(1500) && span <= Duration::from_millis(3000),
            "three reports at a 1 s interval span about 2 s: {arrivals:?}"
        );
        socket.close(None).await.unwrap();
    });
}

#[test]
fn the_token_rides_in_a_subprotocol_and_is_never_echoed() {
    let server = Daemon::server(SECRET, &["--api-token", TOKEN]);
    runtime().block_on(async {
        let (status, body) = refused_with(open(server.http, "", &[]).await);
        assert_eq!(status, 401, "no token: refused before the upgrade: {body}");
        assert!(body.contains("token required"), "{body}");
        let wrong = format!("tunneld, bearer.{}", encoded("not-the-token-at-all"));
        let (status, body) = refused_with(open(server.http, "", &[("Sec-WebSocket-Protocol", &wrong)]).await);
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("invalid API token"), "{body}");
        // The raw token is not the form: it is compared encoded.
        let raw = format!("tunneld, bearer.{TOKEN}");
        assert_eq!(refused_with(open(server.http, "", &[("Sec-WebSocket-Protocol", &raw)]).await).0, 401);

        let right = format!("tunneld, bearer.{}", encoded(TOKEN));
        let (mut socket, response) =
            open(server.http, "", &[("Sec-WebSocket-Protocol", &right)]).await.expect("the right token opens the socket");
        let selected: Vec<_> = response.headers().get_all("sec-websocket-protocol").iter().collect();
        assert_eq!(selected, [HeaderValue::from_static("tunneld")], "only the non-secret subprotocol is echoed");
        let whole = format!("{:?}", response.headers());
        assert!(!whole.contains(&encoded(TOKEN)) && !whole.contains(TOKEN), "the answer carries no token: {whole}");
        assert!(next_report(&mut socket).await["mappings"].is_array());

        // Offered without `tunneld`, the token would have to be echoed: refused, saying why.
        let alone = format!("bearer.{}", encoded(TOKEN));
        let (status, body) = refused_with(open(server.http, "", &[("Sec-WebSocket-Protocol", &alone)]).await);
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("tunneld"), "{body}");
        // Programs that can set headers use the usual one.
        let bearer = format!("Bearer {TOKEN}");
        let (mut socket, _) = open(server.http, "", &[("Authorization", &bearer)]).await.expect("Authorization works too");
        assert!(next_report(&mut socket).await["mappings"].is_array());
    });
}

#[test]
fn foreign_origins_are_refused_unless_configured() {
    let (_dir, config) = config_file("[api]\ncors_origins = [\"http://friend.example:3000\"]\n");
    let server = Daemon::server(SECRET, &["--config", &config]);
    let own = format!("http://{}", server.http);
    runtime().block_on(async {
        let (status, body) = refused_with(open(server.http, "", &[("Origin", "http://evil.example")]).await);
        assert_eq!(status, 403, "cross-site WebSocket hijacking: {body}");
        assert!(body.contains("cors_origins"), "{body}");
        for (origin, why) in [(Some("http://friend.example:3000"), "configured"), (Some(own.as_str()), "same origin"), (None, "no browser")]
        {
            let headers: Vec<(&str, &str)> = origin.map(|o| ("Origin", o)).into_iter().collect();
            let (mut socket, _) = open(server.http, "", &headers).await.unwrap_or_else(|e| panic!("{why}: {e}"));
            assert!(next_report(&mut socket).await["mappings"].is_array(), "{why}");
        }
    });
    // Plain reads keep their rules: CORS, not a refusal.
    let (status, _) = http("GET", &server.url("/api/stats/traffic"), None);
    assert_eq!(status, 200);
}

#[test]
fn websockets_and_event_streams_share_one_cap() {
    // 4096 descriptors: the API's full 128 connections, so 32 streams.
    let server = Daemon::server_with_nofile(4096, 4096, SECRET, &[]);
    runtime().block_on(async {
        let mut sse = Vec::new();
        for _ in 0..16 {
            let mut conn = TcpStream::connect(server.http).unwrap();
            conn.set_read_timeout(Some(MESSAGE_TIMEOUT)).unwrap();
            write!(conn, "GET /api/stats/stream HTTP/1.1\r\nHost: {}\r\n\r\n", server.http).unwrap();
            let mut reader = BufReader::new(conn);
            let mut status = String::new();
            reader.read_line(&mut status).unwrap();
            assert!(status.contains(" 200 "), "{status}");
            sse.push(reader);
        }
        let mut sockets = Vec::new();
        for _ in 0..16 {
            sockets.push(open(server.http, "", &[]).await.expect("within the cap").0);
        }
        let (status, body) = refused_with(open(server.http, "", &[]).await);
        assert_eq!(status, 503, "the 33rd stream: {body}");
        assert!(body.contains("32 event streams are open"), "{body}");
        let mut conn = TcpStream::connect(server.http).unwrap();
        conn.set_read_timeout(Some(MESSAGE_TIMEOUT)).unwrap();
        write!(conn, "GET /api/stats/stream HTTP/1.1\r\nHost: {}\r\n\r\n", server.http).unwrap();
        let mut status = String::new();
        BufReader::new(conn).read_line(&mut status).unwrap();
        assert!(status.contains(" 503 "), "an SSE stream beyond the shared cap: {status}");

        // A socket that leaves gives its slot back.
        let mut leaving = sockets.pop().unwrap();
        leaving.close(None).await.unwrap();
        while leaving.next().await.is_some() {}
        let deadline = Instant::now() + MESSAGE_TIMEOUT;
        let (mut again, _) = loop {
            match open(server.http, "", &[]).await {
                Ok(opened) => break opened,
                Err(e) if Instant::now() < deadline => {
                    assert_eq!(refused_with(Err(e)).0, 503);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("the freed slot was not given back: {e}"),
            }
        };
        assert!(next_report(&mut again).await["mappings"].is_array());
    });
}

#[test]
fn an_open_websocket_keeps_its_api_connection_counted() {
    // 64 descriptors: 8 API connections (5 for requests, 2 for streams, 1
    // kept for /health and /metrics), and 4 more beyond for those two alone.
    let server = Daemon::server_with_nofile(64, 64, SECRET, &[]);
    runtime().block_on(async {
        let mut sockets = Vec::new();
        for _ in 0..2 {
            let (mut socket, _) = open(server.http, "", &[]).await.expect("within the cap");
            next_report(&mut socket).await;
            sockets.push(socket);
        }
        // Six connections that send nothing fill the rest of the budget, if
        // the two sockets still count as the connections they came on.
        let idle: Vec<TcpStream> = (0..6).map(|_| TcpStream::connect(server.http).unwrap()).collect();
        let (status, body) = http("GET", &server.url("/api/mapping/list"), None);
        assert_eq!(status, 503, "an upgraded connection is still one of the API's: {body}");
        assert!(body.to_string().contains("kept for /health"), "{body}");
        assert_eq!(http("GET", &server.url("/health"), None).0, 200);

        // A socket that leaves gives its connection back.
        let mut leaving = sockets.pop().unwrap();
        leaving.close(None).await.unwrap();
        while leaving.next().await.is_some() {}
        wait_for("a request slot", MESSAGE_TIMEOUT, || (http("GET", &server.url("/api/mapping/list"), None).0 == 200).then_some(()));
        drop(idle);
    });
}

#[test]
fn oversized_messages_close_the_socket_and_shutdown_sends_a_close_frame() {
    let mut server = Daemon::server(SECRET, &[]);
    runtime().block_on(async {
        let (mut greedy, _) = open(server.http, "", &[]).await.unwrap();
        next_report(&mut greedy).await;
        greedy.send(Message::binary(vec![7u8; 64 * 1024])).await.unwrap();
        let close = loop {
            match tokio::time::timeout(MESSAGE_TIMEOUT, greedy.next()).await.expect("closed in time") {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| f.code), Some(CloseCode::Size), "too big: 1009");

        let (mut socket, _) = open(server.http, "", &[]).await.unwrap();
        next_report(&mut socket).await;
        server.signal("TERM");
        let close = loop {
            match tokio::time::timeout(MESSAGE_TIMEOUT, socket.next()).await.expect("closed in time") {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame on shutdown, got {other:?}"),
            }
        };
        let frame = close.expect("the close frame says why");
        assert_eq!(frame.code, CloseCode::Away, "{frame:?}");
        assert!(frame.reason.contains("shutting down"), "{frame:?}");
        // The client's answer completes the close handshake; the server ends the connection.
        let after = tokio::time::timeout(MESSAGE_TIMEOUT, socket.next()).await.expect("ended in time");
        assert!(matches!(after, None | Some(Err(_))), "{after:?}");
    });
    let status = server.terminate();
    assert!(status.success(), "a clean exit with a socket open: {status:?}\n{}", server.log());
    assert!(!server.log().contains("did not stop within"), "{}", server.log());
}

/// A web server on its own port (so its own origin) that serves one blank page.
fn page_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 4096];
            let _ = std::io::Read::read(&mut conn, &mut buf);
            let page = "<!doctype html><title>another site</title><p>hello";
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    addr
}

/// JS: opens the API's WebSocket with the token subprotocol, encoded in the
/// page as docs/operations.md shows, and resolves with the selected protocol
/// and the first message's mapping count, or the close code.
fn open_from_page(api: SocketAddr, token: &str) -> String {
    format!(
        "new Promise(resolve => {{
            const b64url = s => btoa(String.fromCharCode(...new TextEncoder().encode(s)))
              .replace(/\\+/g, '-').replace(/\\//g, '_').replace(/=+$/, '');
            const ws = new WebSocket('ws://{api}/api/stats/ws', ['tunneld', 'bearer.' + b64url({token:?})]);
            ws.onmessage = e => {{ const r = JSON.parse(e.data); ws.close(); resolve({{protocol: ws.protocol, mappings: r.mappings.length}}); }};
            ws.onclose = e => resolve('closed ' + e.code);
        }})"
    )
}

#[test]
fn chromium_opens_it_only_from_an_allowed_origin() {
    let Some(chromium) = external_tool("chromium", "websocket") else { return };
    let evil = page_server();
    let friend = page_server();
    let (_dir, config) = config_file(&format!("[api]\ntoken = \"{TOKEN}\"\ncors_origins = [\"http://{friend}\"]\n"));
    let server = Daemon::server(SECRET, &["--config", &config]);
    create_mapping_with_token(&server);
    let mut browser = Browser::launch(&chromium, &[], None);

    browser.open(&format!("http://{evil}/"));
    assert_eq!(browser.eval(&open_from_page(server.http, TOKEN)), json!("closed 1006"), "a foreign page cannot open it");
    assert_eq!(handshake_errors(&mut browser), ["Error during WebSocket handshake: Unexpected response code: 403"]);

    browser.open(&format!("http://{friend}/"));
    assert_eq!(browser.eval(&open_from_page(server.http, TOKEN)), json!({"protocol": "tunneld", "mappings": 1}));
    // The right origin with a wrong token is still refused.
    assert_eq!(browser.eval(&open_from_page(server.http, "a-wrong-token-0123")), json!("closed 1006"));
    assert_eq!(handshake_errors(&mut browser)[1..], ["HTTP Authentication failed; no valid credentials available"], "401");
}

/// What chromium said of each WebSocket handshake that failed, in order.
fn handshake_errors(browser: &mut Browser) -> Vec<String> {
    let errors = browser.events_named("Network.webSocketFrameError");
    errors.iter().map(|e| e["errorMessage"].as_str().unwrap_or_default().to_string()).collect()
}

/// One direct mapping, created with the token.
fn create_mapping_with_token(server: &Daemon) {
    let body = json!({"source_port": free_port(), "target_host": "127.0.0.1", "target_port": echo_server().port()});
    let (status, answer) = post_with_token(server, "/api/mapping/create", TOKEN, body);
    assert_eq!(status, 200, "{answer}");
}
