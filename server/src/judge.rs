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
        let _permit = self.permits.acquire().await.expect("judge semaphore is never closed");
        let (this, url) = (self.clone(), self.endpoint.clone());
        tokio::task::spawn_blocking(move || this.chat_blocking(&prompt, max_tokens))
            .await
            .unwrap_or_else(|e| Err(JudgeError::Http { url, reason: e.to_string() }))
    }

    fn chat_blocking(&self, prompt: &str, max_tokens: u32) -> Result<String, JudgeError> {
        let http = |reason: String| JudgeError::Http { url: self.endpoint.clone(), reason };
        let body = serde_json::json!({
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        });
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
        v["choices"][0]["message"]["content"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| http("reply has no choices[0].message.content".into()))
    }

    /// Scores one judge prompt.
    pub async fn score(self: &Arc<Self>, prompt: String) -> Result<Verdict, JudgeError> {
        parse_verdict(&self.chat(prompt, 8).await?)
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
