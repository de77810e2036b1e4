//! EvaluateSteering and SteeringSpectrum: steered answers to held-out questions, each read back
//! by the unsteered model (or the judge) for trait expression and coherence on 0-100 scales.

use super::extract::{complete, tally_to_pb};
use super::reading::ReadFormat;
use super::score::mean_logprob;
use super::{AppState, ResponseStream, resolve, traits, vectors};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::judge::{Judge, Tally, coherence_prompt};
use crate::model::LoadedModel;
use crate::model::chat::Message;
use crate::model::sampling::SamplingConfig;
use crate::scheduler::{CaptureJob, EngineHandle, GenerateJob};
use crate::steering::calibration::Scale;
use crate::steering::evaluation::{
    CellScore, Reference, SteeringRecommendation, coherence, distinct_bigrams, recommend,
};
use crate::steering::plan::{Phase, SteeringPlan};
use crate::steering::probe::Probe;
use crate::steering::store::StoredVector;
use crate::support::unix_now;
use crate::traits::TraitDef;
use persona_proto::v1 as pb;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tonic::Status;

/// The sweep's coefficients when the request gives none (0, the baseline, always runs): half steps
/// up to 2, where deep layers of a small model already lose coherence, then wider ones to 8.
pub const DEFAULT_COEFFICIENTS: [f32; 10] = [-2.0, -1.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0];
const DEFAULT_QUESTIONS: usize = 8;
const DEFAULT_ANSWER_TOKENS: usize = 48;
const DEFAULT_COHERENCE_FRACTION: f32 = 0.8;
const DEFAULT_MULTIPLIERS: [f32; 5] = [-2.0, -1.0, 0.0, 1.0, 2.0];
/// Most layer × coefficient cells one evaluation may sweep.
pub const MAX_CELLS: usize = 200;
/// Largest coefficient magnitude accepted (far past where any model still writes text).
const MAX_COEFFICIENT: f32 = 1000.0;
const MAX_MULTIPLIERS: usize = 16;

/// Every third layer from 25% to 85% of the depth, plus the monitoring layer: the best steering
/// layer can be far from the best separating one.
pub fn default_layers(n_layers: usize, monitoring: Option<usize>) -> Vec<usize> {
    let lo = (n_layers as f32 * 0.25).round() as usize;
    let hi = (n_layers as f32 * 0.85).round() as usize;
    let mut layers: Vec<usize> = (lo..=hi).step_by(3).chain(monitoring).collect();
    layers.sort_unstable();
    layers.dedup();
    layers
}

/// How answers are scored.
enum Judging {
    /// Calibrated projection at the monitoring layer; coherence from log-probability and repetition.
    /// `by`: the scoring vector and its model, when it is not the steered vector (`score_with`).
    Offline { probe: Probe, scale: Scale, by: Option<String> },
    /// The judge model with the trait's eval prompt and the coherence prompt.
    Judge { judge: Arc<Judge>, def: TraitDef },
}

impl Judging {
    fn describe(&self, monitoring: usize) -> String {
        match self {
            Self::Offline { by, .. } => format!(
                "offline: trait = calibrated projection{} of the answer read unsteered at layer {monitoring}; \
                 coherence = 100 x fluency (log-probability) x diversity (distinct bigrams)",
                by.as_ref().map(|b| format!(" onto {b}")).unwrap_or_default()
            ),
            Self::Judge { judge, .. } => format!("judge `{}`", judge.model()),
        }
    }
}

/// The unsteered model's reading of one answer after its bare question.
#[derive(Debug, Clone, Default)]
struct Reading {
    text: String,
    tokens: usize,
    mean_logprob: f32,
    distinct: f32,
    /// Raw projection of the answer's response average at the monitoring layer.
    projection: Option<f32>,
}

/// A model other than the generator that reads answers for their trait score, and how it reads.
type Scorer = (EngineHandle, ReadFormat);

/// Generates and reads answers; shared by the evaluation and the spectrum.
struct Answerer {
    engine: EngineHandle,
    /// The model that reads answers for their projection and log-probabilities (the
    /// generator, unless answers of one model are scored by another's vector).
    reader: EngineHandle,
    monitoring: usize,
    judging: Judging,
    /// Another served model that reads each answer's text for the trait score, and how it reads
    /// (the scoring vector belongs to it); `None`: the reader's capture serves.
    scorer: Option<Scorer>,
    max_tokens: usize,
    sampling: SamplingConfig,
    stop: Vec<String>,
    permits: Arc<Semaphore>,
}

/// One answer to produce: a prompt (possibly with a system prompt), the question it reads back
/// after, and the steering to generate with.
struct Ask {
    prompt: Vec<u32>,
    bare: Vec<u32>,
    plan: SteeringPlan,
    /// The question's text, for a scorer on another model.
    question: Arc<str>,
    /// Sampling other than the answerer's (a sampling baseline).
    sampling: Option<SamplingConfig>,
}

impl Answerer {
    fn new(engine: EngineHandle, monitoring: usize, judging: Judging, sampling: resolve::Sampling) -> Self {
        // Twice a batch: while some answers are in their read-back pass, others keep the decode
        // batch full (the engine queues the rest).
        let permits = Arc::new(Semaphore::new(2 * engine.max_batch()));
        let reader = engine.clone();
        Self {
            engine,
            reader,
            monitoring,
            judging,
            scorer: None,
            max_tokens: sampling.max_tokens,
            sampling: sampling.config,
            stop: sampling.stop,
            permits,
        }
    }

