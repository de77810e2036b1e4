//! The web console: static files under `server/console/`, built into the binary, served at `/`.
//! Plain ES modules and hand-made SVG charts; there is no build step.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Every file of the console: its path under `/` and its bytes.
macro_rules! files {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/console/", $path)) as &[u8])),*]
    };
}

pub const FILES: &[(&str, &[u8])] = files!(
    "index.html",
    "errors.js",
    "console.css",
    "app.js",
    "api.js",
    "charts.js",
    "ui.js",
    "pages/playground.js",
    "pages/spectrum.js",
    "pages/sweep.js",
    "pages/vectors.js",
    "pages/traits.js",
    "pages/monitor.js",
);

pub fn routes() -> axum::Router {
    axum::Router::new().route("/", axum::routing::get(|| file("index.html"))).route(
        "/console/{*path}",
        axum::routing::get(|axum::extract::Path(p): axum::extract::Path<String>| file_owned(p)),
    )
}

async fn file_owned(path: String) -> Response {
    file(&path).await
}

async fn file(path: &str) -> Response {
    let Some((_, bytes)) = FILES.iter().find(|(p, _)| *p == path) else {
        return (StatusCode::NOT_FOUND, "no such file in the console").into_response();
    };
    let mime = match path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    };
    let mut res = (*bytes).into_response();
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(mime));
    // The files change only with the binary; revalidate rather than serve a stale console.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    );
    res
}
