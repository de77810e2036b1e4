//! Fine-tuning jobs: LoRA training runs on its own thread and CPU pool
//! (`training.threads`) beside the engines, at most `training.max_running` at once.
//!
//! A job's status is a [`watch`] value every watcher sees the latest of. Jobs live in memory
//! only: a restart forgets them. What a job writes is its adapter directory, written whole or
//! not at all ([`crate::train::peft::save`]); it never touches stored vectors or models.

use crate::config::TrainingSettings;
use crate::error::{ServiceError, ServiceResult};
use crate::scheduler::EngineHandle;
use crate::support::{panic_text, unix_now};
use crate::train::data::Example;
use crate::train::lora::Adapter;
use crate::train::model::TrainModel;
use crate::train::peft;
use crate::train::shift::ShiftProbe;
use crate::train::trainer::{self, Ending, Hyper};
use persona_proto::v1 as pb;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use tokio::sync::watch;

/// What serves a finished job's adapter as a new model (the service's model registry): jobs
/// know how to train, not how models are served.
pub trait ServeAdapter: Send + Sync {
    /// Serves `base` with the adapter at `dir` merged in, as model `id`.
    fn serve_adapter(&self, base: &EngineHandle, id: &str, dir: &std::path::Path) -> ServiceResult<pb::ModelInfo>;
}

/// One vector whose shift a job follows: its layer, direction and the prompts to read.
pub struct ShiftSpec {
    pub vector: String,
    pub layer: usize,
    pub direction: Vec<f32>,
    pub prompts: Vec<Vec<u32>>,
}

/// Everything a job needs, resolved and validated by the handler.
pub struct JobSpec {
    pub base: EngineHandle,
    pub output_model: String,
    pub examples: Vec<Example>,
    pub hyper: Hyper,
    /// Summed `coefficient · v` per residual layer.
    pub steering: Vec<(usize, Vec<f32>)>,
    pub applied: Vec<pb::AppliedSteering>,
    pub shifts: Vec<ShiftSpec>,
    pub shift_every: usize,
    pub register: bool,
    /// Where the data came from, for the adapter's record.
    pub dataset: String,
}

pub struct Job {
    pub id: String,
    pub output_model: String,
    status: watch::Sender<pb::JobStatus>,
    cancel: AtomicBool,
}

impl Job {
    pub fn status(&self) -> pb::JobStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<pb::JobStatus> {
        self.status.subscribe()
    }

    /// Asks the job to stop at its next step (or before it starts).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    fn update(&self, f: impl FnOnce(&mut pb::JobStatus)) {
        self.status.send_modify(f);
    }

    fn set_state(&self, state: pb::JobState, message: impl Into<String>) {
        let message = message.into();
        self.update(|s| {
            s.state = state as i32;
            s.message = message;
        });
    }
}

/// Whether a job in this state is over.
pub fn is_terminal(state: i32) -> bool {
    matches!(
        pb::JobState::try_from(state),
        Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
    )
}

pub struct Jobs {
    settings: TrainingSettings,
    jobs: Mutex<BTreeMap<String, Arc<Job>>>,
    running: Mutex<usize>,
    freed: Condvar,
    next: AtomicU64,
}

impl Jobs {
    pub fn new(settings: TrainingSettings) -> Self {
        Self {
            settings,
            jobs: Default::default(),
            running: Mutex::new(0),
            freed: Condvar::new(),
            next: AtomicU64::new(1),
        }
    }

    pub fn settings(&self) -> &TrainingSettings {
        &self.settings
    }

    /// Where a job's adapter goes.
    pub fn adapter_path(&self, output_model: &str) -> PathBuf {
        self.settings.adapter_dir.join(output_model)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Job>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: &str) -> ServiceResult<Arc<Job>> {
        self.lock()
            .get(id)
            .cloned()
            .ok_or_else(|| ServiceError::NotFound(format!("no job `{id}` (jobs are forgotten on restart)")))
    }

    pub fn list(&self) -> Vec<pb::JobStatus> {
        self.lock().values().map(|j| j.status()).collect()
    }

