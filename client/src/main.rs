//! `persona`: command-line client for persona-steer.

use anyhow::Result;
use clap::{Parser, Subcommand};
use persona_client::{ConnectOptions, connect_with, pb};

mod bench;
mod elicit_cmd;
mod evaluate;
mod extract;
mod finetune;
mod generate;
mod http_bench;
mod library;
mod measure;
mod progress;
mod soak;
mod streams;

#[derive(Parser)]
#[command(name = "persona", version, about = "Client for the persona-steer gRPC service")]
struct Cli {
    /// Server address: host:port, http(s)://host:port, or dns:///name:port to balance round robin
    /// over every address the name resolves to (a Kubernetes headless Service).
    #[arg(long, global = true, env = "PERSONA_ADDR", default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// API key, sent as `authorization: Bearer <key>`.
    #[arg(long, global = true, env = "PERSONA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// CA certificate (PEM) of the server's TLS certificate; implies TLS.
    #[arg(long, global = true, env = "PERSONA_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM), for servers that require one (mTLS).
    #[arg(long, global = true, env = "PERSONA_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// Client private key (PEM) for --tls-cert.
    #[arg(long, global = true, env = "PERSONA_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Name the server's certificate must carry, when not the address's host.
    #[arg(long, global = true, env = "PERSONA_TLS_DOMAIN")]
    tls_domain: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Extract a persona vector: a library trait (--trait), a trait file (--file) or explicit prompts.
    Extract(extract::ExtractArgs),
    /// The trait library: list, show, or draft a new trait from a name and a description.
    Traits {
        #[command(subcommand)]
        command: library::TraitsCmd,
    },
    /// Project a conversation's activations onto a stored vector.
    Project(library::ProjectArgs),
    /// Score a JSONL file of conversations through MonitorStream, printing JSONL results.
    Monitor(streams::MonitorArgs),
    /// Screen a JSONL training set: projection difference of each response against the model's
    /// own; writes ranked JSONL and CSV and an SVG histogram.
    Screen(streams::ScreenArgs),
    /// Manage stored vectors.
    Vectors {
        #[command(subcommand)]
        command: library::VectorsCmd,
    },
    /// List the loaded models.
    Models,
    /// Measure single-stream prefill and decode speed, steered and unsteered.
    Bench(bench::BenchArgs),
    /// Sweep a vector over layers x coefficients on held-out questions: trait and coherence per
    /// cell, the recommended steering point (stored with the vector), SVG charts.
    Eval(evaluate::EvalArgs),
    /// Answers to one question at -2c, -c, 0, +c, +2c with their trait and coherence scores.
    Spectrum(evaluate::SpectrumArgs),
    /// Per-token log-probabilities of a response after a prompt, and its perplexity.
    Score(evaluate::ScoreArgs),
    /// A long mixed load with bad requests and dropped streams: statuses, latency, server RSS
    /// (scripts/soak starts a server and runs it).
    Soak(soak::SoakArgs),
    /// A trait-eliciting dataset (the model's answers under the trait's system prompts, or
    /// steered; saved without them) and its matched normal dataset, as JSONL for fine-tuning.
    Dataset(elicit_cmd::DatasetArgs),
    /// LoRA fine-tuning on the server (optionally with preventative steering); follows the job
    /// and serves the result as a new model id.
    Finetune(finetune::FinetuneArgs),
    /// Fine-tuning jobs: list, watch, cancel.
    Jobs {
        #[command(subcommand)]
        command: finetune::JobsCmd,
    },
    /// Serve a PEFT LoRA adapter over a served base model.
    LoadAdapter(finetune::LoadAdapterArgs),
    /// The finetuning shift of a tuned model against its base along stored vectors, and
    /// optionally both models' trait expression.
    Shift(finetune::ShiftArgs),
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
    let opts = ConnectOptions {
        api_key: cli.api_key.clone(),
        tls_ca: cli.tls_ca.clone(),
        tls_cert: cli.tls_cert.clone(),
        tls_key: cli.tls_key.clone(),
        tls_domain: cli.tls_domain.clone(),
    };
    let mut c = connect_with(&cli.addr, &opts).await?;
    match cli.command {
        Cmd::Generate(a) => generate::generate(&mut c, a).await,
        Cmd::Extract(a) => extract::extract(&mut c, a).await,
        Cmd::Traits { command } => library::traits(&mut c, command).await,
        Cmd::Monitor(a) => streams::monitor(&mut c, a).await,
        Cmd::Screen(a) => streams::screen(&mut c, a).await,
        Cmd::Project(a) => library::project(&mut c, a).await,
        Cmd::Vectors { command } => library::vectors(&mut c, command).await,
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
        Cmd::Bench(a) => bench::bench(&mut c, a).await,
        Cmd::Eval(a) => evaluate::eval(&mut c, a).await,
        Cmd::Spectrum(a) => evaluate::spectrum(&mut c, a).await,
        Cmd::Score(a) => evaluate::score(&mut c, a).await,
        Cmd::Soak(a) => soak::soak(&mut c, a).await,
        Cmd::Dataset(a) => elicit_cmd::dataset(&mut c, a).await,
        Cmd::Finetune(a) => finetune::finetune(&mut c, a).await,
        Cmd::Jobs { command } => finetune::jobs(&mut c, command).await,
        Cmd::LoadAdapter(a) => finetune::load_adapter(&mut c, a).await,
        Cmd::Shift(a) => finetune::shift(&mut c, a).await,
    }
}
