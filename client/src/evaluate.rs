//! `persona eval` (EvaluateSteering, with its charts), `persona spectrum` and `persona score`.

use anyhow::{Context, Result};
use clap::Args;
use persona_client::charts::{heatmap_svg, spectrum_html, steering_chart_svg};
use persona_client::{Client, pb};
use std::path::PathBuf;

#[derive(Args)]
pub struct EvalArgs {
    /// A stored vector extracted here (it carries a calibration and a monitoring layer).
    #[arg(long)]
    vector: String,
    /// Layers to steer at, comma-separated (default: every third from 25% to 85% of the depth,
    /// plus the monitoring layer).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<u32>,
    /// Coefficients, comma-separated (default -2,-1,0.5,1,1.5,2,3,4,6,8; 0 always runs).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    coefficients: Vec<f32>,
    /// Questions to use (default: the trait's eval_questions, first 8).
    #[arg(long)]
    max_questions: Option<u32>,
    /// A trait file (traits/ JSON) for vectors whose trait is not in the server's library.
    #[arg(long)]
    trait_file: Option<PathBuf>,
    /// New tokens per answer.
    #[arg(long, default_value_t = 48)]
    max_tokens: u32,
    /// A cell passes when its coherence is at least this fraction of the unsteered one.
    #[arg(long, default_value_t = 0.8)]
    coherence_fraction: f32,
    /// Score offline even when the server has a judge.
    #[arg(long)]
    no_judge: bool,
    /// Do not store the recommendation with the vector.
    #[arg(long)]
    dry_run: bool,
    /// How questions are posed: auto (chat turns when the model ships a chat template), chat, or
    /// plain ("Question: …\nAnswer:" continued as text, for a base model).
    #[arg(long, default_value = "auto", value_parser = ["auto", "chat", "plain"])]
    format: String,
    /// Score trait expression with this stored calibrated vector (of any served model) instead
    /// of the steered one, e.g. the native vector when evaluating a transferred one.
    #[arg(long, value_name = "VECTOR")]
    score_with: Option<String>,
    /// Also score unsteered answers sampled at TEMPERATURE[:TOP_P] (repeatable): what sampling
    /// alone does to the trait.
    #[arg(long = "baseline", value_name = "TEMPERATURE[:TOP_P]")]
    baselines: Vec<String>,
    /// Seed of sampled answers.
    #[arg(long)]
    seed: Option<u64>,
    /// Output prefix: PREFIX.json (the result), PREFIX-chart.svg, PREFIX-heatmap.svg.
    #[arg(long)]
    out: Option<String>,
}

/// `T` or `T:P` as a sampling baseline.
fn sampling_baseline(s: &str) -> Result<pb::SamplingBaseline> {
    let (t, p) = s.split_once(':').unwrap_or((s, "0"));
    let num = |x: &str| x.trim().parse::<f32>().with_context(|| format!("--baseline {s}: `{x}` is not a number"));
    Ok(pb::SamplingBaseline { temperature: num(t)?, top_p: num(p)? })
}

#[derive(Args)]
pub struct SpectrumArgs {
    /// The user's question.
    question: String,
    #[arg(long)]
    vector: String,
    #[arg(long)]
    system: Option<String>,
    /// Default: the vector's steering recommendation.
    #[arg(long)]
    layer: Option<u32>,
    #[arg(long)]
    coefficient: Option<f32>,
    /// Multiples of the coefficient, comma-separated.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true, default_value = "-2,-1,0,1,2")]
    multipliers: Vec<f32>,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    #[arg(long)]
    no_judge: bool,
    /// Write the spectrum as an HTML table here.
    #[arg(long)]
    html: Option<PathBuf>,
}

#[derive(Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    prompt: crate::generate::PromptArgs,
    /// The response to score.
    #[arg(long)]
    response: String,
    /// Alternatives per token (0-20).
    #[arg(long, default_value_t = 0)]
    top_logprobs: u32,
    /// Steering while scoring, as in `generate --steer`.
    #[arg(long = "steer", value_name = "NAME[:LAYER[:COEF]]")]
    steer: Vec<String>,
}

fn trait_file(path: &Option<PathBuf>) -> Result<Option<pb::TraitDefinition>> {
    path.as_ref()
        .map(|f| {
            let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            persona_client::trait_from_json(&text).with_context(|| format!("parsing {}", f.display()))
        })
        .transpose()
}

