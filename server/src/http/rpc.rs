//! `POST /api/v1/<Method>`: the persona API over HTTP with JSON bodies.
//!
//! The body is the RPC's request message in the proto3 JSON mapping (field names in camelCase
//! or as in the .proto, enum values by name, 64-bit integers and bytes as strings); the reply is
//! its response message the same way. Server-streaming RPCs (Generate, ExtractVector,
//! EvaluateSteering) answer with server-sent events, one message per `data:` line, and an
//! `event: error` with the OpenAI error body if the call fails after it started. The
//! client-streaming RPCs (MonitorStream, ScreenDataset) are gRPC only.

use super::{ApiError, Http, parse_json};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use pb::persona_service_server::PersonaService;
use persona_proto::v1 as pb;
use tokio_stream::StreamExt;

pub fn routes() -> axum::Router<Http> {
    axum::Router::new().route("/api/v1/{method}", axum::routing::post(call))
}

async fn call(
    State(http): State<Http>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    if crate::auth::scope_of(&method).is_none() {
        return Err(ApiError::not_found(format!("no method `{method}` in persona.v1.PersonaService")));
    }
    http.authorize(&method, &headers)?;
    // The handlers answer UNAVAILABLE (503) themselves while the models load.
    let svc = &http.svc;
    let body: &[u8] = if body.is_empty() { b"{}" } else { &body };
    macro_rules! unary {
        ($call:ident) => {{
            let req = parse_json(body)?;
            let res = svc.$call(tonic::Request::new(req)).await?.into_inner();
            Ok(axum::Json(res).into_response())
        }};
    }
    macro_rules! streaming {
        ($call:ident) => {{
            let req = parse_json(body)?;
            let stream = svc.$call(tonic::Request::new(req)).await?.into_inner();
            Ok(events(stream).into_response())
        }};
    }
    match method.as_str() {
        "Generate" => streaming!(generate),
        "ExtractVector" => streaming!(extract_vector),
        "EvaluateSteering" => streaming!(evaluate_steering),
        "WatchJob" => streaming!(watch_job),
        "StartFineTune" => unary!(start_fine_tune),
        "CancelJob" => unary!(cancel_job),
        "ListJobs" => unary!(list_jobs),
        "LoadAdapter" => unary!(load_adapter),
        "MeasureShift" => unary!(measure_shift),
        "ProjectActivation" => unary!(project_activation),
        "ListModels" => unary!(list_models),
        "ListVectors" => unary!(list_vectors),
        "GetVector" => unary!(get_vector),
        "PutVector" => unary!(put_vector),
        "DeleteVector" => unary!(delete_vector),
        "GetServerStatus" => unary!(get_server_status),
        "ListTraits" => unary!(list_traits),
        "DraftTrait" => unary!(draft_trait),
        "ImportVector" => unary!(import_vector),
        "ExportVector" => unary!(export_vector),
        "ScoreText" => unary!(score_text),
        "SteeringSpectrum" => unary!(steering_spectrum),
        _ => Err(ApiError::from(tonic::Status::unimplemented(format!(
            "{method} streams its requests; call it over gRPC"
        )))),
    }
}

/// A response stream as server-sent events; dropping the body (client gone) drops the stream,
/// which cancels the work behind it as a gRPC cancellation does.
fn events<T: serde::Serialize + Send + 'static>(
    stream: crate::service::ResponseStream<T>,
) -> Sse<impl tokio_stream::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let mut failed = false;
    let events = stream.map_while(move |item| {
        if failed {
            return None;
        }
        Some(Ok(match item {
            Ok(m) => Event::default().data(serde_json::to_string(&m).unwrap_or_else(|e| {
                format!("{{\"error\":{{\"message\":\"encoding the message: {e}\",\"type\":\"server_error\"}}}}")
            })),
            Err(status) => {
                failed = true;
                Event::default().event("error").data(ApiError::from(status).body().to_string())
            }
        }))
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
