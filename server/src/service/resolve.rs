//! Request validation shared by the handlers: prompts, sampling, steering and vector info.

use crate::error::{ServiceError, ServiceResult, invalid};
use crate::model::LoadedModel;
use crate::model::chat::Message;
use crate::model::sampling::SamplingConfig;
use crate::steering::plan::{Phase, SteeringPlan};
use crate::steering::probe::Probe;
use crate::steering::store::{StoredVector, VectorKind, VectorStore};
use persona_proto::v1 as pb;

pub const DEFAULT_MAX_TOKENS: usize = 256;

pub fn messages(conv: &pb::Conversation) -> ServiceResult<Vec<Message>> {
    if conv.messages.is_empty() {
        return Err(invalid("conversation has no messages"));
    }
    Ok(conv.messages.iter().map(|m| Message::new(&m.role, m.content.clone())).collect())
}

/// Renders chat messages with the model's template.
pub fn render_chat(model: &LoadedModel, messages: &[Message]) -> ServiceResult<String> {
    model.template.render(messages).map_err(|e| invalid(e.to_string()))
}

pub fn tokenize(model: &LoadedModel, text: &str) -> ServiceResult<Vec<u32>> {
    model.tokenizer.encode(text).map_err(|e| ServiceError::Internal(e.to_string()))
}

/// Tokens of a request's prompt (chat rendered with the template, or raw text).
pub fn prompt_tokens(model: &LoadedModel, prompt: Option<&pb::Prompt>) -> ServiceResult<Vec<u32>> {
    let text = match prompt.and_then(|p| p.kind.as_ref()) {
        Some(pb::prompt::Kind::Chat(c)) => render_chat(model, &messages(c)?)?,
        Some(pb::prompt::Kind::Raw(r)) if !r.is_empty() => r.clone(),
        Some(pb::prompt::Kind::Raw(_)) => return Err(invalid("raw prompt is empty")),
        None => return Err(invalid("prompt is required: give chat messages or a raw prompt")),
    };
    let ids = tokenize(model, &text)?;
    check_fits(model, ids.len())?;
    Ok(ids)
}

/// The prompt must leave room for at least one generated token.
pub fn check_fits(model: &LoadedModel, n_tokens: usize) -> ServiceResult<()> {
    let ctx = model.config().context_length;
    if n_tokens == 0 {
        return Err(invalid("prompt tokenizes to nothing"));
    }
    if n_tokens >= ctx {
        return Err(invalid(format!("prompt has {n_tokens} tokens; the context window of `{}` is {ctx}", model.id)));
    }
    Ok(())
}

