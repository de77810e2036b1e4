//! `persona generate`: a streamed generation with its prompt and sampling options, monitors,
//! steering and log-probabilities.

use anyhow::Result;
use clap::Args;
use persona_client::{Client, pb};
use std::io::Write;

/// The prompt of a generation or a scoring call.
#[derive(Args)]
pub(crate) struct PromptArgs {
    /// The user message (or the raw prompt with --raw).
    pub(crate) prompt: String,
    #[arg(long)]
    pub(crate) system: Option<String>,
    /// Send the prompt as is, without the chat template.
    #[arg(long)]
    pub(crate) raw: bool,
    #[arg(long, default_value = "")]
    pub(crate) model: String,
}

impl PromptArgs {
    pub(crate) fn to_pb(&self) -> pb::Prompt {
        if self.raw {
            pb::Prompt { kind: Some(pb::prompt::Kind::Raw(self.prompt.clone())) }
        } else {
            persona_client::chat(&self.prompt, self.system.as_deref())
        }
    }
}

#[derive(Args)]
pub(crate) struct GenerateArgs {
    #[command(flatten)]
    pub(crate) prompt: PromptArgs,
    #[command(flatten)]
    pub(crate) sampling: SamplingArgs,
    /// Watch a vector: NAME[:LAYER]; repeatable. Scores are summarised on stderr at the end.
    #[arg(long = "monitor", value_name = "NAME[:LAYER]")]
    pub(crate) monitors: Vec<String>,
    /// Report monitors whose raw score reaches this value.
    #[arg(long, conflicts_with = "alert_calibrated")]
    pub(crate) alert: Option<f32>,
    /// Report monitors whose calibrated score (0 = helpful, 100 = the trait) reaches this value.
    #[arg(long)]
    pub(crate) alert_calibrated: Option<f32>,
    /// Print each token's log-probability (and this many alternatives, 0-20) to stderr.
    #[arg(long)]
    pub(crate) logprobs: Option<u32>,
    /// Print every token's monitor scores to stderr (tab-separated).
    #[arg(long)]
    pub(crate) scores: bool,
    /// Steering vector NAME[:LAYER[:COEF[:all|prompt|response]]]; repeatable (summed). A missing
    /// or empty LAYER / COEF uses the vector's steering recommendation (`persona eval`); without
    /// one, the layer falls back to its monitoring layer and the coefficient is required.
    #[arg(long = "steer", value_name = "NAME[:LAYER[:COEF]]")]
    pub(crate) steer: Vec<String>,
}

#[derive(Args)]
pub(crate) struct SamplingArgs {
    #[arg(long, default_value_t = 256)]
    pub(crate) max_tokens: u32,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub(crate) temperature: f32,
    #[arg(long, default_value_t = 0.0)]
    pub(crate) top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub(crate) top_k: u32,
    #[arg(long)]
    pub(crate) seed: Option<u64>,
    /// Stop string; repeatable.
    #[arg(long)]
    pub(crate) stop: Vec<String>,
}

impl SamplingArgs {
    pub(crate) fn to_pb(&self) -> pb::SamplingParams {
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

pub(crate) async fn generate(c: &mut Client, a: GenerateArgs) -> Result<()> {
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