    /// Generates one answer with its steering, then reads it back unsteered after the bare
    /// question: log-probabilities and the monitoring layer's projection in one capture pass.
    async fn answer(self: Arc<Self>, ask: Ask, seed: u64) -> ServiceResult<Reading> {
        let _permit = self.permits.clone().acquire_owned().await.map_err(|e| ServiceError::Internal(e.to_string()))?;
        let job = GenerateJob {
            span: tracing::Span::current(),
            prompt: ask.prompt,
            max_tokens: self.max_tokens,
            sampling: match ask.sampling {
                Some(own) => SamplingConfig { seed: own.seed.map(|s| s.wrapping_add(seed)), ..own },
                None => {
                    SamplingConfig { seed: self.sampling.seed.map(|s| s.wrapping_add(seed)), ..self.sampling.clone() }
                }
            },
            stop: self.stop.clone(),
            steering: ask.plan,
            deadline: None,
            monitors: Vec::new(),
            capture: false,
            logprobs: None,
        };
        let (mut ids, _) = complete(&self.engine, job).await?;
        let model = self.engine.model();
        let decode = |ids: &[u32]| model.tokenizer.decode(ids).map_err(|e| ServiceError::Internal(e.to_string()));
        let mut text = decode(&ids)?;
        // The token that completed a stop string was generated: the answer ends before the stop
        // string, and is read back without the tokens past it.
        if let Some(at) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(at);
            while !ids.is_empty() && decode(&ids[..ids.len() - 1])?.len() >= at {
                ids.pop();
            }
        }
        if ids.is_empty() {
            return Ok(Reading { text, ..Default::default() });
        }
        let cap = self
            .reader
            .capture(CaptureJob {
                prompt_len: ask.bare.len(),
                tokens: [ask.bare.as_slice(), &ids].concat(),
                steering: SteeringPlan::new(model.config().n_residual_rows()),
                probes: Vec::new(),
                logprobs: Some(0),
                token_states: None,
            })
            .await?;
        let projection = match (&self.judging, &self.scorer) {
            (Judging::Offline { probe, .. }, None) => cap.response_avg.as_ref().map(|r| probe.score_at_layer(r)),
            (Judging::Offline { probe, .. }, Some((scorer, format))) => {
                let m = scorer.model();
                let (prompt, answer) = format.tokens(m, &ask.question, &text)?;
                if answer.is_empty() {
                    None
                } else {
                    let read = scorer
                        .capture(CaptureJob {
                            prompt_len: prompt.len(),
                            tokens: [prompt, answer].concat(),
                            steering: SteeringPlan::new(m.config().n_residual_rows()),
                            probes: Vec::new(),
                            logprobs: None,
                            token_states: None,
                        })
                        .await?;
                    read.response_avg.as_ref().map(|r| probe.score_at_layer(r))
                }
            }
            (Judging::Judge { .. }, _) => None,
        };
        Ok(Reading {
            text,
            tokens: ids.len(),
            mean_logprob: mean_logprob(&cap.logprobs) as f32,
            distinct: distinct_bigrams(&ids),
            projection,
        })
    }

    /// Trait and coherence 0-100 of each reading (`None`: the judge dropped it); `question(i)` is
    /// the question reading `i` answers. Offline coherence is measured against `reference`, the
    /// unsteered answers' own figures.
    async fn score(
        &self,
        readings: &[Reading],
        question: impl Fn(usize) -> String,
        reference: Reference,
        tally: &mut Tally,
    ) -> Vec<Option<(f32, f32)>> {
        match &self.judging {
            Judging::Offline { scale, .. } => readings
                .iter()
                .map(|r| {
                    if r.tokens == 0 {
                        return Some((0.0, 0.0));
                    }
                    let t = r.projection.and_then(|p| scale.calibrate(p)).unwrap_or(0.0).clamp(0.0, 100.0);
                    Some((t, coherence(r.mean_logprob, r.distinct, r.tokens, reference)))
                })
                .collect(),
            Judging::Judge { judge, def } => {
                let mut tasks = JoinSet::new();
                for (i, r) in readings.iter().enumerate() {
                    let q = question(i);
                    let prompts = [def.eval_prompt_for(&q, &r.text), coherence_prompt(&q, &r.text)];
                    let judge = judge.clone();
                    tasks.spawn(async move {
                        let [t, c] = prompts;
                        let (t, c) = judge.rate_answer(t, c).await;
                        (i, t, c)
                    });
                }
                let mut out = vec![None; readings.len()];
                while let Some(joined) = tasks.join_next().await {
                    let Ok((i, t, c)) = joined else {
                        tally.request_failed += 1;
                        continue;
                    };
                    match (tally.read(&t), tally.read(&c)) {
                        (Some(t), Some(c)) => {
                            tally.kept += 1;
                            out[i] = Some((t, c));
                        }
                        (None, _) => tally.drop_for(&t),
                        (Some(_), None) => tally.drop_for(&c),
                    }
                }
                out
            }
        }
    }
}

