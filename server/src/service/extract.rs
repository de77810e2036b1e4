//! ExtractVector: roll out answers under contrastive system prompts on the batched engine,
//! optionally filter them with the judge, capture the residual stream over prompt and answer, and
//! store mean(pos) − mean(neg) per layer for three activation summaries, each with per-layer
//! separation scores and a recommended layer.
//!
//! In reading mode the rollouts are written (and judged) as usual, by this model or another
//! served one, and this model then *reads* each question and answer teacher-forced without the
//! system prompt ([`reading`](super::reading)); its activations while reading are what is
//! averaged.

use super::reading::ReadFormat;
use super::{AppState, ResponseStream, resolve, traits, vectors};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::judge::{Judge, Outcome, Tally, coherence_prompt};
use crate::model::chat::Message;
use crate::scheduler::{CaptureJob, CaptureResult, EngineHandle, GenEvent, GenerateJob, Summary};
use crate::steering::calibration::{calibrate_projections, projections_per_layer};
use crate::steering::comparison;
use crate::steering::plan::SteeringPlan;
use crate::steering::separation::{auroc, cohens_d, recommend};
use crate::steering::store::{LayerScore, StoredVector, VectorKind, VectorMeta, validate_name};
use crate::support::unix_now;
use crate::traits::TraitDef;
use persona_proto::v1 as pb;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tonic::Status;

/// New tokens per rollout when the request does not say.
const DEFAULT_ROLLOUT_TOKENS: usize = 64;
/// Upper bound on rollouts per request (pairs × questions × samples × 2).
const MAX_ROLLOUTS: usize = 20_000;
const DEFAULT_THRESHOLD: f32 = 50.0;
/// Random directions per layer behind a comparison's chance level.
const RANDOM_DIRECTIONS: usize = 200;
const KINDS: [(VectorKind, &str); 3] =
    [(VectorKind::ResponseAvg, ""), (VectorKind::PromptAvg, ".prompt_avg"), (VectorKind::PromptLast, ".prompt_last")];

/// What one extraction rolls out.
struct Spec {
    name: String,
    trait_name: String,
    /// Full system prompts (positive, negative).
    pairs: Vec<(String, String)>,
    questions: Vec<String>,
    samples: usize,
    /// The trait definition, when the request named or sent one (its eval prompt drives the judge).
    def: Option<TraitDef>,
    origin: String,
}

struct Rollout {
    positive: bool,
    question: usize,
    /// The rendered and tokenized system prompt + question.
    prompt: Vec<u32>,
}

/// One rollout after generation and judging: its answer (re-read for calibration) and whether it
/// is kept. Its activation summaries went into the running sums and are gone.
struct Answer {
    /// The prompt the answer was read after: the rollout's (system prompt + question), or in
    /// reading mode the reading model's question.
    prompt: Vec<u32>,
    ids: Vec<u32>,
    /// How many of `ids` were run through the model during generation: all but a last token that
    /// was sampled and then ended the generation (length, context or a stop string). The
    /// generation's summaries cover these only, and so does the held-out re-reading.
    fed: usize,
    kept: bool,
}

fn spec(state: &AppState, req: &pb::ExtractVectorRequest) -> ServiceResult<Spec> {
    let (def, origin) = match &req.trait_source {
        Some(pb::extract_vector_request::TraitSource::TraitRef(name)) => {
            let def = state.traits.get(name).cloned().ok_or_else(|| {
                let known: Vec<&str> = state.traits.names().collect();
                ServiceError::NotFound(format!("trait `{name}` is not in the library (known: {})", known.join(", ")))
            })?;
            (Some(def), format!("trait `{name}` from the library"))
        }
        Some(pb::extract_vector_request::TraitSource::Definition(d)) => {
            let def = traits::from_pb(d)?;
            let origin = format!("trait `{}` defined in the request", def.name);
            (Some(def), origin)
        }
        None => (None, "explicit instruction pairs".to_string()),
    };
    let (mut pairs, mut questions, trait_name) = match &def {
        Some(d) => {
            if !req.pairs.is_empty() || !req.questions.is_empty() {
                return Err(invalid("give either a trait or explicit pairs and questions, not both"));
            }
            let pairs: Vec<_> = (0..d.instruction.len()).map(|i| d.system_prompts(i)).collect();
            (pairs, d.questions.clone(), d.name.clone())
        }
        None => {
            if req.pairs.is_empty() || req.questions.is_empty() {
                return Err(invalid(
                    "extraction needs a trait (trait_ref or definition) or at least one instruction pair and one question",
                ));
            }
            if req.pairs.iter().any(|p| p.pos.trim().is_empty() || p.neg.trim().is_empty()) {
                return Err(invalid("every instruction pair needs non-empty pos and neg prompts"));
            }
            if req.questions.iter().any(|q| q.trim().is_empty()) {
                return Err(invalid("questions must not be empty"));
            }
            let pairs = req.pairs.iter().map(|p| (p.pos.clone(), p.neg.clone())).collect();
            (pairs, req.questions.clone(), req.trait_name.clone())
        }
    };
    if req.max_pairs > 0 {
        pairs.truncate(req.max_pairs as usize);
    }
    if req.max_questions > 0 {
        questions.truncate(req.max_questions as usize);
    }
    let samples = req.samples_per_question.max(1) as usize;
    let total = pairs.len() * questions.len() * samples * 2;
    if total > MAX_ROLLOUTS {
        return Err(invalid(format!("{total} rollouts requested; the limit is {MAX_ROLLOUTS}")));
    }
    let name = if req.name.is_empty() && def.is_some() { trait_name.clone() } else { req.name.clone() };
    Ok(Spec { name, trait_name, pairs, questions, samples, def, origin })
}

