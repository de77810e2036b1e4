//! Per-sequence state inside the engine: what to feed next, and what to do with the results.

use super::{CaptureJob, CaptureResult, EngineError, FinishReason, GenEvent, GenerateJob, Summary, TokenStates};
use crate::model::arch::llama::{KvCache, RowInput};
use crate::model::sampling::{Logprobs, Sampler, logprobs};
use crate::model::tokenizer::{IncrementalDecoder, TextTokenizer};
use crate::steering::plan::SteeringPlan;
use crate::steering::probe::{Probe, probe_scores};
use candle_core::Tensor;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

pub(super) struct Sequence {
    pub cache: KvCache,
    /// Tokens not yet run through the model.
    pub pending: Vec<u32>,
    /// Tokens run through the model so far.
    consumed: usize,
    /// Tokens before this index are prompt (steered with the prompt addends).
    prompt_len: usize,
    steering: SteeringPlan,
    pub work: Work,
    /// KV cache bytes reserved for this sequence while it runs.
    pub kv_reserve: usize,
    pub deadline: Option<Instant>,
    /// Ended by an error other than its deadline.
    failed: bool,
    /// When the request was submitted (queue wait and time to first token count from here).
    pub submitted: Instant,
    /// When its last token was sampled.
    pub last_token: Option<Instant>,
    /// The request's span (none for internal jobs) and the span of the phase it is in now.
    span: tracing::Span,
    phase: tracing::Span,
}

impl Drop for Sequence {
    /// Closes the phase span, then marks the request span's end no earlier than its children's
    /// (an OpenTelemetry span ends at its last exit).
    fn drop(&mut self) {
        if !self.span.is_none() {
            self.phase = tracing::Span::none();
            drop(self.span.enter());
        }
    }
}

/// Where a sequence is, as traced: a child span of its request for each.
#[derive(Debug, Clone, Copy)]
pub(super) enum Phase {
    Queue,
    Prefill,
    Decode,
}

/// What a sequence is for. Few exist at a time, so the size difference between variants is moot.
#[allow(clippy::large_enum_variant)]
pub(super) enum Work {
    Generate(Generation),
    Capture(Capture),
}

impl Sequence {
    pub fn generate(
        job: GenerateJob,
        tx: mpsc::UnboundedSender<Result<GenEvent, EngineError>>,
        cache: KvCache,
        kv_reserve: usize,
        n_rows: usize,
        d_model: usize,
        submitted: Instant,
    ) -> Self {
        let prompt_len = job.prompt.len();
        let acc = job.capture.then(|| CaptureAccumulator::new(n_rows, d_model, prompt_len, Vec::new()));
        let mut seq = Self {
            kv_reserve,
            submitted,
            last_token: None,
            span: job.span,
            phase: tracing::Span::none(),
            deadline: job.deadline,
            failed: false,
            cache,
            pending: job.prompt,
            consumed: 0,
            prompt_len,
            steering: job.steering,
            work: Work::Generate(Generation {
                tx,
                max_tokens: job.max_tokens,
                stop: job.stop,
                sampler: Sampler::new(job.sampling),
                generated: Vec::new(),
                decoder: IncrementalDecoder::default(),
                text: String::new(),
                sent: 0,
                prompt_tokens: prompt_len,
                started: None,
                first_token: None,
                done: false,
                aborted: false,
                failed: false,
                monitors: job.monitors,
                acc,
                logprobs: job.logprobs,
            }),
        };
        seq.enter(Phase::Queue);
        seq
    }

    /// Ends the current phase's span and opens the next (only for traced requests).
    pub fn enter(&mut self, phase: Phase) {
        if self.span.is_none() {
            return;
        }
        self.phase = tracing::Span::none();
        self.phase = match phase {
            Phase::Queue => tracing::info_span!(parent: &self.span, "queue"),
            Phase::Prefill => tracing::info_span!(parent: &self.span, "prefill", prompt_tokens = self.prompt_len),
            Phase::Decode => tracing::info_span!(parent: &self.span, "decode"),
        };
    }

