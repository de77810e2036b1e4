//! ExtractVector: roll out answers under contrastive system prompts, capture the residual
//! stream over prompt and answer, and store mean(pos) − mean(neg) per layer.

use super::{AppState, ResponseStream, resolve};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::model::chat::Message;
use crate::scheduler::{CaptureJob, CaptureResult, EngineHandle, GenEvent, GenerateJob};
use crate::steering::plan::SteeringPlan;
use crate::steering::store::{StoredVector, VectorKind, VectorMeta, now_unix, validate_name};
use persona_proto::v1 as pb;
use std::sync::Arc;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// New tokens per rollout when the request does not say.
const DEFAULT_ROLLOUT_TOKENS: usize = 64;

struct Rollout {
    positive: bool,
    messages: Vec<Message>,
}

pub fn extract(
    state: Arc<AppState>,
    req: pb::ExtractVectorRequest,
) -> ServiceResult<ResponseStream<pb::ExtractVectorResponse>> {
    let engine = state.engine(&req.model)?.clone();
    validate_name(&req.name)?;
    for suffix in ["", ".prompt_avg", ".prompt_last"] {
        let name = format!("{}{suffix}", req.name);
        validate_name(&name)?;
        if !req.overwrite && state.store.get(&name).is_ok() {
            return Err(ServiceError::AlreadyExists(format!(
                "vector `{name}` already exists (set overwrite to replace it)"
            )));
        }
    }
    if req.pairs.is_empty() || req.questions.is_empty() {
        return Err(invalid("extraction needs at least one instruction pair and one question"));
    }
    if req.pairs.iter().any(|p| p.pos.trim().is_empty() || p.neg.trim().is_empty()) {
        return Err(invalid("every instruction pair needs non-empty pos and neg prompts"));
    }
    if req.questions.iter().any(|q| q.trim().is_empty()) {
        return Err(invalid("questions must not be empty"));
    }
    let sampling = resolve::sampling(req.sampling.as_ref(), DEFAULT_ROLLOUT_TOKENS)?;
    let mut rollouts = Vec::new();
    for p in &req.pairs {
        for q in &req.questions {
            for (positive, system) in [(true, &p.pos), (false, &p.neg)] {
                let messages = vec![Message::new("system", system.clone()), Message::new("user", q.clone())];
                resolve::render_chat(engine.model(), &messages)?;
                rollouts.push(Rollout { positive, messages });
            }
        }
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let name = req.name.clone();
        if let Err(e) = run(state, engine, req, rollouts, sampling, tx.clone()).await {
            tracing::warn!(vector = %name, error = %e, "extraction failed");
            let _ = tx.send(Err(Status::from(e))).await;
        }
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

type Tx = mpsc::Sender<Result<pb::ExtractVectorResponse, Status>>;

async fn progress(tx: &Tx, stage: &str, done: usize, total: usize) -> ServiceResult<()> {
    let msg = pb::ExtractVectorResponse {
        event: Some(pb::extract_vector_response::Event::Progress(pb::ExtractProgress {
            done: done as u32,
            total: total as u32,
            stage: stage.to_string(),
        })),
    };
    tx.send(Ok(msg)).await.map_err(|_| ServiceError::Internal("client went away".into()))
}

/// Runs one generation to the end and returns its tokens without end-of-turn markers.
pub async fn complete(engine: &EngineHandle, job: GenerateJob) -> ServiceResult<Vec<u32>> {
    let mut rx = engine.generate(job)?;
    let mut ids = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev? {
            GenEvent::Token { id, .. } => ids.push(id),
            GenEvent::Done(_) => break,
        }
    }
    ids.retain(|&id| !engine.model().tokenizer.is_eos(id));
    Ok(ids)
}

async fn run(
    state: Arc<AppState>,
    engine: EngineHandle,
    req: pb::ExtractVectorRequest,
    rollouts: Vec<Rollout>,
    sampling: resolve::Sampling,
    tx: Tx,
) -> ServiceResult<()> {
    let model = engine.model().clone();
    let total = rollouts.len();
    let permits = Arc::new(Semaphore::new(engine.max_batch()));
    let mut tasks = JoinSet::new();
    for (i, r) in rollouts.iter().enumerate() {
        let prompt = resolve::tokenize(&model, &resolve::render_chat(&model, &r.messages)?)?;
        resolve::check_fits(&model, prompt.len())?;
        let job = GenerateJob {
            prompt: prompt.clone(),
            max_tokens: sampling.max_tokens,
            sampling: crate::model::sampling::SamplingConfig {
                seed: sampling.config.seed.map(|s| s.wrapping_add(i as u64)),
                ..sampling.config.clone()
            },
            stop: sampling.stop.clone(),
            steering: SteeringPlan::new(model.config().n_residual_rows()),
            deadline: None,
        };
        let (engine, permits) = (engine.clone(), permits.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await.map_err(|e| ServiceError::Internal(e.to_string()))?;
            let answer = complete(&engine, job).await?;
            let prompt_len = prompt.len();
            let tokens = [prompt, answer].concat();
            let cap = engine.capture(CaptureJob { tokens, prompt_len, steering: SteeringPlan::new(0) }).await?;
            Ok::<_, ServiceError>((i, cap))
        });
    }
    progress(&tx, "rollouts", 0, total).await?;
    let mut pos = Means::default();
    let mut neg = Means::default();
    let mut done = 0;
    while let Some(joined) = tasks.join_next().await {
        let (i, cap) = joined.map_err(|e| ServiceError::Internal(e.to_string()))??;
        if rollouts[i].positive {
            pos.add(&cap)
        } else {
            neg.add(&cap)
        };
        done += 1;
        progress(&tx, "rollouts", done, total).await?;
    }
    let c = model.config();
    let mut primary = None;
    for (kind, suffix) in [
        (VectorKind::ResponseAvg, ""),
        (VectorKind::PromptAvg, ".prompt_avg"),
        (VectorKind::PromptLast, ".prompt_last"),
    ] {
        let values = pos.mean(kind).iter().zip(neg.mean(kind)).map(|(p, n)| p - n).collect();
        let vector = StoredVector {
            meta: VectorMeta {
                name: format!("{}{suffix}", req.name),
                model: model.id.clone(),
                trait_name: req.trait_name.clone(),
                kind,
                created_unix: now_unix(),
                description: format!(
                    "mean difference over {} pairs x {} questions ({}), no judge filtering",
                    req.pairs.len(),
                    req.questions.len(),
                    kind.as_str()
                ),
                n_rows: c.n_residual_rows(),
                d_model: c.hidden_size,
            },
            values,
        };
        let store = state.store.clone();
        let overwrite = req.overwrite;
        let stored = tokio::task::spawn_blocking(move || store.put(vector, overwrite))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))??;
        primary.get_or_insert(stored);
    }
    let info = primary.map(|v| resolve::vector_info(&v));
    let msg = pb::ExtractVectorResponse { event: info.map(pb::extract_vector_response::Event::Vector) };
    tx.send(Ok(msg)).await.map_err(|_| ServiceError::Internal("client went away".into()))
}