/// The chat prompt of a question, with an optional system prompt.
pub(super) fn question_prompt(model: &LoadedModel, system: Option<&str>, question: &str) -> ServiceResult<Vec<u32>> {
    let mut messages = Vec::new();
    if let Some(s) = system.filter(|s| !s.trim().is_empty()) {
        messages.push(Message::new("system", s.to_string()));
    }
    messages.push(Message::new("user", question.to_string()));
    let ids = resolve::tokenize(model, &resolve::render_chat(model, &messages)?)?;
    resolve::check_fits(model, ids.len())?;
    Ok(ids)
}

/// The trait definition behind a vector: the request's, else the library's by the vector's trait.
fn definition(
    state: &AppState,
    v: &StoredVector,
    given: Option<&pb::TraitDefinition>,
) -> ServiceResult<Option<TraitDef>> {
    match given {
        Some(d) => Ok(Some(traits::from_pb(d)?)),
        None => Ok(state.traits.get(&v.meta.trait_name).cloned()),
    }
}

/// How answers about `v` are scored: the judge when one is configured, not skipped, and the trait
/// has an eval prompt; otherwise offline, which needs the vector's calibration at its monitoring
/// layer.
fn judging(
    state: &AppState,
    v: &StoredVector,
    def: Option<&TraitDef>,
    skip_judge: bool,
) -> ServiceResult<(usize, Judging)> {
    let name = &v.meta.name;
    let monitoring = v.meta.recommended_layer.ok_or_else(|| {
        ServiceError::FailedPrecondition(format!(
            "vector `{name}` has no monitoring layer (imported, or extracted from too few rollouts): \
             import it with recommended_layer or extract it here"
        ))
    })?;
    if let (Some(judge), Some(def), false) = (&state.judge, def, skip_judge)
        && !def.eval_prompt.is_empty()
    {
        return Ok((monitoring, Judging::Judge { judge: judge.clone(), def: def.clone() }));
    }
    let judging = offline(v, monitoring, None, |why| {
        format!(
            "scoring without a judge reads calibrated projections, but {why}; configure a judge or extract the \
             vector here"
        )
    })?;
    Ok((monitoring, judging))
}

/// Offline scoring by `v` at its monitoring layer: its probe there and its response calibration;
/// `by` names a scoring vector other than the steered one; `refused` words the refusal of an
/// uncalibrated vector.
fn offline(
    v: &StoredVector,
    monitoring: usize,
    by: Option<String>,
    refused: impl FnOnce(String) -> String,
) -> ServiceResult<Judging> {
    let name = &v.meta.name;
    let cal = resolve::calibration_of(v, monitoring).map_err(|why| ServiceError::FailedPrecondition(refused(why)))?;
    let probe = Probe::new(monitoring, v.row(monitoring).unwrap_or_default())
        .ok_or_else(|| ServiceError::FailedPrecondition(format!("vector `{name}` is zero at layer {monitoring}")))?;
    Ok(Judging::Offline { probe, scale: cal.response, by })
}

/// Offline scoring with `name`, another stored calibrated vector (`score_with`): its monitoring
/// layer, its probe and scale, and the model that reads answers for it when that is not
/// `generator`'s.
fn judging_with(
    state: &AppState,
    name: &str,
    generator: &EngineHandle,
) -> ServiceResult<(usize, Judging, Option<Scorer>)> {
    let v = state.store.get(name)?;
    let engine = state.engine(&v.meta.model).map_err(|_| {
        ServiceError::FailedPrecondition(format!(
            "score_with: vector `{name}` belongs to model `{}`, which this server does not serve",
            v.meta.model
        ))
    })?;
    let monitoring = v.meta.recommended_layer.ok_or_else(|| {
        ServiceError::FailedPrecondition(format!("score_with: vector `{name}` has no monitoring layer"))
    })?;
    let by = Some(format!("`{name}` of `{}`", v.meta.model));
    let judging = offline(&v, monitoring, by, |why| format!("score_with reads calibrated projections, but {why}"))?;
    let scorer = (engine.model().id != generator.model().id).then(|| {
        let format = ReadFormat::resolve(pb::ReadingFormat::Auto, engine.model());
        (engine, format)
    });
    Ok((monitoring, judging, scorer))
}

/// A question posed in `format`: the chat prompt without a system prompt, or the plain-text
/// document `Question: …\nAnswer:`.
fn pose(model: &LoadedModel, format: ReadFormat, question: &str) -> ServiceResult<Vec<u32>> {
    match format {
        ReadFormat::Chat => question_prompt(model, None, question),
        ReadFormat::Plain => {
            let (ids, _) = format.tokens(model, question, "")?;
            resolve::check_fits(model, ids.len())?;
            Ok(ids)
        }
    }
}

fn check_coefficient(c: f32, what: &str) -> ServiceResult<()> {
    if !c.is_finite() || c.abs() > MAX_COEFFICIENT {
        return Err(invalid(format!(
            "{what} {c} is out of range: coefficients must be finite and within ±{MAX_COEFFICIENT}"
        )));
    }
    Ok(())
}

