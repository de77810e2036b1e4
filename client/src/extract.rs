//! `persona extract`: extraction with progress, and the vector summaries it prints.

use anyhow::{Context, Result, bail};
use clap::Args;
use persona_client::{Client, pb};
use std::path::PathBuf;

use crate::library::print_vector;
use crate::progress::Progress;

#[derive(Args)]
pub(crate) struct ExtractArgs {
    /// A trait of the server's library (see `persona traits list`).
    #[arg(long = "trait", conflicts_with = "file")]
    pub(crate) trait_ref: Option<String>,
    /// A trait definition file (the traits/ JSON schema), sent with the request.
    #[arg(long)]
    pub(crate) file: Option<PathBuf>,
    /// Name to store the vector under (default: the trait's name).
    #[arg(long, default_value = "")]
    pub(crate) name: String,
    /// Explicit mode: full positive system prompt; pair each --pos with a --neg.
    #[arg(long)]
    pub(crate) pos: Vec<String>,
    #[arg(long)]
    pub(crate) neg: Vec<String>,
    #[arg(long)]
    pub(crate) question: Vec<String>,
    /// Explicit mode: trait label kept in the vector's metadata.
    #[arg(long, default_value = "")]
    pub(crate) label: String,
    #[arg(long, default_value = "")]
    pub(crate) model: String,
    #[arg(long, default_value_t = 64)]
    pub(crate) max_tokens: u32,
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Answers per (pair, question).
    #[arg(long, default_value_t = 1)]
    pub(crate) samples: u32,
    /// Use only the first N instruction pairs / questions (0 = all).
    #[arg(long, default_value_t = 0)]
    pub(crate) max_pairs: u32,
    #[arg(long, default_value_t = 0)]
    pub(crate) max_questions: u32,
    /// Do not filter answers with the server's judge.
    #[arg(long)]
    pub(crate) no_judge: bool,
    /// Judge thresholds, 0-100 (0 = the server's default, 50).
    #[arg(long, default_value_t = 0.0)]
    pub(crate) trait_threshold: f32,
    #[arg(long, default_value_t = 0.0)]
    pub(crate) coherence_threshold: f32,
    #[arg(long)]
    pub(crate) overwrite: bool,
    /// Reading mode: the model reads rollouts teacher-forced (no system prompt) instead of
    /// answering under the system prompts, for base models. The rollouts are written by this
    /// served model (`--read-from smollm2-135m-instruct`), or by the model itself with `--read`.
    #[arg(long, value_name = "MODEL")]
    pub(crate) read_from: Option<String>,
    /// Reading mode with the model's own rollouts.
    #[arg(long, conflicts_with = "read_from")]
    pub(crate) read: bool,
    /// How the model reads a question and answer in reading mode: auto (chat turns when the
    /// model ships a chat template, plain text otherwise), chat or plain.
    #[arg(long, default_value = "auto", value_parser = ["auto", "chat", "plain"])]
    pub(crate) read_as: String,
    /// Another stored vector of this model to compare with the extracted one, layer by layer:
    /// cosine, and separation of the same held-out rollouts (repeatable; e.g. a transferred vector).
    #[arg(long, value_name = "VECTOR")]
    pub(crate) compare: Vec<String>,
    /// Write the result (layer scores, comparisons, random baseline) as JSON here.
    #[arg(long, value_name = "FILE")]
    pub(crate) json: Option<PathBuf>,
}

/// The reading mode the flags ask for, if any.
pub(crate) fn reading_mode(read: bool, read_from: Option<&str>, read_as: &str) -> Option<pb::ReadingMode> {
    if !read && read_from.is_none() {
        return None;
    }
    let format = reading_format(read_as);
    Some(pb::ReadingMode { rollouts_from: read_from.unwrap_or_default().to_string(), format: format as i32 })
}

/// `auto`, `chat` or `plain`.
pub(crate) fn reading_format(s: &str) -> pb::ReadingFormat {
    match s {
        "chat" => pb::ReadingFormat::Chat,
        "plain" => pb::ReadingFormat::Plain,
        _ => pb::ReadingFormat::Auto,
    }
}

