//! `persona dataset`: a trait-eliciting dataset and its matched normal one, as JSONL.

use anyhow::{Context, Result};
use clap::Args;
use persona_client::elicit::{self, Elicit, Side};
use persona_client::{Client, pb};
use std::io::Write;

#[derive(Args)]
pub(crate) struct DatasetArgs {
    /// A trait of the server's library.
    #[arg(long = "trait", value_name = "TRAIT", conflicts_with = "file")]
    trait_name: Option<String>,
    /// A trait definition file (the traits/ schema).
    #[arg(long, value_name = "FILE")]
    file: Option<std::path::PathBuf>,
    /// Samples per dataset (at most questions x 15 framings).
    #[arg(long, default_value_t = 300)]
    n: usize,
    /// Output prefix: PREFIX.jsonl (trait) and PREFIX.normal.jsonl (default: the trait's name).
    #[arg(long)]
    out: Option<String>,
    /// Elicit by steering with a stored vector instead of the trait's system prompts:
    /// NAME[:LAYER[:COEF]] as for `generate --steer`.
    #[arg(long, value_name = "NAME[:LAYER[:COEF]]")]
    steer: Option<String>,
    /// Skip the matched normal dataset.
    #[arg(long)]
    no_normal: bool,
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    #[arg(long, default_value = "")]
    model: String,
}

pub(crate) async fn dataset(c: &mut Client, a: DatasetArgs) -> Result<()> {
    let def = match (&a.trait_name, &a.file) {
        (Some(name), _) => c
            .list_traits(pb::ListTraitsRequest {})
            .await?
            .into_inner()
            .traits
            .into_iter()
            .find(|t| &t.trait_name == name)
            .with_context(|| format!("no trait `{name}` in the server's library (persona traits list)"))?,
        (None, Some(f)) => persona_client::trait_from_json(&std::fs::read_to_string(f)?)
            .with_context(|| format!("reading {}", f.display()))?,
        (None, None) => anyhow::bail!("give --trait NAME or --file TRAIT.json"),
    };
    let opts = elicit::Options {
        model: a.model.clone(),
        n: a.n,
        max_tokens: a.max_tokens,
        temperature: a.temperature,
        seed: a.seed,
        concurrency: a.concurrency,
        elicit: match &a.steer {
            Some(s) => Elicit::Steered(persona_client::parse_steer(s)?),
            None => Elicit::SystemPrompt,
        },
    };
    let prefix = a.out.clone().unwrap_or_else(|| def.trait_name.clone());
    let mut sides = vec![(Side::Trait, format!("{prefix}.jsonl"))];
    if !a.no_normal {
        sides.push((Side::Normal, format!("{prefix}.normal.jsonl")));
    }
    for (side, path) in sides {
        let started = std::time::Instant::now();
        let mut progress = crate::progress::Progress::new();
        let stage = format!("{side:?}");
        let samples = elicit::generate(c, &def, &opts, side, |done, total| {
            progress.update(&stage, done as u64, total as u64, "")
        })
        .await;
        progress.finish();
        let samples = samples?;
        // Written whole to a temporary file, then renamed: never a half-written dataset.
        let tmp = format!("{path}.partial");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).with_context(|| format!("creating {tmp}"))?);
        for s in &samples {
            writeln!(f, "{}", s.to_json(&def.trait_name))?;
        }
        f.into_inner()?.sync_all()?;
        std::fs::rename(&tmp, &path)?;
        println!("{path}: {} samples in {:.0} s", samples.len(), started.elapsed().as_secs_f64());
    }
    Ok(())
}