/// A stored response-average vector and the engine of its model.
fn vector_and_engine(state: &AppState, name: &str) -> ServiceResult<(Arc<StoredVector>, EngineHandle)> {
    if name.is_empty() {
        return Err(invalid("vector is required"));
    }
    let v = state.store.get(name)?;
    let engine = state.engine(&v.meta.model)?;
    let v = resolve::vector_for(&state.store, engine.model(), name)?;
    Ok((v, engine))
}

/// Mean trait expression and coherence (0-100) of one model's unsteered answers to questions.
pub struct Expression {
    pub trait_score: f32,
    pub coherence: f32,
    /// How answers were scored ([`Judging::describe`]).
    pub scorer: String,
    /// Whether `trait_score` is the calibrated response projection (the offline scorer).
    pub offline: bool,
}

/// Whose answers to score, and how.
pub struct ExpressionJob<'a> {
    pub generator: EngineHandle,
    pub reader: EngineHandle,
    pub questions: &'a [String],
    pub sampling: Option<&'a pb::SamplingParams>,
    /// Coherence relative to these figures (else the answers' own).
    pub reference: Option<Reference>,
    /// Steering while generating.
    pub steering: Option<SteeringPlan>,
}

/// The trait expression of `generator`'s answers to `questions`, each read by `reader` (the
/// model `v` belongs to) and scored as EvaluateSteering scores its unsteered cell: by the
/// judge when configured, else offline. Coherence is relative to the reader's own answers'
/// fluency when `reference` is given.
pub async fn expression(
    state: &AppState,
    v: &StoredVector,
    job: ExpressionJob<'_>,
) -> ServiceResult<(Expression, Reference)> {
    let ExpressionJob { generator, reader, questions, sampling, reference, steering } = job;
    let def = definition(state, v, None)?;
    let (monitoring, judging) = judging(state, v, def.as_ref(), false)?;
    let offline = matches!(judging, Judging::Offline { .. });
    let sampling = resolve::sampling(sampling, DEFAULT_ANSWER_TOKENS)?;
    let answerer = Arc::new(Answerer { reader, ..Answerer::new(generator, monitoring, judging, sampling) });
    let model = answerer.reader.model().clone();
    let mut tasks = JoinSet::new();
    for (i, q) in questions.iter().enumerate() {
        let prompt = question_prompt(&model, None, q)?;
        let plan = steering.clone().unwrap_or_else(|| SteeringPlan::new(model.config().n_residual_rows()));
        let ask = Ask { bare: prompt.clone(), prompt, plan, question: q.as_str().into(), sampling: None };
        let a = answerer.clone();
        tasks.spawn(async move { (i, a.answer(ask, i as u64).await) });
    }
    let mut readings = vec![Reading::default(); questions.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined.map_err(|e| ServiceError::Internal(e.to_string()))?;
        readings[i] = r?;
    }
    let own: Vec<(f32, f32)> = readings.iter().filter(|r| r.tokens > 0).map(|r| (r.mean_logprob, r.distinct)).collect();
    let reference = reference.unwrap_or_else(|| Reference::of(&own));
    let mut tally = Tally::default();
    let scores = answerer.score(&readings, |i| questions[i].clone(), reference, &mut tally).await;
    let kept: Vec<(f32, f32)> = scores.into_iter().flatten().collect();
    let n = kept.len().max(1) as f32;
    Ok((
        Expression {
            trait_score: kept.iter().map(|s| s.0).sum::<f32>() / n,
            coherence: kept.iter().map(|s| s.1).sum::<f32>() / n,
            scorer: answerer.judging.describe(monitoring),
            offline,
        },
        reference,
    ))
}

// ---------------------------------------------------------------------------------------------
// EvaluateSteering
// ---------------------------------------------------------------------------------------------

struct Sweep {
    state: Arc<AppState>,
    vector: Arc<StoredVector>,
    answerer: Arc<Answerer>,
    layers: Vec<usize>,
    coefficients: Vec<f32>,
    questions: Vec<String>,
    /// The trait's positive system prompt, for the suppression check.
    positive_system: Option<String>,
    fraction: f32,
    dry_run: bool,
    format: ReadFormat,
    baselines: Vec<pb::SamplingBaseline>,
    /// The seed of the sampling baselines.
    seed: u64,
}

/// Where a plain-text answer ends.
const PLAIN_STOPS: [&str; 3] = ["Question:", "Answer:", "\n\n"];

/// Most sampling baselines per evaluation.
const MAX_BASELINES: usize = 16;

type Tx = mpsc::Sender<Result<pb::EvaluateSteeringResponse, Status>>;

