//! The engine actor: one OS thread per resident model runs continuous batching over a packed
//! forward pass. Handles are cheap to clone; each request gets its own response channel, and a
//! closed channel (the client went away) frees the sequence's slot at the next step.

mod sequence;

use crate::model::LoadedModel;
use crate::model::arch::llama::{ForwardContext, KvCache, RowInput};
use crate::model::sampling::SamplingConfig;
use crate::steering::plan::SteeringPlan;
use candle_core::Tensor;
use sequence::{Sequence, Work};
use std::collections::VecDeque;
use std::sync::Arc;
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
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self { max_batch: 16, max_step_tokens: 512, max_queue: 256 }
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the engine queue is full ({0} waiting); retry later")]
    QueueFull(usize),
    #[error("the engine has stopped")]
    Stopped,
    #[error("model computation failed: {0}")]
    Compute(String),
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
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenEvent {
    /// Newly stable text and the token behind it (text may be empty while a stop string or a
    /// multi-byte character is still undecided).
    Token {
        text: String,
        id: u32,
    },
    Done(Summary),
}

pub struct GenerateJob {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingConfig,
    pub stop: Vec<String>,
    pub steering: SteeringPlan,
}

/// A forward pass over `tokens` (prompt then optional response) that reports per-layer
/// activation summaries instead of generating.
pub struct CaptureJob {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub steering: SteeringPlan,
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
}

/// Events of one generation; dropping it cancels the generation.
pub type EventStream = mpsc::UnboundedReceiver<Result<GenEvent, EngineError>>;

enum Command {
    Generate(GenerateJob, mpsc::UnboundedSender<Result<GenEvent, EngineError>>),
    Capture(CaptureJob, oneshot::Sender<Result<CaptureResult, EngineError>>),
}

/// Cloneable handle to a model's engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    model: Arc<LoadedModel>,
    max_batch: usize,
}

impl EngineHandle {
    /// Starts the engine thread for `model`.
    pub fn spawn(model: Arc<LoadedModel>, cfg: EngineConfig) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel(cfg.max_queue.max(1));
        let max_batch = cfg.max_batch;
        let engine = Engine { model: model.clone(), cfg, rx, running: Vec::new(), waiting: VecDeque::new() };
        std::thread::Builder::new().name(format!("engine-{}", model.id)).spawn(move || engine.run())?;
        Ok(Self { tx, model, max_batch })
    }

    /// Sequences the engine decodes together at most.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    pub fn model(&self) -> &Arc<LoadedModel> {
        &self.model
    }

    fn submit(&self, cmd: Command) -> Result<(), EngineError> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => EngineError::QueueFull(self.tx.max_capacity()),
            mpsc::error::TrySendError::Closed(_) => EngineError::Stopped,
        })
    }

    /// Queues a generation; events arrive on the returned channel, which the caller may drop
    /// to cancel.
    pub fn generate(&self, job: GenerateJob) -> Result<EventStream, EngineError> {
        // Unbounded: the engine never blocks on a slow reader; a generation's events are
        // bounded by its max_tokens anyway.
        let (tx, rx) = mpsc::unbounded_channel();
        self.submit(Command::Generate(job, tx))?;
        Ok(rx)
    }

    /// Runs a capture pass and waits for its result.
    pub async fn capture(&self, job: CaptureJob) -> Result<CaptureResult, EngineError> {
        let (tx, rx) = oneshot::channel();
        self.submit(Command::Capture(job, tx))?;
        rx.await.map_err(|_| EngineError::Stopped)?
    }
}

struct Engine {
    model: Arc<LoadedModel>,
    cfg: EngineConfig,
    rx: mpsc::Receiver<Command>,
    running: Vec<Sequence>,
    waiting: VecDeque<Sequence>,
}

impl Engine {
    fn run(mut self) {
        tracing::info!(model = %self.model.id, "engine started");
        loop {
            if !self.admit() {
                break;
            }
            self.running.retain(|s| !s.cancelled());
            if self.running.is_empty() {
                continue;
            }
            self.step();
        }
        tracing::info!(model = %self.model.id, "engine stopped");
    }

    fn new_sequence(&self, cmd: Command) -> Sequence {
        let cfg = self.model.config();
        match cmd {
            Command::Generate(job, tx) => Sequence::generate(job, tx, KvCache::new(cfg)),
            Command::Capture(job, tx) => {
                Sequence::capture(job, tx, KvCache::new(cfg), cfg.n_residual_rows(), cfg.hidden_size)
            }
        }
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
        self.waiting.retain(|s| !s.cancelled());
        while self.running.len() < self.cfg.max_batch {
            match self.waiting.pop_front() {
                Some(s) => self.running.push(s),
                None => break,
            }
        }
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
        let (rows, selected): (Vec<RowInput<'_>>, Vec<usize>) = {
            let mut rows = Vec::new();
            let mut selected = Vec::new();
            for (i, seq) in self.running.iter_mut().enumerate() {
                if take[i] == 0 {
                    continue;
                }
                rows.push(seq.row_input(take[i]));
                selected.push(i);
            }
            (rows, selected)
        };
        let result = self.model.model.forward(ForwardContext { rows });
        match result {
            Ok(out) => {
                if let Err(e) = self.absorb(&selected, &take, out.logits, out.captures) {
                    self.fail(&selected, &e.to_string());
                }
            }
            Err(e) => self.fail(&selected, &e.to_string()),
        }
        tracing::trace!(rows = selected.len(), ms = started.elapsed().as_secs_f64() * 1e3, "step");
        self.running.retain(|s| !s.finished());
    }

    fn absorb(
        &mut self,
        selected: &[usize],
        take: &[usize],
        logits: Option<Tensor>,
        captures: Vec<Vec<Tensor>>,
    ) -> candle_core::Result<()> {
        let logits: Vec<Vec<f32>> = match logits {
            Some(l) => l.to_vec2()?,
            None => Vec::new(),
        };
        let mut logits = logits.into_iter();
        let mut captures = captures.into_iter();
        let tok = &self.model.tokenizer;
        for &i in selected {
            let seq = &mut self.running[i];
            let wants_logits = seq.wants_logits(take[i]);
            let capture = if seq.is_capture() { captures.next() } else { None };
            seq.consume(take[i]);
            match &mut seq.work {
                Work::Generate(g) => {
                    if wants_logits {
                        let row = logits.next().ok_or_else(|| candle_core::Error::msg("missing logits row"))?;
                        if let Some(next) = g.on_logits(&row, tok, seq.cache.len(), self.model.config().context_length)
                        {
                            seq.feed_response(next);
                        }
                    }
                }
                Work::Capture(c) => {
                    if let Some(states) = capture {
                        c.accumulate(&states, take[i])?;
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
        for &i in selected {
            self.running[i].fail(EngineError::Compute(msg.to_string()));
        }
    }
}
