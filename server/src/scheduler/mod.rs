//! The engine actor: one OS thread per resident model runs continuous batching over a packed
//! forward pass. Handles are cheap to clone; each request gets its own response channel, and a
//! closed channel (the client went away) frees the sequence's slot at the next step.

mod sequence;

use crate::metrics::ModelMetrics;
use crate::model::LoadedModel;
use crate::model::arch::llama::{ForwardContext, KvCache, RowInput};
use crate::model::sampling::{Logprobs, SamplingConfig};
use crate::steering::plan::SteeringPlan;
use crate::steering::probe::Probe;
use candle_core::Tensor;
use sequence::{Next, Phase, Sequence, Work};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Limits of one engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most; later arrivals wait.
    pub max_batch: usize,
    /// Tokens one forward pass may carry (decode tokens plus prefill chunks).
    pub max_step_tokens: usize,
    /// Requests waiting beyond the running batch; past this, submissions are refused.
    pub max_queue: usize,
    /// Memory for the key/value caches of running sequences. A sequence reserves room for
    /// its prompt plus `max_tokens` when it joins the batch; requests wait until that fits.
    pub kv_cache_bytes: usize,
    /// Fault injection for tests: a step carrying this token id panics inside the engine
    /// thread, as a kernel bug would. Never set from configuration.
    #[doc(hidden)]
    pub panic_on_token: Option<u32>,
    /// Where the engine reports latencies, batch sizes and token counts.
    pub metrics: ModelMetrics,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self::from(&crate::config::EngineSettings::default())
    }
}

impl From<&crate::config::EngineSettings> for EngineConfig {
    /// The limits the settings give, reporting to no registry until metrics are attached.
    fn from(s: &crate::config::EngineSettings) -> Self {
        Self {
            max_batch: s.max_batch,
            max_step_tokens: s.max_step_tokens,
            max_queue: s.max_queue,
            kv_cache_bytes: s.kv_cache_mb << 20,
            panic_on_token: s.panic_on_token,
            metrics: ModelMetrics::detached(),
        }
    }
}

/// Panics within this window count towards [`CRASH_LOOP`].
const CRASH_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);
/// After this many engine panics within [`CRASH_WINDOW`] the engine stops restarting: it stays
/// NOT_SERVING and refuses work, so a supervisor replaces the process.
const CRASH_LOOP: usize = 5;

/// Whether an engine serves, published to health checks and status reports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineHealth {
    /// False after a crash loop (and for the instant of a restart).
    pub serving: bool,
    /// Times the engine thread panicked and restarted since start.
    pub restarts: u64,
    /// The last panic's message.
    pub last_panic: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the engine queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error(
        "the request needs {need_mib:.1} MiB of KV cache ({tokens} tokens) but the engine's budget is {budget_mib:.1} MiB; lower max_tokens or shorten the prompt"
    )]
    TooLarge { tokens: usize, need_mib: f64, budget_mib: f64 },
    #[error("deadline exceeded after {0} generated tokens")]
    DeadlineExceeded(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("model computation failed: {0}")]
    Compute(String),
    #[error("the engine failed while running this request ({0}); it restarted and serves new requests")]
    Panicked(String),
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Length,
    Stop,
    Context,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub prefill_ms: f64,
    pub decode_ms: f64,
    /// Activation summaries of the tokens run through the model (prompt, and every generated token
    /// fed back), when the job asked for them.
    pub capture: Option<CaptureResult>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Newly stable text and the token behind it (text may be empty while a stop string or a
    /// multi-byte character is still undecided).
    Token {
        text: String,
        id: u32,
        /// One per monitor probe: the projection at the position that predicted this token.
        scores: Vec<f32>,
        /// With `GenerateJob::logprobs`: the token's log-probability under the model's own
        /// distribution (before temperature, top-k and top-p) and the position's top tokens.
        logprob: Option<Logprobs>,
    },
    Done(Summary),
}