    /// Starts a job on its own thread; ALREADY_EXISTS while another unfinished job writes the
    /// same output.
    pub fn start(self: &Arc<Self>, host: Arc<dyn ServeAdapter>, spec: JobSpec) -> ServiceResult<Arc<Job>> {
        let mut jobs = self.lock();
        if let Some(other) =
            jobs.values().find(|j| j.output_model == spec.output_model && !is_terminal(j.status.borrow().state))
        {
            return Err(ServiceError::AlreadyExists(format!(
                "job `{}` is already producing `{}`",
                other.id, spec.output_model
            )));
        }
        let id = format!("ft-{}-{}", unix_now(), self.next.fetch_add(1, Ordering::Relaxed));
        let status = pb::JobStatus {
            job_id: id.clone(),
            state: pb::JobState::Queued as i32,
            model: spec.base.model().id.clone(),
            output_model: spec.output_model.clone(),
            total_steps: spec.hyper.total_steps(spec.examples.len()) as u32,
            created_unix: unix_now(),
            steering: spec.applied.clone(),
            samples: spec.examples.len() as u32,
            message: "waiting for a training slot".into(),
            ..Default::default()
        };
        let job = Arc::new(Job {
            id: id.clone(),
            output_model: spec.output_model.clone(),
            status: watch::Sender::new(status),
            cancel: AtomicBool::new(false),
        });
        jobs.insert(id.clone(), job.clone());
        drop(jobs);
        let (jobs, j) = (self.clone(), job.clone());
        std::thread::Builder::new()
            .name(format!("train-{id}"))
            .spawn(move || jobs.run(host.as_ref(), j, spec))
            .map_err(|e| ServiceError::Internal(format!("starting the training thread: {e}")))?;
        Ok(job)
    }

    /// Waits for a training slot; false when the job was cancelled while waiting.
    fn acquire(&self, job: &Job) -> bool {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if job.cancel.load(Ordering::Relaxed) {
                return false;
            }
            if *running < self.settings.max_running {
                *running += 1;
                return true;
            }
            running = self
                .freed
                .wait_timeout(running, std::time::Duration::from_millis(200))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn release(&self) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        self.freed.notify_all();
    }