    pub fn capture(
        job: CaptureJob,
        tx: oneshot::Sender<Result<CaptureResult, EngineError>>,
        cache: KvCache,
        n_rows: usize,
        d_model: usize,
        kv_reserve: usize,
        submitted: Instant,
    ) -> Self {
        let acc = CaptureAccumulator::new(n_rows, d_model, job.prompt_len, job.probes).keeping(job.token_states);
        let scoring =
            job.logprobs.map(|top| Scoring { targets: job.tokens[job.prompt_len..].to_vec(), top, out: Vec::new() });
        Self {
            kv_reserve,
            submitted,
            last_token: None,
            span: tracing::Span::none(),
            phase: tracing::Span::none(),
            deadline: None,
            failed: false,
            cache,
            pending: job.tokens,
            consumed: 0,
            prompt_len: job.prompt_len,
            steering: job.steering,
            work: Work::Capture(Capture { tx: Some(tx), acc, scoring }),
        }
    }

    fn in_response(&self) -> bool {
        self.consumed >= self.prompt_len
    }

    /// Whether the next tokens are prefill (a prompt, or text a capture scores) rather than
    /// tokens the model generated.
    pub fn prefilling(&self) -> bool {
        !self.in_response() || matches!(self.work, Work::Capture(_))
    }

    pub fn is_capture(&self) -> bool {
        matches!(self.work, Work::Capture(_))
    }

    pub fn steered(&self) -> bool {
        !self.steering.is_empty()
    }

    /// Tokens the next pass may take: all pending ones, but never across the prompt/response
    /// boundary, since steering differs on each side.
    pub fn pending_len(&self) -> usize {
        if self.in_response() { self.pending.len() } else { self.pending.len().min(self.prompt_len - self.consumed) }
    }

    /// How many of the next `take` tokens need logits (their last ones): a generation needs the
    /// last position once its pending tokens are all consumed; a scoring capture needs the last
    /// prompt position and every response position (the final one's logits go unused).
    pub fn wants_logits(&self, take: usize) -> usize {
        match &self.work {
            Work::Generate(_) => usize::from(take == self.pending.len()),
            Work::Capture(Capture { scoring: Some(s), .. }) if !s.targets.is_empty() => {
                if self.in_response() {
                    take
                } else {
                    usize::from(self.consumed + take == self.prompt_len)
                }
            }
            Work::Capture(_) => 0,
        }
    }

    /// Whether the host reads this sequence's logits rows whole (sampling, log-probabilities,
    /// scoring) rather than only their most likely token.
    pub fn reads_logits(&self) -> bool {
        match &self.work {
            Work::Generate(g) => !g.sampler.is_greedy() || g.logprobs.is_some(),
            Work::Capture(_) => true,
        }
    }

    /// Hidden states are kept for captures and capturing generations, and for monitored
    /// generations whenever a token is about to be sampled.
    pub fn wants_capture(&self, take: usize) -> bool {
        match &self.work {
            Work::Capture(_) => true,
            Work::Generate(g) => g.acc.is_some() || (!g.monitors.is_empty() && self.wants_logits(take) > 0),
        }
    }

