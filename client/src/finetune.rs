//! `persona finetune`, `persona jobs` and `persona shift`: LoRA fine-tuning jobs on the server
//! (optionally with preventative steering), and the finetuning shift of one model against
//! another.

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand};
use persona_client::{Client, pb};
use std::io::Write;

#[derive(Args)]
pub(crate) struct FinetuneArgs {
    /// JSONL samples ({"messages": [...]} or {"prompt", "completion"} per line), sent inline.
    #[arg(value_name = "DATA.jsonl", required_unless_present = "server_path")]
    data: Option<std::path::PathBuf>,
    /// A dataset already on the server, relative to its training.dataset_dir.
    #[arg(long, conflicts_with = "data")]
    server_path: Option<String>,
    /// Id of the result (base + adapter), and its adapter directory's name.
    #[arg(long)]
    out: String,
    /// Base model (default: the server's default).
    #[arg(long, default_value = "")]
    model: String,
    /// Preventative steering during training: NAME[:LAYER[:COEF]] (repeatable), as for
    /// `generate --steer`.
    #[arg(long = "steer", value_name = "NAME[:LAYER[:COEF]]")]
    steer: Vec<String>,
    /// Follow the finetuning shift along these stored vectors (repeatable).
    #[arg(long = "shift", value_name = "VECTOR")]
    shift: Vec<String>,
    /// Measure the shift every N steps (default: at the end only).
    #[arg(long, default_value_t = 0)]
    shift_every: u32,
    #[arg(long, default_value_t = 32)]
    rank: u32,
    #[arg(long, default_value_t = 64.0)]
    alpha: f32,
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// LoRA target modules (default: q,k,v,o,gate,up,down projections).
    #[arg(long = "target", value_name = "MODULE")]
    targets: Vec<String>,
    #[arg(long, default_value_t = 1e-4)]
    lr: f32,
    #[arg(long, default_value_t = 1)]
    epochs: u32,
    #[arg(long, default_value_t = 8)]
    batch_size: u32,
    #[arg(long, default_value_t = 256)]
    max_seq_len: u32,
    /// Stop after this many optimizer steps (0: every epoch).
    #[arg(long, default_value_t = 0)]
    max_steps: u32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Skip (and count) invalid lines instead of failing on the first.
    #[arg(long)]
    skip_invalid: bool,
    /// Save the adapter without serving it.
    #[arg(long)]
    no_register: bool,
    /// Return once the job has started instead of following it.
    #[arg(long)]
    detach: bool,
}

#[derive(Subcommand)]
pub(crate) enum JobsCmd {
    /// Every job the server knows (since its start).
    List,
    /// Follow a job until it ends.
    Watch { job_id: String },
    /// Stop a running job (nothing is saved).
    Cancel { job_id: String },
}

#[derive(Args)]
pub(crate) struct LoadAdapterArgs {
    /// PEFT adapter directory on the server (relative to its training.adapter_dir, or absolute).
    path: String,
    /// Id to serve it as.
    #[arg(long)]
    id: String,
    /// The served base model (default: the server's default).
    #[arg(long, default_value = "")]
    base: String,
}

#[derive(Args)]
pub(crate) struct ShiftArgs {
    #[arg(long)]
    base: String,
    #[arg(long)]
    tuned: String,
    /// Stored vectors of the base model (repeatable).
    #[arg(long = "vector", required = true)]
    vectors: Vec<String>,
    /// Residual layer (default: each vector's monitoring layer).
    #[arg(long)]
    layer: Option<u32>,
    /// Also score the trait expression and coherence of both models' answers.
    #[arg(long)]
    expression: bool,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Print the per-question shifts.
    #[arg(long)]
    per_question: bool,
    /// Steer the tuned model while it answers (expression only): NAME[:LAYER[:COEF]], repeatable.
    #[arg(long = "steer", value_name = "NAME[:LAYER[:COEF]]")]
    steer: Vec<String>,
    /// Write the response as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

fn state_name(s: i32) -> &'static str {
    pb::JobState::try_from(s).map_or("?", |s| s.as_str_name().trim_start_matches("JOB_STATE_"))
}

