//! `persona`: command-line client for persona-steer.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use persona_client::{Client, connect, generate_text, pb};
use std::io::Write;
use std::path::PathBuf;

mod evaluate;
mod streams;

#[derive(Parser)]
#[command(name = "persona", version, about = "Client for the persona-steer gRPC service")]
struct Cli {
    /// Server address.
    #[arg(long, global = true, env = "PERSONA_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text, streaming it to stdout.
    Generate(GenerateArgs),
    /// Extract a persona vector: a library trait (--trait), a trait file (--file) or explicit prompts.
    Extract(ExtractArgs),
    /// The trait library: list, show, or draft a new trait from a name and a description.
    Traits {
        #[command(subcommand)]
        command: TraitsCmd,
    },
    /// Project a conversation's activations onto a stored vector.
    Project(ProjectArgs),
    /// Score a JSONL file of conversations through MonitorStream, printing JSONL results.
    Monitor(streams::MonitorArgs),
    /// Screen a JSONL training set: projection difference of each response against the model's
    /// own; writes ranked JSONL and CSV and an SVG histogram.
    Screen(streams::ScreenArgs),
    /// Manage stored vectors.
    Vectors {
        #[command(subcommand)]
        command: VectorsCmd,
    },
    /// List the loaded models.
    Models,
    /// Measure single-stream prefill and decode speed, steered and unsteered.
    Bench(BenchArgs),
    /// Sweep a vector over layers x coefficients on held-out questions: trait and coherence per
    /// cell, the recommended steering point (stored with the vector), SVG charts.
    Eval(evaluate::EvalArgs),
    /// Answers to one question at -2c, -c, 0, +c, +2c with their trait and coherence scores.
    Spectrum(evaluate::SpectrumArgs),
    /// Per-token log-probabilities of a response after a prompt, and its perplexity.
    Score(evaluate::ScoreArgs),
}

/// The prompt of a generation or a scoring call.
#[derive(Args)]
struct PromptArgs {
    /// The user message (or the raw prompt with --raw).
    prompt: String,
    #[arg(long)]
    system: Option<String>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value = "")]
    model: String,
}

impl PromptArgs {
    fn to_pb(&self) -> pb::Prompt {
        if self.raw {
            pb::Prompt { kind: Some(pb::prompt::Kind::Raw(self.prompt.clone())) }
        } else {
            persona_client::chat(&self.prompt, self.system.as_deref())
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    prompt: PromptArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Watch a vector: NAME[:LAYER]; repeatable. Scores are summarised on stderr at the end.
    #[arg(long = "monitor", value_name = "NAME[:LAYER]")]
    monitors: Vec<String>,
    /// Report monitors whose raw score reaches this value.
    #[arg(long, conflicts_with = "alert_calibrated")]
    alert: Option<f32>,
    /// Report monitors whose calibrated score (0 = helpful, 100 = the trait) reaches this value.
    #[arg(long)]
    alert_calibrated: Option<f32>,
    /// Print each token's log-probability (and this many alternatives, 0-20) to stderr.
    #[arg(long)]
    logprobs: Option<u32>,
    /// Print every token's monitor scores to stderr (tab-separated).
    #[arg(long)]
    scores: bool,
    /// Steering vector NAME[:LAYER[:COEF[:all|prompt|response]]]; repeatable (summed). A missing
    /// or empty LAYER / COEF uses the vector's steering recommendation (`persona eval`); without
    /// one, the layer falls back to its monitoring layer and the coefficient is required.
    #[arg(long = "steer", value_name = "NAME[:LAYER[:COEF]]")]
    steer: Vec<String>,
}

#[derive(Args)]
struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    max_tokens: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop string; repeatable.
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn to_pb(&self) -> pb::SamplingParams {
        pb::SamplingParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            stop: self.stop.clone(),
        }
    }
}

#[derive(Args)]
struct ExtractArgs {
    /// A trait of the server's library (see `persona traits list`).
    #[arg(long = "trait", conflicts_with = "file")]
    trait_ref: Option<String>,
    /// A trait definition file (the traits/ JSON schema), sent with the request.
    #[arg(long)]
    file: Option<PathBuf>,
    /// Name to store the vector under (default: the trait's name).
    #[arg(long, default_value = "")]
    name: String,
    /// Explicit mode: full positive system prompt; pair each --pos with a --neg.
    #[arg(long)]
    pos: Vec<String>,
    #[arg(long)]
    neg: Vec<String>,
    #[arg(long)]
    question: Vec<String>,
    /// Explicit mode: trait label kept in the vector's metadata.
    #[arg(long, default_value = "")]
    label: String,
    #[arg(long, default_value = "")]
    model: String,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Answers per (pair, question).
    #[arg(long, default_value_t = 1)]
    samples: u32,
    /// Use only the first N instruction pairs / questions (0 = all).
    #[arg(long, default_value_t = 0)]
    max_pairs: u32,
    #[arg(long, default_value_t = 0)]
    max_questions: u32,
    /// Do not filter answers with the server's judge.
    #[arg(long)]
    no_judge: bool,
    /// Judge thresholds, 0-100 (0 = the server's default, 50).
    #[arg(long, default_value_t = 0.0)]
    trait_threshold: f32,
    #[arg(long, default_value_t = 0.0)]
    coherence_threshold: f32,
    #[arg(long)]
    overwrite: bool,
}