    fn run(&self, host: &dyn ServeAdapter, job: Arc<Job>, spec: JobSpec) {
        if !self.acquire(&job) {
            job.set_state(pb::JobState::Cancelled, "cancelled before it started");
            return;
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.settings.threads)
            .thread_name(|i| format!("train-pool-{i}"))
            .build();
        let result = match pool {
            Ok(pool) => std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                pool.install(|| self.train(host, &job, &spec))
            }))
            .unwrap_or_else(|p| Err(format!("training panicked: {}", panic_text(&*p)))),
            Err(e) => Err(format!("building the training thread pool: {e}")),
        };
        self.release();
        if let Err(e) = result {
            tracing::warn!(job = %job.id, error = %e, "fine-tuning failed");
            job.set_state(pb::JobState::Failed, e);
        }
    }

    fn train(&self, host: &dyn ServeAdapter, job: &Job, spec: &JobSpec) -> Result<(), String> {
        let base = spec.base.model();
        job.set_state(pb::JobState::Loading, "dequantizing the base weights for training");
        let device = base.model.device().clone();
        let model = {
            let mut src = base.weight_source(&device).map_err(|e| format!("opening the base model's files: {e:#}"))?;
            TrainModel::load(src.as_mut(), base.config().clone()).map_err(ctx("loading the training weights"))?
        };
        let adapter = Adapter::new(spec.hyper.lora.clone(), model.dims(), spec.hyper.seed, &device)
            .map_err(ctx("creating the adapter"))?;
        let steering = trainer::steering_addends(
            base.config().n_residual_rows(),
            &spec.steering.iter().map(|(l, v)| (*l, 1.0, v.clone())).collect::<Vec<_>>(),
            &device,
        )
        .map_err(ctx("steering"))?;
        job.set_state(pb::JobState::Loading, "reading the base model's activations for the shift");
        let probes = spec
            .shifts
            .iter()
            .map(|s| ShiftProbe::new(&model, &s.vector, s.layer, &s.direction, s.prompts.clone()))
            .collect::<candle_core::Result<Vec<_>>>()
            .map_err(ctx("measuring the base activations"))?;
        let measure = |step: usize, adapter: &Adapter| -> Result<Vec<pb::ShiftPoint>, String> {
            probes
                .iter()
                .map(|p| {
                    let s = p.measure(&model, adapter).map_err(ctx("measuring the shift"))?;
                    Ok(pb::ShiftPoint {
                        vector: p.vector.clone(),
                        layer: p.layer() as u32,
                        step: step as u32,
                        shift: s.mean,
                        shift_std: s.std,
                    })
                })
                .collect()
        };
        job.set_state(pb::JobState::Running, "training");
        let mut shift_error = None;
        let outcome = trainer::train(&model, &adapter, &spec.examples, &spec.hyper, &steering, &job.cancel, |p, ad| {
            let shifts = if spec.shift_every > 0 && p.step % spec.shift_every == 0 && p.step < p.total_steps {
                match measure(p.step, ad) {
                    Ok(s) => s,
                    Err(e) => {
                        shift_error = Some(e);
                        return false;
                    }
                }
            } else {
                Vec::new()
            };
            job.update(|s| {
                s.step = p.step as u32;
                s.total_steps = p.total_steps as u32;
                s.epoch = p.epoch as u32;
                s.loss = p.loss as f32;
                s.learning_rate = p.learning_rate as f32;
                s.grad_norm = p.grad_norm as f32;
                s.tokens_per_second = p.tokens_per_second as f32;
                s.elapsed_seconds = p.elapsed_s;
                s.eta_seconds = p.eta_s;
                s.losses.push(pb::LossPoint { step: p.step as u32, loss: p.loss as f32 });
                s.shifts.extend(shifts);
            });
            true
        })
        .map_err(ctx("training"))?;
        if let Some(e) = shift_error {
            return Err(e);
        }
        let dir = self.adapter_path(&spec.output_model);
        let save = |note: &str| -> Result<(), String> {
            let snapshot = adapter.snapshot().map_err(ctx("copying the adapter"))?;
            let status = job.status();
            let record = serde_json::json!({
                "base_model": base.id,
                "base_source": base.source,
                "dataset": spec.dataset,
                "samples": spec.examples.len(),
                "steps": outcome.steps,
                "tokens": outcome.tokens,
                "first_loss": outcome.first_loss,
                "last_loss": outcome.last_loss,
                "seconds": outcome.elapsed_s,
                "learning_rate": spec.hyper.learning_rate,
                "epochs": spec.hyper.epochs,
                "batch_size": spec.hyper.batch_size,
                "max_seq_len": spec.hyper.max_seq_len,
                "seed": spec.hyper.seed,
                "steering": spec.applied.iter().map(|a| serde_json::json!({"vector": a.vector, "layer": a.layer, "coefficient": a.coefficient})).collect::<Vec<_>>(),
                "shifts": status.shifts.iter().map(|s| serde_json::json!({"vector": s.vector, "layer": s.layer, "step": s.step, "shift": s.shift, "shift_std": s.shift_std})).collect::<Vec<_>>(),
                "job": job.id,
                "note": note,
                "saved_unix": unix_now(),
            });
            let files = peft::AdapterFiles {
                config: &spec.hyper.lora,
                layers: &snapshot,
                layout: peft::Layout::of(base.config()),
                base: &base.id,
                training: &record,
            };
            peft::save(&dir, &files).map_err(|e| format!("saving the adapter: {e}"))?;
            job.update(|s| s.adapter_path = dir.display().to_string());
            Ok(())
        };
        match outcome.ending {
            Ending::Cancelled => {
                job.set_state(
                    pb::JobState::Cancelled,
                    format!("cancelled after {} steps; nothing saved", outcome.steps),
                );
                Ok(())
            }
            Ending::NonFinite { step, what } => {
                let msg = format!("training diverged at step {step}: {what}");
                if outcome.steps > 0 {
                    save(&msg)?;
                    Err(format!(
                        "{msg}; the adapter after step {} is saved at {} (not served)",
                        outcome.steps,
                        dir.display()
                    ))
                } else {
                    Err(format!("{msg}; nothing was saved"))
                }
            }
            Ending::Finished => {
                let last = measure(outcome.steps, &adapter)?;
                job.update(|s| s.shifts.extend(last));
                job.set_state(pb::JobState::Saving, "saving the adapter");
                save("finished")?;
                if spec.register {
                    job.set_state(pb::JobState::Saving, "loading the adapted model for serving");
                    host.serve_adapter(&spec.base, &spec.output_model, &dir).map_err(|e| e.to_string())?;
                    job.set_state(pb::JobState::Succeeded, format!("served as `{}`", spec.output_model));
                } else {
                    job.set_state(pb::JobState::Succeeded, format!("saved at {}", dir.display()));
                }
                Ok(())
            }
        }
    }
}

/// Formats a candle error with what was being done.
fn ctx(what: &'static str) -> impl Fn(candle_core::Error) -> String {
    move |e| format!("{what}: {e}")
}