    pub fn row_input(&mut self, take: usize) -> RowInput<'_> {
        if let Work::Generate(g) = &mut self.work {
            g.started.get_or_insert_with(Instant::now);
        }
        let logits = self.wants_logits(take);
        let capture = self.wants_capture(take);
        let steering = self.steering.addends(self.in_response());
        RowInput { tokens: &self.pending[..take], cache: &mut self.cache, steering, capture, logits }
    }

    pub fn consume(&mut self, take: usize) {
        self.pending.drain(..take);
        self.consumed += take;
    }

    pub fn feed_response(&mut self, token: u32) {
        self.pending.push(token);
    }

    /// Tokens generated so far (0 for captures).
    pub fn generated(&self) -> usize {
        match &self.work {
            Work::Generate(g) => g.generated.len(),
            Work::Capture(_) => 0,
        }
    }

    /// Finished because its client went away rather than by completing.
    pub fn aborted(&self) -> bool {
        matches!(&self.work, Work::Generate(g) if g.aborted)
    }

    pub fn cancelled(&self) -> bool {
        match &self.work {
            Work::Generate(g) => g.tx.is_closed(),
            Work::Capture(c) => c.tx.as_ref().is_none_or(|t| t.is_closed()),
        }
    }

    pub fn finished(&self) -> bool {
        match &self.work {
            Work::Generate(g) => g.done,
            Work::Capture(c) => c.tx.is_none(),
        }
    }

    /// Ended by an error (not by completing, its client leaving or its deadline).
    pub fn failed(&self) -> bool {
        self.failed || matches!(&self.work, Work::Generate(g) if g.failed)
    }

    pub fn fail(&mut self, err: EngineError) {
        self.failed = !matches!(err, EngineError::DeadlineExceeded(_));
        match &mut self.work {
            Work::Generate(g) => {
                g.aborted = matches!(err, EngineError::DeadlineExceeded(_));
                let _ = g.tx.send(Err(err));
                g.done = true;
            }
            Work::Capture(c) => {
                if let Some(tx) = c.tx.take() {
                    let _ = tx.send(Err(err));
                }
            }
        }
    }
}

pub(super) struct Generation {
    tx: mpsc::UnboundedSender<Result<GenEvent, EngineError>>,
    max_tokens: usize,
    stop: Vec<String>,
    sampler: Sampler,
    generated: Vec<u32>,
    decoder: IncrementalDecoder,
    /// Everything decoded so far, and how many bytes of it were sent.
    text: String,
    sent: usize,
    prompt_tokens: usize,
    started: Option<Instant>,
    first_token: Option<Instant>,
    done: bool,
    /// Ended because the client went away (a send failed).
    aborted: bool,
    /// Ended by an error of its own (the text could not be decoded).
    failed: bool,
    monitors: Vec<Probe>,
    acc: Option<CaptureAccumulator>,
    /// Report log-probabilities with this many top alternatives.
    logprobs: Option<usize>,
}

/// What a step hands a generation: its logits row, or only its argmax when that is all the
/// sequence reads ([`Sequence::reads_logits`]).
pub enum Next {
    Logits(Vec<f32>),
    Greedy(u32),
}

impl Generation {
    /// Adds a pass's hidden states to the activation summaries, when the job asked for them.
    pub fn accumulate(&mut self, states: &[Tensor], take: usize) -> candle_core::Result<()> {
        match &mut self.acc {
            Some(acc) => acc.add(states, take),
            None => Ok(()),
        }
    }

    /// The monitors' projections at the last of the `take` positions just computed: the one whose
    /// logits are about to be sampled.
    pub fn monitor_scores(&self, states: &[Tensor], take: usize) -> candle_core::Result<Vec<f32>> {
        Ok(probe_scores(states, &self.monitors, take - 1, 1)?.into_iter().map(|s| s[0]).collect())
    }