pub fn extract(
    state: Arc<AppState>,
    req: pb::ExtractVectorRequest,
) -> ServiceResult<ResponseStream<pb::ExtractVectorResponse>> {
    let engine = state.engine(&req.model)?;
    let spec = spec(&state, &req)?;
    // Reading mode: who writes the rollouts, and how this model reads them.
    let (writer, reading) = match &req.reading {
        Some(r) => {
            let writer = if r.rollouts_from.is_empty() { engine.clone() } else { state.engine(&r.rollouts_from)? };
            let format = pb::ReadingFormat::try_from(r.format)
                .map_err(|_| invalid(format!("reading.format: unknown value {}", r.format)))?;
            (writer, Some(ReadFormat::resolve(format, engine.model())))
        }
        None => (engine.clone(), None),
    };
    validate_name(&spec.name)?;
    for (_, suffix) in KINDS.iter().take(stored_kinds(req.reading.is_some())) {
        let name = format!("{}{suffix}", spec.name);
        validate_name(&name)?;
        if !req.overwrite && state.store.get(&name).is_ok() {
            return Err(ServiceError::AlreadyExists(format!(
                "vector `{name}` already exists (set overwrite to replace it)"
            )));
        }
    }
    let compare = req
        .compare
        .iter()
        .map(|name| resolve::vector_for(&state.store, engine.model(), name))
        .collect::<ServiceResult<Vec<_>>>()?;
    let judge = match (&state.judge, &spec.def, req.skip_judge) {
        (Some(j), Some(d), false) if !d.eval_prompt.is_empty() => Some(j.clone()),
        _ => None,
    };
    let thresholds = (threshold(req.trait_threshold, "trait")?, threshold(req.coherence_threshold, "coherence")?);
    let sampling = resolve::sampling(req.sampling.as_ref(), DEFAULT_ROLLOUT_TOKENS)?;
    // Prompts are rendered and tokenized here, so a bad template or an over-long prompt fails the
    // call before anything streams.
    let model = writer.model();
    let mut rollouts = Vec::new();
    for (pos, neg) in &spec.pairs {
        for (qi, q) in spec.questions.iter().enumerate() {
            for (positive, system) in [(true, pos), (false, neg)] {
                let messages = [Message::new("system", system.clone()), Message::new("user", q.clone())];
                let prompt = resolve::tokenize(model, &resolve::render_chat(model, &messages)?)?;
                resolve::check_fits(model, prompt.len())?;
                for _ in 0..spec.samples {
                    rollouts.push(Rollout { positive, question: qi, prompt: prompt.clone() });
                }
            }
        }
    }
    let filtering = match (&judge, &state.judge, &spec.def) {
        (Some(j), ..) => format!(
            "judged by `{}`: positive answers with trait score >= {}, negative below, both coherence >= {}",
            j.model(),
            thresholds.0,
            thresholds.1
        ),
        (None, None, _) => "no judge configured: answers were not filtered".to_string(),
        (None, Some(_), _) if req.skip_judge => "judge skipped on request: answers were not filtered".to_string(),
        (None, Some(_), _) => "no eval prompt for these pairs: answers were not filtered".to_string(),
    };
    let job = Job {
        state,
        engine,
        writer,
        reading,
        spec,
        rollouts,
        sampling,
        judge,
        thresholds,
        filtering,
        overwrite: req.overwrite,
        compare,
    };
    let name = job.spec.name.clone();
    Ok(super::spawn_job("extraction", name, move |tx| job.run(tx)))
}

fn threshold(v: f32, what: &str) -> ServiceResult<f32> {
    match v {
        0.0 => Ok(DEFAULT_THRESHOLD),
        v if v.is_finite() && (0.0..=100.0).contains(&v) => Ok(v),
        v => Err(invalid(format!("{what}_threshold must be in 0..=100, got {v}"))),
    }
}