pub struct GenerateJob {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
    pub steering: SteeringPlan,
    /// Past this instant the generation ends with `DeadlineExceeded`.
    pub deadline: Option<Instant>,
    /// Directions whose projections accompany every token.
    pub monitors: Vec<Probe>,
    /// Summarise the hidden states of every layer over prompt and response as the generation runs
    /// (see `Summary::capture`): extraction's one pass over prompt and answer.
    pub capture: bool,
    /// Report each token's log-probability with this many top alternatives.
    pub logprobs: Option<usize>,
    /// The request's span: the engine adds `queue`, `prefill` and `decode` child spans to it.
    pub span: tracing::Span,
}

impl GenerateJob {
    /// `max_tokens` greedy tokens after `prompt`, with nothing else: no stop strings, steering,
    /// deadline, monitors, capture or log-probabilities (set those on the result).
    pub fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling: SamplingConfig::default(),
            stop: Vec::new(),
            steering: SteeringPlan::new(0),
            deadline: None,
            monitors: Vec::new(),
            capture: false,
            logprobs: None,
            span: tracing::Span::none(),
        }
    }
}

/// A forward pass over `tokens` (prompt then optional response) that reports per-layer
/// activation summaries instead of generating.
pub struct CaptureJob {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub steering: SteeringPlan,
    /// Directions to project every token's hidden state onto (see `CaptureResult::per_token`).
    pub probes: Vec<Probe>,
    /// Score the response tokens (teacher-forced log-probabilities) with this many top
    /// alternatives per position.
    pub logprobs: Option<usize>,
    /// Keep the whole hidden state of some tokens at some layers (see
    /// `CaptureResult::token_states`).
    pub token_states: Option<TokenStates>,
}

/// Which tokens' hidden states a capture keeps, and at which residual layers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenStates {
    /// Indices into the job's tokens, ascending.
    pub positions: Vec<usize>,
    pub layers: Vec<usize>,
}

/// Per residual layer (`n_rows x d_model`, row-major) activation summaries of one capture.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureResult {
    pub n_rows: usize,
    pub d_model: usize,
    pub prompt_last: Vec<f32>,
    pub prompt_avg: Vec<f32>,
    /// `None` when the capture had no response tokens.
    pub response_avg: Option<Vec<f32>>,
    /// Per probe of the job, the projection at every token (prompt then response).
    pub per_token: Vec<Vec<f32>>,
    /// With `CaptureJob::logprobs`: one per response token, given everything before it.
    pub logprobs: Vec<Logprobs>,
    /// With `CaptureJob::token_states`: per requested position, the hidden state at each
    /// requested layer (`layers.len() x d_model`, row-major).
    pub token_states: Vec<Vec<f32>>,
}

/// Events of one generation; dropping it cancels the generation.
pub type EventStream = mpsc::UnboundedReceiver<Result<GenEvent, EngineError>>;

enum Command {
    Generate(GenerateJob, mpsc::UnboundedSender<Result<GenEvent, EngineError>>, Instant),
    Capture(CaptureJob, oneshot::Sender<Result<CaptureResult, EngineError>>, Instant),
}

/// Counters an engine publishes for status reports and tests.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Submitted, not yet running (includes commands still in the channel).
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    /// KV cache bytes reserved by running sequences.
    pub kv_reserved_bytes: AtomicUsize,
    /// Admitted and not yet gone: waiting plus running (bounds admission to batch + queue).
    pub in_flight: AtomicUsize,
    pub completed: AtomicU64,
    pub cancelled: AtomicU64,
    /// Ended by an error (a row the model could not run, an engine panic).
    pub failed: AtomicU64,
    pub rejected: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Device memory of the model's KV pool (0 on the host path).
    pub kv_pool_bytes: AtomicUsize,
}

/// A point-in-time copy of [`EngineStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineStatus {
    pub waiting: usize,
    pub running: usize,
    pub kv_reserved_bytes: usize,
    pub kv_budget_bytes: usize,
    pub kv_pool_bytes: usize,
    pub completed: u64,
    pub cancelled: u64,
    pub failed: u64,
    pub rejected: u64,
    pub generated_tokens: u64,
    pub restarts: u64,
    pub serving: bool,
}

