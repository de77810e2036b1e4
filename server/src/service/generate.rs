//! Generate: validate, queue on the model's engine, stream token deltas with monitor scores.

use super::{AppState, ResponseStream, resolve, score};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::metrics::MonitorMetrics;
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
    let logprobs = score::top_count(req.logprobs, req.top_logprobs)?;
    let threshold = alert_threshold(&req, &targets)?;
    let model_id = model.id.clone();
    tracing::debug!(model = %model_id, prompt_tokens = prompt.len(), steered = !steering.plan.is_empty(), "generate");
    let meters =
        targets.iter().map(|t| state.metrics.monitor(&model_id, &t.vector, t.layer, t.calibration.is_ok())).collect();
    let mut watch = Watch::new(&targets, threshold, meters);
    let rx = engine.generate(GenerateJob {
        span: tracing::Span::current(),
        prompt,
        max_tokens: sampling.max_tokens,
        sampling: sampling.config,
        stop: sampling.stop,
        steering: steering.plan,
        deadline,
        monitors: targets.iter().map(|t| t.probe.clone()).collect(),
        capture: false,
        logprobs,
    })?;
    let applied = steering.applied;
    let model = model.clone();
    let live = (!targets.is_empty()).then(|| Live::new(state.live.clone(), &model.id, &targets, &applied));
    // Dropping this stream (client gone, deadline passed) drops the receiver, which the engine
    // notices at its next step and frees the sequence.
    let stream = UnboundedReceiverStream::new(rx).map(move |ev| match ev {
        Ok(GenEvent::Token { text, id, scores, logprob }) => {
            let calibrated_scores: Vec<f32> =
                targets.iter().zip(&scores).map(|(t, &s)| t.response_scale(s).unwrap_or(f32::NAN)).collect();
            let first = watch.tokens == 0;
            let prompt_scores_calibrated: Vec<f32> = if first {
                targets.iter().zip(&scores).map(|(t, &s)| t.prompt_last_scale(s).unwrap_or(f32::NAN)).collect()
            } else {
                Vec::new()
            };
            watch.token(&scores, &calibrated_scores, &prompt_scores_calibrated);
            if let Some(live) = &live {
                live.token(&text, &scores, &calibrated_scores);
            }
            Ok(pb::GenerateResponse {
                delta: text,
                token_ids: vec![id],
                summary: None,
                prompt_scores: if first { scores.clone() } else { Vec::new() },
                scores,
                logprob: logprob.map(|l| score::token_logprob_pb(&model, &l)),
                calibrated_scores,
                prompt_scores_calibrated,
            })
        }
        Ok(GenEvent::Done(s)) => {
            let monitors = watch.summaries();
            if let Some(live) = &live {
                live.done(&monitors, s.completion_tokens);
            }
            Ok(pb::GenerateResponse {
                summary: Some(summary(&s, model.id.clone(), monitors, applied.clone())),
                ..Default::default()
            })
        }
        Err(e) => Err(Status::from(ServiceError::from(e))),
    });
    Ok(Box::pin(stream))
}

/// The alert threshold on the raw scale or the calibrated one (at most one of them).
fn alert_threshold(req: &pb::GenerateRequest, targets: &[resolve::Target]) -> ServiceResult<Option<Threshold>> {
    match (req.alert_threshold, req.alert_threshold_calibrated) {
        (Some(_), Some(_)) => Err(invalid("give alert_threshold or alert_threshold_calibrated, not both")),
        (Some(t), None) | (None, Some(t)) if !t.is_finite() => Err(invalid("alert thresholds must be finite")),
        (Some(t), None) => Ok(Some(Threshold::Raw(t))),
        (None, Some(t)) => {
            if let Some(u) = targets.iter().find(|u| u.calibration.is_err()) {
                return Err(ServiceError::FailedPrecondition(format!(
                    "alert_threshold_calibrated needs calibrated monitors: {}",
                    u.uncalibrated_reason()
                )));
            }
            Ok(Some(Threshold::Calibrated(t)))
        }
        (None, None) => Ok(None),
    }
}

/// Which scale an alert threshold is on.
#[derive(Clone, Copy)]
enum Threshold {
    Raw(f32),
    Calibrated(f32),
}

fn summary(
    s: &Summary,
    model: String,
    monitors: Vec<pb::MonitorSummary>,
    steering: Vec<pb::AppliedSteering>,
) -> pb::GenerateSummary {
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
        steering,
    }
}

/// Running statistics of a generation's monitor scores.
struct Watch {
    monitors: Vec<pb::MonitorSummary>,
    threshold: Option<Threshold>,
    tokens: usize,
    /// Per monitor: the server's score histogram and alert counter.
    meters: Vec<MonitorMetrics>,
}

