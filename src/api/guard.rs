//! The API's browser-facing defences, applied to every route as one middleware
//! (so routes added later get them without doing anything):
//!
//! - `Host` must be an IP literal, `localhost`, or a name in `api.allowed_hosts`
//!   (403): a DNS-rebinding page reaches the API under its own name and is refused;
//! - state-changing requests and WebSocket handshakes carrying a foreign `Origin`
//!   are refused (403) unless the origin is in `api.cors_origins`: a browser
//!   opens a WebSocket to any site without asking CORS, so a foreign page could
//!   otherwise read the socket (cross-site WebSocket hijacking);
//! - CORS: origins in `api.cors_origins` get `Access-Control-Allow-Origin` and
//!   preflight answers; no other origin can read a response.
//!
//! The JSON content type of state-changing requests (415) is enforced by the body
//! extractor ([`super::body`]), which every such route uses.

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::failure;
use crate::config::ApiConfig;

/// How long a browser may cache a preflight answer.
const PREFLIGHT_MAX_AGE_SECS: &str = "600";

pub struct Guard {
    allowed_hosts: Vec<String>,
    cors_origins: Vec<String>,
    /// `/metrics` needs the token too.
    pub metrics_token_required: bool,
}

impl Guard {
    pub fn new(config: &ApiConfig) -> Guard {
        Guard {
            allowed_hosts: config.allowed_hosts.iter().map(|h| h.trim_end_matches('.').to_ascii_lowercase()).collect(),
            cors_origins: config.cors_origins.iter().map(|o| o.trim_end_matches('/').to_ascii_lowercase()).collect(),
            metrics_token_required: config.metrics_token_required,
        }
    }

    /// Whether the `Host` header names this API in a way a rebinding page cannot:
    /// an address literal (a page's origin then *is* the address), `localhost`, or
    /// a configured name.
    fn host_allowed(&self, host: &str) -> bool {
        let name = host_name(host).trim_end_matches('.').to_ascii_lowercase();
        let literal = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')).unwrap_or(&name);
        literal.parse::<IpAddr>().is_ok() || name == "localhost" || self.allowed_hosts.contains(&name)
    }

    fn cors_allowed(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// `example.com:8080` → `example.com`; `[::1]:8080` → `[::1]`.
fn host_name(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    host.rsplit_once(':').filter(|(_, port)| port.chars().all(|c| c.is_ascii_digit())).map_or(host, |(name, _)| name)
}

/// Whether `origin` is the API's own origin as the browser addressed it.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    host.is_some_and(|host| origin.eq_ignore_ascii_case(&format!("http://{host}")))
}

pub(crate) async fn check(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if let Some(host) = host {
        if !guard.host_allowed(host) {
            return failure(
                StatusCode::FORBIDDEN,
                format!("host {host:?} is not allowed; add it to api.allowed_hosts if it names this server"),
            );
        }
    }
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).map(str::to_string);
    let cors = origin.as_deref().filter(|o| guard.cors_allowed(o)).map(str::to_string);
    if req.method() == Method::OPTIONS && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD) {
        return match &cors {
            Some(origin) => preflight(origin),
            None => failure(StatusCode::FORBIDDEN, "cross-origin requests from this origin are not allowed (see api.cors_origins)"),
        };
    }
    let mutating = !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    // Any protocol upgrade, not only `websocket`: no CORS protects what follows it.
    let upgrade = headers.contains_key(header::UPGRADE);
    if let (true, Some(origin), None) = (mutating || upgrade, &origin, &cors) {
        if !same_origin(origin, host) {
            return failure(StatusCode::FORBIDDEN, format!("cross-origin request from {origin} refused (see api.cors_origins)"));
        }
    }
    let mut response = next.run(req).await;
    if let Some(origin) = cors {
        allow_origin(response.headers_mut(), &origin);
    }
    response
}

fn allow_origin(headers: &mut HeaderMap, origin: &str) {
    if let Ok(value) = HeaderValue::from_str(origin) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        headers.append(header::VARY, HeaderValue::from_static("Origin"));
    }
}

fn preflight(origin: &str) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    let headers = response.headers_mut();
    allow_origin(headers, origin);
    headers.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
    headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
    headers.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static(PREFLIGHT_MAX_AGE_SECS));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(hosts: &[&str], origins: &[&str]) -> Guard {
        let config = ApiConfig {
            allowed_hosts: hosts.iter().map(|s| s.to_string()).collect(),
            cors_origins: origins.iter().map(|s| s.to_string()).collect(),
            ..ApiConfig::default()
        };
        Guard::new(&config)
    }

    #[test]
    fn hosts_literals_localhost_and_configured_names_only() {
        let g = guard(&["tunnel.example.com"], &[]);
        for ok in
            ["127.0.0.1:8080", "127.0.0.1", "[::1]:8080", "localhost:8080", "LOCALHOST", "tunnel.example.com:8080", "tunnel.example.com."]
        {
            assert!(g.host_allowed(ok), "{ok}");
        }
        for refused in ["evil.example", "evil.example:8080", "localhost.evil.example", "127.0.0.1.nip.io:8080"] {
            assert!(!g.host_allowed(refused), "{refused}");
        }
    }

    #[test]
    fn origins_match_exactly() {
        let g = guard(&[], &["http://127.0.0.1:3000"]);
        assert!(g.cors_allowed("http://127.0.0.1:3000"));
        assert!(!g.cors_allowed("http://127.0.0.1:3001"));
        assert!(same_origin("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(!same_origin("http://127.0.0.1:3000", Some("127.0.0.1:8080")));
    }
}