type Tx = mpsc::Sender<Result<pb::ExtractVectorResponse, Status>>;

async fn send(tx: &Tx, event: pb::extract_vector_response::Event) -> ServiceResult<()> {
    let msg = pb::ExtractVectorResponse { event: Some(event) };
    tx.send(Ok(msg)).await.map_err(|_| ServiceError::client_left())
}

async fn progress(tx: &Tx, stage: &str, done: usize, total: usize, started: Instant) -> ServiceResult<()> {
    let (elapsed, eta_secs) = super::elapsed_and_eta(started, done, total);
    let p = pb::ExtractProgress {
        done: done as u32,
        total: total as u32,
        stage: stage.into(),
        elapsed_secs: elapsed,
        eta_secs,
    };
    send(tx, pb::extract_vector_response::Event::Progress(p)).await
}

/// Runs one generation to the end and returns its tokens without end-of-turn markers, and its
/// summary.
pub async fn complete(engine: &EngineHandle, job: GenerateJob) -> ServiceResult<(Vec<u32>, Option<Summary>)> {
    let mut rx = engine.generate(job)?;
    let (mut ids, mut summary) = (Vec::new(), None);
    while let Some(ev) = rx.recv().await {
        match ev? {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(s) => {
                summary = Some(s);
                break;
            }
        }
    }
    ids.retain(|&id| !engine.model().tokenizer.is_eos(id));
    Ok((ids, summary))
}

/// Whether rollouts of question `q` are held out for scoring layers: every fifth question, or the
/// last one when there are fewer than five (none when there is only one).
fn held_out(q: usize, n_questions: usize) -> bool {
    match n_questions {
        0 | 1 => false,
        2..=4 => q == n_questions - 1,
        _ => q % 5 == 4,
    }
}

fn activations(c: &CaptureResult, kind: VectorKind) -> Option<&[f32]> {
    match kind {
        VectorKind::ResponseAvg => c.response_avg.as_deref(),
        VectorKind::PromptAvg => Some(&c.prompt_avg),
        VectorKind::PromptLast => Some(&c.prompt_last),
    }
}

/// Running sums of the three activation summaries (in [`KINDS`] order) over the kept rollouts,
/// per side, over all questions and over the training (not held-out) ones. Their size depends on
/// the model, not on how many rollouts an extraction has.
struct Sums {
    len: usize,
    /// `[kind][side]` (side 0: positive), summed in f64.
    all: Vec<[Vec<f64>; 2]>,
    train: Vec<[Vec<f64>; 2]>,
    n_all: Vec<[usize; 2]>,
    n_train: Vec<[usize; 2]>,
    n_held: Vec<[usize; 2]>,
}

fn side(positive: bool) -> usize {
    usize::from(!positive)
}

impl Sums {
    fn new(len: usize) -> Self {
        let zeros = || -> Vec<[Vec<f64>; 2]> { KINDS.iter().map(|_| [vec![0.0; len], vec![0.0; len]]).collect() };
        let counts = || vec![[0usize; 2]; KINDS.len()];
        Self { len, all: zeros(), train: zeros(), n_all: counts(), n_train: counts(), n_held: counts() }
    }

    fn add(&mut self, capture: &CaptureResult, positive: bool, held: bool) {
        let s = side(positive);
        for (k, (kind, _)) in KINDS.iter().enumerate() {
            let Some(a) = activations(capture, *kind) else { continue };
            let add = |sum: &mut Vec<f64>| sum.iter_mut().zip(a).for_each(|(t, &v)| *t += f64::from(v));
            add(&mut self.all[k][s]);
            self.n_all[k][s] += 1;
            if held {
                self.n_held[k][s] += 1;
            } else {
                add(&mut self.train[k][s]);
                self.n_train[k][s] += 1;
            }
        }
    }

    /// mean(positive) − mean(negative) of kind `k`, over all kept rollouts or the training ones.
    fn difference(&self, k: usize, train: bool) -> Vec<f32> {
        let (sums, n) = if train { (&self.train[k], &self.n_train[k]) } else { (&self.all[k], &self.n_all[k]) };
        let (p, q) = (n[0].max(1) as f64, n[1].max(1) as f64);
        (0..self.len).map(|i| (sums[0][i] / p - sums[1][i] / q) as f32).collect()
    }

    /// Whether kind `k` has training and held-out rollouts on both sides.
    fn splits(&self, k: usize) -> bool {
        self.n_train[k].iter().chain(&self.n_held[k]).all(|&n| n > 0)
    }
}

/// Per-layer projection lists of one kind, per side: `[side][layer]`.
type SideProjections = [Vec<Vec<f32>>; 2];

