//! Generate: validate, queue on the model's engine, stream token deltas with monitor scores.

use super::{AppState, ResponseStream, resolve};
use crate::error::{ServiceResult, invalid};
use crate::scheduler::{FinishReason, GenEvent, GenerateJob, Summary};
use persona_proto::v1 as pb;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::Status;

pub fn generate(
    state: &AppState,
    req: pb::GenerateRequest,
    deadline: Option<std::time::Instant>,
) -> ServiceResult<ResponseStream<pb::GenerateResponse>> {
    let engine = state.engine(&req.model)?;
    let model = engine.model();
    let prompt = resolve::prompt_tokens(model, req.prompt.as_ref())?;
    let sampling = resolve::sampling(req.sampling.as_ref(), resolve::DEFAULT_MAX_TOKENS)?;
    let steering = resolve::steering(&state.store, model, &req.steering)?;
    let targets = resolve::targets(&state.store, model, &req.monitors)?;
    if req.alert_threshold.is_some_and(|t| !t.is_finite()) {
        return Err(invalid("alert_threshold must be finite"));
    }
    let model_id = model.id.clone();
    tracing::debug!(model = %model_id, prompt_tokens = prompt.len(), steered = !steering.is_empty(), "generate");
    let mut watch = Watch::new(&targets, req.alert_threshold);
    let rx = engine.generate(GenerateJob {
        prompt,
        max_tokens: sampling.max_tokens,
        sampling: sampling.config,
        stop: sampling.stop,
        steering,
        deadline,
        monitors: targets.into_iter().map(|t| t.probe).collect(),
        capture: false,
    })?;
    // Dropping this stream (client gone, deadline passed) drops the receiver, which the engine
    // notices at its next step and frees the sequence.
    let stream = UnboundedReceiverStream::new(rx).map(move |ev| match ev {
        Ok(GenEvent::Token { text, id, scores }) => {
            let prompt_scores = watch.token(&scores);
            Ok(pb::GenerateResponse { delta: text, token_ids: vec![id], summary: None, scores, prompt_scores })
        }
        Ok(GenEvent::Done(s)) => Ok(pb::GenerateResponse {
            summary: Some(summary(&s, model_id.clone(), watch.summaries())),
            ..Default::default()
        }),
        Err(e) => Err(Status::from(crate::error::ServiceError::from(e))),
    });
    Ok(Box::pin(stream))
}

fn summary(s: &Summary, model: String, monitors: Vec<pb::MonitorSummary>) -> pb::GenerateSummary {
    pb::GenerateSummary {
        finish_reason: match s.finish_reason {
            FinishReason::Length => pb::FinishReason::Length,
            FinishReason::Stop => pb::FinishReason::Stop,
            FinishReason::Context => pb::FinishReason::Context,
        } as i32,
        prompt_tokens: s.prompt_tokens as u32,
        completion_tokens: s.completion_tokens as u32,
        prefill_ms: s.prefill_ms,
        decode_ms: s.decode_ms,
        model,
        monitors,
    }
}

/// Running statistics of a generation's monitor scores.
struct Watch {
    monitors: Vec<pb::MonitorSummary>,
    threshold: Option<f32>,
    tokens: usize,
}

impl Watch {
    fn new(targets: &[resolve::Target], threshold: Option<f32>) -> Self {
        let monitors = targets
            .iter()
            .map(|t| pb::MonitorSummary {
                vector: t.vector.clone(),
                layer: t.layer as u32,
                max: f32::NEG_INFINITY,
                first_alert_token: -1,
                ..Default::default()
            })
            .collect();
        Self { monitors, threshold, tokens: 0 }
    }

    /// Records one token's scores; for the first token they are the prompt's last-token scores
    /// too (the same hidden state), returned to go out with the first message.
    fn token(&mut self, scores: &[f32]) -> Vec<f32> {
        let first = self.tokens == 0;
        for (m, &s) in self.monitors.iter_mut().zip(scores) {
            if first {
                m.prompt_last = s;
            }
            m.mean += s;
            m.max = m.max.max(s);
            if self.threshold.is_some_and(|t| s >= t) && m.first_alert_token < 0 {
                m.alert = true;
                m.first_alert_token = self.tokens as i32;
            }
        }
        self.tokens += 1;
        if first { scores.to_vec() } else { Vec::new() }
    }

    fn summaries(&self) -> Vec<pb::MonitorSummary> {
        self.monitors
            .iter()
            .map(|m| pb::MonitorSummary {
                mean: if self.tokens == 0 { 0.0 } else { m.mean / self.tokens as f32 },
                max: if self.tokens == 0 { 0.0 } else { m.max },
                ..m.clone()
            })
            .collect()
    }
}