pub fn evaluate(
    state: Arc<AppState>,
    req: pb::EvaluateSteeringRequest,
) -> ServiceResult<ResponseStream<pb::EvaluateSteeringResponse>> {
    let (v, engine) = vector_and_engine(&state, &req.vector)?;
    let model = engine.model().clone();
    let n_layers = model.config().n_layers;
    let def = definition(&state, &v, req.definition.as_ref())?;
    let format = pb::ReadingFormat::try_from(req.format)
        .map_err(|_| invalid(format!("format: unknown value {}", req.format)))?;
    let format = ReadFormat::resolve(format, &model);
    let (monitoring, judging, scorer) = if req.score_with.is_empty() {
        let (monitoring, judging) = judging(&state, &v, def.as_ref(), req.skip_judge)?;
        (monitoring, judging, None)
    } else {
        judging_with(&state, &req.score_with, &engine)?
    };
    if req.sampling_baselines.len() > MAX_BASELINES {
        return Err(invalid(format!(
            "at most {MAX_BASELINES} sampling baselines, got {}",
            req.sampling_baselines.len()
        )));
    }
    for b in &req.sampling_baselines {
        if !b.temperature.is_finite() || b.temperature < 0.0 {
            return Err(invalid(format!("sampling baseline temperature must be >= 0, got {}", b.temperature)));
        }
        if !b.top_p.is_finite() || !(0.0..=1.0).contains(&b.top_p) {
            return Err(invalid(format!("sampling baseline top_p must be in [0, 1], got {}", b.top_p)));
        }
    }
    let mut questions = if !req.questions.is_empty() {
        req.questions.clone()
    } else {
        def.as_ref().map(|d| d.eval_questions.clone()).unwrap_or_default()
    };
    if questions.is_empty() {
        return Err(ServiceError::FailedPrecondition(format!(
            "no evaluation questions for vector `{}`: its trait `{}` is not in the library or has no eval_questions; \
             send questions or a definition",
            v.meta.name, v.meta.trait_name
        )));
    }
    if questions.iter().any(|q| q.trim().is_empty()) {
        return Err(invalid("questions must not be empty"));
    }
    questions.truncate(if req.max_questions == 0 { DEFAULT_QUESTIONS } else { req.max_questions as usize });
    let layers = if req.layers.is_empty() {
        default_layers(n_layers, v.meta.recommended_layer)
    } else {
        let mut l = req.layers.iter().map(|&l| resolve::check_layer(&model, l)).collect::<ServiceResult<Vec<_>>>()?;
        l.sort_unstable();
        l.dedup();
        l
    };
    let mut coefficients =
        if req.coefficients.is_empty() { DEFAULT_COEFFICIENTS.to_vec() } else { req.coefficients.clone() };
    for &c in &coefficients {
        check_coefficient(c, "coefficient")?;
    }
    coefficients.retain(|&c| c != 0.0);
    coefficients.sort_by(f32::total_cmp);
    coefficients.dedup();
    if coefficients.is_empty() {
        return Err(invalid("coefficients holds no non-zero value (0, the unsteered baseline, always runs)"));
    }
    let cells = layers.len() * coefficients.len();
    if cells > MAX_CELLS {
        return Err(invalid(format!(
            "{} layers x {} coefficients = {cells} cells; at most {MAX_CELLS} per evaluation",
            layers.len(),
            coefficients.len()
        )));
    }
    let fraction = match req.coherence_fraction {
        0.0 => DEFAULT_COHERENCE_FRACTION,
        f if f.is_finite() && f > 0.0 && f <= 1.0 => f,
        f => return Err(invalid(format!("coherence_fraction must be in (0, 1], got {f}"))),
    };
    let mut sampling = resolve::sampling(req.sampling.as_ref(), DEFAULT_ANSWER_TOKENS)?;
    let seed = sampling.config.seed.unwrap_or(0);
    // A base model continuing a question document goes on to write the next question, a second
    // answer, or another paragraph.
    if format == ReadFormat::Plain {
        sampling.stop.extend(PLAIN_STOPS.iter().map(|s| s.to_string()));
    }
    let positive_system =
        def.as_ref().filter(|d| !d.instruction.is_empty() && format == ReadFormat::Chat).map(|d| d.system_prompts(0).0);
    let sweep = Sweep {
        answerer: Arc::new(Answerer { scorer, ..Answerer::new(engine, monitoring, judging, sampling) }),
        state,
        vector: v,
        layers,
        coefficients,
        questions,
        positive_system,
        fraction,
        dry_run: req.dry_run,
        format,
        baselines: req.sampling_baselines.clone(),
        seed,
    };
    let name = sweep.vector.meta.name.clone();
    Ok(super::spawn_job("steering evaluation", name, move |tx| async move { sweep.run(&tx).await }))
}

async fn progress(tx: &Tx, stage: &str, done: usize, total: usize, started: Instant) -> ServiceResult<()> {
    let (elapsed, eta_secs) = super::elapsed_and_eta(started, done, total);
    let p = pb::EvalProgress {
        done: done as u32,
        total: total as u32,
        stage: stage.into(),
        elapsed_secs: elapsed,
        eta_secs,
    };
    let msg = pb::EvaluateSteeringResponse { event: Some(pb::evaluate_steering_response::Event::Progress(p)) };
    // A client that left drops the receiver: failing here drops the task set, which aborts the
    // generations in flight and so frees their engine slots.
    tx.send(Ok(msg)).await.map_err(|_| ServiceError::client_left())
}

