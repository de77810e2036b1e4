//! The HTTP surface on `http_listen`, backed by the same engines as gRPC:
//!
//! - `/v1/chat/completions`, `/v1/completions`, `/v1/models`: the OpenAI API, with steering and
//!   monitoring as extra body fields ([`openai`]);
//! - `POST /api/v1/<Method>`: every unary and server-streaming RPC of `persona.v1.PersonaService`
//!   with its messages in the proto3 JSON mapping, streams as server-sent events ([`rpc`]);
//! - `GET /api/live`: recent monitored generations, then new ones as they happen ([`live`]);
//! - `/`: the web console, static files built into the binary ([`console`]);
//! - `/metrics` when `metrics_listen` names the same address.
//!
//! API keys and scopes are the gRPC side's: each route is checked as the RPC it amounts to.

pub mod console;
pub mod live;
pub mod metrics;
mod openai;
mod rpc;

use crate::auth::Keys;
use crate::metrics::Metrics;
use crate::security::Tls;
use crate::service::{AppState, PersonaSvc};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::sync::Arc;
use tonic::Code;

/// What the handlers share.
#[derive(Clone)]
pub struct Http {
    svc: PersonaSvc,
    keys: Keys,
}

impl Http {
    /// Checks the request's key as a call of the RPC `method`.
    fn authorize(&self, method: &str, headers: &HeaderMap) -> Result<(), ApiError> {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner()).clone();
        keys.check(&format!("/persona.v1.PersonaService/{method}"), headers).map_err(ApiError::from)
    }

    fn state(&self) -> Result<&Arc<AppState>, ApiError> {
        self.svc.state().map_err(ApiError::from)
    }
}

/// Server-sent events fed by a task through a bounded channel (a slow reader holds the task
/// back); the task is aborted when the response body is dropped, i.e. when the client goes.
fn task_events<F, Fut>(
    f: F,
) -> impl tokio_stream::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<axum::response::sse::Event>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let guard = crate::support::AbortOnDrop(tokio::spawn(f(tx)));
    tokio_stream::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), move |e| {
        let _ = &guard;
        Ok(e)
    })
}

/// The HTTP routes, counted in `metrics`; `/metrics` too when `serve_metrics`; answering CORS
/// requests from `cors_origins` (validated settings: origins, or `*`).
pub fn router(
    svc: PersonaSvc,
    keys: Keys,
    metrics: Arc<Metrics>,
    serve_metrics: bool,
    cors_origins: &[String],
) -> axum::Router {
    let http = Http { svc: svc.clone(), keys };
    let mut app = axum::Router::new()
        .route("/health", axum::routing::get(health))
        .merge(openai::routes())
        .merge(rpc::routes())
        .merge(live::routes())
        .with_state(http)
        .merge(console::routes())
        // Vectors travel base64-encoded in ImportVector; the gRPC side allows 64 MiB too.
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024));
    if serve_metrics {
        app = app.merge(self::metrics::routes(metrics.clone(), svc));
    }
    let app = app.layer(axum::middleware::from_fn_with_state(metrics, observe));
    match cors(cors_origins) {
        Some(layer) => app.layer(layer),
        None => app,
    }
}

/// The CORS layer for `origins` (none when empty): GET and POST with the authorization and
/// content-type headers, preflights cached for an hour.
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// `GET /health`, open like gRPC health: 200 once the models are loaded and every engine
/// serves, else 503 with the reason.
async fn health(axum::extract::State(http): axum::extract::State<Http>) -> Response {
    let Some(state) = http.svc.ready_state() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "loading models\n").into_response();
    };
    let down: Vec<String> =
        state.engines().into_iter().filter(|(_, e)| !e.health().borrow().serving).map(|(id, _)| id).collect();
    if down.is_empty() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("not serving: {}\n", down.join(", "))).into_response()
    }
}

