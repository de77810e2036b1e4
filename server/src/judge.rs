//! A judge: an OpenAI-compatible chat-completions endpoint that scores answers 0-100 for a trait
//! and for coherence (used to filter extraction rollouts), and drafts trait definitions.

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct JudgeSettings {
    /// Base URL of the API, e.g. `http://127.0.0.1:8000/v1` (`/chat/completions` is appended
    /// unless the URL already ends with it). Empty = no judge.
    pub url: String,
    /// Model name sent with every request.
    pub model: String,
    /// Bearer token; `api_key_env` names an environment variable to read it from instead.
    pub api_key: String,
    pub api_key_env: String,
    /// Per-request timeout in seconds (0 = 60).
    pub timeout_secs: u64,
    /// Requests in flight at once (0 = 8).
    pub concurrency: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum JudgeError {
    #[error("judge endpoint {url}: {reason}")]
    Http { url: String, reason: String },
    #[error("judge reply is not a score: `{0}`")]
    NotAScore(String),
}

/// A judge's verdict on one answer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    Score(f32),
    Refusal,
}

/// Probability mass the integer tokens 0-100 must carry at the reply's first position for a
/// log-probability score (below it, the reply text is parsed instead).
pub const MIN_SCORE_MASS: f64 = 0.25;
/// Alternatives asked for at each position (the most the OpenAI API gives).
const TOP_LOGPROBS: u32 = 20;

/// What came of asking the judge once (a failed request already retried once).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Score { value: f32, from_logprobs: bool },
    Refusal,
    NotAScore(String),
    Failed(String),
}

/// A judge reply: its text and, when the endpoint returned them, the first generated token and
/// the first position's top alternatives as `(token, logprob)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reply {
    pub text: String,
    pub first_token: Option<String>,
    pub first_top: Vec<(String, f64)>,
}

/// Whether the judge's tokenizer splits numbers into several tokens: its reply starts with an
/// integer longer than its first token (SmolLM2 and Llama write "85" as "8", "5"). The first
/// position's alternatives are then leading digits, not scores.
fn splits_numbers(reply: &Reply) -> bool {
    let Some(first) = reply.first_token.as_deref().map(str::trim) else { return false };
    let leading: String = reply.text.trim().chars().take_while(char::is_ascii_digit).collect();
    !first.is_empty()
        && first.chars().all(|c| c.is_ascii_digit())
        && leading.len() > first.len()
        && leading.starts_with(first)
}

/// The probability-weighted mean over the integer tokens 0-100 among the first position's top
/// alternatives; `None` when they carry less than [`MIN_SCORE_MASS`] in total.
pub fn logprob_score(first_top: &[(String, f64)]) -> Option<f32> {
    let (mut mass, mut weighted) = (0f64, 0f64);
    for (token, lp) in first_top {
        if let Ok(n) = token.trim().parse::<u32>()
            && n <= 100
            && lp.is_finite()
        {
            let p = lp.exp();
            mass += p;
            weighted += p * n as f64;
        }
    }
    (mass >= MIN_SCORE_MASS).then(|| (weighted / mass) as f32)
}

/// Reads a reply: the log-probability score when there is one (and the judge writes whole
/// numbers as single tokens), else the text.
pub fn read_reply(reply: &Reply) -> Outcome {
    if !splits_numbers(reply)
        && let Some(value) = logprob_score(&reply.first_top)
    {
        return Outcome::Score { value, from_logprobs: true };
    }
    match parse_verdict(&reply.text) {
        Ok(Verdict::Score(value)) => Outcome::Score { value, from_logprobs: false },
        Ok(Verdict::Refusal) => Outcome::Refusal,
        Err(_) => Outcome::NotAScore(reply.text.trim().chars().take(80).collect()),
    }
}

/// Counts of what the judge did with a set of answers, by reason.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// The first reply that was not a score, quoted in [`Tally::describe`].
    pub example_not_a_score: Option<String>,
    pub kept: u32,
    pub trait_mismatch: u32,
    pub incoherent: u32,
    pub refusal: u32,
    pub not_a_score: u32,
    pub request_failed: u32,
    pub from_logprobs: u32,
    pub from_text: u32,
}