#[derive(Subcommand)]
enum TraitsCmd {
    /// One line per trait.
    List,
    /// A trait's definition as JSON.
    Show { name: String },
    /// Draft a definition from a name and a description; writes JSON to --out or stdout.
    New {
        name: String,
        #[arg(long)]
        description: String,
        /// Ask the server's judge model to write it instead of the built-in templates.
        #[arg(long)]
        llm: bool,
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Args)]
struct ProjectArgs {
    /// The user message.
    user: String,
    #[arg(long)]
    system: Option<String>,
    /// Assistant answer to score.
    #[arg(long, default_value = "")]
    response: String,
    /// VECTOR[:LAYER]; repeatable. Without a layer, the vector's recommended one.
    #[arg(long = "vector", value_name = "VECTOR[:LAYER]", required = true)]
    vectors: Vec<String>,
    #[arg(long, default_value = "")]
    model: String,
    /// Also print the projection at every token.
    #[arg(long)]
    per_token: bool,
}

#[derive(Subcommand)]
enum VectorsCmd {
    List {
        #[arg(long, default_value = "")]
        model: String,
    },
    Get {
        name: String,
        /// Write the values as JSON ({"info":…, "values":[[…]…]}) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Store a vector from a JSON file holding a list of rows ([[f32; d_model]; n_layers+1]).
    Put {
        name: String,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long = "trait", default_value = "")]
        trait_name: String,
        #[arg(long)]
        overwrite: bool,
    },
    Rm {
        name: String,
    },
    /// Store a vector from a llama.cpp/repeng control-vector GGUF, a persona_vectors .pt file or
    /// our safetensors file (format detected from the bytes unless --format says).
    Import {
        file: PathBuf,
        #[arg(long)]
        name: String,
        /// auto, gguf, pt or safetensors.
        #[arg(long, default_value = "auto")]
        format: String,
        #[arg(long, default_value = "")]
        model: String,
        #[arg(long = "trait", default_value = "")]
        trait_name: String,
        /// Recommended layer to record with the vector.
        #[arg(long)]
        layer: Option<u32>,
        #[arg(long)]
        overwrite: bool,
    },
    /// Write a stored vector as a control-vector GGUF (llama.cpp --control-vector) or safetensors.
    Export {
        name: String,
        #[arg(long)]
        out: PathBuf,
        /// gguf or safetensors.
        #[arg(long, default_value = "gguf")]
        format: String,
    },
}