pub struct Sampling {
    pub config: SamplingConfig,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

pub fn sampling(p: Option<&pb::SamplingParams>, default_max_tokens: usize) -> ServiceResult<Sampling> {
    let d = pb::SamplingParams::default();
    let p = p.unwrap_or(&d);
    if !p.temperature.is_finite() || p.temperature < 0.0 {
        return Err(invalid(format!("temperature must be >= 0, got {}", p.temperature)));
    }
    if !p.top_p.is_finite() || !(0.0..=1.0).contains(&p.top_p) {
        return Err(invalid(format!("top_p must be in [0, 1], got {}", p.top_p)));
    }
    if p.stop.iter().any(String::is_empty) {
        return Err(invalid("stop strings must not be empty"));
    }
    let max_tokens = if p.max_tokens == 0 { default_max_tokens } else { p.max_tokens as usize };
    Ok(Sampling {
        config: SamplingConfig { temperature: p.temperature, top_p: p.top_p, top_k: p.top_k as usize, seed: p.seed },
        max_tokens,
        stop: p.stop.clone(),
    })
}

/// Looks up a stored vector and checks it belongs to `model`.
pub fn vector_for(store: &VectorStore, model: &LoadedModel, name: &str) -> ServiceResult<std::sync::Arc<StoredVector>> {
    let v = store.get(name)?;
    let c = model.config();
    if v.meta.model != model.id {
        return Err(invalid(format!("vector `{name}` belongs to model `{}`, not `{}`", v.meta.model, model.id)));
    }
    if v.meta.n_rows != c.n_residual_rows() || v.meta.d_model != c.hidden_size {
        return Err(invalid(format!(
            "vector `{name}` has shape [{}, {}], model `{}` needs [{}, {}]",
            v.meta.n_rows,
            v.meta.d_model,
            model.id,
            c.n_residual_rows(),
            c.hidden_size
        )));
    }
    Ok(v)
}

pub fn check_layer(model: &LoadedModel, layer: u32) -> ServiceResult<usize> {
    let n = model.config().n_layers;
    if layer as usize > n {
        return Err(invalid(format!(
            "layer {layer} is out of range: model `{}` has residual layers 0..={n}",
            model.id
        )));
    }
    Ok(layer as usize)
}

/// The layer a request asked for, or else the stored vector's recommended one.
pub fn layer_or_recommended(model: &LoadedModel, layer: Option<u32>, v: Option<&StoredVector>) -> ServiceResult<usize> {
    match (layer, v) {
        (Some(l), _) => check_layer(model, l),
        (None, Some(v)) => v.meta.recommended_layer.ok_or_else(|| {
            invalid(format!(
                "vector `{}` has no recommended layer (imported, or extracted from too few rollouts to score layers): give a layer",
                v.meta.name
            ))
        }),
        (None, None) => Err(invalid("inline vectors need a layer")),
    }
}

/// A resolved projection target: the vector's name, the layer read, and its unit direction.
pub struct Target {
    pub vector: String,
    pub layer: usize,
    pub probe: Probe,
}

/// Resolves projection targets (stored vector, layer or the recommended one); a vector that is
/// zero at the layer has no direction and is refused.
pub fn targets(
    store: &VectorStore,
    model: &LoadedModel,
    targets: &[pb::ProjectionTarget],
) -> ServiceResult<Vec<Target>> {
    targets
        .iter()
        .map(|t| {
            let v = vector_for(store, model, &t.vector)?;
            let layer = layer_or_recommended(model, t.layer, Some(&v))?;
            let probe = Probe::new(layer, v.row(layer).unwrap_or_default())
                .ok_or_else(|| invalid(format!("vector `{}` is zero at layer {layer}", t.vector)))?;
            Ok(Target { vector: t.vector.clone(), layer, probe })
        })
        .collect()
}

pub fn steering(store: &VectorStore, model: &LoadedModel, specs: &[pb::SteeringVector]) -> ServiceResult<SteeringPlan> {
    let c = model.config();
    let mut plan = SteeringPlan::new(c.n_residual_rows());
    for (i, s) in specs.iter().enumerate() {
        if !s.coefficient.is_finite() {
            return Err(invalid(format!("steering[{i}]: coefficient must be finite")));
        }
        let phase = match pb::Positions::try_from(s.positions) {
            Ok(pb::Positions::Unspecified | pb::Positions::All) => Phase::All,
            Ok(pb::Positions::Prompt) => Phase::Prompt,
            Ok(pb::Positions::Response) => Phase::Response,
            Err(_) => return Err(invalid(format!("steering[{i}]: unknown positions value {}", s.positions))),
        };
        match &s.source {
            Some(pb::steering_vector::Source::Name(name)) => {
                let v = vector_for(store, model, name)?;
                let layer = layer_or_recommended(model, s.layer, Some(&v))?;
                let row =
                    v.row(layer).ok_or_else(|| ServiceError::Internal(format!("vector `{name}` lacks row {layer}")))?;
                plan.add(layer, row, s.coefficient, phase);
            }
            Some(pb::steering_vector::Source::Inline(v)) => {
                let layer =
                    layer_or_recommended(model, s.layer, None).map_err(|e| invalid(format!("steering[{i}]: {e}")))?;
                if v.values.len() != c.hidden_size {
                    return Err(invalid(format!(
                        "steering[{i}]: inline vector has {} values, model `{}` has d_model {}",
                        v.values.len(),
                        model.id,
                        c.hidden_size
                    )));
                }
                if v.values.iter().any(|x| !x.is_finite()) {
                    return Err(invalid(format!("steering[{i}]: inline vector has non-finite values")));
                }
                plan.add(layer, &v.values, s.coefficient, phase);
            }
            None => return Err(invalid(format!("steering[{i}]: give a vector name or inline values"))),
        }
    }
    Ok(plan)
}

pub fn kind_to_pb(k: VectorKind) -> pb::VectorKind {
    match k {
        VectorKind::ResponseAvg => pb::VectorKind::ResponseAvg,
        VectorKind::PromptAvg => pb::VectorKind::PromptAvg,
        VectorKind::PromptLast => pb::VectorKind::PromptLast,
    }
}

pub fn kind_from_pb(k: i32) -> ServiceResult<VectorKind> {
    match pb::VectorKind::try_from(k) {
        Ok(pb::VectorKind::Unspecified | pb::VectorKind::ResponseAvg) => Ok(VectorKind::ResponseAvg),
        Ok(pb::VectorKind::PromptAvg) => Ok(VectorKind::PromptAvg),
        Ok(pb::VectorKind::PromptLast) => Ok(VectorKind::PromptLast),
        Err(_) => Err(invalid(format!("unknown vector kind {k}"))),
    }
}

pub fn vector_info(v: &StoredVector) -> pb::VectorInfo {
    let m = &v.meta;
    pb::VectorInfo {
        name: m.name.clone(),
        model: m.model.clone(),
        trait_name: m.trait_name.clone(),
        kind: kind_to_pb(m.kind) as i32,
        n_rows: m.n_rows as u32,
        d_model: m.d_model as u32,
        created_unix: m.created_unix,
        row_norms: v.row_norms(),
        description: m.description.clone(),
        recommended_layer: m.recommended_layer.map(|l| l as u32),
        layer_scores: m
            .layer_scores
            .iter()
            .map(|s| pb::LayerScore { layer: s.layer as u32, cohens_d: s.cohens_d, auroc: s.auroc })
            .collect(),
    }
}