/// Each request in its own span (continuing the caller's W3C trace), counted by route and
/// status, and logged at debug level.
async fn observe(
    axum::extract::State(metrics): axum::extract::State<Arc<Metrics>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use tracing::Instrument;
    let method = req.method().clone();
    let route = route_of(&req);
    let span = crate::observe::http_span(&method, &route, req.headers());
    let started = std::time::Instant::now();
    let res = next.run(req).instrument(span.clone()).await;
    let (status, elapsed) = (res.status().as_u16(), started.elapsed());
    if route != "/metrics" {
        metrics.http_done(&route, method.as_str(), status, elapsed);
    }
    span.in_scope(|| tracing::debug!(%method, route, status, ms = elapsed.as_secs_f64() * 1e3, "http request"));
    res
}

/// The metrics label of a request's route: the matched route, with the RPC named for
/// `/api/v1/{method}` (a bounded set); `unmatched` for anything else.
fn route_of(req: &axum::extract::Request) -> String {
    let Some(matched) = req.extensions().get::<axum::extract::MatchedPath>() else { return "unmatched".into() };
    match req.uri().path().strip_prefix("/api/v1/") {
        Some(m) if crate::auth::scope_of(m).is_some() => format!("/api/v1/{m}"),
        _ => matched.as_str().to_owned(),
    }
}

/// Serves `app` on `listener` (over TLS when given) until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<Tls>>,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr()?;
    tracing::info!(http_addr = %addr, tls = tls.is_some(), "HTTP API and console");
    match tls {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        Some(tls) => {
            let incoming = TlsListener { addr, inner: Box::pin(crate::security::incoming(listener, tls)) };
            axum::serve(incoming, app).with_graceful_shutdown(shutdown).await
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

/// The TLS connections of [`crate::security::incoming`] as an axum listener.
struct TlsListener {
    addr: std::net::SocketAddr,
    inner: std::pin::Pin<Box<dyn tokio_stream::Stream<Item = std::io::Result<TlsStream>> + Send>>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use tokio_stream::StreamExt;
        loop {
            match self.inner.next().await {
                Some(Ok(stream)) => {
                    let peer = stream.get_ref().0.peer_addr().unwrap_or(self.addr);
                    return (stream, peer);
                }
                Some(Err(e)) => tracing::debug!(error = %e, "accepting a TLS connection"),
                // The accept loop only ends when this listener is dropped.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.addr)
    }
}

/// An error in the OpenAI API's shape: `{"error": {"message", "type", "param", "code"}}`, with
/// the HTTP status that matches the gRPC code the engine would have answered.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<&'static str>,
    /// The request named a model that is not served (OpenAI's `model_not_found`).
    unknown_model: bool,
}

impl ApiError {
    /// 400 about one request field.
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: Some(param), unknown_model: false }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, message: message.into(), param: None, unknown_model: false }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self { status: StatusCode::NOT_FOUND, message: message.into(), param: None, unknown_model: false }
    }

    /// 404 for a model that is not served.
    fn model_not_found(message: impl Into<String>) -> Self {
        Self { unknown_model: true, ..Self::not_found(message) }
    }

    /// OpenAI's error `type` for a status.
    fn kind(&self) -> &'static str {
        match self.status {
            StatusCode::BAD_REQUEST | StatusCode::CONFLICT | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            StatusCode::SERVICE_UNAVAILABLE => "service_unavailable_error",
            StatusCode::GATEWAY_TIMEOUT => "timeout_error",
            StatusCode::NOT_IMPLEMENTED => "not_implemented_error",
            _ => "server_error",
        }
    }

    /// OpenAI's machine-readable `code`, where it has one for the case.
    fn code(&self) -> Option<&'static str> {
        match self.status {
            StatusCode::UNAUTHORIZED => Some("invalid_api_key"),
            StatusCode::NOT_FOUND if self.unknown_model => Some("model_not_found"),
            StatusCode::TOO_MANY_REQUESTS => Some("rate_limit_exceeded"),
            _ => None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "message": self.message, "type": self.kind(), "param": self.param, "code": self.code() }
        })
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        let status = match s.code() {
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => StatusCode::BAD_REQUEST,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
            Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
            // The client is gone; nobody reads this.
            Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let unknown_model = s
            .metadata()
            .get(crate::error::ERROR_KIND)
            .is_some_and(|kind| kind.as_bytes() == crate::error::MODEL_NOT_FOUND.as_bytes());
        Self { status, message: s.message().to_owned(), param: None, unknown_model }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            res.headers_mut()
                .insert(axum::http::header::WWW_AUTHENTICATE, axum::http::HeaderValue::from_static("Bearer"));
        }
        res
    }
}