#[derive(Args)]
struct BenchArgs {
    #[arg(long, default_value = "")]
    model: String,
    /// Measured runs per configuration (medians are reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Residual layer for the steered runs (default: the middle layer).
    #[arg(long)]
    layer: Option<u32>,
    #[arg(long, default_value_t = 4.0)]
    coefficient: f32,
    /// Also run N concurrent streams, each steered by its own vector, for each N listed
    /// (e.g. 1,4,8,16); prints aggregate tok/s, TTFT and inter-token latency percentiles.
    #[arg(long, value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// Skip the single-stream steered/unsteered comparison.
    #[arg(long)]
    no_single: bool,
    /// Also time one full extraction of this library trait (every pair and question, one greedy
    /// answer per side, no judge), stored as `bench-TRAIT`.
    #[arg(long, value_name = "TRAIT")]
    extract: Option<String>,
    /// New tokens per rollout for --extract.
    #[arg(long, default_value_t = 128)]
    extract_tokens: u32,
    /// Measure the cost of per-token monitoring: single-stream decode with two monitors against none.
    #[arg(long)]
    monitor: bool,
    /// ProjectActivation throughput with N concurrent clients, for each N listed (e.g. 1,16).
    #[arg(long, value_delimiter = ',')]
    project: Vec<usize>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // A server's refusal reads best as its status name and message.
            match e.downcast_ref::<tonic::Status>() {
                Some(s) => eprintln!("error: {:?}: {}", s.code(), s.message()),
                None => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let mut c = connect(&cli.addr).await?;
    match cli.command {
        Cmd::Generate(a) => generate(&mut c, a).await,
        Cmd::Extract(a) => extract(&mut c, a).await,
        Cmd::Traits { command } => traits(&mut c, command).await,
        Cmd::Monitor(a) => streams::monitor(&mut c, a).await,
        Cmd::Screen(a) => streams::screen(&mut c, a).await,
        Cmd::Project(a) => project(&mut c, a).await,
        Cmd::Vectors { command } => vectors(&mut c, command).await,
        Cmd::Models => {
            let r = c.list_models(pb::ListModelsRequest {}).await?.into_inner();
            for m in r.models {
                println!(
                    "{}{}\t{} layers={} d={} ctx={} weights={} device={} source={}",
                    m.id,
                    if m.is_default { " (default)" } else { "" },
                    m.architecture,
                    m.n_layers,
                    m.d_model,
                    m.context_length,
                    m.weights,
                    m.device,
                    m.source
                );
            }
            Ok(())
        }
        Cmd::Bench(a) => bench(&mut c, a).await,
        Cmd::Eval(a) => evaluate::eval(&mut c, a).await,
        Cmd::Spectrum(a) => evaluate::spectrum(&mut c, a).await,
        Cmd::Score(a) => evaluate::score(&mut c, a).await,
    }
}

async fn generate(c: &mut Client, a: GenerateArgs) -> Result<()> {
    let req = pb::GenerateRequest {
        model: a.prompt.model.clone(),
        prompt: Some(a.prompt.to_pb()),
        sampling: Some(a.sampling.to_pb()),
        steering: a.steer.iter().map(|s| persona_client::parse_steer(s)).collect::<Result<_>>()?,
        monitors: a.monitors.iter().map(|m| persona_client::parse_target(m)).collect::<Result<_>>()?,
        alert_threshold: a.alert,
        alert_threshold_calibrated: a.alert_calibrated,
        logprobs: a.logprobs.is_some(),
        top_logprobs: a.logprobs.unwrap_or(0),
    };
    let mut stream = c.generate(req).await?.into_inner();
    let mut out = std::io::stdout();
    while let Some(msg) = stream.message().await? {
        out.write_all(msg.delta.as_bytes())?;
        out.flush()?;
        if a.scores && !msg.scores.is_empty() {
            let scores: Vec<String> = msg
                .scores
                .iter()
                .zip(msg.calibrated_scores.iter().map(Some).chain(std::iter::repeat(None)))
                .map(|(s, c)| match c.filter(|c| c.is_finite()) {
                    Some(c) => format!("{s:.3} ({c:.0})"),
                    None => format!("{s:.3}"),
                })
                .collect();
            eprintln!("\t{:?}\t{}", msg.delta, scores.join("\t"));
        }
        if let Some(lp) = &msg.logprob {
            let top: Vec<String> = lp.top_logprobs.iter().map(|t| format!("{:?} {:.2}", t.token, t.logprob)).collect();
            eprintln!("\t{:?}\tlogprob {:.3}\t{}", lp.token, lp.logprob, top.join(", "));
        }
        if let Some(s) = msg.summary {
            let reason = pb::FinishReason::try_from(s.finish_reason).map(|r| r.as_str_name()).unwrap_or("?");
            eprintln!(
                "\n[{} prompt + {} completion tokens, {reason}, prefill {:.0} ms, decode {:.0} ms]",
                s.prompt_tokens, s.completion_tokens, s.prefill_ms, s.decode_ms
            );
            for st in &s.steering {
                let name = if st.vector.is_empty() { "inline" } else { &st.vector };
                eprintln!(
                    "[steered by {name} at layer {} ({}) with coefficient {} ({})]",
                    st.layer, st.layer_source, st.coefficient, st.coefficient_source
                );
            }
            for m in s.monitors {
                let alert = if m.alert { format!("  ALERT at token {}", m.first_alert_token) } else { String::new() };
                let calibrated = if m.calibrated {
                    format!(
                        " | calibrated 0-100: prompt {:.0}, mean {:.0}, max {:.0}",
                        m.prompt_last_calibrated, m.mean_calibrated, m.max_calibrated
                    )
                } else {
                    " | raw only (uncalibrated vector)".to_string()
                };
                eprintln!(
                    "[monitor {}@{}: prompt {:.3}, mean {:.3}, max {:.3}{calibrated}{alert}]",
                    m.vector, m.layer, m.prompt_last, m.mean, m.max
                );
            }
        }
    }
    println!();
    Ok(())
}

async fn extract(c: &mut Client, a: ExtractArgs) -> Result<()> {
    if a.pos.len() != a.neg.len() {
        bail!("give as many --neg as --pos prompts");
    }
    let trait_source = match (&a.trait_ref, &a.file) {
        (Some(t), _) => Some(pb::extract_vector_request::TraitSource::TraitRef(t.clone())),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            let def = persona_client::trait_from_json(&text).with_context(|| format!("parsing {}", f.display()))?;
            Some(pb::extract_vector_request::TraitSource::Definition(def))
        }
        (None, None) => None,
    };
    let req = pb::ExtractVectorRequest {
        model: a.model,
        name: a.name,
        trait_name: a.label,
        pairs: a.pos.iter().zip(&a.neg).map(|(p, n)| pb::InstructionPair { pos: p.clone(), neg: n.clone() }).collect(),
        questions: a.question,
        sampling: Some(pb::SamplingParams {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            seed: a.seed,
            ..Default::default()
        }),
        overwrite: a.overwrite,
        trait_source,
        samples_per_question: a.samples,
        max_pairs: a.max_pairs,
        max_questions: a.max_questions,
        skip_judge: a.no_judge,
        trait_threshold: a.trait_threshold,
        coherence_threshold: a.coherence_threshold,
    };
    let mut stream = c.extract_vector(req).await?.into_inner();
    // A failure ends the progress line first, so the error starts a line of its own.
    while let Some(msg) = stream.message().await.inspect_err(|_| eprintln!())? {
        match msg.event {
            Some(pb::extract_vector_response::Event::Progress(p)) => {
                print_progress(&p.stage, p.done, p.total, p.elapsed_secs, p.eta_secs)
            }
            Some(pb::extract_vector_response::Event::Result(r)) => {
                eprintln!();
                println!(
                    "{} rollouts ({} tokens) in {:.1} s; kept {} positive / {} negative; {}",
                    r.rollouts, r.generated_tokens, r.elapsed_secs, r.kept_pos, r.kept_neg, r.filtering
                );
                for v in r.vector.iter().chain(&r.variants) {
                    print_vector(v);
                }
                if let Some(v) = &r.vector {
                    print_layer_scores(v);
                }
            }
            None => {}
        }
    }
    Ok(())
}

