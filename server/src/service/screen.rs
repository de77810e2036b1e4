//! ScreenDataset: for each training sample, how much further along each trait its response sits
//! than the model's own response to the same prompt (the paper's projection difference).

use super::extract::complete;
use super::{AppState, ResponseStream, resolve};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::scheduler::{CaptureJob, EngineHandle, GenerateJob};
use crate::steering::plan::SteeringPlan;
use persona_proto::v1 as pb;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OnceCell, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

/// New tokens of the model's own responses when the config does not say.
const DEFAULT_OWN_TOKENS: usize = 128;
/// Own responses kept in memory (a few KiB each).
const CACHE_ENTRIES: usize = 20_000;

/// What an own response depends on: the model, the prompt and the sampling settings.
#[derive(Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    model: String,
    prompt: Vec<u32>,
    settings: String,
}

/// One cached response: filled once, awaited by every concurrent asker of the same prompt.
type Slot = Arc<OnceCell<Arc<Vec<u32>>>>;

/// The model's own responses by prompt, oldest dropped first past the capacity.
#[derive(Default)]
pub struct OwnResponses {
    inner: Mutex<(HashMap<CacheKey, Slot>, VecDeque<CacheKey>)>,
}

impl OwnResponses {
    /// The slot for a key, created empty when new.
    fn slot(&self, k: &CacheKey) -> Slot {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let (map, order) = &mut *guard;
        if let Some(slot) = map.get(k) {
            return slot.clone();
        }
        let slot = Slot::default();
        map.insert(k.clone(), slot.clone());
        order.push_back(k.clone());
        while order.len() > CACHE_ENTRIES {
            if let Some(old) = order.pop_front() {
                map.remove(&old);
            }
        }
        slot
    }
}

/// A validated config: engine, targets and how own responses are generated.
struct Screen {
    state: Arc<AppState>,
    engine: EngineHandle,
    targets: Vec<resolve::Target>,
    sampling: resolve::Sampling,
    include_own: bool,
}

/// Reads and checks the first message; errors here fail the call with a status.
pub async fn start(
    state: Arc<AppState>,
    mut inbound: Streaming<pb::ScreenRequest>,
) -> ServiceResult<ResponseStream<pb::ScreenResponse>> {
    let first = inbound.message().await.map_err(|s| invalid(format!("reading the config: {}", s.message())))?;
    let Some(pb::ScreenRequest { kind: Some(pb::screen_request::Kind::Config(cfg)) }) = first else {
        return Err(invalid("the first message must be a ScreenConfig"));
    };
    let engine = state.engine(&cfg.model)?;
    if cfg.targets.is_empty() {
        return Err(invalid("config.targets is empty: name at least one vector"));
    }
    let targets = resolve::targets(&state.store, engine.model(), &cfg.targets)?;
    let sampling = resolve::sampling(cfg.sampling.as_ref(), DEFAULT_OWN_TOKENS)?;
    let screen = Arc::new(Screen { state, engine, targets, sampling, include_own: cfg.include_own_response });
    Ok(run(screen, inbound))
}