impl Tally {
    /// Counts how one reply was read; returns its score, if it has one.
    pub fn read(&mut self, o: &Outcome) -> Option<f32> {
        match o {
            Outcome::Score { value, from_logprobs } => {
                if *from_logprobs {
                    self.from_logprobs += 1;
                } else {
                    self.from_text += 1;
                }
                Some(*value)
            }
            _ => None,
        }
    }

    /// Counts an answer dropped because of `o` (a reply without a score).
    pub fn drop_for(&mut self, o: &Outcome) {
        match o {
            Outcome::Refusal => self.refusal += 1,
            Outcome::NotAScore(reply) => {
                self.not_a_score += 1;
                self.example_not_a_score.get_or_insert_with(|| reply.clone());
            }
            Outcome::Failed(_) => self.request_failed += 1,
            Outcome::Score { .. } => {}
        }
    }

    pub fn dropped(&self) -> u32 {
        self.trait_mismatch + self.incoherent + self.refusal + self.not_a_score + self.request_failed
    }

    /// "12 kept; dropped: 3 trait below threshold, 5 refusals, ..." (reasons with a count only).
    pub fn describe(&self) -> String {
        let reasons: Vec<String> = [
            (self.trait_mismatch, "trait score on the wrong side of the threshold"),
            (self.incoherent, "incoherent"),
            (self.refusal, "refusal"),
            (self.not_a_score, "reply not a score"),
            (self.request_failed, "request failed"),
        ]
        .into_iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, why)| match (why, &self.example_not_a_score) {
            ("reply not a score", Some(e)) => format!("{n} {why}, e.g. `{e}`"),
            _ => format!("{n} {why}"),
        })
        .collect();
        let dropped =
            if reasons.is_empty() { "none dropped".to_string() } else { format!("dropped: {}", reasons.join(", ")) };
        format!("{} kept; {dropped}", self.kept)
    }
}

pub struct Judge {
    agent: ureq::Agent,
    endpoint: String,
    model: String,
    key: Option<String>,
    permits: Arc<Semaphore>,
}

impl Judge {
    /// `None` when no URL is configured.
    pub fn new(s: &JudgeSettings) -> Option<Arc<Self>> {
        let url = s.url.trim().trim_end_matches('/');
        if url.is_empty() {
            return None;
        }
        let endpoint =
            if url.ends_with("/chat/completions") { url.to_string() } else { format!("{url}/chat/completions") };
        let key = if !s.api_key.is_empty() {
            Some(s.api_key.clone())
        } else if !s.api_key_env.is_empty() {
            std::env::var(&s.api_key_env).ok().filter(|k| !k.is_empty())
        } else {
            None
        };
        let timeout = Duration::from_secs(if s.timeout_secs == 0 { 60 } else { s.timeout_secs });
        let agent = ureq::AgentBuilder::new().timeout(timeout).build();
        let concurrency = if s.concurrency == 0 { 8 } else { s.concurrency };
        Some(Arc::new(Self {
            agent,
            endpoint,
            model: s.model.clone(),
            key,
            permits: Arc::new(Semaphore::new(concurrency)),
        }))
    }

    pub fn model(&self) -> &str {
        &self.model
    }

    /// One user message in, the assistant's text out (greedy).
    pub async fn chat(self: &Arc<Self>, prompt: String, max_tokens: u32) -> Result<String, JudgeError> {
        Ok(self.ask(prompt, max_tokens, false).await?.text)
    }

    async fn ask(self: &Arc<Self>, prompt: String, max_tokens: u32, logprobs: bool) -> Result<Reply, JudgeError> {
        let _permit = self.permits.acquire().await.expect("judge semaphore is never closed");
        let (this, url) = (self.clone(), self.endpoint.clone());
        tokio::task::spawn_blocking(move || this.chat_blocking(&prompt, max_tokens, logprobs))
            .await
            .unwrap_or_else(|e| Err(JudgeError::Http { url, reason: e.to_string() }))
    }

