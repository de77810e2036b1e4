//! The tower layer around every gRPC call: opens its span (continuing the caller's W3C trace
//! context), counts it by method and status code, times it until its response stream ends, and
//! logs one line when it ends, carrying the trace id.
//!
//! A gRPC status travels in the response headers when a call fails before its first message
//! ("trailers-only") and in the trailers otherwise, so the response body is wrapped to read the
//! trailers as they pass. A body dropped before its trailers is a call the client cancelled.

use crate::metrics::Metrics;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// Adds [`Observed`] around a service.
#[derive(Clone)]
pub struct ObserveLayer {
    metrics: Arc<Metrics>,
}

impl ObserveLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for ObserveLayer {
    type Service = Observed<S>;
    fn layer(&self, inner: S) -> Observed<S> {
        Observed { inner, metrics: self.metrics.clone() }
    }
}

#[derive(Clone)]
pub struct Observed<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// Services whose methods are counted by name; other paths count as `unknown` so a scanner
/// cannot grow the label set without bound.
const KNOWN_SERVICES: &[&str] = &[
    "persona.v1.PersonaService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// `(service, method)` of a gRPC path `/package.Service/Method`.
fn rpc_of(path: &str) -> (&'static str, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match KNOWN_SERVICES.iter().find(|&&s| s == service) {
        Some(s) if !method.is_empty() && method.len() <= 64 && method.bytes().all(|b| b.is_ascii_alphanumeric()) => {
            (s, method.to_string())
        }
        _ => ("unknown", "unknown".to_string()),
    }
}

fn status_of(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let v = headers.get("grpc-status")?.to_str().ok()?.parse::<i32>().ok()?;
    Some(tonic::Code::from_i32(v))
}

/// One call not yet counted.
struct Pending {
    metrics: Arc<Metrics>,
    service: &'static str,
    method: String,
    started: Instant,
    span: tracing::Span,
}

impl Pending {
    fn finish(self, code: tonic::Code) {
        let elapsed = self.started.elapsed();
        self.metrics.rpc_done(self.service, &self.method, code, elapsed);
        if self.service != HEALTH {
            // An OpenTelemetry span ends at its last exit: mark the end of the response stream.
            drop(self.span.enter());
            let ms = elapsed.as_secs_f64() * 1e3;
            let code = crate::metrics::code_name(code);
            tracing::info!(parent: &self.span, grpc.code = code, ms, "rpc finished");
        }
    }
}

const HEALTH: &str = "grpc.health.v1.Health";

/// Reads W3C trace context (`traceparent`, `tracestate`) from request headers.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// The span of one call: a child of the caller's trace when it sent one, with the trace id as
/// a field so log lines inside the call carry it. Health checks get none (probes every few
/// seconds would drown the traces).
fn request_span(service: &'static str, method: &str, headers: &http::HeaderMap) -> tracing::Span {
    if service == HEALTH {
        return tracing::Span::none();
    }
    let span = tracing::info_span!(
        "rpc",
        otel.name = %format_args!("{service}/{method}"),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = %method,
        trace_id = tracing::field::Empty,
    );
    continue_trace(span, headers)
}

/// The span of one HTTP API request, continuing the caller's trace like [`request_span`].
pub fn http_span(method: &http::Method, route: &str, headers: &http::HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "http",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        trace_id = tracing::field::Empty,
    );
    continue_trace(span, headers)
}

/// Makes `span` a child of the trace the request headers carry, and records the trace id.
fn continue_trace(span: tracing::Span, headers: &http::HeaderMap) -> tracing::Span {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let parent = opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let ctx = span.context();
    let id = ctx.span().span_context().trace_id();
    if id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(id));
    }
    span
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Observed<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<ReqBody>) -> Self::Future {
        use tracing::Instrument;
        let (service, method) = rpc_of(req.uri().path());
        let span = request_span(service, &method, req.headers());
        let pending = Pending { metrics: self.metrics.clone(), service, method, started: Instant::now(), span };
        let call = {
            let _entered = pending.span.enter();
            self.inner.call(req)
        }
        .instrument(pending.span.clone());
        Box::pin(async move {
            let response = call.await?;
            let pending = match status_of(response.headers()) {
                Some(code) => {
                    pending.finish(code);
                    None
                }
                None => Some(pending),
            };
            Ok(response.map(|inner| ObservedBody { inner, pending }))
        })
    }
}

/// A response body that counts its call when the trailers pass, or when it is dropped first.
pub struct ObservedBody<B> {
    inner: B,
    pending: Option<Pending>,
}

impl<B> Drop for ObservedBody<B> {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            p.finish(tonic::Code::Cancelled);
        }
    }
}

impl<B> Body for ObservedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(p) = this.pending.take()
                {
                    p.finish(status_of(trailers).unwrap_or(tonic::Code::Unknown));
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(p) = this.pending.take() {
                    p.finish(tonic::Code::Internal);
                }
            }
            Poll::Ready(None) => {
                if let Some(p) = this.pending.take() {
                    // A body that ends without trailers carries no status: the HTTP layer's
                    // default for gRPC is OK only with an explicit status, so say so.
                    p.finish(tonic::Code::Unknown);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_bounded_labels() {
        assert_eq!(rpc_of("/persona.v1.PersonaService/Generate"), ("persona.v1.PersonaService", "Generate".into()));
        assert_eq!(rpc_of("/grpc.health.v1.Health/Check"), ("grpc.health.v1.Health", "Check".into()));
        for odd in ["/", "", "/evil.Service/Steal", "/persona.v1.PersonaService/", "/persona.v1.PersonaService/a/b"] {
            assert_eq!(rpc_of(odd), ("unknown", "unknown".into()), "{odd}");
        }
    }
}