impl Watch {
    fn new(targets: &[resolve::Target], threshold: Option<Threshold>, meters: Vec<MonitorMetrics>) -> Self {
        let monitors = targets
            .iter()
            .map(|t| pb::MonitorSummary {
                vector: t.vector.clone(),
                layer: t.layer as u32,
                max: f32::NEG_INFINITY,
                max_calibrated: f32::NEG_INFINITY,
                first_alert_token: -1,
                calibrated: t.calibration.is_ok(),
                ..Default::default()
            })
            .collect();
        Self { monitors, threshold, tokens: 0, meters }
    }

    /// Records one token's scores (raw, and calibrated on the response scale); for the first
    /// token they are the prompt's last-token scores too (the same hidden state), whose calibrated
    /// values on the last-prompt-token scale come in `prompt_calibrated`.
    fn token(&mut self, scores: &[f32], calibrated: &[f32], prompt_calibrated: &[f32]) {
        let first = self.tokens == 0;
        for (i, (m, (&s, &c))) in self.monitors.iter_mut().zip(scores.iter().zip(calibrated)).enumerate() {
            if first {
                m.prompt_last = s;
                if m.calibrated {
                    m.prompt_last_calibrated = prompt_calibrated.get(i).copied().unwrap_or(0.0);
                }
            }
            if let Some(meter) = self.meters.get(i) {
                meter.scores.observe(f64::from(if m.calibrated { c } else { s }));
            }
            m.mean += s;
            m.max = m.max.max(s);
            if m.calibrated {
                m.mean_calibrated += c;
                m.max_calibrated = m.max_calibrated.max(c);
            }
            let reached = match self.threshold {
                Some(Threshold::Raw(t)) => s >= t,
                Some(Threshold::Calibrated(t)) => c >= t,
                None => false,
            };
            if reached && m.first_alert_token < 0 {
                m.alert = true;
                m.first_alert_token = self.tokens as i32;
                if let Some(meter) = self.meters.get(i) {
                    meter.alerts.inc();
                }
            }
        }
        self.tokens += 1;
    }

    fn summaries(&self) -> Vec<pb::MonitorSummary> {
        let n = self.tokens as f32;
        self.monitors
            .iter()
            .map(|m| pb::MonitorSummary {
                mean: if self.tokens == 0 { 0.0 } else { m.mean / n },
                max: if self.tokens == 0 { 0.0 } else { m.max },
                mean_calibrated: if self.tokens == 0 || !m.calibrated { 0.0 } else { m.mean_calibrated / n },
                max_calibrated: if self.tokens == 0 || !m.calibrated { 0.0 } else { m.max_calibrated },
                ..m.clone()
            })
            .collect()
    }
}

/// One monitored generation's events on the live feed ([`crate::live`]).
struct Live {
    feed: std::sync::Arc<crate::live::LiveFeed>,
    request: u64,
    model: String,
}

impl Live {
    /// Announces the generation: its monitors and steering.
    fn new(
        feed: std::sync::Arc<crate::live::LiveFeed>,
        model: &str,
        targets: &[resolve::Target],
        steering: &[pb::AppliedSteering],
    ) -> Self {
        let request = feed.request_id();
        feed.publish(serde_json::json!({
            "kind": "start",
            "request": request,
            "model": model,
            "monitors": targets.iter().map(|t| serde_json::json!({
                "vector": t.vector, "layer": t.layer, "calibrated": t.calibration.is_ok(),
            })).collect::<Vec<_>>(),
            "steering": steering.iter().map(|a| serde_json::json!({
                "vector": a.vector, "layer": a.layer, "coefficient": a.coefficient,
            })).collect::<Vec<_>>(),
        }));
        Self { feed, request, model: model.to_owned() }
    }

    fn token(&self, text: &str, raw: &[f32], calibrated: &[f32]) {
        let finite = |v: f32| if v.is_finite() { serde_json::json!(v) } else { serde_json::Value::Null };
        self.feed.publish(serde_json::json!({
            "kind": "token",
            "request": self.request,
            "text": text,
            "scores": raw,
            "calibrated": calibrated.iter().map(|&c| finite(c)).collect::<Vec<_>>(),
        }));
    }

    fn done(&self, monitors: &[pb::MonitorSummary], tokens: usize) {
        self.feed.publish(serde_json::json!({
            "kind": "done",
            "request": self.request,
            "model": self.model,
            "tokens": tokens,
            "monitors": monitors.iter().map(|m| serde_json::json!({
                "vector": m.vector,
                "mean": m.mean,
                "max": m.max,
                "mean_calibrated": m.calibrated.then_some(m.mean_calibrated),
                "max_calibrated": m.calibrated.then_some(m.max_calibrated),
                "alert": m.alert,
                "first_alert_token": (m.first_alert_token >= 0).then_some(m.first_alert_token),
            })).collect::<Vec<_>>(),
        }));
    }
}