fn run(screen: Arc<Screen>, mut inbound: Streaming<pb::ScreenRequest>) -> ResponseStream<pb::ScreenResponse> {
    let in_flight = screen.engine.max_batch();
    let (tx, rx) = mpsc::channel(in_flight);
    let (results_tx, mut results) = mpsc::channel::<pb::ScreenResult>(in_flight);
    let reader = screen.clone();
    tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(in_flight));
        loop {
            let Ok(permit) = permits.clone().acquire_owned().await else { break };
            let sample = match inbound.message().await {
                Ok(Some(pb::ScreenRequest { kind: Some(pb::screen_request::Kind::Sample(s)) })) => s,
                Ok(Some(_)) => {
                    let _ =
                        results_tx.send(failure(String::new(), invalid("only the first message is a config"))).await;
                    continue;
                }
                Ok(None) | Err(_) => break,
            };
            let (screen, results_tx) = (reader.clone(), results_tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let id = sample.id.clone();
                let result = screen.sample(sample).await.unwrap_or_else(|e| failure(id, e));
                let _ = results_tx.send(result).await;
            });
        }
    });
    tokio::spawn(async move {
        let started = Instant::now();
        let mut diffs: Vec<Vec<f32>> = vec![Vec::new(); screen.targets.len()];
        let (mut samples, mut failed, mut cached) = (0u32, 0u32, 0u32);
        while let Some(r) = results.recv().await {
            samples += 1;
            if r.error_code != 0 {
                failed += 1;
            } else {
                cached += r.cached as u32;
                diffs.iter_mut().zip(&r.scores).for_each(|(d, s)| d.push(s.difference));
            }
            let msg = pb::ScreenResponse { kind: Some(pb::screen_response::Kind::Result(r)) };
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
        let stats = screen.targets.iter().zip(&mut diffs).map(|(t, d)| stats(t, d)).collect();
        let summary = pb::ScreenSummary {
            samples,
            failed,
            cached_own_responses: cached,
            stats,
            elapsed_secs: started.elapsed().as_secs_f64(),
        };
        let _ = tx.send(Ok(pb::ScreenResponse { kind: Some(pb::screen_response::Kind::Summary(summary)) })).await;
    });
    Box::pin(ReceiverStream::new(rx))
}

/// A sample's failure, with the status code the same error would get as a call's.
fn failure(id: String, e: ServiceError) -> pb::ScreenResult {
    let s = Status::from(e);
    pb::ScreenResult { id, error_code: s.code() as i32, error_message: s.message().to_string(), ..Default::default() }
}

impl Screen {
    async fn sample(&self, s: pb::ScreenSample) -> ServiceResult<pb::ScreenResult> {
        let model = self.engine.model();
        let conv = s.prompt.as_ref().ok_or_else(|| invalid("sample has no prompt"))?;
        if s.response.trim().is_empty() {
            return Err(invalid("sample has an empty response"));
        }
        let prompt = resolve::tokenize(model, &resolve::render_chat(model, &resolve::messages(conv)?)?)?;
        let response = resolve::tokenize(model, &s.response)?;
        resolve::check_fits(model, prompt.len() + response.len())?;
        let (own, cached) = self.own_response(&prompt).await?;
        if own.is_empty() {
            return Err(invalid("the model's own response to this prompt is empty; nothing to compare with"));
        }
        let sample_acts = self.response_avg(&prompt, &response).await?;
        let own_acts = self.response_avg(&prompt, &own).await?;
        let scores = self
            .targets
            .iter()
            .map(|t| {
                let (sample_projection, own_projection) =
                    (t.probe.score_at_layer(&sample_acts), t.probe.score_at_layer(&own_acts));
                let difference = sample_projection - own_projection;

                pb::ScreenScore {
                    vector: t.vector.clone(),
                    layer: t.layer as u32,
                    sample_projection,
                    own_projection,
                    difference,
                    calibrated: t.calibration.is_ok(),
                    sample_calibrated: t.response_scale(sample_projection).unwrap_or(0.0),
                    own_calibrated: t.response_scale(own_projection).unwrap_or(0.0),
                    difference_calibrated: t.response_calibration().and_then(|c| c.points(difference)).unwrap_or(0.0),
                }
            })
            .collect();
        let own_response = if self.include_own {
            model.tokenizer.decode(&own).map_err(|e| ServiceError::Internal(e.to_string()))?
        } else {
            String::new()
        };
        Ok(pb::ScreenResult { id: s.id, scores, own_response, cached, ..Default::default() })
    }

    /// The model's own (unsteered) response to a prompt, from the cache when it was made before.
    async fn own_response(&self, prompt: &[u32]) -> ServiceResult<(Arc<Vec<u32>>, bool)> {
        let c = &self.sampling.config;
        let key = CacheKey {
            model: self.engine.model().id.clone(),
            prompt: prompt.to_vec(),
            settings: format!(
                "{}|{}|{}|{}|{:?}|{:?}",
                self.sampling.max_tokens, c.temperature, c.top_p, c.top_k, c.seed, self.sampling.stop
            ),
        };
        let slot = self.state.own_responses.slot(&key);
        let mut generated = false;
        let own = slot
            .get_or_try_init(|| {
                generated = true;
                self.generate_own(prompt)
            })
            .await?;
        Ok((own.clone(), !generated))
    }

