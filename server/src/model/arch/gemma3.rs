//! Gemma 3: what sets it apart from the llama family, and how its GGUF metadata is read.
//!
//! The decoder skeleton (packed rows, KV caches, steering and capture hooks, host and device
//! paths) is shared with [`llama`](super::llama); a Gemma 3 block differs in five places, each
//! switched on by [`Gemma3Params`] in the model's configuration:
//! - token embeddings are multiplied by √d_model before the first block;
//! - "sandwich" norms: the attention and MLP outputs are RMS-normalised again before their
//!   residual adds (`post_attention_norm`, `post_ffw_norm`);
//! - QK-norm: every query and key head is RMS-normalised (over head_dim) before rotation;
//! - the MLP is GeGLU with the tanh-approximated GELU instead of SwiGLU;
//! - five of every six layers attend over a sliding window (512 tokens for the 270M model) with
//!   their own rotary base (10 000); every sixth layer attends globally with base 1 000 000.
//!
//! GGUF files store Gemma's RMSNorm weights already shifted by one (the `1 + w` of the
//! reference implementation), so the shared RMSNorm applies them as they are. head_dim (256)
//! is independent of d_model (640); rotary pairs are the half-split (NeoX) layout.

use super::llama::LlamaConfig;
use candle_core::Result;
use candle_core::quantized::gguf_file;

/// Gemma 3's departures from a llama block (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Params {
    /// Tokens a sliding-window layer attends over, its own included.
    pub sliding_window: usize,
    /// Every `global_every`-th layer (1-based) attends globally; the others use the window.
    pub global_every: usize,
    /// Rotary base of the sliding-window layers (global layers use the config's `rope_theta`).
    pub rope_theta_local: f32,
}

impl Gemma3Params {
    /// Whether layer `i` (0-based) attends over the sliding window.
    pub fn is_local(&self, layer: usize) -> bool {
        !(layer + 1).is_multiple_of(self.global_every)
    }
}

/// Gemma 3 270M's pattern when the GGUF does not state it: five local layers, then a global one.
const DEFAULT_GLOBAL_EVERY: usize = 6;
const DEFAULT_LOCAL_ROPE_BASE: f32 = 10_000.0;

/// The chat format Gemma 3 instruction-tuned checkpoints were trained on, used when a Gemma 3
/// GGUF ships no template (the base model's file has none): turns wrapped in
/// `<start_of_turn>{user|model}` … `<end_of_turn>`, a system prompt folded into the first user
/// turn, and `<bos>` first.
pub const CHAT_TEMPLATE: &str = "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}{% else %}{% set role = 'model' if message['role'] == 'assistant' else 'user' %}{{ '<start_of_turn>' + role + '\n' + (ns.system if loop.index0 <= 1 and role == 'user' else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}";

/// Reads a Gemma 3 configuration from GGUF metadata (`gemma3.*` keys).
pub fn config_from_gguf(ct: &gguf_file::Content) -> Result<LlamaConfig> {
    let get = |k: &str| {
        let key = format!("gemma3.{k}");
        ct.metadata.get(&key).ok_or_else(|| candle_core::Error::msg(format!("GGUF metadata has no `{key}`")))
    };
    let u = |k: &str| -> Result<usize> { Ok(get(k)?.to_u32()? as usize) };
    let n_heads = u("attention.head_count")?;
    let hidden_size = u("embedding_length")?;
    let head_dim = u("attention.key_length")?;
    if u("attention.value_length").unwrap_or(head_dim) != head_dim {
        candle_core::bail!("Gemma 3 with different key and value head sizes is not supported");
    }
    let vocab_size = match u("vocab_size") {
        Ok(v) => v,
        Err(_) => ct
            .metadata
            .get("tokenizer.ggml.tokens")
            .ok_or_else(|| candle_core::Error::msg("GGUF metadata has neither a vocabulary size nor tokens"))?
            .to_vec()?
            .len(),
    };
    if let Ok(f) = get("rope.scaling.factor").and_then(|v| v.to_f32())
        && f != 1.0
    {
        // The larger Gemma 3 models stretch their global layers' rotary positions; 270M does not.
        candle_core::bail!("Gemma 3 with rotary scaling (factor {f}) is not supported");
    }
    let params = Gemma3Params {
        sliding_window: u("attention.sliding_window")?,
        global_every: u("attention.sliding_window_type").unwrap_or(DEFAULT_GLOBAL_EVERY).max(1),
        rope_theta_local: get("rope.local_freq_base").and_then(|v| v.to_f32()).unwrap_or(DEFAULT_LOCAL_ROPE_BASE),
    };
    Ok(LlamaConfig {
        architecture: "gemma3".to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: u("feed_forward_length")?,
        n_layers: u("block_count")?,
        n_heads,
        n_kv_heads: u("attention.head_count_kv").unwrap_or(n_heads),
        head_dim,
        rms_norm_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
        rope_theta: get("rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(1_000_000.0),
        context_length: u("context_length").unwrap_or(32_768),
        rope_interleaved: false,
        qkv_bias: false,
        gemma3: Some(params),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_sixth_layer_is_global() {
        let p = Gemma3Params { sliding_window: 512, global_every: 6, rope_theta_local: 1e4 };
        let global: Vec<usize> = (0..18).filter(|&i| !p.is_local(i)).collect();
        assert_eq!(global, vec![5, 11, 17]);
    }

    #[test]
    fn the_chat_template_folds_the_system_prompt_into_the_first_user_turn() {
        use crate::model::chat::{ChatTemplate, Message};
        let t = ChatTemplate::new(Some(CHAT_TEMPLATE.to_string()), Some("<bos>"), Some("<eos>")).unwrap();
        let text = t
            .render(&[
                Message::new("system", "Be brief."),
                Message::new("user", "Hi"),
                Message::new("assistant", "Hello."),
                Message::new("user", "Bye"),
            ])
            .unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n\
             <start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
    }
}
