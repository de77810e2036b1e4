//! `GET /metrics`: the recorded metrics ([`crate::metrics`]) rendered with the engines' state read
//! at scrape time, on the metrics listener or on the HTTP API's when they share an address.

use crate::metrics::{Gauges, Metrics, ModelGauges};
use crate::service::{AppState, PersonaSvc};
use std::sync::Arc;

/// What the gauges show of the loaded models and the vector store.
fn gauges(state: &AppState) -> Gauges {
    let models = state
        .engines()
        .into_iter()
        .map(|(id, engine)| {
            let s = engine.status();
            let g = ModelGauges {
                running: s.running,
                waiting: s.waiting,
                kv_reserved_bytes: s.kv_reserved_bytes,
                kv_budget_bytes: s.kv_budget_bytes,
                kv_pool_bytes: s.kv_pool_bytes,
                serving: s.serving,
                restarts: s.restarts,
            };
            (id, g)
        })
        .collect();
    Gauges { models, vectors: state.store.list(None).len() }
}

/// `GET /metrics`, for the metrics listener or the HTTP API's when they share an address.
pub fn routes(metrics: Arc<Metrics>, state: PersonaSvc) -> axum::Router {
    use axum::http::header::CONTENT_TYPE;
    axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let (metrics, state) = (metrics.clone(), state.clone());
            async move {
                let body = metrics.render(state.ready_state().map(|s| gauges(s)).as_ref());
                ([(CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], body)
            }
        }),
    )
}

/// The HTTP server of `GET /metrics`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    state: PersonaSvc,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = routes(metrics, state);
    tracing::info!(addr = %listener.local_addr()?, "metrics on /metrics");
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}