pub async fn eval(c: &mut Client, a: EvalArgs) -> Result<()> {
    let req = pb::EvaluateSteeringRequest {
        vector: a.vector.clone(),
        layers: a.layers,
        coefficients: a.coefficients,
        max_questions: a.max_questions.unwrap_or(0),
        definition: trait_file(&a.trait_file)?,
        sampling: Some(pb::SamplingParams { max_tokens: a.max_tokens, seed: a.seed, ..Default::default() }),
        coherence_fraction: a.coherence_fraction,
        skip_judge: a.no_judge,
        dry_run: a.dry_run,
        questions: Vec::new(),
        format: crate::extract::reading_format(&a.format) as i32,
        score_with: a.score_with.clone().unwrap_or_default(),
        sampling_baselines: a.baselines.iter().map(|b| sampling_baseline(b)).collect::<Result<_>>()?,
    };
    let mut stream = c.evaluate_steering(req).await?.into_inner();
    let mut progress = crate::progress::Progress::new();
    while let Some(msg) = stream.message().await.inspect_err(|_| progress.finish())? {
        match msg.event {
            Some(pb::evaluate_steering_response::Event::Progress(p)) => {
                progress.timed(&p.stage, p.done, p.total, p.elapsed_secs, p.eta_secs)
            }
            Some(pb::evaluate_steering_response::Event::Result(r)) => {
                progress.finish();
                print_eval(&r);
                let prefix = a.out.clone().unwrap_or_else(|| format!("eval-{}", a.vector));
                write_eval(&prefix, &r)?;
            }
            None => {}
        }
    }
    Ok(())
}

fn print_eval(r: &pb::EvaluateSteeringResult) {
    let u = r.unsteered.clone().unwrap_or_default();
    println!(
        "{}: {} questions as {}, {} tokens in {:.1} s; monitoring layer {}; scorer: {}",
        r.vector,
        r.questions.len(),
        r.format,
        r.generated_tokens,
        r.elapsed_secs,
        r.monitoring_layer,
        r.scorer
    );
    println!(
        "unsteered: trait {:.1}, coherence {:.1} (cells pass at coherence >= {:.1})",
        u.trait_score, u.coherence, r.coherence_threshold
    );
    println!("layer\tcoef\ttrait\tcoherence\tlogprob\tdistinct\tpass\texample");
    for cell in &r.cells {
        let example: String = cell.example.replace('\n', " ").chars().take(60).collect();
        println!(
            "{}\t{}\t{:.1}\t{:.1}\t{:.2}\t{:.2}\t{}\t{example}",
            cell.layer,
            cell.coefficient,
            cell.trait_score,
            cell.coherence,
            cell.mean_logprob,
            cell.distinct_bigrams,
            if cell.coherent { "yes" } else { "no" }
        );
    }
    for b in &r.sampling_baselines {
        let cell = b.cell.clone().unwrap_or_default();
        let example: String = cell.example.replace('\n', " ").chars().take(60).collect();
        println!(
            "unsteered, temperature {} top_p {}: trait {:.1}, coherence {:.1}\t{example}",
            b.temperature, b.top_p, cell.trait_score, cell.coherence
        );
    }
    match &r.recommendation {
        Some(rec) => {
            println!(
                "recommended: layer {}, coefficient {} -> trait {:.1} (unsteered {:.1}), coherence {:.1} (unsteered {:.1}){}",
                rec.layer,
                rec.coefficient,
                rec.trait_score,
                rec.unsteered_trait_score,
                rec.coherence,
                rec.unsteered_coherence,
                if r.stored { "; stored with the vector" } else { "; not stored" }
            );
            for l in &rec.layers {
                println!(
                    "  layer {}: coefficient {} (trait {:.1}, coherence {:.1})",
                    l.layer, l.coefficient, l.trait_score, l.coherence
                );
            }
        }
        None => println!("no recommendation: {}", r.note),
    }
    if !r.suppression.is_empty() {
        println!("suppression (the trait's own system prompt, steered against it):");
        for s in &r.suppression {
            println!(
                "  layer {} coefficient {}: trait {:.1}, coherence {:.1}",
                s.layer, s.coefficient, s.trait_score, s.coherence
            );
        }
    }
    if let Some(j) = &r.judge {
        println!(
            "judge: {} scored ({} from log-probabilities, {} from text); dropped {} refusals, {} non-scores, {} failed requests",
            j.kept, j.scored_from_logprobs, j.scored_from_text, j.refusal, j.not_a_score, j.request_failed
        );
    }
}