/// Mean trait and coherence over a cell's scored answers.
fn cell(
    layer: usize,
    coefficient: f32,
    scores: &[Option<(f32, f32)>],
    readings: &[&Reading],
    min_coherence: f32,
) -> pb::EvalCell {
    let kept: Vec<(f32, f32)> = scores.iter().flatten().copied().collect();
    // An empty f32 sum is -0.0; a cell without scored answers reads 0.
    let mean = |f: fn(&(f32, f32)) -> f32| {
        if kept.is_empty() { 0.0 } else { kept.iter().map(f).sum::<f32>() / kept.len() as f32 }
    };
    let (trait_score, coherence) = (mean(|s| s.0), mean(|s| s.1));
    // Sample standard deviation (0 with fewer than two answers).
    let sd = |f: fn(&(f32, f32)) -> f32, m: f32| {
        if kept.len() < 2 {
            return 0.0;
        }
        (kept.iter().map(|s| (f(s) - m).powi(2)).sum::<f32>() / (kept.len() - 1) as f32).sqrt()
    };
    let (trait_sd, coherence_sd) = (sd(|s| s.0, trait_score), sd(|s| s.1, coherence));
    let m = readings.len().max(1) as f32;
    pb::EvalCell {
        layer: layer as u32,
        coefficient,
        trait_score,
        coherence,
        mean_logprob: readings.iter().map(|r| r.mean_logprob).sum::<f32>() / m,
        distinct_bigrams: readings.iter().map(|r| r.distinct).sum::<f32>() / m,
        answers: kept.len() as u32,
        coherent: !kept.is_empty() && coherence >= min_coherence,
        example: readings.first().map(|r| r.text.clone()).unwrap_or_default(),
        trait_sd,
        coherence_sd,
    }
}

impl Sweep {
    fn plan(&self, layer: usize, coefficient: f32) -> SteeringPlan {
        let mut plan = SteeringPlan::new(self.answerer.engine.model().config().n_residual_rows());
        plan.add(layer, self.vector.row(layer).unwrap_or_default(), coefficient, Phase::All);
        plan
    }