fn empty_projections(n_rows: usize) -> Vec<SideProjections> {
    KINDS.iter().map(|_| [vec![Vec::new(); n_rows], vec![Vec::new(); n_rows]]).collect()
}

/// Adds one rollout's per-layer projections (none at a layer that has none) to its side's lists.
fn push_projections(into: &mut SideProjections, positive: bool, projections: Vec<Vec<f32>>) {
    for (list, p) in into[side(positive)].iter_mut().zip(projections) {
        list.extend(p);
    }
}

/// What the second pass over the kept rollouts leaves: projections only, per kind.
struct Readings {
    /// Re-read response averages on the stored vector (calibration of response scores).
    response: Vec<SideProjections>,
    /// Last prompt tokens on the stored vector (calibration of prompt scores).
    prompt_last: Vec<SideProjections>,
    /// Held-out rollouts on the training direction (or, without a split, every kept rollout on
    /// the stored vector): the layer scores.
    scored: Vec<SideProjections>,
    /// With comparisons: the response averages of the rollouts the response layer scores read,
    /// per side.
    scored_activations: [Vec<Vec<f32>>; 2],
}

/// How many of [`KINDS`] an extraction stores: all, or in reading mode the response average only
/// (both sides read the same question, so the prompt summaries do not differ between them).
fn stored_kinds(reading: bool) -> usize {
    if reading { 1 } else { KINDS.len() }
}

struct Job {
    state: Arc<AppState>,
    /// The model the vector is extracted from (and stored for).
    engine: EngineHandle,
    /// The model that writes the rollouts: `engine` unless reading another model's.
    writer: EngineHandle,
    /// Reading mode: how `engine` reads the written rollouts.
    reading: Option<ReadFormat>,
    spec: Spec,
    rollouts: Vec<Rollout>,
    sampling: resolve::Sampling,
    judge: Option<Arc<Judge>>,
    thresholds: (f32, f32),
    filtering: String,
    overwrite: bool,
    /// Stored vectors of this model to compare with the extracted one.
    compare: Vec<Arc<StoredVector>>,
}

impl Job {
    fn kinds(&self) -> usize {
        stored_kinds(self.reading.is_some())
    }

    async fn run(self, tx: Tx) -> ServiceResult<()> {
        let started = Instant::now();
        let (answers, sums, tally) = self.roll_out(&tx).await?;
        let kept = |positive: bool| {
            (0..answers.len()).filter(|&i| answers[i].kept && self.rollouts[i].positive == positive).count()
        };
        let (kept_pos, kept_neg) = (kept(true), kept(false));
        if kept_pos == 0 || kept_neg == 0 {
            let why =
                tally.as_ref().map(|t| format!(" ({} of {} answers: {})", t.dropped(), answers.len(), t.describe()));
            return Err(ServiceError::FailedPrecondition(format!(
                "after judge filtering {kept_pos} positive and {kept_neg} negative rollouts remain{}; \
                 both sides need at least one (lower the thresholds or add pairs and questions)",
                why.unwrap_or_default()
            )));
        }
        let values: Vec<Vec<f32>> = (0..KINDS.len()).map(|k| sums.difference(k, false)).collect();
        let readings = self.read_again(&answers, &sums, &values, &tx).await?;
        let stage = Instant::now();
        progress(&tx, "store", 0, self.kinds(), stage).await?;
        let mut stored = Vec::new();
        for (k, (kind, suffix)) in KINDS.into_iter().enumerate().take(self.kinds()) {
            let vector = self.vector(k, kind, suffix, &sums, values[k].clone(), &readings);
            stored.push(vectors::store_put(&self.state.store, vector, self.overwrite).await?);
            progress(&tx, "store", k + 1, self.kinds(), stage).await?;
        }
        let (comparisons, random_baseline) = self.comparisons(&values[0], &sums, &readings);
        let mut infos = stored.iter().map(|v| resolve::vector_info(v));
        let result = pb::ExtractResult {
            vector: infos.next(),
            variants: infos.collect(),
            rollouts: answers.len() as u32,
            kept_pos: kept_pos as u32,
            kept_neg: kept_neg as u32,
            filtering: self.filtering.clone(),
            elapsed_secs: started.elapsed().as_secs_f64(),
            generated_tokens: answers.iter().map(|a| a.ids.len() as u64).sum(),
            judge: tally.as_ref().map(tally_to_pb),
            comparisons,
            random_baseline,
        };
        tracing::info!(
            vector = %self.spec.name, rollouts = answers.len(), kept_pos, kept_neg,
            secs = result.elapsed_secs, "extraction done"
        );
        send(&tx, pb::extract_vector_response::Event::Result(result)).await
    }

