//! Request validation shared by the handlers: prompts, sampling, steering and vector info.

use crate::error::{ServiceError, ServiceResult, invalid};
use crate::model::LoadedModel;
use crate::model::chat::Message;
use crate::model::sampling::SamplingConfig;
use crate::steering::calibration::{LayerCalibration, Scale};
use crate::steering::evaluation::SteeringRecommendation;
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
    let ids = match prompt.and_then(|p| p.kind.as_ref()) {
        Some(pb::prompt::Kind::Chat(c)) => tokenize(model, &render_chat(model, &messages(c)?)?)?,
        // Raw text is read as a document: after `bos` where the model expects one (Gemma).
        Some(pb::prompt::Kind::Raw(r)) if !r.is_empty() => {
            model.tokenizer.encode_document(r).map_err(|e| ServiceError::Internal(e.to_string()))?
        }
        Some(pb::prompt::Kind::Raw(_)) => return Err(invalid("raw prompt is empty")),
        None => return Err(invalid("prompt is required: give chat messages or a raw prompt")),
    };
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
    if v.meta.model != model.id && model.base.as_deref() != Some(v.meta.model.as_str()) {
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

/// A resolved projection target: the vector's name, the layer read, its unit direction, and its
/// calibration at that layer (or why it has none).
pub struct Target {
    pub vector: String,
    pub layer: usize,
    pub probe: Probe,
    pub calibration: Result<LayerCalibration, String>,
}

impl Target {
    /// A response-scale reading (response or prompt average, per-token score) calibrated.
    pub fn response_scale(&self, raw: f32) -> Option<f32> {
        self.calibration.as_ref().ok().and_then(|c| c.response.calibrate(raw))
    }

    /// A last-prompt-token reading calibrated.
    pub fn prompt_last_scale(&self, raw: f32) -> Option<f32> {
        self.calibration.as_ref().ok().and_then(|c| c.prompt_last.calibrate(raw))
    }

    pub fn response_calibration(&self) -> Option<&Scale> {
        self.calibration.as_ref().ok().map(|c| &c.response)
    }

    pub fn uncalibrated_reason(&self) -> String {
        self.calibration.as_ref().err().cloned().unwrap_or_default()
    }
}

/// The calibration of a stored vector at `layer`, or a sentence saying why there is none.
pub fn calibration_of(v: &StoredVector, layer: usize) -> Result<LayerCalibration, String> {
    let name = &v.meta.name;
    match v.meta.calibration_at(layer) {
        Some(c) if c.response.calibrate(0.0).is_some() && c.prompt_last.calibrate(0.0).is_some() => Ok(*c),
        Some(_) => {
            Err(format!("vector `{name}` does not separate its rollouts at layer {layer}: raw projections only"))
        }
        None if v.meta.calibration.is_empty() => Err(format!(
            "vector `{name}` has no calibration (imported, put, or extracted before calibration existed): raw projections only"
        )),
        None => Err(format!("vector `{name}` has no calibration at layer {layer}: raw projections only")),
    }
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
            Ok(Target { vector: t.vector.clone(), layer, probe, calibration: calibration_of(&v, layer) })
        })
        .collect()
}

/// A request's steering resolved: the plan the engine applies, and per entry what it applied.
pub struct Steering {
    pub plan: SteeringPlan,
    pub applied: Vec<pb::AppliedSteering>,
}

const FROM_REQUEST: &str = "request";
const FROM_STEERING: &str = "steering recommendation";
const FROM_MONITORING: &str = "monitoring layer";

/// The layer and coefficient a named vector steers with: what the request gave, else the
/// vector's steering recommendation (from an evaluation), else — for the layer only — its
/// monitoring layer. Returns them with where each came from.
pub fn steer_point(
    model: &LoadedModel,
    v: &StoredVector,
    layer: Option<u32>,
    coefficient: Option<f32>,
) -> ServiceResult<(usize, &'static str, f32, &'static str)> {
    let rec: Option<&SteeringRecommendation> = v.meta.steering.as_ref();
    let (layer, layer_source) = match (layer, rec) {
        (Some(l), _) => (check_layer(model, l)?, FROM_REQUEST),
        (None, Some(r)) => (r.layer, FROM_STEERING),
        (None, None) => (layer_or_recommended(model, None, Some(v))?, FROM_MONITORING),
    };
    let (coefficient, coefficient_source) = match coefficient {
        Some(c) => (c, FROM_REQUEST),
        None => {
            let c = rec.and_then(|r| r.coefficient_at(layer)).ok_or_else(|| {
                ServiceError::FailedPrecondition(match rec {
                    None => format!(
                        "vector `{}` has no steering recommendation: give a coefficient, or run EvaluateSteering \
                         (`persona eval --vector {}`) first",
                        v.meta.name, v.meta.name
                    ),
                    Some(r) => format!(
                        "vector `{}` has no recommended coefficient at layer {layer} (evaluated layers: {}): give a \
                         coefficient",
                        v.meta.name,
                        r.layers.iter().map(|l| l.layer.to_string()).collect::<Vec<_>>().join(", ")
                    ),
                })
            })?;
            (c, FROM_STEERING)
        }
    };
    Ok((layer, layer_source, coefficient, coefficient_source))
}