    /// Generates and reads every ask, `stage` naming the progress.
    async fn answer_all(&self, asks: Vec<Ask>, stage: &str, tx: &Tx) -> ServiceResult<Vec<Reading>> {
        let started = Instant::now();
        let total = asks.len();
        let mut tasks = JoinSet::new();
        for (i, ask) in asks.into_iter().enumerate() {
            let answerer = self.answerer.clone();
            tasks.spawn(async move { (i, answerer.answer(ask, i as u64).await) });
        }
        progress(tx, stage, 0, total, started).await?;
        let mut out: Vec<Option<Reading>> = vec![None; total];
        let mut done = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, r) = joined.map_err(|e| ServiceError::Internal(e.to_string()))?;
            out[i] = Some(r?);
            done += 1;
            progress(tx, stage, done, total, started).await?;
        }
        Ok(out.into_iter().map(|r| r.expect("every task reports once")).collect())
    }

    async fn run(self, tx: &Tx) -> ServiceResult<()> {
        let started = Instant::now();
        let model = self.answerer.engine.model().clone();
        let bare: Vec<Vec<u32>> =
            self.questions.iter().map(|q| pose(&model, self.format, q)).collect::<ServiceResult<_>>()?;
        let texts: Vec<Arc<str>> = self.questions.iter().map(|q| Arc::from(q.as_str())).collect();
        let nq = self.questions.len();
        // Baseline (coefficient 0) first, then every cell, layer-major, then the sampling
        // baselines; each over every question.
        let mut points = vec![(0usize, 0f32)];
        points.extend(self.layers.iter().flat_map(|&l| self.coefficients.iter().map(move |&c| (l, c))));
        let mut asks = Vec::with_capacity((points.len() + self.baselines.len()) * nq);
        for &(l, c) in &points {
            asks.extend(bare.iter().zip(&texts).map(|(b, q)| Ask {
                prompt: b.clone(),
                bare: b.clone(),
                plan: self.plan(l, c),
                question: q.clone(),
                sampling: None,
            }));
        }
        for b in &self.baselines {
            let sampling =
                SamplingConfig { temperature: b.temperature, top_p: b.top_p, top_k: 0, seed: Some(self.seed) };
            asks.extend(bare.iter().zip(&texts).map(|(p, q)| Ask {
                prompt: p.clone(),
                bare: p.clone(),
                plan: self.plan(0, 0.0),
                question: q.clone(),
                sampling: Some(sampling.clone()),
            }));
        }
        let readings = self.answer_all(asks, "sweep", tx).await?;
        let baseline: Vec<(f32, f32)> =
            readings[..nq].iter().filter(|r| r.tokens > 0).map(|r| (r.mean_logprob, r.distinct)).collect();
        let reference = Reference::of(&baseline);
        let mut tally = Tally::default();
        let scores = self.answerer.score(&readings, |i| self.questions[i % nq].clone(), reference, &mut tally).await;
        let per_point =
            |p: usize| (&scores[p * nq..(p + 1) * nq], readings[p * nq..(p + 1) * nq].iter().collect::<Vec<_>>());

        let (s0, r0) = per_point(0);
        let unsteered = cell(0, 0.0, s0, &r0, 0.0);
        let min_coherence = self.fraction * unsteered.coherence;
        let cells: Vec<pb::EvalCell> = points[1..]
            .iter()
            .enumerate()
            .map(|(k, &(l, c))| {
                let (s, r) = per_point(k + 1);
                cell(l, c, s, &r, min_coherence)
            })
            .collect();
        let sampling_baselines = self
            .baselines
            .iter()
            .enumerate()
            .map(|(k, b)| {
                let (s, r) = per_point(points.len() + k);
                pb::BaselineCell {
                    temperature: b.temperature,
                    top_p: b.top_p,
                    cell: Some(cell(0, 0.0, s, &r, min_coherence)),
                }
            })
            .collect();
        let scored: Vec<CellScore> = cells
            .iter()
            .filter(|c| c.answers > 0)
            .map(|c| CellScore {
                layer: c.layer as usize,
                coefficient: c.coefficient,
                trait_score: c.trait_score,
                coherence: c.coherence,
            })
            .collect();
        let picks = recommend(&scored, unsteered.trait_score, min_coherence);
        let scorer = self.answerer.judging.describe(self.answerer.monitoring);
        let recommendation = picks.first().map(|best| SteeringRecommendation {
            layer: best.layer,
            coefficient: best.coefficient,
            trait_score: best.trait_score,
            unsteered_trait_score: unsteered.trait_score,
            coherence: best.coherence,
            unsteered_coherence: unsteered.coherence,
            scorer: scorer.clone(),
            evaluated_unix: unix_now(),
            layers: picks.clone(),
            grid: scored.clone(),
            coherence_threshold: min_coherence,
        });
        let suppression = match (&recommendation, &self.positive_system) {
            (Some(r), Some(system)) => self.suppression(r, system, &bare, reference, &mut tally, tx).await?,
            _ => Vec::new(),
        };
        let note = match &recommendation {
            Some(_) => String::new(),
            None if unsteered.answers == 0 => format!(
                "the judge scored none of the {nq} unsteered answers ({}); nothing to compare with, nothing recommended",
                tally.describe()
            ),
            None => format!(
                "no positive coefficient raised the trait score above the unsteered {:.1} while keeping coherence at \
                 or above {min_coherence:.1} ({}% of the unsteered {:.1}); nothing recommended",
                unsteered.trait_score,
                (self.fraction * 100.0).round(),
                unsteered.coherence
            ),
        };
        let stored = match &recommendation {
            Some(r) if !self.dry_run => self.store(r.clone()).await?,
            _ => false,
        };
        let judged = matches!(self.answerer.judging, Judging::Judge { .. });
        let result = pb::EvaluateSteeringResult {
            vector: self.vector.meta.name.clone(),
            monitoring_layer: self.answerer.monitoring as u32,
            generated_tokens: readings.iter().map(|r| r.tokens as u64).sum(),
            unsteered: Some(unsteered),
            cells,
            recommendation: recommendation.as_ref().map(resolve::recommendation_to_pb),
            coherence_threshold: min_coherence,
            suppression,
            questions: self.questions.clone(),
            scorer,
            judge: judged.then(|| tally_to_pb(&tally)),
            stored,
            elapsed_secs: started.elapsed().as_secs_f64(),
            note,
            sampling_baselines,
            format: self.format.name().to_string(),
        };
        tracing::info!(
            vector = %result.vector, secs = result.elapsed_secs,
            layer = ?recommendation.as_ref().map(|r| r.layer), coefficient = ?recommendation.as_ref().map(|r| r.coefficient),
            "steering evaluation done"
        );
        let msg = pb::EvaluateSteeringResponse { event: Some(pb::evaluate_steering_response::Event::Result(result)) };
        tx.send(Ok(msg)).await.map_err(|_| ServiceError::client_left())
    }

    /// The trait's positive system prompt, unsteered and then steered against the trait (−c and
    /// −2c at the recommended layer): negative steering should lower the trait score.
    async fn suppression(
        &self,
        r: &SteeringRecommendation,
        system: &str,
        bare: &[Vec<u32>],
        reference: Reference,
        tally: &mut Tally,
        tx: &Tx,
    ) -> ServiceResult<Vec<pb::SuppressionCheck>> {
        let model = self.answerer.engine.model().clone();
        let coefficients = [0.0, -r.coefficient, -2.0 * r.coefficient];
        let mut asks = Vec::new();
        for &c in &coefficients {
            for (q, b) in self.questions.iter().zip(bare) {
                asks.push(Ask {
                    prompt: question_prompt(&model, Some(system), q)?,
                    bare: b.clone(),
                    plan: self.plan(r.layer, c),
                    question: q.as_str().into(),
                    sampling: None,
                });
            }
        }
        let readings = self.answer_all(asks, "suppression", tx).await?;
        let nq = self.questions.len();
        let scores = self.answerer.score(&readings, |i| self.questions[i % nq].clone(), reference, tally).await;
        Ok(coefficients
            .iter()
            .enumerate()
            .map(|(k, &c)| {
                let rs: Vec<&Reading> = readings[k * nq..(k + 1) * nq].iter().collect();
                let cl = cell(r.layer, c, &scores[k * nq..(k + 1) * nq], &rs, 0.0);
                pb::SuppressionCheck {
                    layer: r.layer as u32,
                    coefficient: c,
                    trait_score: cl.trait_score,
                    coherence: cl.coherence,
                }
            })
            .collect())
    }

    /// Stores the recommendation with the vector, unless the vector changed meanwhile (then the
    /// recommendation would describe other values). Returns whether it was stored.
    async fn store(&self, r: SteeringRecommendation) -> ServiceResult<bool> {
        let current = self.state.store.get(&self.vector.meta.name)?;
        if current.values != self.vector.values || current.meta.created_unix != self.vector.meta.created_unix {
            tracing::warn!(vector = %self.vector.meta.name, "vector replaced during its evaluation; recommendation not stored");
            return Ok(false);
        }
        let mut updated = (*current).clone();
        updated.meta.steering = Some(r);
        vectors::store_put(&self.state.store, updated, true).await?;
        Ok(true)
    }
}