fn terminal(s: i32) -> bool {
    matches!(pb::JobState::try_from(s), Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled))
}

pub(crate) async fn finetune(c: &mut Client, a: FinetuneArgs) -> Result<()> {
    let dataset = match (&a.data, &a.server_path) {
        (Some(p), _) => pb::start_fine_tune_request::Dataset::DatasetJsonl(
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
        ),
        (None, Some(p)) => pb::start_fine_tune_request::Dataset::DatasetPath(p.clone()),
        (None, None) => bail!("give DATA.jsonl or --server-path"),
    };
    let req = pb::StartFineTuneRequest {
        model: a.model.clone(),
        output_model: a.out.clone(),
        dataset: Some(dataset),
        lora: Some(pb::LoraSettings {
            rank: a.rank,
            alpha: a.alpha,
            dropout: a.dropout,
            target_modules: a.targets.clone(),
        }),
        training: Some(pb::TrainingSettings {
            learning_rate: a.lr,
            epochs: a.epochs,
            batch_size: a.batch_size,
            max_seq_len: a.max_seq_len,
            max_steps: a.max_steps,
            seed: a.seed,
            ..Default::default()
        }),
        steering: a.steer.iter().map(|s| persona_client::parse_steer(s)).collect::<Result<_>>()?,
        skip_invalid: a.skip_invalid,
        shift_vectors: a.shift.clone(),
        shift_every: a.shift_every,
        no_register: a.no_register,
    };
    let r = c.start_fine_tune(req).await?.into_inner();
    eprintln!(
        "job {}: {} samples ({} skipped), {} steps, {} trainable parameters",
        r.job_id, r.samples, r.skipped, r.total_steps, r.trainable_parameters
    );
    for line in &r.skipped_lines {
        eprintln!("  skipped {line}");
    }
    if a.detach {
        println!("{}", r.job_id);
        return Ok(());
    }
    watch(c, &r.job_id).await
}

/// Follows a job, printing progress to stderr and the final status to stdout; fails when the
/// job fails.
pub(crate) async fn watch(c: &mut Client, job_id: &str) -> Result<()> {
    let mut stream = c.watch_job(pb::WatchJobRequest { job_id: job_id.to_string() }).await?.into_inner();
    let mut last = None;
    let mut shown_shifts = 0;
    let mut progress = crate::progress::Progress::new();
    while let Some(s) = stream.message().await.inspect_err(|_| progress.finish())? {
        if s.step > 0 && !terminal(s.state) {
            let detail = format!(
                "epoch {} loss {:.4} lr {:.2e} {:.0} tok/s ETA {:.0}s",
                s.epoch + 1,
                s.loss,
                s.learning_rate,
                s.tokens_per_second,
                s.eta_seconds
            );
            progress.update(state_name(s.state), s.step.into(), s.total_steps.into(), &detail);
        } else if !terminal(s.state) {
            progress.println(&format!("[{}] {}", state_name(s.state), s.message));
        }
        for p in &s.shifts[shown_shifts..] {
            progress.println(&format!(
                "  shift along {} (layer {}) at step {}: {:+.3} ± {:.3}",
                p.vector, p.layer, p.step, p.shift, p.shift_std
            ));
        }
        shown_shifts = s.shifts.len();
        last = Some(s);
    }
    progress.finish();
    let s = last.context("the job stream ended without a status")?;
    println!(
        "{}\t{}\tsteps {}/{}\tloss {:.4}\t{:.0} tok/s\t{:.0}s\t{}",
        s.job_id,
        state_name(s.state),
        s.step,
        s.total_steps,
        s.loss,
        s.tokens_per_second,
        s.elapsed_seconds,
        s.message
    );
    if !s.adapter_path.is_empty() {
        println!("adapter: {}", s.adapter_path);
    }
    match pb::JobState::try_from(s.state) {
        Ok(pb::JobState::Succeeded) => Ok(()),
        _ => bail!("job {} ended {}: {}", s.job_id, state_name(s.state), s.message),
    }
}