fn print_calibration(v: &pb::VectorInfo) {
    match &v.steering {
        Some(s) => println!(
            "steering recommendation: layer {}, coefficient {} (trait {:.1} vs {:.1} unsteered, coherence {:.1} vs {:.1}; {})",
            s.layer,
            s.coefficient,
            s.trait_score,
            s.unsteered_trait_score,
            s.coherence,
            s.unsteered_coherence,
            s.scorer
        ),
        None => println!("steering recommendation: none (run `persona eval --vector {}`)", v.name),
    }
    if v.calibration.is_empty() {
        println!("calibration: none (raw projections only)");
        return;
    }
    println!("layer\tresponse helpful (0)\tresponse trait (100)\tprompt_last helpful (0)\tprompt_last trait (100)");
    let side = |s: &Option<pb::SideStats>| {
        s.as_ref().map_or("-".into(), |s| format!("{:.2} ± {:.2} (n={})", s.mean, s.std, s.n))
    };
    for c in &v.calibration {
        let (r, p) = (c.response.unwrap_or_default(), c.prompt_last.unwrap_or_default());
        println!("{}\t{}\t{}\t{}\t{}", c.layer, side(&r.neg), side(&r.pos), side(&p.neg), side(&p.pos));
    }
}

/// One progress line of a long call, rewritten in place on stderr.
fn print_progress(stage: &str, done: u32, total: u32, elapsed: f64, eta: f64) {
    eprint!("\r{stage:<11} {done:>5}/{total:<5} elapsed {elapsed:>6.1}s  eta {eta:>6.1}s   ");
}

fn print_layer_scores(v: &pb::VectorInfo) {
    if v.layer_scores.is_empty() {
        return;
    }
    println!("layer\tcohens_d\tauroc");
    for s in &v.layer_scores {
        let mark = if Some(s.layer) == v.recommended_layer { "\t<- recommended" } else { "" };
        println!("{}\t{:.3}\t{:.3}{mark}", s.layer, s.cohens_d, s.auroc);
    }
}

