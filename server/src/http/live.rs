//! `GET /api/live`: the live feed ([`crate::live`]) as server-sent events, backlog first.

use super::{ApiError, Http};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;

pub fn routes() -> axum::Router<Http> {
    axum::Router::new().route("/api/live", axum::routing::get(live))
}

async fn live(State(http): State<Http>, headers: HeaderMap) -> Result<Response, ApiError> {
    // Token text and scores of other callers' requests: the monitor scope, as MonitorStream.
    http.authorize("MonitorStream", &headers)?;
    let (backlog, mut rx) = http.state()?.live.subscribe();
    let events = super::task_events(move |tx| async move {
        for e in backlog {
            if tx.send(Event::default().data(&*e)).await.is_err() {
                return;
            }
        }
        loop {
            let e = match rx.recv().await {
                Ok(e) => Event::default().data(&*e),
                Err(RecvError::Lagged(n)) => Event::default().event("lagged").data(n.to_string()),
                Err(RecvError::Closed) => return,
            };
            if tx.send(e).await.is_err() {
                return;
            }
        }
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()).into_response())
}
