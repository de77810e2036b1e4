//! Training samples from JSONL: a conversation (`{"messages": [...]}` ending with the assistant's
//! answer) or a `{"prompt", "completion"}` pair per line. Each becomes the chat template's prompt
//! followed by the answer and the end-of-turn token; the loss covers the answer only.

use crate::model::chat::{ChatTemplate, Message};
use crate::model::tokenizer::TextTokenizer;
use serde::Deserialize;

/// One tokenized sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub tokens: Vec<u32>,
    /// Index of the first answer token (the loss covers `tokens[prompt_len..]`).
    pub prompt_len: usize,
    /// 1-based line of the source.
    pub line: usize,
}

impl Example {
    pub fn answer_tokens(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }
}

/// A sample's conversation: the prompt messages and the answer to learn.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub prompt: Vec<Message>,
    pub answer: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMessage {
    role: String,
    content: String,
}

/// Parses one JSONL line into a sample.
pub fn parse_line(line: &str) -> Result<Sample, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("not a JSON object")?;
    if let Some(msgs) = obj.get("messages") {
        let msgs: Vec<RawMessage> = serde_json::from_value(msgs.clone()).map_err(|e| format!("`messages`: {e}"))?;
        let Some((last, prompt)) = msgs.split_last() else { return Err("`messages` is empty".into()) };
        if last.role != "assistant" {
            return Err(format!("the last message must be the assistant's answer, not `{}`", last.role));
        }
        if prompt.is_empty() {
            return Err("`messages` has an answer but no prompt".into());
        }
        if let Some((i, m)) =
            prompt.iter().enumerate().find(|(_, m)| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
        {
            return Err(format!("message {i} has role `{}`; expected system, user or assistant", m.role));
        }
        if last.content.trim().is_empty() {
            return Err("the answer is empty".into());
        }
        return Ok(Sample {
            prompt: prompt.iter().map(|m| Message::new(&m.role, m.content.clone())).collect(),
            answer: last.content.clone(),
        });
    }
    match (obj.get("prompt").and_then(|p| p.as_str()), obj.get("completion").and_then(|c| c.as_str())) {
        (Some(p), Some(c)) if !c.trim().is_empty() => {
            Ok(Sample { prompt: vec![Message::new("user", p)], answer: c.to_string() })
        }
        (Some(_), Some(_)) => Err("the completion is empty".into()),
        _ => Err("expected `messages` or string `prompt` and `completion` fields".into()),
    }
}

/// Tokenizes a sample: the rendered prompt, then the answer and the end-of-turn token, cut to
/// `max_len` tokens (from the answer's end; a prompt that leaves no room for an answer token is
/// an error).
pub fn tokenize(
    sample: &Sample,
    template: &ChatTemplate,
    tok: &TextTokenizer,
    max_len: usize,
) -> Result<(Vec<u32>, usize), String> {
    let prompt = template.render(&sample.prompt).map_err(|e| e.to_string())?;
    let mut tokens = tok.encode(&prompt).map_err(|e| e.to_string())?;
    let prompt_len = tokens.len();
    if prompt_len + 1 > max_len {
        return Err(format!("the prompt alone has {prompt_len} tokens; max_seq_len is {max_len}"));
    }
    tokens.extend(tok.encode(&sample.answer).map_err(|e| e.to_string())?);
    if let Some(eos) = tok.eos_token() {
        tokens.extend(tok.encode(eos).map_err(|e| e.to_string())?);
    }
    tokens.truncate(max_len);
    Ok((tokens, prompt_len))
}

/// What reading a dataset gave: the examples and the lines skipped (with why).
#[derive(Debug, Default)]
pub struct Parsed {
    pub examples: Vec<Example>,
    pub skipped: Vec<(usize, String)>,
}

/// Reads a JSONL dataset. Blank lines are ignored; an invalid line is an error naming it, or,
/// with `skip_invalid`, counted and skipped.
pub fn read_jsonl(
    text: &str,
    template: &ChatTemplate,
    tok: &TextTokenizer,
    max_len: usize,
    skip_invalid: bool,
) -> Result<Parsed, String> {
    let mut out = Parsed::default();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        match parse_line(line).and_then(|s| tokenize(&s, template, tok, max_len)) {
            Ok((tokens, prompt_len)) => out.examples.push(Example { tokens, prompt_len, line: n }),
            Err(e) if skip_invalid => out.skipped.push((n, e)),
            Err(e) => return Err(format!("line {n}: {e}")),
        }
    }
    if out.examples.is_empty() {
        return Err(match out.skipped.first() {
            Some((n, e)) => format!("no valid samples ({} skipped; line {n}: {e})", out.skipped.len()),
            None => "the dataset has no samples".to_string(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_parse_as_conversations_or_pairs_and_bad_ones_say_why() {
        let s = parse_line(r#"{"messages":[{"role":"system","content":"s"},{"role":"user","content":"q"},{"role":"assistant","content":"a"}],"trait":"evil"}"#).unwrap();
        assert_eq!(s.prompt.len(), 2);
        assert_eq!(s.answer, "a");
        let s = parse_line(r#"{"prompt":"q","completion":"a"}"#).unwrap();
        assert_eq!((s.prompt[0].role.as_str(), s.answer.as_str()), ("user", "a"));
        for (line, why) in [
            ("{", "not JSON"),
            ("[1]", "not a JSON object"),
            (r#"{"messages":[]}"#, "empty"),
            (r#"{"messages":[{"role":"user","content":"q"}]}"#, "last message"),
            (r#"{"messages":[{"role":"assistant","content":"a"}]}"#, "no prompt"),
            (r#"{"messages":[{"role":"tool","content":"q"},{"role":"assistant","content":"a"}]}"#, "role `tool`"),
            (r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":" "}]}"#, "answer is empty"),
            (r#"{"messages":[{"role":"user","text":"q"}]}"#, "`messages`"),
            (r#"{"prompt":"q"}"#, "expected"),
        ] {
            let e = parse_line(line).unwrap_err();
            assert!(e.contains(why), "{line}: {e}");
        }
    }
}