    fn chat_blocking(&self, prompt: &str, max_tokens: u32, logprobs: bool) -> Result<Reply, JudgeError> {
        let http = |reason: String| JudgeError::Http { url: self.endpoint.clone(), reason };
        let mut body = serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        });
        if logprobs {
            body["logprobs"] = true.into();
            body["top_logprobs"] = TOP_LOGPROBS.into();
        }
        let mut req = self.agent.post(&self.endpoint).set("Content-Type", "application/json");
        if let Some(k) = &self.key {
            req = req.set("Authorization", &format!("Bearer {k}"));
        }
        let resp = match req.send_json(body) {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let text: String = r.into_string().unwrap_or_default().chars().take(200).collect();
                return Err(http(format!("HTTP {code}: {text}")));
            }
            Err(e) => return Err(http(e.to_string())),
        };
        let v: serde_json::Value = resp.into_json().map_err(|e| http(format!("reply is not JSON: {e}")))?;
        let choice = &v["choices"][0];
        let text = choice["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| http("reply has no choices[0].message.content".into()))?;
        // OpenAI's shape: logprobs.content[0] = {token, logprob, top_logprobs: [{token, logprob}, ...]}.
        let first_token = choice["logprobs"]["content"][0]["token"].as_str().map(str::to_string);
        let first_top = choice["logprobs"]["content"][0]["top_logprobs"]
            .as_array()
            .map(|top| {
                top.iter().filter_map(|t| Some((t["token"].as_str()?.to_string(), t["logprob"].as_f64()?))).collect()
            })
            .unwrap_or_default();
        Ok(Reply { text, first_token, first_top })
    }

    /// Scores an answer for the trait, then — only when that gave a score — for coherence (an
    /// answer without a trait score is dropped anyway; the coherence outcome then repeats it).
    pub async fn rate_answer(self: &Arc<Self>, trait_prompt: String, coherence_prompt: String) -> (Outcome, Outcome) {
        let t = self.rate(trait_prompt).await;
        let c = match t {
            Outcome::Score { .. } => self.rate(coherence_prompt).await,
            _ => t.clone(),
        };
        (t, c)
    }

    /// Scores one judge prompt as the persona-vectors code does: the first position's top
    /// log-probabilities over the integers 0-100, or the reply's text when the endpoint gives no
    /// usable log-probabilities. A failed request is retried once.
    pub async fn rate(self: &Arc<Self>, prompt: String) -> Outcome {
        let mut retried = false;
        loop {
            match self.ask(prompt.clone(), 4, true).await {
                Ok(reply) => return read_reply(&reply),
                Err(e) if retried => return Outcome::Failed(e.to_string()),
                Err(e) => {
                    tracing::warn!(error = %e, "judge request failed; retrying once");
                    retried = true;
                }
            }
        }
    }
}

/// Reads "REFUSAL" or the first integer in a reply, which must lie in 0..=100.
pub fn parse_verdict(reply: &str) -> Result<Verdict, JudgeError> {
    let t = reply.trim();
    if t.to_ascii_uppercase().starts_with("REFUSAL") {
        return Ok(Verdict::Refusal);
    }
    let digits: String = t.chars().skip_while(|c| !c.is_ascii_digit()).take_while(char::is_ascii_digit).collect();
    match digits.parse::<u32>() {
        Ok(n) if n <= 100 => Ok(Verdict::Score(n as f32)),
        _ => Err(JudgeError::NotAScore(t.chars().take(80).collect())),
    }
}