pub(crate) async fn jobs(c: &mut Client, cmd: JobsCmd) -> Result<()> {
    match cmd {
        JobsCmd::List => {
            for s in c.list_jobs(pb::ListJobsRequest {}).await?.into_inner().jobs {
                println!(
                    "{}\t{}\t{} -> {}\tsteps {}/{}\tloss {:.4}\t{}",
                    s.job_id,
                    state_name(s.state),
                    s.model,
                    s.output_model,
                    s.step,
                    s.total_steps,
                    s.loss,
                    s.message
                );
            }
            Ok(())
        }
        JobsCmd::Watch { job_id } => watch(c, &job_id).await,
        JobsCmd::Cancel { job_id } => {
            let s = c.cancel_job(pb::CancelJobRequest { job_id }).await?.into_inner().status.unwrap_or_default();
            println!("{}\tcancelling (was {} at step {})", s.job_id, state_name(s.state), s.step);
            Ok(())
        }
    }
}

pub(crate) async fn load_adapter(c: &mut Client, a: LoadAdapterArgs) -> Result<()> {
    let m = c
        .load_adapter(pb::LoadAdapterRequest { model: a.id, base_model: a.base, path: a.path })
        .await?
        .into_inner()
        .model
        .unwrap_or_default();
    println!("{}\tbase {}\tweights {}\tsource {}", m.id, m.base_model, m.weights, m.source);
    Ok(())
}

pub(crate) async fn shift(c: &mut Client, a: ShiftArgs) -> Result<()> {
    let r = c
        .measure_shift(pb::MeasureShiftRequest {
            base_model: a.base.clone(),
            tuned_model: a.tuned.clone(),
            vectors: a.vectors.clone(),
            layer: a.layer,
            expression: a.expression,
            sampling: Some(pb::SamplingParams { max_tokens: a.max_tokens, ..Default::default() }),
            tuned_steering: a.steer.iter().map(|s| persona_client::parse_steer(s)).collect::<Result<_>>()?,
        })
        .await?
        .into_inner();
    let mut out = std::io::stdout().lock();
    for s in &r.shifts {
        write!(
            out,
            "{}\tlayer {}\tshift {:+.3} ± {:.3} over {} questions",
            s.vector,
            s.layer,
            s.shift,
            s.shift_std,
            s.questions.len()
        )?;
        if let (Some(b), Some(t)) = (s.base_expression, s.tuned_expression) {
            write!(out, "\texpression {b:.1} -> {t:.1}")?;
        }
        if let (Some(b), Some(t)) = (s.base_coherence, s.tuned_coherence) {
            write!(out, "\tcoherence {b:.1} -> {t:.1}")?;
        }
        writeln!(out)?;
        if a.per_question {
            for q in &s.questions {
                writeln!(out, "  {:+.3}\t{}", q.shift, q.question)?;
            }
        }
        if !s.scorer.is_empty() {
            writeln!(out, "  scorer: {}", s.scorer)?;
        }
    }
    if let Some(p) = &a.json {
        std::fs::write(p, serde_json::to_string_pretty(&shift_json(&r))?)?;
    }
    Ok(())
}

fn shift_json(r: &pb::MeasureShiftResponse) -> serde_json::Value {
    serde_json::Value::Array(
        r.shifts
            .iter()
            .map(|s| {
                serde_json::json!({
                    "vector": s.vector, "trait": s.trait_name, "layer": s.layer, "shift": s.shift, "shift_std": s.shift_std,
                    "base_expression": s.base_expression, "tuned_expression": s.tuned_expression,
                    "base_coherence": s.base_coherence, "tuned_coherence": s.tuned_coherence,
                    "questions": s.questions.iter().map(|q| serde_json::json!({"question": q.question, "shift": q.shift})).collect::<Vec<_>>(),
                })
            })
            .collect(),
    )
}
