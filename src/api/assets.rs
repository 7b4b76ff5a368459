//! The monitor page and its files, embedded in the binary so the daemon serves
//! them with no network access and nothing to install beside it.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

/// (path under `static/`, content type, bytes). `monitor.html` is the page itself.
const FILES: &[(&str, &str, &[u8])] = &[
    ("monitor.html", "text/html; charset=utf-8", include_bytes!("../../static/monitor.html")),
    ("monitor.css", "text/css; charset=utf-8", include_bytes!("../../static/monitor.css")),
    ("monitor.js", "text/javascript; charset=utf-8", include_bytes!("../../static/monitor.js")),
    ("vendor/chart.umd.js", "text/javascript; charset=utf-8", include_bytes!("../../static/vendor/chart.umd.js")),
    ("vendor/LICENSE.md", "text/markdown; charset=utf-8", include_bytes!("../../static/vendor/LICENSE.md")),
];

pub(super) async fn monitor_page() -> Response {
    asset("monitor.html")
}

pub(super) fn asset(path: &str) -> Response {
    match FILES.iter().find(|(name, _, _)| *name == path) {
        Some((_, content_type, bytes)) => {
            ([(header::CONTENT_TYPE, *content_type), (header::CACHE_CONTROL, "no-cache")], *bytes).into_response()
        }
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