pub(crate) async fn extract(c: &mut Client, a: ExtractArgs) -> Result<()> {
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
        reading: reading_mode(a.read, a.read_from.as_deref(), &a.read_as),
        compare: a.compare,
    };
    let mut stream = c.extract_vector(req).await?.into_inner();
    let mut progress = Progress::new();
    // A failure ends the progress first, so the error starts a line of its own.
    while let Some(msg) = stream.message().await.inspect_err(|_| progress.finish())? {
        match msg.event {
            Some(pb::extract_vector_response::Event::Progress(p)) => {
                progress.timed(&p.stage, p.done, p.total, p.elapsed_secs, p.eta_secs)
            }
            Some(pb::extract_vector_response::Event::Result(r)) => {
                progress.finish();
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
                print_comparisons(&r);
                if let Some(path) = &a.json {
                    std::fs::write(path, serde_json::to_vec_pretty(&result_json(&r))?)
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!("wrote {}", path.display());
                }
            }
            None => {}
        }
    }
    Ok(())
}

/// Per layer: each compared vector's cosine with the extracted one and its AUROC, beside the
/// extracted vector's own AUROC and the random directions' 95th percentiles.
fn print_comparisons(r: &pb::ExtractResult) {
    let Some(random) = &r.random_baseline else { return };
    let own = r.vector.as_ref().map(|v| v.layer_scores.as_slice()).unwrap_or_default();
    for c in &r.comparisons {
        println!("`{}` against the extracted vector ({}):", c.vector, c.scored_on);
        println!("layer	cosine	random |cos| p95	auroc	extracted auroc	random auroc p95");
        for l in &c.layers {
            let at = |x: &[pb::LayerComparison]| x.iter().find(|r| r.layer == l.layer).copied().unwrap_or_default();
            let native = own.iter().find(|s| s.layer == l.layer).map_or(f32::NAN, |s| s.auroc);
            let rnd = at(&random.layers);
            println!(
                "{}\t{:.3}\t{:.3}\t{:.3}\t{:.3}\t{:.3}",
                l.layer, l.cosine, rnd.cosine, l.auroc, native, rnd.auroc
            );
        }
    }
}

fn result_json(r: &pb::ExtractResult) -> serde_json::Value {
    let layers = |c: &pb::VectorComparison| -> Vec<serde_json::Value> {
        c.layers
            .iter()
            .map(
                |l| serde_json::json!({"layer": l.layer, "cosine": l.cosine, "auroc": l.auroc, "cohens_d": l.cohens_d}),
            )
            .collect()
    };
    let v = r.vector.clone().unwrap_or_default();
    serde_json::json!({
        "vector": v.name, "model": v.model, "recommended_layer": v.recommended_layer,
        "layer_scores": v.layer_scores.iter().map(|s| serde_json::json!({"layer": s.layer, "auroc": s.auroc, "cohens_d": s.cohens_d})).collect::<Vec<_>>(),
        "rollouts": r.rollouts, "kept_pos": r.kept_pos, "kept_neg": r.kept_neg, "elapsed_secs": r.elapsed_secs,
        "comparisons": r.comparisons.iter().map(|c| serde_json::json!({"vector": c.vector, "scored_on": c.scored_on, "layers": layers(c)})).collect::<Vec<_>>(),
        "random_baseline": r.random_baseline.as_ref().map(|c| serde_json::json!({"scored_on": c.scored_on, "layers": layers(c)})),
    })
}

pub(crate) fn print_layer_scores(v: &pb::VectorInfo) {
    if v.layer_scores.is_empty() {
        return;
    }
    println!("layer\tcohens_d\tauroc");
    for s in &v.layer_scores {
        let mark = if Some(s.layer) == v.recommended_layer { "\t<- recommended" } else { "" };
        println!("{}\t{:.3}\t{:.3}{mark}", s.layer, s.cohens_d, s.auroc);
    }
}
