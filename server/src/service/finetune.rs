//! StartFineTune, WatchJob, CancelJob, ListJobs and LoadAdapter: validate and resolve the
//! request here (so a bad dataset line or setting fails the call, with its line number), then
//! hand the job to [`crate::jobs`].

use super::{AppState, ResponseStream, resolve};
use crate::error::{ServiceError, ServiceResult, invalid};
use crate::jobs::{JobSpec, ShiftSpec, is_terminal};
use crate::model::LoadedModel;
use crate::scheduler::{EngineConfig, EngineHandle};
use crate::train::data;
use crate::train::lora::{LoraConfig, Target};
use crate::train::trainer::Hyper;
use persona_proto::v1 as pb;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;

/// Model and adapter names: what is safe as a directory name and a model id.
pub fn check_name(what: &str, name: &str) -> ServiceResult<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(format!("{what} `{name}` must be 1-64 letters, digits, '-', '_' or '.', not starting with '.'")))
    }
}

/// A relative path that stays inside its directory.
fn inside(dir: &Path, rel: &str, what: &str) -> ServiceResult<PathBuf> {
    let p = Path::new(rel);
    if rel.is_empty() || p.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(invalid(format!("{what} `{rel}` must be a relative path inside {} without `..`", dir.display())));
    }
    Ok(dir.join(p))
}