    /// Generates every rollout (at most a batch's worth at once, so other users keep queue room),
    /// summarising the hidden states of every layer over prompt and answer in the same pass; the
    /// judge, when there is one, scores each answer as soon as it exists. A kept rollout's
    /// summaries go into running sums and are dropped, so memory does not grow with the number of
    /// rollouts (only the answers' token ids are kept, for the second pass).
    async fn roll_out(&self, tx: &Tx) -> ServiceResult<(Vec<Answer>, Sums, Option<Tally>)> {
        let started = Instant::now();
        let model = self.engine.model().clone();
        let c = model.config();
        let total = self.rollouts.len();
        let writer_rows = self.writer.model().config().n_residual_rows();
        let permits = Arc::new(Semaphore::new(self.engine.max_batch()));
        let mut tasks = JoinSet::new();
        for (i, r) in self.rollouts.iter().enumerate() {
            let job = GenerateJob {
                span: tracing::Span::current(),
                prompt: r.prompt.clone(),
                max_tokens: self.sampling.max_tokens,
                sampling: crate::model::sampling::SamplingConfig {
                    seed: self.sampling.config.seed.map(|s| s.wrapping_add(i as u64)),
                    ..self.sampling.config.clone()
                },
                stop: self.sampling.stop.clone(),
                steering: SteeringPlan::new(writer_rows),
                deadline: None,
                monitors: Vec::new(),
                // In reading mode the reading pass captures instead.
                capture: self.reading.is_none(),
                logprobs: None,
            };
            // The judge's two prompts need the answer; they are built once it exists.
            let judging = self
                .judge
                .clone()
                .zip(self.spec.def.clone())
                .map(|(j, d)| (j, d, self.spec.questions[r.question].clone()));
            let (engine, writer, permits) = (self.engine.clone(), self.writer.clone(), permits.clone());
            let reading = self.reading.map(|f| (f, self.spec.questions[r.question].clone()));
            let prompt = r.prompt.clone();
            tasks.spawn(async move {
                let permit = permits.acquire_owned().await.map_err(|e| ServiceError::Internal(e.to_string()))?;
                let (answer, summary) = complete(&writer, job).await?;
                let summary =
                    summary.ok_or_else(|| ServiceError::Internal("generation ended without a summary".into()))?;
                // An end-of-turn token was sampled, stripped and never fed; otherwise the last
                // kept token ended the generation without being fed.
                let fed = if summary.completion_tokens > answer.len() {
                    answer.len()
                } else {
                    answer.len().saturating_sub(1)
                };
                let text =
                    || writer.model().tokenizer.decode(&answer).map_err(|e| ServiceError::Internal(e.to_string()));
                // This model's prompt, answer, tokens read and capture.
                let (prompt, answer, fed, capture) = match reading {
                    Some((format, question)) => {
                        let (prompt, ids) = format.tokens(engine.model(), &question, &text()?)?;
                        let job = CaptureJob {
                            tokens: [prompt.as_slice(), &ids].concat(),
                            prompt_len: prompt.len(),
                            steering: SteeringPlan::new(engine.model().config().n_residual_rows()),
                            probes: Vec::new(),
                            logprobs: None,
                            token_states: None,
                        };
                        let capture = engine.capture(job).await?;
                        let fed = ids.len();
                        (prompt, ids, fed, capture)
                    }
                    None => {
                        let capture = summary
                            .capture
                            .ok_or_else(|| ServiceError::Internal("generation ended without its capture".into()))?;
                        (prompt, answer.clone(), fed, capture)
                    }
                };
                drop(permit);
                let judged = match judging {
                    Some((judge, def, question)) => {
                        let text = text()?;
                        let prompts = (def.eval_prompt_for(&question, &text), coherence_prompt(&question, &text));
                        Some(judge.rate_answer(prompts.0, prompts.1).await)
                    }
                    None => None,
                };
                Ok::<_, ServiceError>((i, prompt, answer, fed, capture, judged))
            });
        }
        progress(tx, "rollouts", 0, total, started).await?;
        let mut answers: Vec<Option<Answer>> = (0..total).map(|_| None).collect();
        let mut sums = Sums::new(c.n_residual_rows() * c.hidden_size);
        let mut tally = self.judge.as_ref().map(|_| Tally::default());
        let mut last_failure = None;
        let n_q = self.spec.questions.len();
        let mut done = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, prompt, ids, fed, capture, judged) =
                joined.map_err(|e| ServiceError::Internal(e.to_string()))??;
            let r = &self.rollouts[i];
            let kept = match (judged, tally.as_mut()) {
                (Some((trait_score, coherence)), Some(tally)) => {
                    for o in [&trait_score, &coherence] {
                        if let Outcome::Failed(e) = o {
                            last_failure = Some(e.clone());
                        }
                    }
                    self.judge_keeps(r.positive, &trait_score, &coherence, tally)
                }
                _ => true,
            };
            if kept {
                sums.add(&capture, r.positive, held_out(r.question, n_q));
            }
            answers[i] = Some(Answer { prompt, ids, fed, kept });
            done += 1;
            progress(tx, "rollouts", done, total, started).await?;
        }
        if let Some(t) = &tally {
            if t.request_failed as usize == total
                && let Some(e) = last_failure
            {
                return Err(ServiceError::Unavailable(format!("every judge request failed; the last: {e}")));
            }
            tracing::info!(vector = %self.spec.name, judged = %t.describe(), "judge filtering done");
        }
        let answers = answers.into_iter().map(|a| a.expect("every rollout task reports once")).collect();
        Ok((answers, sums, tally))
    }

    /// Whether the judge's scores keep an answer (counted in `tally`): coherent enough, and on
    /// its side of the trait threshold. A request that failed twice drops its answer.
    fn judge_keeps(&self, positive: bool, trait_score: &Outcome, coherence: &Outcome, tally: &mut Tally) -> bool {
        let (trait_min, coherence_min) = self.thresholds;
        match (tally.read(trait_score), tally.read(coherence)) {
            (Some(_), Some(c)) if c < coherence_min => {
                tally.incoherent += 1;
                false
            }
            (Some(t), Some(_)) => {
                let keep = if positive { t >= trait_min } else { t < trait_min };
                if keep {
                    tally.kept += 1;
                } else {
                    tally.trait_mismatch += 1;
                }
                keep
            }
            (None, _) => {
                tally.drop_for(trait_score);
                false
            }
            (Some(_), None) => {
                tally.drop_for(coherence);
                false
            }
        }
    }

    /// The second pass over the kept rollouts, once the stored vectors (`values`, per kind) and
    /// the training directions are known; it keeps projections only. Per rollout:
    /// - the answer re-read after its bare question, without the system prompt that produced it
    ///   (calibration of response scores, so the system prompt's own effect on the activations
    ///   does not leak into the scale);
    /// - its prompt (system prompt + question) read again for the last prompt token (calibration
    ///   of prompt scores), with the answer too where the layer scores need the rollout's
    ///   activations: held-out rollouts, projected on the direction of the training ones (or
    ///   every rollout on the stored vector when there is no held-out split).
    async fn read_again(
        &self,
        answers: &[Answer],
        sums: &Sums,
        values: &[Vec<f32>],
        tx: &Tx,
    ) -> ServiceResult<Readings> {
        let started = Instant::now();
        let model = self.engine.model().clone();
        let (n_rows, d) = (model.config().n_residual_rows(), model.config().hidden_size);
        // The answers re-read after their bare question. In reading mode they were read that way
        // already (the reading prompt is the bare question).
        let mut bare = Vec::with_capacity(self.spec.questions.len());
        if self.reading.is_none() {
            for q in &self.spec.questions {
                let text = resolve::render_chat(&model, &[Message::new("user", q.clone())])?;
                bare.push(resolve::tokenize(&model, &text)?);
            }
        }
        let splits: Vec<bool> = (0..KINDS.len()).map(|k| sums.splits(k)).collect();
        let directions: Arc<Vec<Vec<f32>>> = Arc::new(
            (0..KINDS.len()).map(|k| if splits[k] { sums.difference(k, true) } else { values[k].clone() }).collect(),
        );
        let values = Arc::new(values.to_vec());
        let n_q = self.spec.questions.len();
        let todo: Vec<usize> = (0..answers.len()).filter(|&i| answers[i].kept).collect();
        let permits = Arc::new(Semaphore::new(self.engine.max_batch()));
        let mut tasks = JoinSet::new();
        for &i in &todo {
            let r = &self.rollouts[i];
            let ids = &answers[i].ids;
            let held = held_out(r.question, n_q);
            // Kinds whose layer scores read this rollout.
            let scored: Vec<bool> = splits.iter().map(|&split| !split || held).collect();
            let capture = |tokens: Vec<u32>, prompt_len: usize| CaptureJob {
                tokens,
                prompt_len,
                steering: SteeringPlan::new(n_rows),
                probes: Vec::new(),
                logprobs: None,
                token_states: None,
            };
            let prompt = answers[i].prompt.clone();
            let reading = self.reading.is_some();
            let read = if scored.iter().any(|&s| s) || reading {
                capture([prompt.as_slice(), &ids[..answers[i].fed]].concat(), prompt.len())
            } else {
                capture(prompt.clone(), prompt.len())
            };
            let reread = match bare.get(r.question) {
                Some(question) if !reading && !ids.is_empty() => {
                    Some(capture([question.as_slice(), ids].concat(), question.len()))
                }
                _ => None,
            };
            let (engine, permits, values, directions) =
                (self.engine.clone(), permits.clone(), values.clone(), directions.clone());
            let positive = r.positive;
            let compare = !self.compare.is_empty();
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await.map_err(|e| ServiceError::Internal(e.to_string()))?;
                let (read, reread) = tokio::join!(engine.capture(read), async {
                    match reread {
                        Some(job) => engine.capture(job).await.map(Some),
                        None => Ok(None),
                    }
                });
                let (read, reread) = (read?, reread?);
                // In reading mode the reading already is the bare question and its answer.
                let reread = if reading { Some(read.clone()) } else { reread };
                // Per kind: re-read response, last prompt token, and (where scored) the layer-score reading.
                let mut out = Vec::with_capacity(KINDS.len());
                for (k, (kind, _)) in KINDS.iter().enumerate() {
                    let response = reread
                        .as_ref()
                        .and_then(|c| c.response_avg.as_deref())
                        .map(|a| projections_per_layer(&values[k], &[a], n_rows, d));
                    let last = projections_per_layer(&values[k], &[&read.prompt_last], n_rows, d);
                    let score = if scored[k] {
                        activations(&read, *kind).map(|a| {
                            (0..n_rows)
                                .map(|l| {
                                    let span = l * d..(l + 1) * d;
                                    vec![crate::steering::projection(&a[span.clone()], &directions[k][span])]
                                })
                                .collect::<Vec<_>>()
                        })
                    } else {
                        None
                    };
                    out.push((response, last, score));
                }
                let kept = if compare && scored[0] { read.response_avg.clone() } else { None };
                Ok::<_, ServiceError>((positive, out, kept))
            });
        }
        let mut readings = Readings {
            response: empty_projections(n_rows),
            prompt_last: empty_projections(n_rows),
            scored: empty_projections(n_rows),
            scored_activations: [Vec::new(), Vec::new()],
        };
        progress(tx, "calibrate", 0, todo.len(), started).await?;
        let mut done = 0;
        while let Some(joined) = tasks.join_next().await {
            let (positive, per_kind, activations) = joined.map_err(|e| ServiceError::Internal(e.to_string()))??;
            if let Some(a) = activations {
                readings.scored_activations[side(positive)].push(a);
            }
            for (k, (response, last, score)) in per_kind.into_iter().enumerate() {
                if let Some(p) = response {
                    push_projections(&mut readings.response[k], positive, p);
                }
                push_projections(&mut readings.prompt_last[k], positive, last);
                if let Some(p) = score {
                    push_projections(&mut readings.scored[k], positive, p);
                }
            }
            done += 1;
            progress(tx, "calibrate", done, todo.len(), started).await?;
        }
        Ok(readings)
    }

    /// Each `compare` vector against the extracted response-average vector on the rollouts its
    /// layer scores read, and the random-direction baseline (none without comparisons).
    fn comparisons(
        &self,
        extracted: &[f32],
        sums: &Sums,
        readings: &Readings,
    ) -> (Vec<pb::VectorComparison>, Option<pb::VectorComparison>) {
        if self.compare.is_empty() {
            return (Vec::new(), None);
        }
        let c = self.engine.model().config();
        let [pos, neg] = &readings.scored_activations;
        let on = comparison::Readings { sides: [pos, neg], n_rows: c.n_residual_rows(), d: c.hidden_size };
        let held = if sums.splits(0) { "held-out " } else { "" };
        let scored_on = format!("{} positive and {} negative {held}rollouts", pos.len(), neg.len());
        let to_pb = |name: &str, layers: Vec<comparison::LayerComparison>| pb::VectorComparison {
            vector: name.to_string(),
            layers: layers
                .into_iter()
                .map(|l| pb::LayerComparison {
                    layer: l.layer as u32,
                    cosine: l.cosine,
                    auroc: l.auroc,
                    cohens_d: l.cohens_d,
                })
                .collect(),
            scored_on: scored_on.clone(),
        };
        let compared =
            self.compare.iter().map(|v| to_pb(&v.meta.name, comparison::compare(&v.values, extracted, &on))).collect();
        let random = comparison::random_baseline(extracted, &on, RANDOM_DIRECTIONS, 0.95, 0);
        (compared, Some(to_pb("random", random)))
    }

    /// The stored vector of one activation summary (kind `k`), with its layer scores and
    /// calibration.
    fn vector(
        &self,
        k: usize,
        kind: VectorKind,
        suffix: &str,
        sums: &Sums,
        values: Vec<f32>,
        readings: &Readings,
    ) -> StoredVector {
        let c = self.engine.model().config();
        let (n_rows, d) = (c.n_residual_rows(), c.hidden_size);
        let n_q = self.spec.questions.len();
        let [pos, neg] = &readings.scored[k];
        let scores: Vec<LayerScore> = (0..n_rows)
            .map(|layer| LayerScore {
                layer,
                cohens_d: cohens_d(&pos[layer], &neg[layer]),
                auroc: auroc(&pos[layer], &neg[layer]),
            })
            .collect();
        let scored_on =
            if sums.splits(k) { "held-out questions" } else { "the same rollouts (too few for a held-out split)" };
        let recommended = recommend(&scores);
        // Reading mode reads the same question on both sides, so last-prompt-token readings do not
        // separate: prompt scores use the response scale there.
        let prompt_readings = if self.reading.is_some() { &readings.response[k] } else { &readings.prompt_last[k] };
        let calibration = calibrate_projections(&readings.response[k], prompt_readings);
        let s = &self.spec;
        let [n_pos, n_neg] = sums.n_all[k];
        let origin = match self.reading {
            Some(format) => format!(
                "{}, read by `{}` as {} from the answers `{}` wrote under the system prompts",
                s.origin,
                self.engine.model().id,
                format.name(),
                self.writer.model().id
            ),
            None => s.origin.clone(),
        };
        StoredVector {
            meta: VectorMeta {
                name: format!("{}{suffix}", s.name),
                model: self.engine.model().id.clone(),
                trait_name: s.trait_name.clone(),
                kind,
                created_unix: unix_now(),
                description: format!(
                    "{}: mean {} difference over {} positive and {} negative rollouts ({} pairs x {} questions x {} \
                     samples); {}; layers scored on {}",
                    origin,
                    kind.as_str(),
                    n_pos,
                    n_neg,
                    s.pairs.len(),
                    n_q,
                    s.samples,
                    self.filtering,
                    scored_on
                ),
                n_rows,
                d_model: d,
                recommended_layer: recommended,
                layer_scores: scores,
                calibration,
                steering: None,
                transferred_from: None,
            },
            values,
        }
    }
}