    async fn generate_own(&self, prompt: &[u32]) -> ServiceResult<Arc<Vec<u32>>> {
        let c = &self.sampling.config;
        let job = GenerateJob {
            span: tracing::Span::current(),
            sampling: c.clone(),
            stop: self.sampling.stop.clone(),
            ..GenerateJob::greedy(prompt.to_vec(), self.sampling.max_tokens)
        };
        Ok(Arc::new(complete(&self.engine, job).await?.0))
    }

    async fn response_avg(&self, prompt: &[u32], response: &[u32]) -> ServiceResult<Vec<f32>> {
        // A response that stopped at the context limit ends with a token sampled at the last
        // position, which was never run through the model: prompt + response is one token longer
        // than the context. Read what fits.
        let context = self.engine.model().config().context_length;
        let response = &response[..response.len().min(context.saturating_sub(prompt.len()))];
        if response.is_empty() {
            return Err(invalid(format!(
                "the prompt fills the model's context ({} of {context} tokens); no response token fits after it",
                prompt.len()
            )));
        }
        let job = CaptureJob {
            tokens: [prompt, response].concat(),
            prompt_len: prompt.len(),
            steering: SteeringPlan::new(0),
            probes: Vec::new(),
            logprobs: None,
            token_states: None,
        };
        let cap = self.engine.capture(job).await?;
        cap.response_avg.ok_or_else(|| ServiceError::Internal("capture without response tokens".into()))
    }
}

/// Summary statistics of one target's differences (nearest-rank percentiles).
fn stats(t: &resolve::Target, d: &mut [f32]) -> pb::ScreenStats {
    let mut s = pb::ScreenStats { vector: t.vector.clone(), layer: t.layer as u32, ..Default::default() };
    if d.is_empty() {
        return s;
    }
    d.sort_by(f32::total_cmp);
    let n = d.len() as f32;
    let pct = |p: f32| d[(((p / 100.0) * n).ceil() as usize).clamp(1, d.len()) - 1];
    s.mean = d.iter().sum::<f32>() / n;
    s.std = (d.iter().map(|x| (x - s.mean) * (x - s.mean)).sum::<f32>() / n).sqrt();
    (s.min, s.max) = (d[0], d[d.len() - 1]);
    (s.p50, s.p90, s.p99) = (pct(50.0), pct(90.0), pct(99.0));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let t = resolve::Target {
            vector: "v".into(),
            layer: 3,
            probe: crate::steering::probe::Probe::new(3, &[1.0]).unwrap(),
            calibration: Err("test".into()),
        };
        let mut d: Vec<f32> = (1..=10).rev().map(|x| x as f32).collect();
        let s = stats(&t, &mut d);
        assert_eq!((s.min, s.p50, s.p90, s.p99, s.max), (1.0, 5.0, 9.0, 10.0, 10.0));
        assert_eq!(s.mean, 5.5);
        assert!((s.std - 8.25f32.sqrt()).abs() < 1e-6);
        assert_eq!(stats(&t, &mut []).mean, 0.0);
    }

    #[test]
    fn the_cache_drops_the_oldest_entries_past_capacity() {
        let cache = OwnResponses::default();
        let key = |i: u32| CacheKey { model: "m".into(), prompt: vec![i], settings: String::new() };
        for i in 0..(CACHE_ENTRIES as u32 + 2) {
            cache.slot(&key(i)).set(Arc::new(vec![i])).unwrap();
        }
        assert_eq!(**cache.slot(&key(2)).get().unwrap(), vec![2]);
        // (Asking creates an empty slot, which evicts the next oldest: 2 is checked first.)
        assert!(cache.slot(&key(0)).get().is_none() && cache.slot(&key(1)).get().is_none());
    }
}