async fn traits(c: &mut Client, cmd: TraitsCmd) -> Result<()> {
    match cmd {
        TraitsCmd::List => {
            for t in c.list_traits(pb::ListTraitsRequest {}).await?.into_inner().traits {
                println!(
                    "{}\t{} pairs, {} questions\t{}",
                    t.trait_name,
                    t.instruction.len(),
                    t.questions.len(),
                    t.description
                );
            }
        }
        TraitsCmd::Show { name } => {
            let all = c.list_traits(pb::ListTraitsRequest {}).await?.into_inner().traits;
            let known: Vec<String> = all.iter().map(|t| t.trait_name.clone()).collect();
            let t = all
                .into_iter()
                .find(|t| t.trait_name == name)
                .with_context(|| format!("no trait `{name}` (known: {})", known.join(", ")))?;
            println!("{}", persona_client::trait_to_json(&t));
        }
        TraitsCmd::New { name, description, llm, out } => {
            let r = c
                .draft_trait(pb::DraftTraitRequest { trait_name: name, description, use_llm: llm })
                .await?
                .into_inner();
            let json = persona_client::trait_to_json(&r.definition.context("server sent no definition")?);
            match out {
                Some(path) => {
                    std::fs::write(&path, json + "\n")?;
                    eprintln!("wrote {} (generator: {})", path.display(), r.generator);
                }
                None => println!("{json}"),
            }
        }
    }
    Ok(())
}

fn print_vector(v: &pb::VectorInfo) {
    let kind = pb::VectorKind::try_from(v.kind).map(|k| k.as_str_name()).unwrap_or("?");
    let (best, norm) =
        v.row_norms.iter().enumerate().fold((0, 0f32), |acc, (i, n)| if *n > acc.1 { (i, *n) } else { acc });
    let layer = v.recommended_layer.map_or("-".to_string(), |l| l.to_string());
    println!(
        "{}\tmodel={} trait={} kind={kind} shape=[{}, {}] recommended layer={layer} largest-norm row={best} ({norm:.2}) {}",
        v.name, v.model, v.trait_name, v.n_rows, v.d_model, v.description
    );
}

