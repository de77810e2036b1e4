//! Text ⇄ token ids: a `tokenizers` pipeline rebuilt from GGUF metadata (gpt2-style byte-level
//! BPE, or SentencePiece BPE with byte fallback as Gemma ships it), or loaded from a
//! `tokenizer.json`, plus incremental detokenization for streaming.

use anyhow::{Context, Result, anyhow, bail};
use candle_core::quantized::gguf_file;
use std::path::Path;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

/// GGUF token types (llama.cpp `llama_token_type`).
const TOKEN_TYPE_NORMAL: i32 = 1;
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Names that end a turn in the chat formats we know; any present in the vocabulary stop generation.
const END_OF_TURN: &[&str] =
    &["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<end_of_turn>", "<eos>"];

/// SentencePiece's visible space.
const SPM_SPACE: &str = "\u{2581}";

/// Llama-3 / Qwen2 style split: contractions, letter runs, 1–3 digit numbers, punctuation runs.
const SPLIT_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

pub struct TextTokenizer {
    inner: Tokenizer,
    eos_ids: Vec<u32>,
    bos: Option<String>,
    eos: Option<String>,
    /// The model expects `bos` before any text (Gemma); chat templates write it themselves.
    add_bos: bool,
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
        let tokens: Vec<String> = md(ct, "tokenizer.ggml.tokens")?
            .to_vec()?
            .iter()
            .map(|v| v.to_string().cloned())
            .collect::<candle_core::Result<_>>()?;
        match model.as_str() {
            "gpt2" => Self::byte_level_from_gguf(ct, tokens),
            "llama" => Self::sentencepiece_from_gguf(ct, tokens),
            _ => bail!("GGUF tokenizer model `{model}` is not supported; put a tokenizer.json beside the model"),
        }
    }

    fn byte_level_from_gguf(ct: &gguf_file::Content, tokens: Vec<String>) -> Result<Self> {
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

    /// A SentencePiece BPE vocabulary (`tokenizer.ggml.model = llama`: Llama 2, Gemma) as a
    /// `tokenizers` BPE: spaces become `▁`, pieces merge in the order of their scores (a merge
    /// `a + b` ranks by the score of the piece it makes, the highest first), text no piece
    /// covers falls back to `<0xNN>` byte tokens, and control and user-defined tokens are
    /// matched whole.
    fn sentencepiece_from_gguf(ct: &gguf_file::Content, tokens: Vec<String>) -> Result<Self> {
        let scores: Vec<f32> = md(ct, "tokenizer.ggml.scores")?
            .to_vec()?
            .iter()
            .map(|v| v.to_f32())
            .collect::<candle_core::Result<_>>()?;
        let types: Vec<i32> = md(ct, "tokenizer.ggml.token_type")?
            .to_vec()?
            .iter()
            .map(|t| t.to_i32())
            .collect::<candle_core::Result<_>>()?;
        if scores.len() != tokens.len() || types.len() != tokens.len() {
            bail!("GGUF tokenizer has {} tokens, {} scores and {} types", tokens.len(), scores.len(), types.len());
        }
        let merges = sentencepiece_merges(&tokens, &scores, &types);
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let token_name = |key: &str| -> Option<String> {
            let id = ct.metadata.get(key)?.to_u32().ok()? as usize;
            tokens.get(id).cloned()
        };
        let mut bpe = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true);
        if let Some(unk) = token_name("tokenizer.ggml.unknown_token_id") {
            bpe = bpe.unk_token(unk);
        }
        let bpe = bpe.build().map_err(|e| anyhow!("building BPE: {e}"))?;
        let mut inner = Tokenizer::new(bpe);
        let flag = |key: &str| ct.metadata.get(key).and_then(|v| v.to_bool().ok());
        let space = |e| anyhow!("space normalizer: {e}");
        let mut normalizers: Vec<NormalizerWrapper> = Vec::new();
        if flag("tokenizer.ggml.add_space_prefix").unwrap_or(true) {
            normalizers.push(Prepend::new(SPM_SPACE.to_string()).into());
        }
        normalizers.push(Replace::new(" ", SPM_SPACE).map_err(space)?.into());
        inner.with_normalizer(Some(NormalizerSequence::new(normalizers))).map_err(|e| anyhow!("normalizer: {e}"))?;
        inner.with_decoder(Some(DecoderSequence::new(vec![
            Replace::new(SPM_SPACE, " ").map_err(space)?.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ])));
        let added = |kind: i32, special: bool| -> Vec<AddedToken> {
            tokens
                .iter()
                .zip(&types)
                .filter(|(_, t)| **t == kind)
                .map(|(s, _)| AddedToken::from(s.clone(), special).normalized(false))
                .collect()
        };
        inner.add_special_tokens(added(TOKEN_TYPE_CONTROL, true)).map_err(|e| anyhow!("adding control tokens: {e}"))?;
        inner.add_tokens(added(TOKEN_TYPE_USER_DEFINED, false)).map_err(|e| anyhow!("adding user tokens: {e}"))?;
        let bos = token_name("tokenizer.ggml.bos_token_id");
        let eos = token_name("tokenizer.ggml.eos_token_id");
        let mut tok = Self::finish(inner, bos, eos);
        tok.add_bos = flag("tokenizer.ggml.add_bos_token").unwrap_or(true);
        Ok(tok)
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
        Self { inner, eos_ids, bos, eos, add_bos: false }
    }

    /// Encodes plain text as the model reads a document: after `bos` where the model expects
    /// one (Gemma) and the text does not start with it, as is otherwise. Chat prompts come
    /// from [`Self::encode`] of the rendered template, which writes its own `bos`.
    pub fn encode_document(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = self.encode(text)?;
        if let Some(bos) = self.missing_bos(&ids) {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// The `bos` to put before `ids` when the model expects one and they do not start with it.
    fn missing_bos(&self, ids: &[u32]) -> Option<u32> {
        let bos = self.bos.as_deref().and_then(|b| self.inner.token_to_id(b))?;
        (self.add_bos && ids.first() != Some(&bos)).then_some(bos)
    }

    /// [`Self::encode_document`] with, per token, the byte offset in `text` where it ends
    /// (`None` for the `bos` it adds): where two tokenizers both end a token, two models have
    /// read the same text.
    pub fn encode_document_ends(&self, text: &str) -> Result<(Vec<u32>, Vec<Option<usize>>)> {
        let enc = self.inner.encode(text, false).map_err(|e| anyhow!("tokenizing: {e}"))?;
        let mut ids = enc.get_ids().to_vec();
        let mut ends: Vec<Option<usize>> = enc.get_offsets().iter().map(|&(_, end)| Some(end)).collect();
        if let Some(bos) = self.missing_bos(&ids) {
            ids.insert(0, bos);
            ends.insert(0, None);
        }
        Ok((ids, ends))
    }

    /// Whether the model expects `bos` before any text.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
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

/// BPE merges implied by a SentencePiece vocabulary: every split of a normal piece into two
/// normal pieces, ranked by the whole piece's score (highest first; ties by id, then by the
/// halves' ids).
fn sentencepiece_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<(String, String)> {
    let normal: std::collections::HashMap<&str, u32> = tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, t))| **t == TOKEN_TYPE_NORMAL)
        .map(|(i, (s, _))| (s.as_str(), i as u32))
        .collect();
    let mut ranked: Vec<(f32, u32, u32, u32, &str, &str)> = Vec::new();
    for (&piece, &id) in &normal {
        for (cut, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(cut);
            if let (Some(&a), Some(&b)) = (normal.get(l), normal.get(r)) {
                ranked.push((scores[id as usize], id, a, b, l, r));
            }
        }
    }
    ranked.sort_by(|x, y| y.0.total_cmp(&x.0).then(x.1.cmp(&y.1)).then(x.2.cmp(&y.2)).then(x.3.cmp(&y.3)));
    ranked.into_iter().map(|(.., l, r)| (l.to_string(), r.to_string())).collect()
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
