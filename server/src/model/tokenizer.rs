//! Text ⇄ token ids: a `tokenizers` pipeline rebuilt from GGUF metadata (gpt2-style byte-level
//! BPE), or loaded from a `tokenizer.json`, plus incremental detokenization for streaming.

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Names that end a turn in the chat formats we know; any present in the vocabulary stop generation.
const END_OF_TURN: &[&str] = &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>"];

/// Llama-3 / Qwen2 style split: contractions, letter runs, 1–3 digit numbers, punctuation runs.
const SPLIT_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct TextTokenizer {
    inner: Tokenizer,
    eos_ids: Vec<u32>,
    bos: Option<String>,
    eos: Option<String>,
}

fn md<'a>(ct: &'a gguf_file::Content, key: &str) -> Result<&'a gguf_file::Value> {
    ct.metadata.get(key).ok_or_else(|| anyhow!("GGUF metadata has no `{key}`"))
}

fn byte_level_pipeline(pre: &str) -> Result<PreTokenizerWrapper> {
    Ok(match pre {
        // SmolLM: every digit on its own, then GPT-2 byte-level splitting without a prefix space.
        "smollm" => Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into(),
        "llama3" | "llama-bpe" | "qwen2" | "smaug-bpe" => Sequence::new(vec![
            Split::new(SplitPattern::Regex(SPLIT_LLAMA3.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| anyhow!("pre-tokenizer regex: {e}"))?
                .into(),
            ByteLevel::new(false, true, false).into(),
        ])
        .into(),
        _ => ByteLevel::new(false, true, true).into(),
    })
}

impl TextTokenizer {
    /// Rebuilds the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(ct: &gguf_file::Content) -> Result<Self> {
        let model = md(ct, "tokenizer.ggml.model")?.to_string()?;
        if model != "gpt2" {
            bail!("GGUF tokenizer model `{model}` is not supported; put a tokenizer.json beside the model");
        }
        let tokens: Vec<String> = md(ct, "tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        let merges: Vec<(String, String)> = md(ct, "tokenizer.ggml.merges")?
            .to_vec()?
            .iter()
            .map(|v| {
                let m = v.to_string()?;
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| candle_core::Error::msg(format!("bad merge `{m}`")))
            })
            .collect::<candle_core::Result<_>>()?;
        let types: Vec<i32> = match ct.metadata.get("tokenizer.ggml.token_type") {
            Some(v) => v.to_vec()?.iter().map(|t| t.to_i32()).collect::<candle_core::Result<_>>()?,
            None => vec![1; tokens.len()],
        };
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| anyhow!("building BPE: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        let pre = ct.metadata.get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        inner.with_pre_tokenizer(Some(byte_level_pipeline(&pre)?));
        inner.with_decoder(Some(ByteLevelDecoder::new(false, true, true)));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(s, _)| AddedToken::from(s.clone(), true))
            .collect();
        inner.add_special_tokens(special).map_err(|e| anyhow!("adding special tokens: {e}"))?;
        let token_name = |key: &str| -> Option<String> {
            let id = ct.metadata.get(key)?.to_u32().ok()? as usize;
            tokens.get(id).cloned()
        };
        let bos = token_name("tokenizer.ggml.bos_token_id");
        let eos = token_name("tokenizer.ggml.eos_token_id");
        Ok(Self::finish(inner, bos, eos))
    }

    /// Loads a Hugging Face `tokenizer.json`; bos/eos names come from `tokenizer_config.json`
    /// beside it when present.
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = Tokenizer::from_file(path).map_err(|e| anyhow!("loading {}: {e}", path.display()))?;
        let (bos, eos) = match path.parent().map(|p| p.join("tokenizer_config.json")) {
            Some(cfg) if cfg.exists() => {
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg)?)
                    .with_context(|| format!("parsing {}", cfg.display()))?;
                let name = |k: &str| match &v[k] {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
                    _ => None,
                };
                (name("bos_token"), name("eos_token"))
            }
            _ => (None, None),
        };
        Ok(Self::finish(inner, bos, eos))
    }

    fn finish(inner: Tokenizer, bos: Option<String>, eos: Option<String>) -> Self {
        let mut eos_ids: Vec<u32> =
            END_OF_TURN.iter().copied().chain(eos.as_deref()).filter_map(|t| inner.token_to_id(t)).collect();
        eos_ids.sort_unstable();
        eos_ids.dedup();
        Self { inner, eos_ids, bos, eos }
    }

    /// Encodes text; special-token strings such as `<|im_start|>` map to their single ids.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| anyhow!("detokenizing: {e}"))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.binary_search(&id).is_ok()
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

/// Turns a growing list of token ids into text deltas without splitting UTF-8 characters or
/// byte-level merges: text is only released once the decoded suffix is stable.
#[derive(Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    /// Adds a token and returns the newly stable text (possibly empty).
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len() && !full.ends_with('\u{fffd}') && full.is_char_boundary(prefix.len()) {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }

    /// Text still held back (a dangling partial character), decoded as is.
    pub fn flush(&mut self, tok: &TextTokenizer) -> Result<String> {
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full.get(prefix.len()..).unwrap_or_default().to_string())
    }
}