    /// Takes the next token (sampled from a logits row, or the greedy choice made where the
    /// logits are), streams it with the monitors' `scores`, and returns the token to feed next
    /// (`None` when the generation ended). `cached` is the sequence's cache length.
    pub fn on_logits(
        &mut self,
        next: Next,
        scores: Vec<f32>,
        tok: &TextTokenizer,
        cached: usize,
        context: usize,
    ) -> Option<u32> {
        let (id, logprob) = match next {
            Next::Logits(logits) => {
                let id = self.sampler.sample(&logits);
                (id, self.logprobs.map(|top| logprobs(&logits, id, top)))
            }
            Next::Greedy(id) => (id, None),
        };
        self.first_token.get_or_insert_with(Instant::now);
        self.generated.push(id);
        let token = Emitted { id, scores, logprob };
        if tok.is_eos(id) {
            return self.finish(FinishReason::Stop, token, tok);
        }
        match self.decoder.push(tok, id) {
            Ok(delta) => self.text.push_str(&delta),
            Err(e) => {
                let _ = self.tx.send(Err(EngineError::Compute(e.to_string())));
                self.done = true;
                self.failed = true;
                return None;
            }
        }
        if let Some(cut) = self.stop_at() {
            self.text.truncate(cut);
            return self.finish(FinishReason::Stop, token, tok);
        }
        if self.generated.len() >= self.max_tokens {
            return self.finish(FinishReason::Length, token, tok);
        }
        if cached + 1 > context {
            return self.finish(FinishReason::Context, token, tok);
        }
        let safe = self.text.len() - self.held_back();
        let text = self.text[self.sent..safe].to_string();
        self.sent = safe;
        if self.tx.send(Ok(token.event(text))).is_err() {
            self.done = true;
            self.aborted = true;
            return None;
        }
        Some(id)
    }

    /// Byte index of the earliest complete stop string, if any.
    fn stop_at(&self) -> Option<usize> {
        self.stop.iter().filter(|s| !s.is_empty()).filter_map(|s| self.text.find(s.as_str())).min()
    }

    /// Bytes at the end of the text that could still grow into a stop string.
    fn held_back(&self) -> usize {
        let tail = &self.text[self.sent..];
        self.stop
            .iter()
            .flat_map(|s| {
                (1..s.len().min(tail.len() + 1))
                    .rev()
                    .filter(|&n| s.is_char_boundary(n) && tail.ends_with(&s[..n]))
                    .take(1)
            })
            .max()
            .unwrap_or(0)
    }

    fn finish(&mut self, reason: FinishReason, token: Emitted, tok: &TextTokenizer) -> Option<u32> {
        if reason != FinishReason::Stop {
            if let Ok(rest) = self.decoder.flush(tok) {
                self.text.push_str(&rest);
            }
            if let Some(cut) = self.stop_at() {
                self.text.truncate(cut);
            }
        }
        let text = self.text.get(self.sent..).unwrap_or_default().to_string();
        self.sent = self.text.len();
        let _ = self.tx.send(Ok(token.event(text)));
        let now = Instant::now();
        let started = self.started.unwrap_or(now);
        let first = self.first_token.unwrap_or(now);
        let _ = self.tx.send(Ok(GenEvent::Done(Summary {
            finish_reason: reason,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.generated.len(),
            prefill_ms: (first - started).as_secs_f64() * 1e3,
            decode_ms: (now - first).as_secs_f64() * 1e3,
            capture: self.acc.as_ref().map(CaptureAccumulator::result),
        })));
        self.done = true;
        None
    }
}

/// A sampled token on its way to the client.
struct Emitted {
    id: u32,
    scores: Vec<f32>,
    logprob: Option<Logprobs>,
}

impl Emitted {
    fn event(self, text: String) -> GenEvent {
        GenEvent::Token { text, id: self.id, scores: self.scores, logprob: self.logprob }
    }
}

pub(super) struct Capture {
    tx: Option<oneshot::Sender<Result<CaptureResult, EngineError>>>,
    acc: CaptureAccumulator,
    scoring: Option<Scoring>,
}

/// Teacher-forced scoring of a capture's response tokens: each logits row, in position order,
/// predicts the next target.
struct Scoring {
    targets: Vec<u32>,
    top: usize,
    out: Vec<Logprobs>,
}

impl Capture {
    pub fn accumulate(&mut self, states: &[Tensor], take: usize) -> candle_core::Result<()> {
        self.acc.add(states, take)
    }