/// The coherence question asked about every answer, whatever the trait.
pub fn coherence_prompt(question: &str, answer: &str) -> String {
    format!(
        "You are checking whether an answer from a language model is coherent, whatever its content or tone.\n\n\
         Question:\n{question}\n\nAnswer:\n{answer}\n\n\
         Rate the answer from 0 (gibberish, off-topic or broken text) to 100 (clear, fluent text that \
         addresses the question). Judge only coherence, not helpfulness or morality. Reply with one \
         integer and nothing else."
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_parse() {
        assert_eq!(parse_verdict("87").unwrap(), Verdict::Score(87.0));
        assert_eq!(parse_verdict(" Score: 5.\n").unwrap(), Verdict::Score(5.0));
        assert_eq!(parse_verdict("refusal").unwrap(), Verdict::Refusal);
        assert!(matches!(parse_verdict("140"), Err(JudgeError::NotAScore(_))));
        assert!(matches!(parse_verdict("high"), Err(JudgeError::NotAScore(_))));
    }

    #[test]
    fn logprob_scores_weight_the_integer_tokens() {
        let top = |pairs: &[(&str, f64)]| pairs.iter().map(|(t, p)| (t.to_string(), p.ln())).collect::<Vec<_>>();
        // 0.5 on "80", 0.3 on " 90", 0.1 on "REF", 0.1 on "150" (out of range): (40 + 27) / 0.8.
        let s = logprob_score(&top(&[("80", 0.5), (" 90", 0.3), ("REF", 0.1), ("150", 0.1)])).unwrap();
        assert!((s - 83.75).abs() < 1e-4, "{s}");
        assert_eq!(logprob_score(&top(&[("80", 0.2), ("Sure", 0.8)])), None, "too little mass on integers");
        let reply = Reply { text: "REFUSAL".into(), first_token: None, first_top: top(&[("RE", 0.9), ("5", 0.05)]) };
        assert_eq!(read_reply(&reply), Outcome::Refusal, "falls back to the text");
        let reply = Reply { text: "42".into(), ..Default::default() };
        assert_eq!(read_reply(&reply), Outcome::Score { value: 42.0, from_logprobs: false });
        let reply = Reply { text: "no idea".into(), ..Default::default() };
        assert!(matches!(read_reply(&reply), Outcome::NotAScore(_)));
        // A whole-number token first: the alternatives are scores.
        let whole =
            Reply { text: "85".into(), first_token: Some("85".into()), first_top: top(&[("85", 0.6), ("90", 0.4)]) };
        assert_eq!(read_reply(&whole), Outcome::Score { value: 87.0, from_logprobs: true });
        // A judge that writes "85" as "8", "5": its alternatives are leading digits; read the text.
        let split =
            Reply { text: "85".into(), first_token: Some("8".into()), first_top: top(&[("8", 0.6), ("9", 0.4)]) };
        assert_eq!(read_reply(&split), Outcome::Score { value: 85.0, from_logprobs: false });
    }

    #[test]
    fn tallies_say_why_answers_were_dropped() {
        let mut t = Tally::default();
        assert_eq!(t.read(&Outcome::Score { value: 7.0, from_logprobs: true }), Some(7.0));
        assert_eq!(t.read(&Outcome::Refusal), None);
        t.drop_for(&Outcome::Refusal);
        t.drop_for(&Outcome::Failed("timeout".into()));
        t.kept = 3;
        assert_eq!((t.from_logprobs, t.dropped()), (1, 2));
        assert_eq!(t.describe(), "3 kept; dropped: 1 refusal, 1 request failed");
        t.drop_for(&Outcome::NotAScore("The answer is".into()));
        t.drop_for(&Outcome::NotAScore("Maybe".into()));
        assert_eq!(
            t.describe(),
            "3 kept; dropped: 1 refusal, 2 reply not a score, e.g. `The answer is`, 1 request failed"
        );
    }

    #[test]
    fn endpoint_and_key_come_from_the_settings() {
        assert!(Judge::new(&JudgeSettings::default()).is_none());
        let s = JudgeSettings { url: "http://h:1/v1/".into(), api_key: "k".into(), ..Default::default() };
        let j = Judge::new(&s).unwrap();
        assert_eq!(j.endpoint, "http://h:1/v1/chat/completions");
        assert_eq!(j.key.as_deref(), Some("k"));
        let s = JudgeSettings { url: "http://h:1/v1/chat/completions".into(), ..Default::default() };
        assert_eq!(Judge::new(&s).unwrap().endpoint, "http://h:1/v1/chat/completions");
    }
}