fn hyper(req: &pb::StartFineTuneRequest) -> ServiceResult<Hyper> {
    let d = Hyper::default();
    let l = req.lora.clone().unwrap_or_default();
    let t = req.training.unwrap_or_default();
    let targets = if l.target_modules.is_empty() {
        d.lora.targets.clone()
    } else {
        l.target_modules
            .iter()
            .map(|m| {
                Target::parse(m).ok_or_else(|| {
                    invalid(format!(
                        "lora.target_modules: `{m}` is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                    ))
                })
            })
            .collect::<ServiceResult<Vec<_>>>()?
    };
    let or = |v: f32, default: f64| if v == 0.0 { default } else { v as f64 };
    let oru = |v: u32, default: usize| if v == 0 { default } else { v as usize };
    let h = Hyper {
        lora: LoraConfig {
            rank: oru(l.rank, d.lora.rank),
            alpha: or(l.alpha, d.lora.alpha),
            dropout: l.dropout as f64,
            targets,
            use_rslora: false,
        },
        learning_rate: or(t.learning_rate, d.learning_rate),
        epochs: oru(t.epochs, d.epochs),
        batch_size: oru(t.batch_size, d.batch_size),
        max_seq_len: oru(t.max_seq_len, d.max_seq_len),
        weight_decay: t.weight_decay as f64,
        warmup_ratio: if t.warmup_ratio == 0.0 { d.warmup_ratio } else { t.warmup_ratio as f64 },
        max_grad_norm: if t.max_grad_norm == 0.0 { d.max_grad_norm } else { t.max_grad_norm as f64 },
        max_steps: t.max_steps as usize,
        seed: t.seed,
    };
    h.validate().map_err(invalid)?;
    Ok(h)
}

/// The shift probes of `names`: each vector's unit direction at its monitoring layer, over its
/// trait's eval questions (the extraction questions when it has none).
fn shift_specs(
    state: &AppState,
    model: &LoadedModel,
    names: &[String],
    layer: Option<u32>,
) -> ServiceResult<Vec<ShiftSpec>> {
    names
        .iter()
        .map(|name| {
            let v = resolve::vector_for(&state.store, model, name)?;
            let layer = resolve::layer_or_recommended(model, layer, Some(&v))?;
            let direction = v.row(layer).map(<[f32]>::to_vec).unwrap_or_default();
            let prompts = shift_prompts(state, model, &v.meta.trait_name, name)?;
            Ok(ShiftSpec { vector: name.clone(), layer, direction, prompts })
        })
        .collect()
}

/// The chat prompts of a trait's eval questions.
pub fn shift_questions(state: &AppState, trait_name: &str, vector: &str) -> ServiceResult<Vec<String>> {
    let def = state.traits.get(trait_name).ok_or_else(|| {
        ServiceError::FailedPrecondition(format!(
            "vector `{vector}` is for trait `{trait_name}`, which is not in the trait library: its eval questions are needed"
        ))
    })?;
    let qs = if def.eval_questions.is_empty() { &def.questions } else { &def.eval_questions };
    if qs.is_empty() {
        return Err(ServiceError::FailedPrecondition(format!("trait `{trait_name}` has no questions")));
    }
    Ok(qs.clone())
}

fn shift_prompts(
    state: &AppState,
    model: &LoadedModel,
    trait_name: &str,
    vector: &str,
) -> ServiceResult<Vec<Vec<u32>>> {
    shift_questions(state, trait_name, vector)?
        .iter()
        .map(|q| super::evaluate::question_prompt(model, None, q))
        .collect()
}

/// Training and adapters cover the llama family; Gemma 3's block has no training graph yet.
fn check_trainable(model: &crate::model::LoadedModel) -> ServiceResult<()> {
    let arch = &model.config().architecture;
    if model.config().gemma3.is_some() {
        return Err(ServiceError::FailedPrecondition(format!(
            "model `{}` is {arch}: fine-tuning and LoRA adapters support llama-family models (llama, mistral, qwen2) only",
            model.id
        )));
    }
    Ok(())
}

pub fn start(state: &Arc<AppState>, req: pb::StartFineTuneRequest) -> ServiceResult<pb::StartFineTuneResponse> {
    let engine = state.engine(&req.model)?;
    let model = engine.model().clone();
    check_trainable(&model)?;
    if model.adapter.is_some() {
        return Err(ServiceError::FailedPrecondition(format!(
            "model `{}` is already adapted; fine-tune its base `{}` instead",
            model.id,
            model.base.as_deref().unwrap_or("?")
        )));
    }
    check_name("output_model", &req.output_model)?;
    if state.engine(&req.output_model).is_ok() {
        return Err(ServiceError::AlreadyExists(format!("model `{}` is already served", req.output_model)));
    }
    let dir = state.jobs.adapter_path(&req.output_model);
    if dir.exists() {
        return Err(ServiceError::AlreadyExists(format!(
            "an adapter already exists at {}: serve it with LoadAdapter, or remove it or choose another output_model",
            dir.display()
        )));
    }
    let hyper = hyper(&req)?;
    let (text, dataset) = match &req.dataset {
        Some(pb::start_fine_tune_request::Dataset::DatasetJsonl(t)) => (t.clone(), "inline".to_string()),
        Some(pb::start_fine_tune_request::Dataset::DatasetPath(p)) => {
            let path = inside(&state.jobs.settings().dataset_dir, p, "dataset_path")?;
            let text = std::fs::read_to_string(&path)
                .map_err(|e| ServiceError::NotFound(format!("reading dataset {}: {e}", path.display())))?;
            (text, path.display().to_string())
        }
        None => return Err(invalid("give dataset_jsonl or dataset_path")),
    };
    let parsed = data::read_jsonl(&text, &model.template, &model.tokenizer, hyper.max_seq_len, req.skip_invalid)
        .map_err(|e| invalid(format!("dataset: {e}")))?;
    let steering = resolve::steering(&state.store, &model, &req.steering)?;
    if req
        .steering
        .iter()
        .any(|s| !matches!(pb::Positions::try_from(s.positions), Ok(pb::Positions::Unspecified | pb::Positions::All)))
    {
        return Err(invalid("steering during training acts on every token: leave positions unset or ALL"));
    }
    let addends: Vec<(usize, Vec<f32>)> = steering
        .plan
        .addends(false)
        .map(|a| a.layers().iter().enumerate().filter_map(|(l, v)| v.clone().map(|v| (l, v))).collect())
        .unwrap_or_default();
    let shifts = shift_specs(state, &model, &req.shift_vectors, None)?;
    let total_steps = hyper.total_steps(parsed.examples.len());
    let params = hyper.lora.n_params(crate::train::peft::dims_of(model.config()));
    let spec = JobSpec {
        base: engine,
        output_model: req.output_model.clone(),
        examples: parsed.examples,
        hyper,
        steering: addends,
        applied: steering.applied,
        shifts,
        shift_every: req.shift_every as usize,
        register: !req.no_register,
        dataset,
    };
    let samples = spec.examples.len() as u32;
    let job = state.jobs.start(state.clone(), spec)?;
    Ok(pb::StartFineTuneResponse {
        job_id: job.id.clone(),
        samples,
        skipped: parsed.skipped.len() as u32,
        skipped_lines: parsed.skipped.iter().take(20).map(|(n, e)| format!("line {n}: {e}")).collect(),
        total_steps: total_steps as u32,
        trainable_parameters: params as u64,
    })
}

pub fn watch(state: &AppState, req: pb::WatchJobRequest) -> ServiceResult<ResponseStream<pb::JobStatus>> {
    let job = state.jobs.get(&req.job_id)?;
    let mut rx = job.subscribe();
    let (tx, out) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            let status = rx.borrow_and_update().clone();
            let done = is_terminal(status.state);
            if tx.send(Ok(status)).await.is_err() || done {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
    Ok(Box::pin(ReceiverStream::new(out)))
}

pub fn cancel(state: &AppState, req: pb::CancelJobRequest) -> ServiceResult<pb::CancelJobResponse> {
    let job = state.jobs.get(&req.job_id)?;
    let status = job.status();
    if is_terminal(status.state) {
        return Err(ServiceError::FailedPrecondition(format!(
            "job `{}` has already ended ({})",
            job.id,
            pb::JobState::try_from(status.state).map_or("?", |s| s.as_str_name())
        )));
    }
    job.cancel();
    Ok(pb::CancelJobResponse { status: Some(job.status()) })
}

pub fn list(state: &AppState) -> pb::ListJobsResponse {
    pb::ListJobsResponse { jobs: state.jobs.list() }
}

pub async fn load_adapter(
    state: &Arc<AppState>,
    req: pb::LoadAdapterRequest,
) -> ServiceResult<pb::LoadAdapterResponse> {
    check_name("model", &req.model)?;
    let base = state.engine(&req.base_model)?;
    check_trainable(base.model())?;
    if req.path.is_empty() {
        return Err(invalid("path is required: a PEFT adapter directory"));
    }
    let given = Path::new(&req.path);
    let dir = if given.is_absolute() {
        given.to_path_buf()
    } else {
        inside(&state.jobs.settings().adapter_dir, &req.path, "path")?
    };
    if !crate::train::peft::is_adapter_dir(&dir) {
        return Err(ServiceError::NotFound(format!("{} holds no {}", dir.display(), crate::train::peft::CONFIG_FILE)));
    }
    let state = state.clone();
    let model = tokio::task::spawn_blocking(move || register(&state, &base, &req.model, &dir))
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))??;
    Ok(pb::LoadAdapterResponse { model: Some(model) })
}

impl crate::jobs::ServeAdapter for AppState {
    fn serve_adapter(&self, base: &EngineHandle, id: &str, dir: &Path) -> ServiceResult<pb::ModelInfo> {
        register(self, base, id, dir)
    }
}

/// Serves `base` with the adapter at `dir` merged in, as model `id` (loaded as the base was,
/// with the base's engine limits). An adapter made for another model is FAILED_PRECONDITION.
pub(crate) fn register(
    state: &AppState,
    base: &EngineHandle,
    id: &str,
    dir: &std::path::Path,
) -> ServiceResult<pb::ModelInfo> {
    let b = base.model();
    if b.adapter.is_some() {
        return Err(ServiceError::FailedPrecondition(format!(
            "model `{}` is itself adapted; adapters apply to plain models",
            b.id
        )));
    }
    if state.engine(id).is_ok() {
        return Err(ServiceError::AlreadyExists(format!("model `{id}` is already served")));
    }
    let loaded =
        LoadedModel::from_files_adapted(id, &b.files, b.model.device(), &b.options, Some(dir)).map_err(|e| match e
            .root_cause()
            .downcast_ref::<crate::train::peft::PeftError>()
        {
            Some(crate::train::peft::PeftError::Mismatch(m)) => ServiceError::FailedPrecondition(m.clone()),
            Some(crate::train::peft::PeftError::Invalid(m)) => ServiceError::InvalidArgument(m.clone()),
            Some(crate::train::peft::PeftError::Io(m)) => ServiceError::NotFound(m.clone()),
            None => ServiceError::Internal(format!("loading `{id}`: {e:#}")),
        })?;
    let model =
        LoadedModel { source: crate::model::adapted_source(&b.source, dir), base: Some(b.id.clone()), ..loaded };
    let cfg = EngineConfig { metrics: state.metrics.model(id), ..base.config().clone() };
    let engine = EngineHandle::spawn(Arc::new(model), cfg)
        .map_err(|e| ServiceError::Internal(format!("starting the engine of `{id}`: {e}")))?;
    state.add_engine(id, engine)?;
    tracing::info!(model = %id, base = %b.id, adapter = %dir.display(), "adapter served");
    Ok(super::list_models(state).models.into_iter().find(|m| m.id == id).unwrap_or_default())
}
