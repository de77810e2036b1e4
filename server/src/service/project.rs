//! ProjectActivation and MonitorStream: one capture pass over prompt (+ response), projected
//! onto vectors.

use super::{AppState, ResponseStream, resolve};
use crate::error::{ServiceResult, invalid};
use crate::scheduler::CaptureJob;
use crate::steering::plan::SteeringPlan;
use persona_proto::v1 as pb;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

pub async fn project(
    state: &AppState,
    req: pb::ProjectActivationRequest,
) -> ServiceResult<pb::ProjectActivationResponse> {
    let engine = state.engine(&req.model)?;
    let model = engine.model();
    let conv = req.conversation.as_ref().ok_or_else(|| invalid("conversation is required"))?;
    let prompt = resolve::tokenize(model, &resolve::render_chat(model, &resolve::messages(conv)?)?)?;
    let response = if req.response.is_empty() { Vec::new() } else { resolve::tokenize(model, &req.response)? };
    resolve::check_fits(model, prompt.len() + response.len())?;
    if req.targets.is_empty() {
        return Err(invalid("targets is empty: name at least one vector"));
    }
    let targets = resolve::targets(&state.store, model, &req.targets)?;
    let (prompt_len, response_len) = (prompt.len(), response.len());
    let tokens = [prompt, response].concat();
    let texts = if req.per_token {
        tokens.iter().map(|&t| model.tokenizer.decode(&[t]).unwrap_or_default()).collect()
    } else {
        Vec::new()
    };
    let probes = if req.per_token { targets.iter().map(|t| t.probe.clone()).collect() } else { Vec::new() };
    let steering = SteeringPlan::new(model.config().n_residual_rows());
    let cap =
        engine.capture(CaptureJob { tokens, prompt_len, steering, probes, logprobs: None, token_states: None }).await?;
    let mut per_token = cap.per_token.into_iter();
    let projections = targets
        .into_iter()
        .map(|t| {
            let prompt_last = t.probe.score_at_layer(&cap.prompt_last);
            let prompt_avg = t.probe.score_at_layer(&cap.prompt_avg);
            let response_avg = cap.response_avg.as_ref().map_or(0.0, |r| t.probe.score_at_layer(r));
            let per_token: Vec<f32> = per_token.next().unwrap_or_default();
            let calibrated = t.calibration.is_ok();
            let on_response = |x: f32| t.response_scale(x).unwrap_or(0.0);
            pb::Projection {
                prompt_last_calibrated: t.prompt_last_scale(prompt_last).unwrap_or(0.0),
                prompt_avg_calibrated: on_response(prompt_avg),
                response_avg_calibrated: if cap.response_avg.is_some() { on_response(response_avg) } else { 0.0 },
                per_token_calibrated: if calibrated {
                    per_token.iter().map(|&x| on_response(x)).collect()
                } else {
                    Vec::new()
                },
                calibrated,
                uncalibrated_reason: t.uncalibrated_reason(),
                prompt_last,
                prompt_avg,
                response_avg,
                has_response: cap.response_avg.is_some(),
                per_token,
                vector: t.vector,
                layer: t.layer as u32,
            }
        })
        .collect();
    Ok(pb::ProjectActivationResponse {
        projections,
        prompt_tokens: prompt_len as u32,
        response_tokens: response_len as u32,
        tokens: texts,
    })
}

/// Serves a MonitorStream: up to a batch's worth of items run at once; the next item is read only
/// when one finishes and its result has room in the outgoing queue, so a fast producer is slowed
/// to the engine's pace by HTTP/2 flow control instead of piling up in memory.
pub fn monitor(
    state: Arc<AppState>,
    mut inbound: Streaming<pb::MonitorRequest>,
) -> ResponseStream<pb::MonitorResponse> {
    let in_flight = state.engines().iter().map(|(_, e)| e.max_batch()).max().unwrap_or(1);
    let (tx, rx) = mpsc::channel(in_flight);
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(in_flight));
        loop {
            // Both a slot to compute in and a place in the outgoing queue, before reading more.
            let Ok(permit) = permits.clone().acquire_owned().await else { break };
            let Ok(slot) = tx.clone().reserve_owned().await else { break };
            let item = match inbound.message().await {
                Ok(Some(item)) => item,
                Ok(None) => break,
                Err(status) => {
                    tracing::debug!(error = %status, "monitor stream ended by the client");
                    break;
                }
            };
            let state = state.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let reply = match item.item {
                    Some(req) => {
                        let model = state.engine(&req.model).map(|e| e.model().id.clone()).unwrap_or_default();
                        let reply = project(&state, req).await.map_err(Status::from);
                        if let Ok(r) = &reply {
                            observe(&state, &model, r);
                        }
                        reply
                    }
                    None => Err(Status::invalid_argument("item is required")),
                };
                let msg = match reply {
                    Ok(result) => pb::MonitorResponse { id: item.id, result: Some(result), ..Default::default() },
                    Err(s) => pb::MonitorResponse {
                        id: item.id,
                        error_code: s.code() as i32,
                        error_message: s.message().to_string(),
                        ..Default::default()
                    },
                };
                slot.send(Ok(msg));
            });
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

/// Adds a monitored item's response score to the server's histogram of monitor scores
/// (calibrated when the vector has a calibration; items without a response have none), and
/// the item to the live feed.
fn observe(state: &AppState, model: &str, reply: &pb::ProjectActivationResponse) {
    for p in reply.projections.iter().filter(|p| p.has_response) {
        let meter = state.metrics.monitor(model, &p.vector, p.layer as usize, p.calibrated);
        let score = if p.calibrated { p.response_avg_calibrated } else { p.response_avg };
        meter.scores.observe(f64::from(score));
    }
    state.live.publish(serde_json::json!({
        "kind": "projection",
        "model": model,
        "prompt_tokens": reply.prompt_tokens,
        "response_tokens": reply.response_tokens,
        "projections": reply.projections.iter().map(|p| serde_json::json!({
            "vector": p.vector,
            "layer": p.layer,
            "prompt_last": p.prompt_last,
            "response_avg": p.has_response.then_some(p.response_avg),
            "prompt_last_calibrated": p.calibrated.then_some(p.prompt_last_calibrated),
            "response_avg_calibrated": (p.calibrated && p.has_response).then_some(p.response_avg_calibrated),
        })).collect::<Vec<_>>(),
    }));
}