/// Cloneable handle to a model's engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    model: Arc<LoadedModel>,
    cfg: EngineConfig,
    stats: Arc<EngineStats>,
    health: tokio::sync::watch::Receiver<EngineHealth>,
}

impl EngineHandle {
    /// Starts the engine thread for `model`.
    pub fn spawn(model: Arc<LoadedModel>, cfg: EngineConfig) -> std::io::Result<Self> {
        // The channel never holds more than batch + queue commands: `in_flight` is checked first.
        let (tx, rx) = mpsc::channel((cfg.max_queue + cfg.max_batch).max(1));
        let stats = Arc::new(EngineStats::default());
        let (health_tx, health) = tokio::sync::watch::channel(EngineHealth { serving: true, ..Default::default() });
        let engine = Engine {
            model: model.clone(),
            cfg: cfg.clone(),
            rx,
            running: Vec::new(),
            waiting: VecDeque::new(),
            stats: stats.clone(),
            bytes_per_token: model.model.kv_bytes_per_token(),
            health: health_tx,
            panics: VecDeque::new(),
        };
        std::thread::Builder::new().name(format!("engine-{}", model.id)).spawn(move || engine.run())?;
        Ok(Self { tx, model, cfg, stats, health })
    }

    /// The engine's health; changes when it panics, restarts or gives up.
    pub fn health(&self) -> tokio::sync::watch::Receiver<EngineHealth> {
        self.health.clone()
    }

    /// Sequences the engine decodes together at most.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    pub fn max_batch(&self) -> usize {
        self.cfg.max_batch
    }

    pub fn status(&self) -> EngineStatus {
        let s = &self.stats;
        EngineStatus {
            waiting: s.waiting.load(Ordering::Relaxed),
            running: s.running.load(Ordering::Relaxed),
            kv_reserved_bytes: s.kv_reserved_bytes.load(Ordering::Relaxed),
            kv_budget_bytes: self.cfg.kv_cache_bytes,
            kv_pool_bytes: s.kv_pool_bytes.load(Ordering::Relaxed),
            completed: s.completed.load(Ordering::Relaxed),
            cancelled: s.cancelled.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
            rejected: s.rejected.load(Ordering::Relaxed),
            generated_tokens: s.generated_tokens.load(Ordering::Relaxed),
            restarts: self.health.borrow().restarts,
            serving: self.health.borrow().serving,
        }
    }

    /// Refuses work that could never fit the KV budget, that would overflow the queue, or that
    /// arrives while the engine is down; otherwise takes a place (given back when the request
    /// leaves). Places are the running batch plus `max_queue`: a burst at an idle engine fills
    /// the batch before anything counts as queued.
    fn admit_check(&self, tokens: usize) -> Result<(), EngineError> {
        let need = tokens * self.model.model.kv_bytes_per_token();
        let mib = |b: usize| b as f64 / (1 << 20) as f64;
        let refused = if !self.health.borrow().serving {
            Some(EngineError::Stopped)
        } else if need > self.cfg.kv_cache_bytes {
            Some(EngineError::TooLarge { tokens, need_mib: mib(need), budget_mib: mib(self.cfg.kv_cache_bytes) })
        } else {
            let max = self.cfg.max_queue + self.cfg.max_batch;
            let place =
                self.stats.in_flight.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| (w < max).then_some(w + 1));
            if place.is_ok() {
                self.stats.waiting.fetch_add(1, Ordering::Relaxed);
            }
            place.is_err().then_some(EngineError::QueueFull(self.cfg.max_queue))
        };
        if let Some(e) = refused {
            self.stats.rejected.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
        Ok(())
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    /// Sends a command whose queue place `admit_check` took.
    fn submit(&self, cmd: Command) -> Result<(), EngineError> {
        self.tx.try_send(cmd).map_err(|e| {
            self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(_) => EngineError::QueueFull(self.cfg.max_queue),
                mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
            }
        })
    }

    /// Queues a generation; events arrive on the returned channel, which the caller may drop
    /// to cancel.
    pub fn generate(&self, job: GenerateJob) -> Result<EventStream, EngineError> {
        self.admit_check(reserved_tokens(job.prompt.len(), job.max_tokens, self.model.config().context_length))?;
        // Unbounded: the engine never blocks on a slow reader; a generation's events are
        // bounded by its max_tokens anyway.
        let (tx, rx) = mpsc::unbounded_channel();
        self.submit(Command::Generate(job, tx, Instant::now()))?;
        Ok(rx)
    }

    /// Runs a capture pass and waits for its result.
    pub async fn capture(&self, job: CaptureJob) -> Result<CaptureResult, EngineError> {
        self.admit_check(job.tokens.len())?;
        let (tx, rx) = oneshot::channel();
        self.submit(Command::Capture(job, tx, Instant::now()))?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}

