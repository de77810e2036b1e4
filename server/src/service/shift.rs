//! MeasureShift: the finetuning shift of a tuned model against its base along persona vectors
//! (the persona-vectors paper's predictor of trait expression after fine-tuning), and
//! optionally the trait expression of both.
//!
//! For each of the trait's eval questions, both models read the chat prompt; the shift is the
//! tuned model's last-prompt-token activation minus the base's at the vector's layer, projected
//! on the unit vector. Answers of both models are read by the base model, so one probe and one
//! calibration score both.

use super::finetune::shift_questions;
use super::{AppState, evaluate, resolve};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::scheduler::{CaptureJob, EngineHandle};
use crate::steering::plan::SteeringPlan;
use crate::steering::probe::Probe;
use crate::train::shift::Shift;
use persona_proto::v1 as pb;
use std::sync::Arc;

/// The projection on `probe` of each prompt's last-token activation at the probe's layer.
async fn last_token(engine: &EngineHandle, prompts: &[Vec<u32>], probe: &Probe) -> ServiceResult<Vec<f32>> {
    let n_rows = engine.model().config().n_residual_rows();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, p) in prompts.iter().enumerate() {
        let (engine, p) = (engine.clone(), p.clone());
        tasks.spawn(async move {
            let job = CaptureJob {
                prompt_len: p.len(),
                tokens: p,
                steering: SteeringPlan::new(n_rows),
                probes: Vec::new(),
                logprobs: None,
                token_states: None,
            };
            (i, engine.capture(job).await)
        });
    }
    let mut out = vec![0.0; prompts.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, c) = joined.map_err(|e| ServiceError::Internal(e.to_string()))?;
        out[i] = probe.score_at_layer(&c?.prompt_last);
    }
    Ok(out)
}

pub async fn measure(state: &Arc<AppState>, req: pb::MeasureShiftRequest) -> ServiceResult<pb::MeasureShiftResponse> {
    let base = state.engine(&req.base_model)?;
    let tuned = state.engine(&req.tuned_model)?;
    let (b, t) = (base.model().clone(), tuned.model().clone());
    if b.id == t.id {
        return Err(invalid(format!("base_model and tuned_model are both `{}`", b.id)));
    }
    let (bc, tc) = (b.config(), t.config());
    if (bc.n_layers, bc.hidden_size, bc.vocab_size) != (tc.n_layers, tc.hidden_size, tc.vocab_size) {
        return Err(ServiceError::FailedPrecondition(format!(
            "`{}` ({} layers, d_model {}, vocab {}) and `{}` ({} layers, d_model {}, vocab {}) are not one model before and \
             after fine-tuning",
            b.id, bc.n_layers, bc.hidden_size, bc.vocab_size, t.id, tc.n_layers, tc.hidden_size, tc.vocab_size
        )));
    }
    if req.vectors.is_empty() {
        return Err(invalid("name at least one stored vector in vectors"));
    }
    let steering = resolve::steering(&state.store, &t, &req.tuned_steering)?;
    let mut shifts = Vec::with_capacity(req.vectors.len());
    for name in &req.vectors {
        let v = resolve::vector_for(&state.store, &b, name)?;
        let layer = resolve::layer_or_recommended(&b, req.layer, Some(&v))?;
        let probe = Probe::new(layer, v.row(layer).unwrap_or_default())
            .ok_or_else(|| ServiceError::FailedPrecondition(format!("vector `{name}` is zero at layer {layer}")))?;
        let questions = shift_questions(state, &v.meta.trait_name, name)?;
        let prompts = |m: &crate::model::LoadedModel| {
            questions.iter().map(|q| evaluate::question_prompt(m, None, q)).collect::<ServiceResult<Vec<_>>>()
        };
        let (bp, tp) = (prompts(&b)?, prompts(&t)?);
        let (hb, ht) = tokio::try_join!(last_token(&base, &bp, &probe), last_token(&tuned, &tp, &probe))?;
        let per: Vec<f32> = ht.iter().zip(&hb).map(|(x, y)| x - y).collect();
        let s = Shift::of(per.clone());
        let mut out = pb::VectorShift {
            vector: name.clone(),
            trait_name: v.meta.trait_name.clone(),
            layer: layer as u32,
            shift: s.mean,
            shift_std: s.std,
            questions: questions
                .iter()
                .zip(per)
                .map(|(q, shift)| pb::ShiftQuestion { question: q.clone(), shift })
                .collect(),
            ..Default::default()
        };
        if req.expression {
            let job = |generator: &EngineHandle, reference, steering| evaluate::ExpressionJob {
                generator: generator.clone(),
                reader: base.clone(),
                questions: &questions,
                sampling: req.sampling.as_ref(),
                reference,
                steering,
            };
            let (eb, reference) = evaluate::expression(state, &v, job(&base, None, None)).await?;
            let (et, _) =
                evaluate::expression(state, &v, job(&tuned, Some(reference), Some(steering.plan.clone()))).await?;
            out.base_expression = Some(eb.trait_score);
            out.tuned_expression = Some(et.trait_score);
            if eb.offline {
                out.base_projection_calibrated = Some(eb.trait_score);
                out.tuned_projection_calibrated = Some(et.trait_score);
            }
            out.base_coherence = Some(eb.coherence);
            out.tuned_coherence = Some(et.coherence);
            out.scorer = eb.scorer;
        }
        shifts.push(out);
    }
    Ok(pb::MeasureShiftResponse { shifts })
}