pub fn steering(store: &VectorStore, model: &LoadedModel, specs: &[pb::SteeringVector]) -> ServiceResult<Steering> {
    let c = model.config();
    let mut plan = SteeringPlan::new(c.n_residual_rows());
    let mut applied = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        if s.coefficient.is_some_and(|c| !c.is_finite()) {
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
                let (layer, layer_source, coefficient, coefficient_source) =
                    steer_point(model, &v, s.layer, s.coefficient)?;
                let row =
                    v.row(layer).ok_or_else(|| ServiceError::Internal(format!("vector `{name}` lacks row {layer}")))?;
                plan.add(layer, row, coefficient, phase);
                applied.push(pb::AppliedSteering {
                    vector: name.clone(),
                    layer: layer as u32,
                    coefficient,
                    layer_source: layer_source.into(),
                    coefficient_source: coefficient_source.into(),
                });
            }
            Some(pb::steering_vector::Source::Inline(v)) => {
                let layer =
                    layer_or_recommended(model, s.layer, None).map_err(|e| invalid(format!("steering[{i}]: {e}")))?;
                let coefficient = s
                    .coefficient
                    .ok_or_else(|| invalid(format!("steering[{i}]: inline vectors need a coefficient")))?;
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
                plan.add(layer, &v.values, coefficient, phase);
                applied.push(pb::AppliedSteering {
                    vector: String::new(),
                    layer: layer as u32,
                    coefficient,
                    layer_source: FROM_REQUEST.into(),
                    coefficient_source: FROM_REQUEST.into(),
                });
            }
            None => return Err(invalid(format!("steering[{i}]: give a vector name or inline values"))),
        }
    }
    Ok(Steering { plan, applied })
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
        calibration: m.calibration.iter().map(calibration_to_pb).collect(),
        steering: m.steering.as_ref().map(recommendation_to_pb),
        transferred_from: m.transferred_from.as_ref().map(|t| pb::TransferredFrom {
            model: t.model.clone(),
            vector: t.vector.clone(),
            source_layer: t.source_layer as u32,
            target_layer: t.target_layer as u32,
            method: t.method.clone(),
            r2: t.r2,
            samples: t.samples as u32,
        }),
    }
}

fn scale_to_pb(s: &Scale) -> pb::ScaleCalibration {
    let side = |x: &crate::steering::calibration::SideStats| pb::SideStats { mean: x.mean, std: x.std, n: x.n };
    pb::ScaleCalibration { neg: Some(side(&s.neg)), pos: Some(side(&s.pos)) }
}

fn calibration_to_pb(c: &LayerCalibration) -> pb::LayerCalibration {
    pb::LayerCalibration {
        layer: c.layer as u32,
        response: Some(scale_to_pb(&c.response)),
        prompt_last: Some(scale_to_pb(&c.prompt_last)),
    }
}

pub fn recommendation_to_pb(r: &SteeringRecommendation) -> pb::SteeringRecommendation {
    pb::SteeringRecommendation {
        layer: r.layer as u32,
        coefficient: r.coefficient,
        trait_score: r.trait_score,
        unsteered_trait_score: r.unsteered_trait_score,
        coherence: r.coherence,
        unsteered_coherence: r.unsteered_coherence,
        scorer: r.scorer.clone(),
        evaluated_unix: r.evaluated_unix,
        layers: r
            .layers
            .iter()
            .map(|l| pb::LayerRecommendation {
                layer: l.layer as u32,
                coefficient: l.coefficient,
                trait_score: l.trait_score,
                coherence: l.coherence,
            })
            .collect(),
        cells: r
            .grid
            .iter()
            .map(|c| pb::EvalCell {
                layer: c.layer as u32,
                coefficient: c.coefficient,
                trait_score: c.trait_score,
                coherence: c.coherence,
                coherent: c.coherence >= r.coherence_threshold,
                ..Default::default()
            })
            .collect(),
        coherence_threshold: r.coherence_threshold,
    }
}