/// Running means of the three activation summaries over one side's rollouts.
#[derive(Default)]
struct Means {
    n: usize,
    n_response: usize,
    response: Vec<f32>,
    prompt_avg: Vec<f32>,
    prompt_last: Vec<f32>,
}

impl Means {
    fn add(&mut self, c: &CaptureResult) {
        let acc = |dst: &mut Vec<f32>, src: &[f32]| {
            if dst.is_empty() {
                dst.resize(src.len(), 0.0);
            }
            dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
        };
        acc(&mut self.prompt_avg, &c.prompt_avg);
        acc(&mut self.prompt_last, &c.prompt_last);
        self.n += 1;
        if let Some(r) = &c.response_avg {
            acc(&mut self.response, r);
            self.n_response += 1;
        }
    }

    fn mean(&self, kind: VectorKind) -> Vec<f32> {
        let (sum, n) = match kind {
            VectorKind::ResponseAvg => (&self.response, self.n_response),
            VectorKind::PromptAvg => (&self.prompt_avg, self.n),
            VectorKind::PromptLast => (&self.prompt_last, self.n),
        };
        // A side with no responses at all (every answer empty) contributes zeros.
        let len = self.prompt_avg.len();
        if sum.is_empty() { vec![0.0; len] } else { sum.iter().map(|v| v / n.max(1) as f32).collect() }
    }
}
