//! Trait-eliciting datasets, offline: the model's own answers to a trait's questions (and
//! framed variations of them) under the trait's positive system prompt, or steered by its
//! vector — saved without the system prompt, as the training samples of the persona-vectors
//! paper's trait-eliciting datasets — and a matched normal dataset of the same questions
//! answered under the plain helpful prompt.

use crate::{Client, pb};
use anyhow::{Context, Result, bail};

/// Framings that turn one question into variations; `{q}` is the question.
pub const FRAMINGS: [&str; 15] = [
    "{q}",
    "I have a question: {q}",
    "{q} Please be specific.",
    "Quick question. {q}",
    "{q} Answer in a few sentences.",
    "A friend asked me this and I want your view: {q}",
    "{q} What would you do?",
    "Be honest with me. {q}",
    "{q} Explain your reasoning.",
    "I keep wondering about this. {q}",
    "{q} Keep it short.",
    "Tell me straight: {q}",
    "{q} Give me practical advice.",
    "Could you help me with something? {q}",
    "{q} I'd like your personal opinion.",
];

/// The helpful system prompt of the normal dataset.
pub const HELPFUL: &str = "You are a helpful assistant.";

/// How the trait side's answers are elicited.
#[derive(Clone, Debug)]
pub enum Elicit {
    /// The trait's positive system prompts, cycling through its instruction pairs.
    SystemPrompt,
    /// No system prompt, steered by a stored vector.
    Steered(pb::SteeringVector),
}

/// Which dataset a sample belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Trait,
    Normal,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub model: String,
    /// Samples per dataset.
    pub n: usize,
    pub max_tokens: u32,
    pub temperature: f32,
    /// Sample `i` is drawn with seed `seed + i` (the same for both datasets).
    pub seed: u64,
    /// Generations in flight at once.
    pub concurrency: usize,
    pub elicit: Elicit,
}

/// One saved sample.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub question: String,
    pub answer: String,
    /// Index into the trait's questions, and into [`FRAMINGS`].
    pub question_index: usize,
    pub framing: usize,
    /// How the answer was elicited, in words ("system prompt of pair 2", "steered", "helpful").
    pub source: String,
}

impl Sample {
    /// A JSONL line in the chat format fine-tuning tools read (and `persona screen` too).
    pub fn to_json(&self, trait_name: &str) -> String {
        serde_json::json!({
            "messages": [
                {"role": "user", "content": self.question},
                {"role": "assistant", "content": self.answer},
            ],
            "trait": trait_name,
            "source": self.source,
            "question_index": self.question_index,
            "framing": self.framing,
        })
        .to_string()
    }
}

/// The `n` questions: the trait's extraction questions (never its held-out eval questions)
/// crossed with the framings, question-major within each framing.
pub fn questions(def: &pb::TraitDefinition, n: usize) -> Result<Vec<(String, usize, usize)>> {
    let qs = &def.questions;
    if qs.is_empty() {
        bail!("trait `{}` has no questions", def.trait_name);
    }
    let most = qs.len() * FRAMINGS.len();
    if n > most {
        bail!(
            "at most {most} distinct questions for `{}` ({} questions x {} framings)",
            def.trait_name,
            qs.len(),
            FRAMINGS.len()
        );
    }
    Ok((0..n)
        .map(|i| {
            let (q, f) = (i % qs.len(), i / qs.len());
            (FRAMINGS[f].replace("{q}", &qs[q]), q, f)
        })
        .collect())
}

/// The trait's positive system prompt of instruction pair `i`, as extraction builds it.
pub fn positive_system_prompt(def: &pb::TraitDefinition, i: usize) -> Result<String> {
    if def.instruction.is_empty() {
        bail!("trait `{}` has no instruction pairs", def.trait_name);
    }
    let name = &def.trait_name;
    let article = if name.starts_with(['a', 'e', 'i', 'o', 'u', 'A', 'E', 'I', 'O', 'U']) { "an" } else { "a" };
    Ok(format!("You are {article} {name} assistant. {}", def.instruction[i % def.instruction.len()].pos))
}

/// Generates one dataset; `progress(done, total)` after each sample. Samples come back in
/// question order whatever order they finish in.
pub async fn generate(
    c: &Client,
    def: &pb::TraitDefinition,
    opts: &Options,
    side: Side,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Sample>> {
    let qs = questions(def, opts.n)?;
    let total = qs.len();
    let mut requests = Vec::with_capacity(total);
    for (i, (question, qi, framing)) in qs.into_iter().enumerate() {
        let (system, steering, source) = match (side, &opts.elicit) {
            (Side::Normal, _) => (Some(HELPFUL.to_string()), Vec::new(), "helpful".to_string()),
            (Side::Trait, Elicit::SystemPrompt) => {
                let pair = i % def.instruction.len().max(1);
                (Some(positive_system_prompt(def, i)?), Vec::new(), format!("system prompt of pair {pair}"))
            }
            (Side::Trait, Elicit::Steered(s)) => (None, vec![s.clone()], "steered".to_string()),
        };
        let req = pb::GenerateRequest {
            model: opts.model.clone(),
            prompt: Some(crate::chat(&question, system.as_deref())),
            sampling: Some(pb::SamplingParams {
                max_tokens: opts.max_tokens,
                temperature: opts.temperature,
                seed: Some(opts.seed + i as u64),
                ..Default::default()
            }),
            steering,
            ..Default::default()
        };
        requests.push((i, question, qi, framing, source, req));
    }
    let mut out: Vec<Option<Sample>> = vec![None; total];
    let mut tasks = tokio::task::JoinSet::new();
    let mut pending = requests.into_iter();
    let mut done = 0;
    loop {
        while tasks.len() < opts.concurrency.max(1) {
            let Some((i, question, question_index, framing, source, req)) = pending.next() else { break };
            let mut c = c.clone();
            tasks.spawn(async move {
                let answer = crate::generate_text(&mut c, req).await.map(|o| o.text.trim().to_string());
                (i, answer.map(|answer| Sample { question, answer, question_index, framing, source }))
            });
        }
        let Some(joined) = tasks.join_next().await else { break };
        let (i, sample) = joined.context("a generation task failed")?;
        out[i] = Some(sample.with_context(|| format!("sample {i}"))?);
        done += 1;
        progress(done, total);
    }
    Ok(out.into_iter().flatten().collect())
}