// ---------------------------------------------------------------------------------------------
// SteeringSpectrum
// ---------------------------------------------------------------------------------------------

pub async fn spectrum(
    state: &AppState,
    req: pb::SteeringSpectrumRequest,
) -> ServiceResult<pb::SteeringSpectrumResponse> {
    let (v, engine) = vector_and_engine(state, &req.vector)?;
    let model = engine.model().clone();
    if req.question.trim().is_empty() {
        return Err(invalid("question is required"));
    }
    if let Some(c) = req.coefficient {
        check_coefficient(c, "coefficient")?;
    }
    let (layer, layer_source, coefficient, coefficient_source) =
        resolve::steer_point(&model, &v, req.layer, req.coefficient)?;
    let multipliers = if req.multipliers.is_empty() { DEFAULT_MULTIPLIERS.to_vec() } else { req.multipliers.clone() };
    if multipliers.len() > MAX_MULTIPLIERS {
        return Err(invalid(format!("at most {MAX_MULTIPLIERS} multipliers, got {}", multipliers.len())));
    }
    for &m in &multipliers {
        check_coefficient(m * coefficient, "multiplier x coefficient")?;
    }
    let def = definition(state, &v, None)?;
    let (monitoring, judging) = judging(state, &v, def.as_ref(), req.skip_judge)?;
    let sampling = resolve::sampling(req.sampling.as_ref(), DEFAULT_ANSWER_TOKENS)?;
    let answerer = Arc::new(Answerer::new(engine.clone(), monitoring, judging, sampling));
    let prompt = question_prompt(&model, Some(&req.system), &req.question)?;
    let bare = question_prompt(&model, None, &req.question)?;
    let row = v.row(layer).unwrap_or_default().to_vec();
    // All points are submitted at once, so the engine decodes them as one batch.
    let mut tasks = JoinSet::new();
    for (i, &m) in multipliers.iter().enumerate() {
        let mut plan = SteeringPlan::new(model.config().n_residual_rows());
        plan.add(layer, &row, m * coefficient, Phase::All);
        let ask = Ask {
            prompt: prompt.clone(),
            bare: bare.clone(),
            plan,
            question: req.question.as_str().into(),
            sampling: None,
        };
        let answerer = answerer.clone();
        tasks.spawn(async move { (i, answerer.answer(ask, 0).await) });
    }
    let mut readings: Vec<Reading> = vec![Reading::default(); multipliers.len()];
    while let Some(joined) = tasks.join_next().await {
        let (i, r) = joined.map_err(|e| ServiceError::Internal(e.to_string()))?;
        readings[i] = r?;
    }
    let reference = multipliers
        .iter()
        .position(|&m| m == 0.0)
        .filter(|&i| readings[i].tokens > 0)
        .map_or(Reference::DEFAULT, |i| Reference::of(&[(readings[i].mean_logprob, readings[i].distinct)]));
    let mut tally = Tally::default();
    let scores = answerer.score(&readings, |_| req.question.clone(), reference, &mut tally).await;
    let points = multipliers
        .iter()
        .zip(readings)
        .zip(scores)
        .map(|((&m, r), s)| pb::SpectrumPoint {
            multiplier: m,
            coefficient: m * coefficient,
            answer: r.text,
            trait_score: s.map_or(0.0, |s| s.0),
            coherence: s.map_or(0.0, |s| s.1),
            mean_logprob: r.mean_logprob,
            scored: s.is_some(),
        })
        .collect();
    Ok(pb::SteeringSpectrumResponse {
        vector: v.meta.name.clone(),
        layer: layer as u32,
        coefficient,
        points,
        scorer: answerer.judging.describe(monitoring),
        source: format!("layer from the {layer_source}, coefficient from the {coefficient_source}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_reports_the_spread_of_its_scored_answers() {
        let readings = [Reading::default(), Reading::default(), Reading::default()];
        let refs: Vec<&Reading> = readings.iter().collect();
        let c = cell(3, 2.0, &[Some((10.0, 50.0)), None, Some((30.0, 90.0))], &refs, 60.0);
        assert_eq!((c.trait_score, c.coherence, c.answers, c.coherent), (20.0, 70.0, 2, true));
        assert!((c.trait_sd - 200f32.sqrt()).abs() < 1e-4, "{}", c.trait_sd);
        assert!((c.coherence_sd - 800f32.sqrt()).abs() < 1e-4, "{}", c.coherence_sd);
        let one = cell(3, 2.0, &[Some((10.0, 50.0))], &refs[..1], 0.0);
        assert_eq!((one.trait_sd, one.coherence_sd), (0.0, 0.0), "one answer has no spread");
    }

    #[test]
    fn default_layers_spread_over_the_depth_plus_the_monitoring_layer() {
        assert_eq!(default_layers(30, Some(28)), [8, 11, 14, 17, 20, 23, 26, 28]);
        assert_eq!(default_layers(30, Some(14)), [8, 11, 14, 17, 20, 23, 26]);
        assert_eq!(default_layers(4, None), [1]);
    }
}