fn write_eval(prefix: &str, r: &pb::EvaluateSteeringResult) -> Result<()> {
    let cells: Vec<serde_json::Value> = r
        .cells
        .iter()
        .chain(r.unsteered.iter())
        .map(|c| {
            serde_json::json!({"layer": c.layer, "coefficient": c.coefficient, "trait_score": c.trait_score,
                "coherence": c.coherence, "mean_logprob": c.mean_logprob, "distinct_bigrams": c.distinct_bigrams,
                "coherent": c.coherent, "answers": c.answers, "example": c.example,
                "trait_sd": c.trait_sd, "coherence_sd": c.coherence_sd})
        })
        .collect();
    let json = serde_json::json!({
        "vector": r.vector, "monitoring_layer": r.monitoring_layer, "scorer": r.scorer,
        "coherence_threshold": r.coherence_threshold, "cells": cells, "questions": r.questions,
        "recommendation": r.recommendation.as_ref().map(|x| serde_json::json!({"layer": x.layer, "coefficient": x.coefficient,
            "trait_score": x.trait_score, "coherence": x.coherence})),
        "suppression": r.suppression.iter().map(|s| serde_json::json!({"layer": s.layer, "coefficient": s.coefficient,
            "trait_score": s.trait_score, "coherence": s.coherence})).collect::<Vec<_>>(),
        "note": r.note, "elapsed_secs": r.elapsed_secs, "format": r.format,
        "sampling_baselines": r.sampling_baselines.iter().map(|b| {
            let c = b.cell.clone().unwrap_or_default();
            serde_json::json!({"temperature": b.temperature, "top_p": b.top_p, "trait_score": c.trait_score,
                "coherence": c.coherence, "coherent": c.coherent, "answers": c.answers, "example": c.example,
                "trait_sd": c.trait_sd, "coherence_sd": c.coherence_sd})
        }).collect::<Vec<_>>(),
    });
    std::fs::write(format!("{prefix}.json"), serde_json::to_vec_pretty(&json)?)?;
    std::fs::write(format!("{prefix}-chart.svg"), steering_chart_svg(r))?;
    std::fs::write(format!("{prefix}-heatmap.svg"), heatmap_svg(r))?;
    eprintln!("wrote {prefix}.json, {prefix}-chart.svg, {prefix}-heatmap.svg");
    Ok(())
}

pub async fn spectrum(c: &mut Client, a: SpectrumArgs) -> Result<()> {
    let r = c
        .steering_spectrum(pb::SteeringSpectrumRequest {
            vector: a.vector,
            question: a.question.clone(),
            system: a.system.unwrap_or_default(),
            layer: a.layer,
            coefficient: a.coefficient,
            multipliers: a.multipliers,
            sampling: Some(pb::SamplingParams { max_tokens: a.max_tokens, ..Default::default() }),
            skip_judge: a.no_judge,
        })
        .await?
        .into_inner();
    println!("{} at layer {}, c = {} ({}); scorer: {}", r.vector, r.layer, r.coefficient, r.source, r.scorer);
    for p in &r.points {
        let scores = if p.scored {
            format!("trait {:>5.1}  coherence {:>5.1}", p.trait_score, p.coherence)
        } else {
            "not scored".into()
        };
        println!("\n[{:+}c = {:+.2}]  {scores}\n{}", p.multiplier, p.coefficient, p.answer.trim());
    }
    if let Some(path) = a.html {
        std::fs::write(&path, spectrum_html(&a.question, &r))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

pub async fn score(c: &mut Client, a: ScoreArgs) -> Result<()> {
    let r = c
        .score_text(pb::ScoreTextRequest {
            model: a.prompt.model.clone(),
            prompt: Some(a.prompt.to_pb()),
            response: a.response,
            response_token_ids: Vec::new(),
            steering: a.steer.iter().map(|s| persona_client::parse_steer(s)).collect::<Result<_>>()?,
            top_logprobs: a.top_logprobs,
        })
        .await?
        .into_inner();
    println!("#\ttoken\tlogprob\ttop");
    for (i, t) in r.tokens.iter().enumerate() {
        let top: Vec<String> = t.top_logprobs.iter().map(|x| format!("{:?} {:.2}", x.token, x.logprob)).collect();
        println!("{i}\t{:?}\t{:.3}\t{}", t.token, t.logprob, top.join(", "));
    }
    println!(
        "{} response tokens after {} prompt tokens: sum {:.3}, mean {:.3}, perplexity {:.2}",
        r.tokens.len(),
        r.prompt_tokens,
        r.sum_logprob,
        r.mean_logprob,
        r.perplexity
    );
    Ok(())
}
