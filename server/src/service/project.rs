//! ProjectActivation: one capture pass over prompt (+ response), projected onto vectors.

use super::{AppState, resolve};
use crate::error::{ServiceResult, invalid};
use crate::scheduler::CaptureJob;
use crate::steering::plan::SteeringPlan;
use crate::steering::projection;
use persona_proto::v1 as pb;

pub async fn project(
    state: &AppState,
    req: pb::ProjectActivationRequest,
) -> ServiceResult<pb::ProjectActivationResponse> {
    let engine = state.engine(&req.model)?;
    let model = engine.model();
    let c = model.config();
    let conv = req.conversation.as_ref().ok_or_else(|| invalid("conversation is required"))?;
    let prompt = resolve::tokenize(model, &resolve::render_chat(model, &resolve::messages(conv)?)?)?;
    let response = if req.response.is_empty() { Vec::new() } else { resolve::tokenize(model, &req.response)? };
    resolve::check_fits(model, prompt.len() + response.len())?;
    if req.targets.is_empty() {
        return Err(invalid("targets is empty: name at least one vector and layer"));
    }
    let mut dirs = Vec::with_capacity(req.targets.len());
    for t in &req.targets {
        let v = resolve::vector_for(&state.store, model, &t.vector)?;
        let layer = resolve::layer_or_recommended(model, t.layer, Some(&v))?;
        let row = v.row(layer).unwrap_or_default().to_vec();
        if row.iter().all(|x| *x == 0.0) {
            return Err(invalid(format!("vector `{}` is zero at layer {layer}", t.vector)));
        }
        dirs.push((t.vector.clone(), layer, row));
    }
    let (prompt_len, response_len) = (prompt.len(), response.len());
    let tokens = [prompt, response].concat();
    let cap =
        engine.capture(CaptureJob { tokens, prompt_len, steering: SteeringPlan::new(c.n_residual_rows()) }).await?;
    let d = cap.d_model;
    let at = |acts: &[f32], layer: usize| acts[layer * d..(layer + 1) * d].to_vec();
    let projections = dirs
        .into_iter()
        .map(|(vector, layer, dir)| pb::Projection {
            prompt_last: projection(&at(&cap.prompt_last, layer), &dir),
            prompt_avg: projection(&at(&cap.prompt_avg, layer), &dir),
            response_avg: cap.response_avg.as_ref().map_or(0.0, |r| projection(&at(r, layer), &dir)),
            has_response: cap.response_avg.is_some(),
            vector,
            layer: layer as u32,
        })
        .collect();
    Ok(pb::ProjectActivationResponse {
        projections,
        prompt_tokens: prompt_len as u32,
        response_tokens: response_len as u32,
    })
}