async fn project(c: &mut Client, a: ProjectArgs) -> Result<()> {
    let targets = a
        .vectors
        .iter()
        .map(|s| {
            Ok(match s.rsplit_once(':') {
                Some((v, l)) => {
                    pb::ProjectionTarget { vector: v.to_string(), layer: Some(l.parse().context("layer")?) }
                }
                None => pb::ProjectionTarget { vector: s.clone(), layer: None },
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let Some(pb::prompt::Kind::Chat(conversation)) = persona_client::chat(&a.user, a.system.as_deref()).kind else {
        unreachable!("chat() builds a conversation")
    };
    let r = c
        .project_activation(pb::ProjectActivationRequest {
            model: a.model,
            conversation: Some(conversation),
            response: a.response,
            targets,
            per_token: a.per_token,
        })
        .await?
        .into_inner();
    println!(
        "vector\tlayer\tprompt_last\tprompt_avg\tresponse_avg\t(calibrated 0-100: helpful rollouts 0, trait rollouts 100)"
    );
    for p in &r.projections {
        let resp = if p.has_response { format!("{:.4}", p.response_avg) } else { "-".into() };
        let cal = if !p.calibrated {
            p.uncalibrated_reason.clone()
        } else if p.has_response {
            format!("{:.0}\t{:.0}\t{:.0}", p.prompt_last_calibrated, p.prompt_avg_calibrated, p.response_avg_calibrated)
        } else {
            format!("{:.0}\t{:.0}\t-", p.prompt_last_calibrated, p.prompt_avg_calibrated)
        };
        println!("{}\t{}\t{:.4}\t{:.4}\t{resp}\t{cal}", p.vector, p.layer, p.prompt_last, p.prompt_avg);
    }
    if a.per_token {
        let names: Vec<String> = r.projections.iter().map(|p| format!("{}@{}", p.vector, p.layer)).collect();
        println!("\n#\tpart\ttoken\t{}", names.join("\t"));
        for (i, t) in r.tokens.iter().enumerate() {
            let part = if i < r.prompt_tokens as usize { "prompt" } else { "response" };
            let vals: Vec<String> = r.projections.iter().map(|p| format!("{:.3}", p.per_token[i])).collect();
            println!("{i}\t{part}\t{t:?}\t{}", vals.join("\t"));
        }
    }
    Ok(())
}

async fn vectors(c: &mut Client, cmd: VectorsCmd) -> Result<()> {
    match cmd {
        VectorsCmd::List { model } => {
            for v in c.list_vectors(pb::ListVectorsRequest { model }).await?.into_inner().vectors {
                print_vector(&v);
            }
        }
        VectorsCmd::Get { name, out } => {
            let r = c.get_vector(pb::GetVectorRequest { name, include_values: out.is_some() }).await?.into_inner();
            let info = r.info.context("server sent no vector info")?;
            print_vector(&info);
            print_calibration(&info);
            if let Some(path) = out {
                let rows: Vec<&[f32]> = r.values.chunks(info.d_model.max(1) as usize).collect();
                let json = serde_json::json!({ "name": info.name, "model": info.model, "trait": info.trait_name, "values": rows });
                std::fs::write(&path, serde_json::to_vec_pretty(&json)?)?;
                eprintln!("wrote {}", path.display());
            }
        }
        VectorsCmd::Put { name, file, model, trait_name, overwrite } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let rows = v.get("values").unwrap_or(&v);
            let rows: Vec<Vec<f32>> =
                serde_json::from_value(rows.clone()).context("expected a list of rows of floats")?;
            let r = c
                .put_vector(pb::PutVectorRequest {
                    name,
                    model,
                    trait_name,
                    kind: pb::VectorKind::ResponseAvg as i32,
                    values: rows.concat(),
                    description: format!("imported from {}", file.display()),
                    overwrite,
                })
                .await?
                .into_inner();
            print_vector(&r.info.context("server sent no vector info")?);
        }
        VectorsCmd::Rm { name } => {
            c.delete_vector(pb::DeleteVectorRequest { name: name.clone() }).await?;
            println!("deleted {name}");
        }
        VectorsCmd::Import { file, name, format, model, trait_name, layer, overwrite } => {
            let data = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let r = c
                .import_vector(pb::ImportVectorRequest {
                    name,
                    model,
                    format: vector_format(&format)? as i32,
                    data,
                    trait_name,
                    kind: pb::VectorKind::ResponseAvg as i32,
                    description: format!("imported from {}", file.display()),
                    overwrite,
                    recommended_layer: layer,
                })
                .await?
                .into_inner();
            print_vector(&r.info.context("server sent no vector info")?);
        }
        VectorsCmd::Export { name, out, format } => {
            let r = c.export_vector(pb::ExportVectorRequest { name, format: vector_format(&format)? as i32 }).await?;
            let r = r.into_inner();
            std::fs::write(&out, &r.data).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("wrote {} ({} bytes, {})", out.display(), r.data.len(), r.extension);
        }
    }
    Ok(())
}

fn vector_format(s: &str) -> Result<pb::VectorFormat> {
    Ok(match s {
        "auto" => pb::VectorFormat::Unspecified,
        "gguf" => pb::VectorFormat::Gguf,
        "pt" | "torch" => pb::VectorFormat::Torch,
        "safetensors" => pb::VectorFormat::Safetensors,
        other => bail!("unknown format `{other}` (auto, gguf, pt or safetensors)"),
    })
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() { f64::NAN } else { xs[xs.len() / 2] }
}

/// Prefill tok/s, decode tok/s and time to first token of one run.
async fn bench_once(c: &mut Client, req: pb::GenerateRequest) -> Result<(f64, f64, f64)> {
    let out = generate_text(c, req).await?;
    let s = out.summary.context("no summary")?;
    let prefill = s.prompt_tokens as f64 / (s.prefill_ms / 1e3);
    let decode = (s.completion_tokens.saturating_sub(1)) as f64 / (s.decode_ms / 1e3);
    Ok((prefill, decode, out.time_to_first_token.unwrap_or(f64::NAN)))
}

async fn bench(c: &mut Client, a: BenchArgs) -> Result<()> {
    let models = c.list_models(pb::ListModelsRequest {}).await?.into_inner().models;
    let m = models
        .iter()
        .find(|m| if a.model.is_empty() { m.is_default } else { m.id == a.model })
        .context("model not loaded")?;
    let layer = a.layer.unwrap_or(m.n_layers / 2);
    // A prompt of a few hundred tokens, so prefill is measured on real work.
    let user = "Write a long, detailed story about a lighthouse keeper who finds a message in a bottle. ".repeat(8);
    let base = pb::GenerateRequest {
        model: m.id.clone(),
        prompt: Some(persona_client::chat(&user, Some("You are a creative writer."))),
        sampling: Some(pb::SamplingParams { max_tokens: a.max_tokens, ..Default::default() }),
        ..Default::default()
    };
    let mut v = persona_client::pseudo_random_vector(7, m.d_model as usize);
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    let steered =
        pb::GenerateRequest { steering: vec![persona_client::steer_inline(v, layer, a.coefficient)], ..base.clone() };
    println!(
        "model {} ({} layers, d={}, weights {}), {} runs, {} new tokens",
        m.id, m.n_layers, m.d_model, m.weights, a.runs, a.max_tokens
    );
    bench_once(c, base.clone()).await?; // warm-up
    if !a.no_single {
        single_stream(c, &a, &base, &steered, layer).await?;
    }
    for &n in &a.concurrency {
        concurrent(c, &a, m, layer, n).await?;
    }
    if a.monitor || !a.project.is_empty() {
        // Monitors and projections read stored vectors: two pseudo-random ones of the model's shape.
        for (i, name) in BENCH_VECTORS.iter().enumerate() {
            let values =
                persona_client::pseudo_random_vector(100 + i as u64, (m.n_layers as usize + 1) * m.d_model as usize);
            let put = pb::PutVectorRequest {
                name: name.to_string(),
                model: m.id.clone(),
                values,
                overwrite: true,
                ..Default::default()
            };
            c.put_vector(put).await?;
        }
    }
    if a.monitor {
        monitor_overhead(c, &a, &base, layer).await?;
    }
    for &n in &a.project {
        project_throughput(c, m, layer, n).await?;
    }
    if let Some(t) = &a.extract {
        bench_extract(c, m, t, a.extract_tokens).await?;
    }
    Ok(())
}

const BENCH_VECTORS: [&str; 2] = ["bench-monitor-a", "bench-monitor-b"];

fn bench_targets(layer: u32) -> Vec<pb::ProjectionTarget> {
    BENCH_VECTORS.iter().map(|v| pb::ProjectionTarget { vector: v.to_string(), layer: Some(layer) }).collect()
}

async fn monitor_overhead(c: &mut Client, a: &BenchArgs, base: &pb::GenerateRequest, layer: u32) -> Result<()> {
    let watched = pb::GenerateRequest { monitors: bench_targets(layer), ..base.clone() };
    let (mut plain, mut monitored) = (Vec::new(), Vec::new());
    for _ in 0..a.runs {
        plain.push(bench_once(c, base.clone()).await?.1);
        monitored.push(bench_once(c, watched.clone()).await?.1);
    }
    let (p, w) = (median(&mut plain), median(&mut monitored));
    println!("decode tok/s (median of {}): unmonitored {p:.1}, two monitors {w:.1}", a.runs);
    println!("monitoring overhead (decode, median): {:+.1}%", (p / w - 1.0) * 100.0);
    Ok(())
}

/// `clients` concurrent callers of ProjectActivation, each scoring its own conversations.
async fn project_throughput(c: &mut Client, m: &pb::ModelInfo, layer: u32, clients: usize) -> Result<()> {
    const PER_CLIENT: usize = 8;
    let answer = "Start by writing down what happened and when, then talk to them calmly in private. \
                  If nothing changes, bring your notes to your manager and ask for advice on next steps.";
    let t0 = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..clients {
        let mut c = c.clone();
        let model = m.id.clone();
        tasks.spawn(async move {
            for i in 0..PER_CLIENT {
                let user =
                    format!("Conversation {k}-{i}: a coworker keeps taking credit for my work. What should I do?");
                let Some(pb::prompt::Kind::Chat(conversation)) =
                    persona_client::chat(&user, Some("You are a helpful assistant.")).kind
                else {
                    unreachable!("chat() builds a conversation")
                };
                let req = pb::ProjectActivationRequest {
                    model: model.clone(),
                    conversation: Some(conversation),
                    response: answer.to_string(),
                    targets: bench_targets(layer),
                    per_token: false,
                };
                c.project_activation(req).await?;
            }
            Ok::<_, tonic::Status>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let n = clients * PER_CLIENT;
    println!(
        "ProjectActivation, {clients:>2} concurrent clients: {n} conversations in {secs:.2} s = {:.1} conversations/s",
        n as f64 / secs
    );
    Ok(())
}

async fn bench_extract(c: &mut Client, m: &pb::ModelInfo, trait_name: &str, max_tokens: u32) -> Result<()> {
    let req = pb::ExtractVectorRequest {
        model: m.id.clone(),
        name: format!("bench-{trait_name}"),
        trait_source: Some(pb::extract_vector_request::TraitSource::TraitRef(trait_name.to_string())),
        sampling: Some(pb::SamplingParams { max_tokens, ..Default::default() }),
        skip_judge: true,
        overwrite: true,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut stream = c.extract_vector(req).await?.into_inner();
    let mut result = None;
    while let Some(msg) = stream.message().await? {
        if let Some(pb::extract_vector_response::Event::Result(r)) = msg.event {
            result = Some(r);
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let r = result.context("extraction ended without a result")?;
    println!(
        "extraction of `{trait_name}`: {} rollouts x {max_tokens} max new tokens, {} tokens generated",
        r.rollouts, r.generated_tokens
    );
    println!(
        "  wall {wall:.1} s ({:.2} rollouts/s, {:.1} generated tok/s); recommended layer {}",
        r.rollouts as f64 / wall,
        r.generated_tokens as f64 / wall,
        r.vector.and_then(|v| v.recommended_layer).map_or("-".into(), |l| l.to_string())
    );
    Ok(())
}

async fn single_stream(
    c: &mut Client,
    a: &BenchArgs,
    base: &pb::GenerateRequest,
    steered: &pb::GenerateRequest,
    layer: u32,
) -> Result<()> {
    let (mut pu, mut du, mut tu, mut ps, mut ds, mut ts) = (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..a.runs {
        let (p, d, t) = bench_once(c, base.clone()).await?;
        pu.push(p);
        du.push(d);
        tu.push(t);
        let (p, d, t) = bench_once(c, steered.clone()).await?;
        ps.push(p);
        ds.push(d);
        ts.push(t);
    }
    let (pu, du, tu, ps, ds, ts) =
        (median(&mut pu), median(&mut du), median(&mut tu), median(&mut ps), median(&mut ds), median(&mut ts));
    println!("{:<12} {:>14} {:>14} {:>10}", "", "prefill tok/s", "decode tok/s", "TTFT ms");
    println!("{:<12} {:>14.1} {:>14.1} {:>10.1}", "unsteered", pu, du, tu * 1e3);
    println!("{:<12} {:>14.1} {:>14.1} {:>10.1}", format!("steered L{layer}"), ps, ds, ts * 1e3);
    println!("steering overhead (decode, median): {:+.1}%", (du / ds - 1.0) * 100.0);
    Ok(())
}

/// Arrival times of one stream's token messages, relative to the start of its request.
async fn timed_stream(mut c: Client, req: pb::GenerateRequest, t0: std::time::Instant) -> Result<Vec<f64>> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut times = Vec::new();
    while let Some(msg) = stream.message().await? {
        for _ in &msg.token_ids {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}

fn percentile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() { f64::NAN } else { xs[((xs.len() - 1) as f64 * p).round() as usize] }
}

/// N concurrent streams, each with its own steering vector and question.
async fn concurrent(c: &mut Client, a: &BenchArgs, m: &pb::ModelInfo, layer: u32, n: usize) -> Result<()> {
    const TOPICS: [&str; 8] =
        ["a lighthouse", "a dragon", "the ocean", "a small town", "a robot", "a garden", "the moon", "a train journey"];
    let (mut aggregate, mut decode) = (Vec::new(), Vec::new());
    let (mut ttft, mut itl) = (Vec::new(), Vec::new());
    for run in 0..a.runs {
        let t0 = std::time::Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let mut v = persona_client::pseudo_random_vector((run * 1000 + i) as u64, m.d_model as usize);
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            let user = format!("Write a long, detailed story about {}.", TOPICS[i % TOPICS.len()]);
            let req = pb::GenerateRequest {
                model: m.id.clone(),
                prompt: Some(persona_client::chat(&user, Some("You are a creative writer."))),
                sampling: Some(pb::SamplingParams { max_tokens: a.max_tokens, ..Default::default() }),
                steering: vec![persona_client::steer_inline(v, layer, a.coefficient)],
                ..Default::default()
            };
            tasks.spawn(timed_stream(c.clone(), req, t0));
        }
        let (mut tokens, mut decoded) = (0, 0);
        let (mut first_token, mut last_token) = (f64::INFINITY, 0f64);
        for times in tasks.join_all().await {
            let times = times?;
            tokens += times.len();
            decoded += times.len().saturating_sub(1);
            if let (Some(first), Some(last)) = (times.first(), times.last()) {
                ttft.push(*first);
                first_token = first_token.min(*first);
                last_token = last_token.max(*last);
            }
            itl.extend(times.windows(2).map(|w| w[1] - w[0]));
        }
        aggregate.push(tokens as f64 / t0.elapsed().as_secs_f64());
        // Decode phase only: tokens after each stream's first, over the span from the first
        // stream's first token to the last stream's last token.
        decode.push(decoded as f64 / (last_token - first_token));
    }
    let status = c.get_server_status(pb::GetServerStatusRequest {}).await?.into_inner();
    let ms = |x: f64| x * 1e3;
    println!(
        "{n:>3} streams  aggregate {:>6.1} tok/s  decode {:>6.1} tok/s   TTFT p50 {:>5.0} ms p99 {:>5.0} ms   ITL p50 {:>5.1} ms p99 {:>5.1} ms   peak RSS {:>4.0} MiB",
        median(&mut aggregate),
        median(&mut decode),
        ms(percentile(&mut ttft, 0.5)),
        ms(percentile(&mut ttft, 0.99)),
        ms(percentile(&mut itl, 0.5)),
        ms(percentile(&mut itl, 0.99)),
        status.peak_rss_bytes as f64 / (1 << 20) as f64,
    );
    Ok(())
}