/// Cache slots a generation may fill: its prompt plus max_tokens, within the context window.
fn reserved_tokens(prompt: usize, max_tokens: usize, context: usize) -> usize {
    (prompt + max_tokens).min(context)
}

struct Engine {
    model: Arc<LoadedModel>,
    cfg: EngineConfig,
    rx: mpsc::Receiver<Command>,
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
    stats: Arc<EngineStats>,
    bytes_per_token: usize,
    health: tokio::sync::watch::Sender<EngineHealth>,
    /// When recent panics happened (for crash-loop detection).
    panics: VecDeque<Instant>,
}

impl Engine {
    /// The engine loop. A panic anywhere in it (a kernel bug, a poisoned row) is caught: the
    /// sequences that were running get an error (INTERNAL), their state is dropped, the restart
    /// is counted, and the engine goes on with the waiting ones. The model's weights are never
    /// written after loading, so nothing else can be left half-changed. After [`CRASH_LOOP`]
    /// panics within [`CRASH_WINDOW`] it gives up: NOT_SERVING for good and every request
    /// refused, so health checks get the process replaced.
    fn run(mut self) {
        tracing::info!(model = %self.model.id, "engine started");
        loop {
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.turn())) {
                Ok(true) => {}
                Ok(false) => break,
                Err(payload) => {
                    if !self.recover(&crate::support::panic_text(payload.as_ref())) {
                        break;
                    }
                }
            }
        }
        tracing::info!(model = %self.model.id, "engine stopped");
    }

    /// One round: take new work, run a step. False once every handle is gone.
    fn turn(&mut self) -> bool {
        if !self.admit() {
            return false;
        }
        self.expire();
        self.retire();
        if !self.running.is_empty() {
            self.step();
            self.retire();
        }
        true
    }

    /// Fails the running sequences after a panic; returns whether the engine goes on.
    fn recover(&mut self, msg: &str) -> bool {
        let now = Instant::now();
        self.panics.push_back(now);
        while self.panics.front().is_some_and(|&t| now.duration_since(t) > CRASH_WINDOW) {
            self.panics.pop_front();
        }
        let crash_loop = self.panics.len() >= CRASH_LOOP;
        tracing::error!(model = %self.model.id, panic = msg, running = self.running.len(), "engine panicked");
        self.health.send_modify(|h| {
            h.serving = false;
            h.restarts += 1;
            h.last_panic = Some(msg.to_string());
        });
        if !crash_loop {
            // Serving again before anyone hears of the failure, so a client that retries at
            // once is admitted.
            self.health.send_modify(|h| h.serving = true);
        }
        let dropped: Vec<Sequence> = if crash_loop {
            self.running.drain(..).chain(self.waiting.drain(..)).collect()
        } else {
            self.running.drain(..).collect()
        };
        for mut seq in dropped {
            if !seq.finished() {
                seq.fail(EngineError::Panicked(msg.to_string()));
            }
            self.stats.failed.fetch_add(1, Ordering::Relaxed);
            self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        self.stats.running.store(0, Ordering::Relaxed);
        self.stats.kv_reserved_bytes.store(0, Ordering::Relaxed);
        if crash_loop {
            tracing::error!(model = %self.model.id, panics = self.panics.len(), "engine crash loop: giving up; NOT_SERVING");
            // Refuse everything still queued in the channel, then stop.
            self.rx.close();
            while let Ok(cmd) = self.rx.try_recv() {
                let mut seq = self.new_sequence(cmd);
                seq.fail(EngineError::Stopped);
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            self.stats.waiting.store(0, Ordering::Relaxed);
            return false;
        }
        tracing::warn!(model = %self.model.id, "engine restarted");
        true
    }

    fn new_sequence(&self, cmd: Command) -> Sequence {
        let cfg = self.model.config();
        match cmd {
            Command::Generate(job, tx, submitted) => {
                let reserve = reserved_tokens(job.prompt.len(), job.max_tokens, cfg.context_length);
                let cache = KvCache::with_limit(cfg, reserve);
                Sequence::generate(
                    job,
                    tx,
                    cache,
                    reserve * self.bytes_per_token,
                    cfg.n_residual_rows(),
                    cfg.hidden_size,
                    submitted,
                )
            }
            Command::Capture(job, tx, submitted) => {
                let reserve = job.tokens.len();
                let cache = KvCache::with_limit(cfg, reserve);
                let bytes = reserve * self.bytes_per_token;
                Sequence::capture(job, tx, cache, cfg.n_residual_rows(), cfg.hidden_size, bytes, submitted)
            }
        }
    }

    fn reserved(&self) -> usize {
        self.running.iter().map(|s| s.kv_reserve).sum()
    }

    /// Ends sequences whose deadline has passed, running or waiting.
    fn expire(&mut self) {
        let now = Instant::now();
        for s in self.running.iter_mut().chain(self.waiting.iter_mut()) {
            if s.deadline.is_some_and(|d| now >= d) && !s.finished() {
                let generated = s.generated();
                s.fail(EngineError::DeadlineExceeded(generated));
            }
        }
    }

    /// Drops finished and cancelled sequences (their caches go with them) and publishes stats.
    fn retire(&mut self) {
        let stats = &self.stats;
        let before_waiting = self.waiting.len();
        self.waiting.retain(|s| {
            let keep = !s.cancelled() && !s.finished();
            if !keep {
                let counter = if s.failed() { &stats.failed } else { &stats.cancelled };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            keep
        });
        let left = before_waiting - self.waiting.len();
        stats.waiting.fetch_sub(left, Ordering::Relaxed);
        stats.in_flight.fetch_sub(left, Ordering::Relaxed);
        let before_running = self.running.len();
        self.running.retain(|s| {
            let counter = if s.failed() {
                &stats.failed
            } else if s.finished() && !s.aborted() {
                &stats.completed
            } else if s.finished() || s.cancelled() {
                &stats.cancelled
            } else {
                return true;
            };
            counter.fetch_add(1, Ordering::Relaxed);
            false
        });
        stats.in_flight.fetch_sub(before_running - self.running.len(), Ordering::Relaxed);
        stats.running.store(self.running.len(), Ordering::Relaxed);
        stats.kv_reserved_bytes.store(self.reserved(), Ordering::Relaxed);
    }

    /// Moves new commands into the waiting queue and waiting sequences into the batch.
    /// Blocks while there is nothing to do. Returns false once every handle is gone.
    fn admit(&mut self) -> bool {
        if self.running.is_empty() && self.waiting.is_empty() {
            match self.rx.blocking_recv() {
                Some(cmd) => {
                    let seq = self.new_sequence(cmd);
                    self.waiting.push_back(seq);
                }
                None => return false,
            }
        }
        while let Ok(cmd) = self.rx.try_recv() {
            let seq = self.new_sequence(cmd);
            self.waiting.push_back(seq);
        }
        self.retire();
        // First come, first served: the head of the queue waits for room rather than being
        // overtaken by smaller requests, so large requests cannot starve.
        let mut reserved = self.reserved();
        while self.running.len() < self.cfg.max_batch {
            match self.waiting.front() {
                Some(s) if reserved + s.kv_reserve <= self.cfg.kv_cache_bytes => {
                    reserved += s.kv_reserve;
                    let mut s = self.waiting.pop_front().expect("front exists");
                    self.cfg.metrics.queue_wait.observe(s.submitted.elapsed().as_secs_f64());
                    self.cfg.metrics.sequence_started(s.is_capture(), s.steered());
                    s.enter(Phase::Prefill);
                    self.running.push(s);
                    self.stats.waiting.fetch_sub(1, Ordering::Relaxed);
                }
                _ => break,
            }
        }
        self.stats.running.store(self.running.len(), Ordering::Relaxed);
        self.stats.kv_reserved_bytes.store(reserved, Ordering::Relaxed);
        true
    }

    /// One packed forward pass: every decoding sequence contributes its last token, prefilling
    /// sequences contribute chunks of their prompt within the step's token budget.
    fn step(&mut self) {
        let mut budget = self.cfg.max_step_tokens;
        // Decode rows first: one token each keeps latency flat; prefill shares what is left.
        let mut order: Vec<usize> = (0..self.running.len()).collect();
        order.sort_by_key(|&i| self.running[i].pending_len() > 1);
        let mut take = vec![0usize; self.running.len()];
        for &i in &order {
            let want = self.running[i].pending_len();
            let n = if want == 1 { 1 } else { want.min(budget) };
            take[i] = n;
            budget = budget.saturating_sub(n);
        }
        let started = Instant::now();
        let prefill: usize = self.running.iter().zip(&take).filter(|(s, _)| s.prefilling()).map(|(_, &n)| n).sum();
        let mut rejected = Vec::new();
        let (rows, selected): (Vec<RowInput<'_>>, Vec<usize>) = {
            let mut rows = Vec::new();
            let mut selected = Vec::new();
            for (i, seq) in self.running.iter_mut().enumerate() {
                if take[i] == 0 {
                    continue;
                }
                let row = seq.row_input(take[i]);
                // A row the model cannot run fails alone, before the step.
                if let Err(e) = self.model.model.check_row(&row) {
                    rejected.push((i, e));
                    continue;
                }
                rows.push(row);
                selected.push(i);
            }
            (rows, selected)
        };
        if let Some(poison) = self.cfg.panic_on_token
            && rows.iter().any(|r| r.tokens.contains(&poison))
        {
            panic!("injected fault: token {poison} reached the forward pass");
        }
        let result = if rows.is_empty() { None } else { Some(self.model.model.forward(ForwardContext { rows })) };
        for (i, msg) in rejected {
            tracing::warn!(error = %msg, "row rejected before the step");
            self.running[i].fail(EngineError::Compute(msg));
        }
        let Some(result) = result else { return };
        let metrics = &self.cfg.metrics;
        metrics.step_seconds.observe(started.elapsed().as_secs_f64());
        metrics.batch_size.observe(selected.len() as f64);
        metrics.prefill_tokens.inc_by(prefill as u64);
        match result {
            Ok(out) => {
                if let Err(e) = self.absorb(&selected, &take, out.logits, out.captures) {
                    self.fail(&selected, &e.to_string());
                }
            }
            Err(e) => self.fail(&selected, &e.to_string()),
        }
        self.stats.kv_pool_bytes.store(self.model.model.kv_pool_bytes(), Ordering::Relaxed);
        tracing::trace!(rows = selected.len(), ms = started.elapsed().as_secs_f64() * 1e3, "step");
    }

    fn absorb(
        &mut self,
        selected: &[usize],
        take: &[usize],
        logits: Option<Tensor>,
        captures: Vec<Vec<Tensor>>,
    ) -> candle_core::Result<()> {
        // Which logits rows the host reads whole; the others only need their argmax.
        let whole: Vec<bool> = selected
            .iter()
            .flat_map(|&i| {
                let seq = &self.running[i];
                std::iter::repeat_n(seq.reads_logits(), seq.wants_logits(take[i]))
            })
            .collect();
        let mut logits = match logits {
            Some(l) => read_logits(&l, &whole)?.into_iter(),
            None => Vec::new().into_iter(),
        };
        let mut captures = captures.into_iter();
        let tok = &self.model.tokenizer;
        let missing = || candle_core::Error::msg("missing logits row");
        for &i in selected {
            let seq = &mut self.running[i];
            let wants_logits = seq.wants_logits(take[i]);
            let capture = if seq.wants_capture(take[i]) { captures.next() } else { None };
            seq.consume(take[i]);
            if wants_logits > 0 && !seq.is_capture() {
                let now = Instant::now();
                let m = &self.cfg.metrics;
                m.generation_tokens.inc();
                match seq.last_token.replace(now) {
                    None => {
                        m.first_token.observe((now - seq.submitted).as_secs_f64());
                        seq.enter(Phase::Decode);
                    }
                    Some(t) => m.inter_token.observe((now - t).as_secs_f64()),
                }
            }
            match &mut seq.work {
                Work::Generate(g) => {
                    if let Some(states) = &capture {
                        g.accumulate(states, take[i])?;
                    }
                    if wants_logits > 0 {
                        let next = logits.next().ok_or_else(missing)?;
                        self.stats.generated_tokens.fetch_add(1, Ordering::Relaxed);
                        let scores = match &capture {
                            Some(states) => g.monitor_scores(states, take[i])?,
                            None => Vec::new(),
                        };
                        let context = self.model.config().context_length;
                        if let Some(next) = g.on_logits(next, scores, tok, seq.cache.len(), context) {
                            seq.feed_response(next);
                        }
                    }
                }
                Work::Capture(c) => {
                    if let Some(states) = capture {
                        c.accumulate(&states, take[i])?;
                    }
                    for _ in 0..wants_logits {
                        match logits.next().ok_or_else(missing)? {
                            Next::Logits(row) => c.score(&row),
                            Next::Greedy(_) => candle_core::bail!("a scoring row came back without its logits"),
                        }
                    }
                    if seq.pending.is_empty() {
                        c.finish();
                    }
                }
            }
        }
        Ok(())
    }

    fn fail(&mut self, selected: &[usize], msg: &str) {
        tracing::error!(error = msg, "forward pass failed");
        // candle appends a backtrace to its errors when RUST_BACKTRACE is set: the log keeps
        // it, clients get the message.
        let first = msg.lines().next().unwrap_or(msg).to_string();
        for &i in selected {
            self.running[i].fail(EngineError::Compute(first.clone()));
        }
    }
}

/// Brings a step's `[rows, vocab]` logits to the host: rows marked in `whole` as they are,
/// the others as their argmax only, computed where the logits are (on a GPU, one id per row
/// crosses instead of a vocabulary of floats).
fn read_logits(logits: &Tensor, whole: &[bool]) -> candle_core::Result<Vec<Next>> {
    if whole.iter().all(|&w| w) {
        return Ok(logits.to_vec2()?.into_iter().map(Next::Logits).collect());
    }
    let greedy = crate::model::device::argmax_rows(logits)?;
    let wanted: Vec<u32> = (0..whole.len() as u32).filter(|&r| whole[r as usize]).collect();
    let mut rows = if wanted.is_empty() {
        Vec::new()
    } else {
        let n = wanted.len();
        let idx = Tensor::from_vec(wanted, n, logits.device())?;
        logits.index_select(&idx, 0)?.to_vec2()?
    }
    .into_iter();
    greedy
        .into_iter()
        .zip(whole)
        .map(|(id, &w)| {
            if w {
                rows.next().map(Next::Logits).ok_or_else(|| candle_core::Error::msg("missing logits row"))
            } else {
                Ok(Next::Greedy(id))
            }
        })
        .collect()
}