/// Parses a JSON body, answering 400 with serde's message (which names the field) on failure.
fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("the request body is empty; send a JSON object"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

/// Seconds since the Unix epoch, as OpenAI's `created` fields carry them.
fn unix_now() -> u64 {
    crate::support::unix_now().max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_the_openai_statuses() {
        for (code, status, kind) in [
            (Code::InvalidArgument, 400, "invalid_request_error"),
            (Code::FailedPrecondition, 400, "invalid_request_error"),
            (Code::Unauthenticated, 401, "authentication_error"),
            (Code::PermissionDenied, 403, "permission_error"),
            (Code::NotFound, 404, "not_found_error"),
            (Code::ResourceExhausted, 429, "rate_limit_error"),
            (Code::Unavailable, 503, "service_unavailable_error"),
            (Code::Internal, 500, "server_error"),
        ] {
            let e = ApiError::from(tonic::Status::new(code, "why"));
            assert_eq!(e.status.as_u16(), status, "{code:?}");
            let body = e.body();
            assert_eq!(body["error"]["type"], kind, "{code:?}");
            assert_eq!(body["error"]["message"], "why");
        }
        // An unknown model is told by the error's kind, not by its message.
        let e = ApiError::from(tonic::Status::from(crate::error::ServiceError::ModelNotFound("any words".into())));
        assert_eq!((e.status.as_u16(), e.body()["error"]["code"].clone()), (404, "model_not_found".into()));
        let e = ApiError::from(tonic::Status::not_found("model `x` is only a word here"));
        assert_eq!(e.body()["error"]["code"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn calls_answer_503_until_the_models_are_loaded_and_the_console_is_up_at_once() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let app = router(PersonaSvc::loading(), Default::default(), Arc::new(Metrics::new()), false, &[]);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        let request = |head: String| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(head.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let body = r#"{"messages": [{"role": "user", "content": "hi"}]}"#;
        let chat = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let res = request(chat).await;
        assert!(res.starts_with("HTTP/1.1 503"), "{res}");
        assert!(res.contains("still loading"), "{res}");
        assert!(res.contains("service_unavailable_error"), "{res}");
        let res = request("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()).await;
        assert!(res.starts_with("HTTP/1.1 200") && res.contains("<title>persona-steer console</title>"), "{res}");
        assert!(res.to_lowercase().contains("content-security-policy"), "{res}");
        let res = request("GET /console/nope.js HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()).await;
        assert!(res.starts_with("HTTP/1.1 404"), "{res}");
        let res = request("GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".into()).await;
        assert!(res.starts_with("HTTP/1.1 503") && res.contains("loading models"), "{res}");
    }

    #[test]
    fn every_console_file_is_built_in_and_every_module_import_resolves() {
        let names: Vec<&str> = console::FILES.iter().map(|(p, _)| *p).collect();
        for (path, bytes) in console::FILES {
            let text = std::str::from_utf8(bytes).unwrap();
            assert!(!text.trim().is_empty(), "{path} is empty");
            // `from "./x.js"` / `from "../x.js"` relative to the file, and /console/ references.
            for spec in text.split("from \"").skip(1).filter_map(|s| s.split('"').next()) {
                let base = path.rsplit_once('/').map(|(d, _)| d).unwrap_or("");
                let mut parts: Vec<&str> = if base.is_empty() { vec![] } else { base.split('/').collect() };
                for seg in spec.split('/') {
                    match seg {
                        "." => {}
                        ".." => {
                            parts.pop();
                        }
                        s => parts.push(s),
                    }
                }
                let target = parts.join("/");
                assert!(names.contains(&target.as_str()), "{path} imports {spec}: {target} is not built in");
            }
            for r in text.split("/console/").skip(1).filter_map(|s| s.split('"').next()) {
                assert!(names.contains(&r), "{path} references /console/{r}, which is not built in");
            }
        }
    }
}
