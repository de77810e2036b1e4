//! The streaming commands: `persona monitor` (MonitorStream) and `persona screen` (ScreenDataset).

use anyhow::{Context, Result, bail};
use clap::Args;
use persona_client::dataset::{csv_field, histogram_svg, record_from_json, sample_from_json};
use persona_client::{Client, pb};
use std::io::{BufRead, Write};
use std::path::PathBuf;

#[derive(Args)]
pub struct MonitorArgs {
    /// JSONL conversations: {"id"?, "messages": [...] or "prompt"/"system", "response"?}, or chat
    /// transcripts ending with the assistant's answer; - = stdin.
    file: PathBuf,
    /// Vector to score against, NAME[:LAYER]; repeatable.
    #[arg(long = "vector", value_name = "NAME[:LAYER]", required = true)]
    vectors: Vec<String>,
    #[arg(long, default_value = "")]
    model: String,
}

#[derive(Args)]
pub struct ScreenArgs {
    /// JSONL training samples: {"id"?, "prompt" (+ "system") or "messages", "response"}, or chat
    /// transcripts whose last assistant message is the response.
    file: PathBuf,
    /// Library trait whose stored vector (same name) to screen with; repeatable.
    #[arg(long = "trait")]
    traits: Vec<String>,
    /// Any stored vector, NAME[:LAYER]; repeatable.
    #[arg(long = "vector", value_name = "NAME[:LAYER]")]
    vectors: Vec<String>,
    /// Keep the N highest-ranked samples in the outputs (0 = all).
    #[arg(long, default_value_t = 0)]
    top: usize,
    /// Output prefix: writes PREFIX.jsonl, PREFIX.csv and PREFIX.svg.
    #[arg(long, default_value = "screen")]
    out: String,
    /// New tokens of the model's own responses.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    #[arg(long, default_value = "")]
    model: String,
}

fn read_lines(file: &PathBuf) -> Result<Vec<String>> {
    let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?,
        ))
    };
    Ok(reader.lines().collect::<std::io::Result<Vec<_>>>()?.into_iter().filter(|l| !l.trim().is_empty()).collect())
}

fn targets(vectors: &[String]) -> Result<Vec<pb::ProjectionTarget>> {
    vectors.iter().map(|v| persona_client::parse_target(v)).collect()
}

pub async fn monitor(c: &mut Client, a: MonitorArgs) -> Result<()> {
    let targets = targets(&a.vectors)?;
    let lines = read_lines(&a.file)?;
    let mut items = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let r = record_from_json(line, i + 1).with_context(|| format!("line {}", i + 1))?;
        items.push(pb::MonitorRequest {
            id: r.id,
            item: Some(pb::ProjectActivationRequest {
                model: a.model.clone(),
                conversation: Some(pb::Conversation { messages: r.messages }),
                response: r.response.unwrap_or_default(),
                targets: targets.clone(),
                per_token: false,
            }),
        });
    }
    let mut stream = c.monitor_stream(tokio_stream::iter(items)).await?.into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(r) = stream.message().await? {
        let json = match r.result {
            Some(res) => serde_json::json!({
                "id": r.id,
                "scores": res.projections.iter().map(|p| serde_json::json!({
                    "vector": p.vector, "layer": p.layer, "prompt_last": p.prompt_last,
                    "prompt_avg": p.prompt_avg, "response_avg": p.has_response.then_some(p.response_avg),
                })).collect::<Vec<_>>(),
            }),
            None => serde_json::json!({"id": r.id, "error": r.error_message, "code": r.error_code}),
        };
        writeln!(out, "{json}")?;
    }
    Ok(())
}