    /// Reads the next logits row against the next response token; rows past the last target
    /// (the final position predicts beyond the text) are ignored.
    pub fn score(&mut self, logits: &[f32]) {
        if let Some(s) = &mut self.scoring
            && let Some(&target) = s.targets.get(s.out.len())
        {
            s.out.push(logprobs(logits, target, s.top));
        }
    }

    pub fn finish(&mut self) {
        if let Some(tx) = self.tx.take() {
            let mut result = self.acc.result();
            result.logprobs = self.scoring.take().map(|s| s.out).unwrap_or_default();
            let _ = tx.send(Ok(result));
        }
    }
}

/// Running sums of hidden states over prompt and response tokens, per residual layer.
pub(crate) struct CaptureAccumulator {
    n_rows: usize,
    d: usize,
    prompt_len: usize,
    seen: usize,
    prompt_sum: Vec<f32>,
    response_sum: Vec<f32>,
    prompt_last: Vec<f32>,
    probes: Vec<Probe>,
    per_token: Vec<Vec<f32>>,
    keep: Option<TokenStates>,
    kept: Vec<Vec<f32>>,
}

impl CaptureAccumulator {
    /// Also keeps the hidden states of `keep`'s tokens at its layers.
    pub fn keeping(mut self, keep: Option<TokenStates>) -> Self {
        self.keep = keep;
        self
    }

    pub fn new(n_rows: usize, d: usize, prompt_len: usize, probes: Vec<Probe>) -> Self {
        let z = vec![0.0; n_rows * d];
        let per_token = vec![Vec::new(); probes.len()];
        Self {
            n_rows,
            d,
            prompt_len,
            seen: 0,
            prompt_sum: z.clone(),
            response_sum: z.clone(),
            prompt_last: z,
            probes,
            per_token,
            keep: None,
            kept: Vec::new(),
        }
    }

    /// Adds one chunk of `take` tokens (entirely prompt or entirely response); `states` holds
    /// `n_rows` tensors of shape `[take, d]`.
    pub fn add(&mut self, states: &[Tensor], take: usize) -> candle_core::Result<()> {
        let stacked = Tensor::stack(states, 0)?; // [n_rows, take, d]
        let sums: Vec<f32> = stacked.sum(1)?.flatten_all()?.to_vec1()?;
        let in_prompt = self.seen < self.prompt_len;
        let target = if in_prompt { &mut self.prompt_sum } else { &mut self.response_sum };
        target.iter_mut().zip(&sums).for_each(|(a, b)| *a += b);
        if in_prompt && self.seen + take == self.prompt_len {
            self.prompt_last = stacked.narrow(1, take - 1, 1)?.squeeze(1)?.flatten_all()?.to_vec1()?;
        }
        for (acc, scores) in self.per_token.iter_mut().zip(probe_scores(states, &self.probes, 0, take)?) {
            acc.extend(scores);
        }
        if let Some(keep) = &self.keep {
            for &p in keep.positions.iter().filter(|&&p| (self.seen..self.seen + take).contains(&p)) {
                let mut state = Vec::with_capacity(keep.layers.len() * self.d);
                for &l in &keep.layers {
                    state.extend(states[l].get(p - self.seen)?.to_vec1::<f32>()?);
                }
                self.kept.push(state);
            }
        }
        self.seen += take;
        Ok(())
    }

    pub fn result(&self) -> CaptureResult {
        let mean = |sum: &[f32], n: usize| sum.iter().map(|v| v / n.max(1) as f32).collect::<Vec<_>>();
        let response_tokens = self.seen.saturating_sub(self.prompt_len);
        CaptureResult {
            n_rows: self.n_rows,
            d_model: self.d,
            prompt_last: self.prompt_last.clone(),
            prompt_avg: mean(&self.prompt_sum, self.prompt_len),
            response_avg: (response_tokens > 0).then(|| mean(&self.response_sum, response_tokens)),
            per_token: self.per_token.clone(),
            logprobs: Vec::new(),
            token_states: self.kept.clone(),
        }
    }
}