pub fn tally_to_pb(t: &Tally) -> pb::JudgeCounts {
    pb::JudgeCounts {
        kept: t.kept,
        trait_mismatch: t.trait_mismatch,
        incoherent: t.incoherent,
        refusal: t.refusal,
        not_a_score: t.not_a_score,
        request_failed: t.request_failed,
        scored_from_logprobs: t.from_logprobs,
        scored_from_text: t.from_text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A client that hangs up mid-extraction closes the stream: the job stops as a
    /// cancellation (CANCELLED, logged at info), not as an internal error.
    #[tokio::test]
    async fn a_client_leaving_cancels_the_job() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let err = progress(&tx, "rollouts", 1, 2, Instant::now()).await.unwrap_err();
        assert!(matches!(err, ServiceError::Cancelled(_)), "{err:?}");
    }

    #[test]
    fn every_fifth_question_is_held_out() {
        let held: Vec<usize> = (0..20).filter(|&q| held_out(q, 20)).collect();
        assert_eq!(held, [4, 9, 14, 19]);
        assert_eq!((0..3).filter(|&q| held_out(q, 3)).collect::<Vec<_>>(), [2]);
        assert!(!held_out(0, 1));
    }

    fn capture(values: [f32; 2]) -> CaptureResult {
        CaptureResult {
            n_rows: 1,
            d_model: 2,
            prompt_last: values.to_vec(),
            prompt_avg: values.to_vec(),
            response_avg: Some(values.to_vec()),
            per_token: Vec::new(),
            logprobs: Vec::new(),
            token_states: Vec::new(),
        }
    }

    /// The running sums give per-element mean differences, over all kept rollouts and over the
    /// training ones, and know when a held-out split exists on both sides.
    #[test]
    fn running_sums_give_mean_differences_and_the_split() {
        let mut sums = Sums::new(2);
        sums.add(&capture([1.0, 2.0]), true, false);
        sums.add(&capture([3.0, 4.0]), true, true);
        sums.add(&capture([1.0, 1.0]), false, false);
        assert_eq!(sums.difference(0, false), [1.0, 2.0]);
        assert_eq!(sums.difference(0, true), [0.0, 1.0]);
        assert!(!sums.splits(0), "no held-out negative rollout yet");
        sums.add(&capture([0.0, 0.0]), false, true);
        assert!(sums.splits(2));
        assert_eq!(sums.difference(2, false), [1.5, 2.5]);
        // An empty answer has no response average: it counts for the prompt kinds only.
        let mut empty = capture([5.0, 5.0]);
        empty.response_avg = None;
        sums.add(&empty, true, false);
        assert_eq!((sums.n_all[0], sums.n_all[1]), ([2, 2], [3, 2]));
    }
}
