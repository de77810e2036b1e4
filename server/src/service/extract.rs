//! ExtractVector: roll out answers under contrastive system prompts on the batched engine,
//! optionally filter them with the judge, capture the residual stream over prompt and answer, and
//! store mean(pos) − mean(neg) per layer for three activation summaries, each with per-layer
//! separation scores and a recommended layer.

use super::{AppState, ResponseStream, resolve, traits, vectors};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::judge::{Judge, Outcome, Tally, coherence_prompt};
use crate::model::chat::Message;
use crate::scheduler::{CaptureJob, CaptureResult, EngineHandle, GenEvent, GenerateJob, Summary};
use crate::steering::calibration::calibrate;
use crate::steering::plan::SteeringPlan;
use crate::steering::separation::{layer_scores, recommend};
use crate::steering::store::{StoredVector, VectorKind, VectorMeta, now_unix, validate_name};
use crate::traits::TraitDef;
use persona_proto::v1 as pb;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// New tokens per rollout when the request does not say.
const DEFAULT_ROLLOUT_TOKENS: usize = 64;
/// Upper bound on rollouts per request (pairs × questions × samples × 2).
const MAX_ROLLOUTS: usize = 20_000;
const DEFAULT_THRESHOLD: f32 = 50.0;
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

struct Answer {
    text: String,
    ids: Vec<u32>,
    capture: CaptureResult,
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
    let engine = state.engine(&req.model)?.clone();
    let spec = spec(&state, &req)?;
    validate_name(&spec.name)?;
    for (_, suffix) in KINDS {
        let name = format!("{}{suffix}", spec.name);
        validate_name(&name)?;
        if !req.overwrite && state.store.get(&name).is_ok() {
            return Err(ServiceError::AlreadyExists(format!(
                "vector `{name}` already exists (set overwrite to replace it)"
            )));
        }
    }
    let judge = match (&state.judge, &spec.def, req.skip_judge) {
        (Some(j), Some(d), false) if !d.eval_prompt.is_empty() => Some(j.clone()),
        _ => None,
    };
    let thresholds = (threshold(req.trait_threshold, "trait")?, threshold(req.coherence_threshold, "coherence")?);
    let sampling = resolve::sampling(req.sampling.as_ref(), DEFAULT_ROLLOUT_TOKENS)?;
    // Prompts are rendered and tokenized here, so a bad template or an over-long prompt fails the
    // call before anything streams.
    let model = engine.model();
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
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let job =
            Job { state, engine, spec, rollouts, sampling, judge, thresholds, filtering, overwrite: req.overwrite };
        let name = job.spec.name.clone();
        match job.run(tx.clone()).await {
            Ok(()) => {}
            Err(ServiceError::Cancelled(why)) => tracing::info!(vector = %name, "extraction cancelled: {why}"),
            Err(e) => {
                tracing::warn!(vector = %name, error = %e, "extraction failed");
                let _ = tx.send(Err(Status::from(e))).await;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
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

fn mean_difference(pos: &[&[f32]], neg: &[&[f32]], len: usize) -> Vec<f32> {
    let mean = |set: &[&[f32]]| {
        let mut m = vec![0f32; len];
        for a in set {
            m.iter_mut().zip(a.iter()).for_each(|(s, v)| *s += v);
        }
        m.iter_mut().for_each(|s| *s /= set.len().max(1) as f32);
        m
    };
    mean(pos).iter().zip(mean(neg)).map(|(p, n)| p - n).collect()
}

struct Job {
    state: Arc<AppState>,
    engine: EngineHandle,
    spec: Spec,
    rollouts: Vec<Rollout>,
    sampling: resolve::Sampling,
    judge: Option<Arc<Judge>>,
    thresholds: (f32, f32),
    filtering: String,
    overwrite: bool,
}

impl Job {
    async fn run(self, tx: Tx) -> ServiceResult<()> {
        let started = Instant::now();
        let answers = self.roll_out(&tx).await?;
        let (keep, tally) = match &self.judge {
            Some(judge) => {
                let (keep, tally) = self.judge_answers(judge, &answers, &tx).await?;
                (keep, Some(tally))
            }
            None => (vec![true; answers.len()], None),
        };
        let kept =
            |positive: bool| (0..answers.len()).filter(|&i| keep[i] && self.rollouts[i].positive == positive).count();
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
        let reread = self.reread(&answers, &keep, &tx).await?;
        let stage = Instant::now();
        progress(&tx, "store", 0, KINDS.len(), stage).await?;
        let mut stored = Vec::new();
        for (i, (kind, suffix)) in KINDS.into_iter().enumerate() {
            let vector = self.vector(kind, suffix, &answers, &keep, &reread);
            stored.push(vectors::store_put(&self.state.store, vector, self.overwrite).await?);
            progress(&tx, "store", i + 1, KINDS.len(), stage).await?;
        }
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
        };
        tracing::info!(
            vector = %self.spec.name, rollouts = answers.len(), kept_pos, kept_neg,
            secs = result.elapsed_secs, "extraction done"
        );
        send(&tx, pb::extract_vector_response::Event::Result(result)).await
    }

    /// Generates every rollout (at most a batch's worth at once, so other users keep queue room),
    /// summarising the hidden states of every layer over prompt and answer in the same pass.
    async fn roll_out(&self, tx: &Tx) -> ServiceResult<Vec<Answer>> {
        let started = Instant::now();
        let model = self.engine.model().clone();
        let total = self.rollouts.len();
        let permits = Arc::new(Semaphore::new(self.engine.max_batch()));
        let mut tasks = JoinSet::new();
        for (i, r) in self.rollouts.iter().enumerate() {
            let job = GenerateJob {
                prompt: r.prompt.clone(),
                max_tokens: self.sampling.max_tokens,
                sampling: crate::model::sampling::SamplingConfig {
                    seed: self.sampling.config.seed.map(|s| s.wrapping_add(i as u64)),
                    ..self.sampling.config.clone()
                },
                stop: self.sampling.stop.clone(),
                steering: SteeringPlan::new(model.config().n_residual_rows()),
                deadline: None,
                monitors: Vec::new(),
                capture: true,
                logprobs: None,
            };
            let (engine, permits) = (self.engine.clone(), permits.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await.map_err(|e| ServiceError::Internal(e.to_string()))?;
                let (answer, summary) = complete(&engine, job).await?;
                let capture = summary
                    .and_then(|s| s.capture)
                    .ok_or_else(|| ServiceError::Internal("generation ended without its capture".into()))?;
                let text =
                    engine.model().tokenizer.decode(&answer).map_err(|e| ServiceError::Internal(e.to_string()))?;
                Ok::<_, ServiceError>((i, Answer { text, ids: answer, capture }))
            });
        }
        progress(tx, "rollouts", 0, total, started).await?;
        let mut answers: Vec<Option<Answer>> = (0..total).map(|_| None).collect();
        let mut done = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, a) = joined.map_err(|e| ServiceError::Internal(e.to_string()))??;
            answers[i] = Some(a);
            done += 1;
            progress(tx, "rollouts", done, total, started).await?;
        }
        Ok(answers.into_iter().map(|a| a.expect("every rollout task reports once")).collect())
    }

    /// The kept answers re-read after their bare question, without the system prompt that
    /// produced them: per rollout, the response average of every layer (`None` when dropped or
    /// empty). Calibration of response scores uses these, so the system prompt's own effect on the
    /// activations does not leak into the scale.
    async fn reread(&self, answers: &[Answer], keep: &[bool], tx: &Tx) -> ServiceResult<Vec<Option<Vec<f32>>>> {
        let started = Instant::now();
        let model = self.engine.model().clone();
        let mut bare = Vec::with_capacity(self.spec.questions.len());
        for q in &self.spec.questions {
            let text = resolve::render_chat(&model, &[Message::new("user", q.clone())])?;
            bare.push(resolve::tokenize(&model, &text)?);
        }
        let todo: Vec<usize> = (0..answers.len()).filter(|&i| keep[i] && !answers[i].ids.is_empty()).collect();
        let permits = Arc::new(Semaphore::new(self.engine.max_batch()));
        let mut tasks = JoinSet::new();
        for &i in &todo {
            let prompt = &bare[self.rollouts[i].question];
            let job = CaptureJob {
                tokens: [prompt.as_slice(), &answers[i].ids].concat(),
                prompt_len: prompt.len(),
                steering: SteeringPlan::new(model.config().n_residual_rows()),
                probes: Vec::new(),
                logprobs: None,
            };
            let (engine, permits) = (self.engine.clone(), permits.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await.map_err(|e| ServiceError::Internal(e.to_string()))?;
                Ok::<_, ServiceError>((i, engine.capture(job).await?.response_avg))
            });
        }
        let mut out = vec![None; answers.len()];
        progress(tx, "calibrate", 0, todo.len(), started).await?;
        let mut done = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, acts) = joined.map_err(|e| ServiceError::Internal(e.to_string()))??;
            out[i] = acts;
            done += 1;
            progress(tx, "calibrate", done, todo.len(), started).await?;
        }
        Ok(out)
    }

    /// Scores every answer for the trait and for coherence; returns which to keep and why the
    /// others were dropped. A request that fails twice drops its answer; only when every request
    /// failed (the endpoint is down) does the extraction fail, with UNAVAILABLE.
    async fn judge_answers(
        &self,
        judge: &Arc<Judge>,
        answers: &[Answer],
        tx: &Tx,
    ) -> ServiceResult<(Vec<bool>, Tally)> {
        let def = self.spec.def.as_ref().expect("a judge is only chosen for trait definitions");
        let (trait_min, coherence_min) = self.thresholds;
        let mut tasks = JoinSet::new();
        for (i, a) in answers.iter().enumerate() {
            let question = &self.spec.questions[self.rollouts[i].question];
            let prompts = [def.eval_prompt_for(question, &a.text), coherence_prompt(question, &a.text)];
            let judge = judge.clone();
            tasks.spawn(async move {
                let [t, c] = prompts;
                let (trait_score, coherence) = judge.rate_answer(t, c).await;
                (i, trait_score, coherence)
            });
        }
        let started = Instant::now();
        let mut keep = vec![false; answers.len()];
        let mut tally = Tally::default();
        let mut last_failure = None;
        let mut done = 0;
        while let Some(joined) = tasks.join_next().await {
            let (i, trait_score, coherence) = joined.map_err(|e| ServiceError::Internal(e.to_string()))?;
            let (t, c) = (tally.read(&trait_score), tally.read(&coherence));
            match (t, c) {
                (Some(_), Some(c)) if c < coherence_min => tally.incoherent += 1,
                (Some(t), Some(_)) => {
                    keep[i] = if self.rollouts[i].positive { t >= trait_min } else { t < trait_min };
                    if keep[i] {
                        tally.kept += 1;
                    } else {
                        tally.trait_mismatch += 1;
                    }
                }
                (None, _) => tally.drop_for(&trait_score),
                (Some(_), None) => tally.drop_for(&coherence),
            }
            for o in [&trait_score, &coherence] {
                if let Outcome::Failed(e) = o {
                    last_failure = Some(e.clone());
                }
            }
            done += 1;
            progress(tx, "judge", done, answers.len(), started).await?;
        }
        if tally.request_failed as usize == answers.len()
            && let Some(e) = last_failure
        {
            return Err(ServiceError::Unavailable(format!("every judge request failed; the last: {e}")));
        }
        tracing::info!(vector = %self.spec.name, judged = %tally.describe(), "judge filtering done");
        Ok((keep, tally))
    }

    /// The stored vector of one activation summary, with its layer scores.
    fn vector(
        &self,
        kind: VectorKind,
        suffix: &str,
        answers: &[Answer],
        keep: &[bool],
        reread: &[Option<Vec<f32>>],
    ) -> StoredVector {
        let c = self.engine.model().config();
        let (n_rows, d) = (c.n_residual_rows(), c.hidden_size);
        let n_q = self.spec.questions.len();
        let set = |positive: bool, held: Option<bool>| -> Vec<&[f32]> {
            (0..answers.len())
                .filter(|&i| keep[i] && self.rollouts[i].positive == positive)
                .filter(|&i| held.is_none_or(|h| held_out(self.rollouts[i].question, n_q) == h))
                .filter_map(|i| activations(&answers[i].capture, kind))
                .collect()
        };
        let (pos, neg) = (set(true, None), set(false, None));
        let values = mean_difference(&pos, &neg, n_rows * d);
        let (train_pos, train_neg) = (set(true, Some(false)), set(false, Some(false)));
        let (test_pos, test_neg) = (set(true, Some(true)), set(false, Some(true)));
        let split = [&train_pos, &train_neg, &test_pos, &test_neg].iter().all(|s| !s.is_empty());
        let (scores, scored_on) = if split {
            let direction = mean_difference(&train_pos, &train_neg, n_rows * d);
            (layer_scores(&direction, &test_pos, &test_neg, n_rows, d), "held-out questions")
        } else {
            (layer_scores(&values, &pos, &neg, n_rows, d), "the same rollouts (too few for a held-out split)")
        };
        let recommended = recommend(&scores);
        let kept_side =
            |positive: bool| (0..answers.len()).filter(move |&i| keep[i] && self.rollouts[i].positive == positive);
        let reread_side =
            |positive: bool| -> Vec<&[f32]> { kept_side(positive).filter_map(|i| reread[i].as_deref()).collect() };
        let last_side = |positive: bool| -> Vec<&[f32]> {
            kept_side(positive).map(|i| answers[i].capture.prompt_last.as_slice()).collect()
        };
        let calibration = calibrate(
            &values,
            (&reread_side(true), &reread_side(false)),
            (&last_side(true), &last_side(false)),
            n_rows,
            d,
        );
        let s = &self.spec;
        StoredVector {
            meta: VectorMeta {
                name: format!("{}{suffix}", s.name),
                model: self.engine.model().id.clone(),
                trait_name: s.trait_name.clone(),
                kind,
                created_unix: now_unix(),
                description: format!(
                    "{}: mean {} difference over {} positive and {} negative rollouts ({} pairs x {} questions x {} \
                     samples); {}; layers scored on {}",
                    s.origin,
                    kind.as_str(),
                    pos.len(),
                    neg.len(),
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

    #[test]
    fn mean_difference_is_per_element() {
        let (a, b, c): (&[f32], &[f32], &[f32]) = (&[1.0, 2.0], &[3.0, 4.0], &[1.0, 1.0]);
        assert_eq!(mean_difference(&[a, b], &[c], 2), [1.0, 2.0]);
    }
}