pub async fn screen(c: &mut Client, a: ScreenArgs) -> Result<()> {
    let mut targets = targets(&a.vectors)?;
    targets.extend(a.traits.iter().map(|t| pb::ProjectionTarget { vector: t.clone(), layer: None }));
    if targets.is_empty() {
        bail!("give at least one --trait or --vector");
    }
    let lines = read_lines(&a.file)?;
    let samples = lines
        .iter()
        .enumerate()
        .map(|(i, l)| sample_from_json(l, i + 1).with_context(|| format!("{} line {}", a.file.display(), i + 1)))
        .collect::<Result<Vec<_>>>()?;
    let texts: std::collections::HashMap<String, pb::ScreenSample> =
        samples.iter().map(|s| (s.id.clone(), s.clone())).collect();
    let config = pb::ScreenRequest {
        kind: Some(pb::screen_request::Kind::Config(pb::ScreenConfig {
            model: a.model.clone(),
            targets,
            sampling: Some(pb::SamplingParams { max_tokens: a.max_tokens, ..Default::default() }),
            include_own_response: true,
        })),
    };
    let total = samples.len();
    let requests = std::iter::once(config)
        .chain(samples.into_iter().map(|s| pb::ScreenRequest { kind: Some(pb::screen_request::Kind::Sample(s)) }));
    let mut stream = c.screen_dataset(tokio_stream::iter(requests)).await?.into_inner();
    let (mut results, mut summary) = (Vec::new(), None);
    let mut progress = crate::progress::Progress::new();
    while let Some(msg) = stream.message().await.inspect_err(|_| progress.finish())? {
        match msg.kind {
            Some(pb::screen_response::Kind::Result(r)) => {
                if r.error_code != 0 {
                    eprintln!("sample {}: {}", r.id, r.error_message);
                }
                results.push(r);
                progress.update("screened", results.len() as u64, total as u64, "");
            }
            Some(pb::screen_response::Kind::Summary(s)) => summary = Some(s),
            None => {}
        }
    }
    progress.finish();
    let summary = summary.context("the server ended the stream without a summary")?;
    let mut ok: Vec<pb::ScreenResult> = results.into_iter().filter(|r| r.error_code == 0).collect();
    let all: Vec<f32> = ok.iter().map(|r| r.scores[0].difference).collect();
    ok.sort_by(|x, y| y.scores[0].difference.total_cmp(&x.scores[0].difference));
    if a.top > 0 {
        ok.truncate(a.top);
    }
    write_outputs(&a.out, &ok, &texts, &all)?;
    for s in &summary.stats {
        println!(
            "{}@{}: mean {:.3} (sd {:.3}), min {:.3}, p50 {:.3}, p90 {:.3}, p99 {:.3}, max {:.3}",
            s.vector, s.layer, s.mean, s.std, s.min, s.p50, s.p90, s.p99, s.max
        );
    }
    println!(
        "{} samples ({} failed, {} own responses from cache) in {:.1} s; ranked by {}; top {}:",
        summary.samples,
        summary.failed,
        summary.cached_own_responses,
        summary.elapsed_secs,
        summary.stats.first().map_or("", |s| s.vector.as_str()),
        ok.len().min(10)
    );
    for r in ok.iter().take(10) {
        let response = texts.get(&r.id).map_or("", |s| s.response.as_str());
        println!("{:>10.3}  {}  {}", r.scores[0].difference, r.id, response.chars().take(80).collect::<String>());
    }
    eprintln!("wrote {0}.jsonl, {0}.csv, {0}.svg", a.out);
    Ok(())
}

fn write_outputs(
    prefix: &str,
    ranked: &[pb::ScreenResult],
    texts: &std::collections::HashMap<String, pb::ScreenSample>,
    all: &[f32],
) -> Result<()> {
    let mut jsonl = std::io::BufWriter::new(std::fs::File::create(format!("{prefix}.jsonl"))?);
    let mut csv = std::io::BufWriter::new(std::fs::File::create(format!("{prefix}.csv"))?);
    let vectors: Vec<String> =
        ranked.first().map_or(Vec::new(), |r| r.scores.iter().map(|s| format!("{}@{}", s.vector, s.layer)).collect());
    let header: Vec<String> = vectors.iter().map(|v| format!("difference {v}")).collect();
    writeln!(csv, "rank,id,{},response,own_response", header.join(","))?;
    for (rank, r) in ranked.iter().enumerate() {
        let response = texts.get(&r.id).map_or("", |s| s.response.as_str());
        let scores: Vec<serde_json::Value> = r
            .scores
            .iter()
            .map(|s| {
                serde_json::json!({"vector": s.vector, "layer": s.layer, "difference": s.difference,
                    "sample_projection": s.sample_projection, "own_projection": s.own_projection})
            })
            .collect();
        let line = serde_json::json!({"rank": rank + 1, "id": r.id, "scores": scores, "response": response,
            "own_response": r.own_response});
        writeln!(jsonl, "{line}")?;
        let diffs: Vec<String> = r.scores.iter().map(|s| format!("{:.4}", s.difference)).collect();
        writeln!(
            csv,
            "{},{},{},{},{}",
            rank + 1,
            csv_field(&r.id),
            diffs.join(","),
            csv_field(response),
            csv_field(&r.own_response)
        )?;
    }
    let title = format!("Projection difference on {}", vectors.first().map_or("-", String::as_str));
    std::fs::write(format!("{prefix}.svg"), histogram_svg(all, 30, &title))?;
    Ok(())
}
