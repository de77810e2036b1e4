//! Weight sources for the llama-family loader: GGUF files (with re-quantization of formats that
//! have no fast CPU kernel) and Hugging Face safetensors checkpoints (f32/f16/bf16).

use super::LoadOptions;
use super::arch::embedding::TokenEmbedding;
use super::arch::llama::{LlamaConfig, WeightSource};
use candle_core::quantized::{GgmlDType, QMatMul, QTensor, gguf_file};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Result, Tensor};
use serde::Deserialize;
use std::fs::File;
use std::path::Path;

/// What to do with quantized weights at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Requantize {
    /// The device's best: [`Self::Int8`] on a CPU with the batched kernel (`q8_0` on CPUs
    /// without AVX2), [`Self::Dense`] on a GPU.
    #[default]
    Auto,
    /// Every matmul weight to int8 blocks for the batched CPU kernel (falls back to `q8_0`
    /// off-CPU or on CPUs without AVX2).
    Int8,
    /// Keep every tensor as stored (on a GPU: candle's quantized kernels read the GGUF blocks).
    None,
    /// Re-quantize formats without a fast CPU kernel (Q4_1, Q5_0, Q5_1) to Q8_0.
    Q8_0,
    /// Re-quantize the same slow formats to Q4_0 (smaller, a little less precise).
    Q4_0,
    /// Dequantize every matmul weight to f32: slow and large, but free of activation
    /// quantization; the yardstick for accuracy checks.
    F32,
    /// Dequantize matmul weights to the compute dtype ([`ComputeDtype`], f16 on a GPU) for the
    /// device's dense matmuls; the output head stays f32.
    Dense,
}

impl Requantize {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_lowercase().as_str() {
            "auto" | "" => Self::Auto,
            "int8" => Self::Int8,
            "q8_0" => Self::Q8_0,
            "q4_0" => Self::Q4_0,
            "none" => Self::None,
            "f32" => Self::F32,
            "dense" => Self::Dense,
            _ => return Option::None,
        })
    }

    fn target(self, from: GgmlDType) -> Option<GgmlDType> {
        let slow = matches!(from, GgmlDType::Q4_1 | GgmlDType::Q5_0 | GgmlDType::Q5_1 | GgmlDType::Q8_1);
        match self {
            _ if !slow => None,
            Self::Q8_0 | Self::Int8 | Self::Auto => Some(GgmlDType::Q8_0),
            Self::Q4_0 => Some(GgmlDType::Q4_0),
            Self::None | Self::F32 | Self::Dense => None,
        }
    }

    /// Whether matmul weights come out as dense tensors.
    fn dense(self) -> bool {
        matches!(self, Self::F32 | Self::Dense)
    }
}

/// Element type of the device path's matmul weights, activations and KV cache (the CPU's block
/// kernels always compute in f32 and int8). The residual stream, norms, softmax and logits stay f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// f16 on a GPU, f32 on the CPU.
    #[default]
    Auto,
    F32,
    F16,
    Bf16,
}

impl ComputeDtype {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.to_lowercase().as_str() {
            "auto" | "" => Self::Auto,
            "f32" => Self::F32,
            "f16" => Self::F16,
            "bf16" => Self::Bf16,
            _ => return None,
        })
    }

    pub fn resolve(self, device: &Device) -> DType {
        match self {
            Self::Auto if device.is_cpu() => DType::F32,
            Self::Auto | Self::F16 => DType::F16,
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// How finely the CPU block kernels quantize activations (the weights stay as loaded).
///
/// A matmul's input is quantized to int8 blocks of 32 with one scale each; one level loses up
/// to half a step per value. `two levels` adds a second int8 row holding the first's rounding
/// error, so the pair carries ~15 bits per value for twice the integer arithmetic on the same
/// weight loads. Attention's q/k/v projections and the output head are where the error shows
/// most in the next-token distribution (scripts/bench-fidelity measures it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// One level everywhere: the fastest, and the furthest from the float reference.
    Fast,
    /// Two levels for the q/k/v projections and the output head, one elsewhere.
    #[default]
    Balanced,
    /// Two levels everywhere: matches the f32 reference to rounding, ~half the prefill speed.
    Exact,
}

/// Which matmul of a block a weight is, for [`Precision::two_levels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MatmulRole {
    /// The attention's q/k/v projection.
    Attention,
    /// The output head (logits).
    Output,
    /// Everything else: attention output, MLP.
    Other,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_lowercase().as_str() {
            "fast" => Some(Self::Fast),
            "balanced" | "" => Some(Self::Balanced),
            "exact" => Some(Self::Exact),
            _ => None,
        }
    }

    pub fn two_levels(self, role: MatmulRole) -> bool {
        match self {
            Self::Fast => false,
            Self::Balanced => matches!(role, MatmulRole::Attention | MatmulRole::Output),
            Self::Exact => true,
        }
    }
}

pub fn dtype_name(d: GgmlDType) -> String {
    format!("{d:?}").to_lowercase()
}

/// What `r` means on `device`: `Auto` becomes `Int8` where the int8 kernel can run, `Q8_0` on
/// other CPUs and `Dense` on a GPU; `Int8` becomes `Q8_0` where its kernel cannot run.
fn effective(r: Requantize, device: &Device) -> Requantize {
    let int8 = device.is_cpu() && super::cpu::supported();
    match r {
        Requantize::Auto if int8 => Requantize::Int8,
        Requantize::Auto if device.is_cpu() => Requantize::Q8_0,
        Requantize::Auto => Requantize::Dense,
        Requantize::Int8 if !int8 => Requantize::Q8_0,
        r => r,
    }
}

/// Dtype of a dense matmul weight: the output head stays f32 (its logits are what sampling and
/// log-probabilities read), the rest follows the compute dtype under `Dense`.
fn dense_dtype(r: Requantize, role: MatmulRole, compute: DType) -> DType {
    if r == Requantize::Dense && role != MatmulRole::Output { compute } else { DType::F32 }
}

/// A GGUF file opened for loading.
pub struct GgufSource {
    content: gguf_file::Content,
    file: File,
    device: Device,
    requantize: Requantize,
    precision: Precision,
    dtype: DType,
    /// (original, loaded) formats of matmul weights seen so far, for reporting.
    pub formats: std::collections::BTreeSet<(String, String)>,
}

impl GgufSource {
    pub fn open(path: &Path, device: &Device, opts: &LoadOptions) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| candle_core::Error::from(e).with_path(path))?;
        let content = gguf_file::Content::read(&mut file).map_err(|e| e.with_path(path))?;
        Ok(Self {
            content,
            file,
            device: device.clone(),
            requantize: effective(opts.requantize, device),
            precision: opts.precision,
            dtype: opts.dtype.resolve(device),
            formats: Default::default(),
        })
    }

    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }

    fn md(&self, key: &str) -> Result<&gguf_file::Value> {
        self.content.metadata.get(key).ok_or_else(|| candle_core::Error::msg(format!("GGUF metadata has no `{key}`")))
    }

    /// Architecture hyper-parameters from the GGUF metadata.
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.md("general.architecture")?.to_string()?.clone();
        if arch == "gemma3" {
            return super::arch::gemma3::config_from_gguf(&self.content);
        }
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            candle_core::bail!("unsupported architecture `{arch}` (supported: llama, mistral, qwen2, gemma3)");
        }
        let get = |k: &str| self.md(&format!("{arch}.{k}"));
        let n_heads = get("attention.head_count")?.to_u32()? as usize;
        let hidden_size = get("embedding_length")?.to_u32()? as usize;
        let head_dim = match get("rope.dimension_count") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => hidden_size / n_heads,
        };
        let vocab_size = match get("vocab_size") {
            Ok(v) => v.to_u32()? as usize,
            Err(_) => self.md("tokenizer.ggml.tokens")?.to_vec()?.len(),
        };
        Ok(LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: get("feed_forward_length")?.to_u32()? as usize,
            n_layers: get("block_count")?.to_u32()? as usize,
            n_heads,
            n_kv_heads: get("attention.head_count_kv").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(n_heads),
            head_dim,
            rms_norm_eps: get("attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
            rope_theta: get("rope.freq_base").and_then(|v| v.to_f32()).unwrap_or(10_000.0),
            context_length: get("context_length").and_then(|v| v.to_u32()).map(|v| v as usize).unwrap_or(4096),
            rope_interleaved: arch != "qwen2",
            qkv_bias: arch == "qwen2",
            gemma3: None,
            architecture: arch,
        })
    }

    fn read(&mut self, name: &str) -> Result<QTensor> {
        self.content.tensor(&mut self.file, name, &self.device)
    }
}

impl WeightSource for GgufSource {
    fn matmul(&mut self, name: &str, role: MatmulRole) -> Result<QMatMul> {
        let qt = self.read(name)?;
        let from = qt.dtype();
        if self.requantize.dense() {
            let dtype = dense_dtype(self.requantize, role, self.dtype);
            self.formats.insert((dtype_name(from), format!("{dtype:?}").to_lowercase()));
            return Ok(QMatMul::Tensor(qt.dequantize(&self.device)?.to_dtype(dtype)?));
        }
        let qt = match self.requantize.target(from) {
            Some(to) => {
                let dense = qt.dequantize(&Device::Cpu)?;
                QTensor::quantize_onto(&dense, to, &self.device)?
            }
            None => qt,
        };
        self.formats.insert((dtype_name(from), dtype_name(qt.dtype())));
        QMatMul::from_qtensor(qt)
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        self.read(name)?.dequantize(&self.device)?.to_dtype(DType::F32)
    }

    fn embedding(&mut self, name: &str) -> Result<TokenEmbedding> {
        TokenEmbedding::from_qtensor(&self.content.tensor(&mut self.file, name, &Device::Cpu)?)
    }

    fn raw(&mut self, name: &str) -> Result<Option<QTensor>> {
        let qt = self.read(name)?;
        self.formats.insert((dtype_name(qt.dtype()), "blocks".to_string()));
        Ok(Some(qt))
    }

    fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn wants_int8(&self) -> bool {
        self.requantize == Requantize::Int8
    }

    fn dense_matmuls(&self) -> bool {
        self.requantize.dense()
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn compute_dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// The subset of a Hugging Face `config.json` the loader needs.
#[derive(Debug, Deserialize)]
pub struct HfConfig {
    #[serde(default)]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f32,
    #[serde(default = "default_ctx")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

fn default_theta() -> f32 {
    10_000.0
}

fn default_ctx() -> usize {
    4096
}

impl HfConfig {
    /// Reads and parses a `config.json`.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    pub fn to_llama(&self) -> Result<LlamaConfig> {
        let arch = if self.model_type.is_empty() { "llama".to_string() } else { self.model_type.clone() };
        if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
            candle_core::bail!(
                "unsupported model_type `{arch}` in a safetensors checkpoint (supported: llama, mistral, qwen2; \
                 Gemma 3 loads from GGUF)"
            );
        }
        Ok(LlamaConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            n_layers: self.num_hidden_layers,
            n_heads: self.num_attention_heads,
            n_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            head_dim: self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta: self.rope_theta,
            context_length: self.max_position_embeddings,
            rope_interleaved: false,
            qkv_bias: arch == "qwen2",
            gemma3: None,
            architecture: arch,
        })
    }
}

/// Safetensors checkpoint(s) with Hugging Face tensor names, served under GGUF names.
pub struct SafetensorsSource {
    st: MmapedSafetensors,
    device: Device,
    tied: bool,
    requantize: Requantize,
    precision: Precision,
    dtype: DType,
}

impl SafetensorsSource {
    pub fn open(files: &[std::path::PathBuf], device: &Device, tied: bool, opts: &LoadOptions) -> Result<Self> {
        // SAFETY: the files are opened read-only and not modified while the model is loading;
        // every tensor is copied out of the mapping before it is dropped.
        let st = unsafe { MmapedSafetensors::multi(files)? };
        // Dense checkpoints have no blocks to keep: anything but int8 blocks is dense.
        let requantize = match effective(opts.requantize, device) {
            Requantize::Int8 => Requantize::Int8,
            Requantize::Dense => Requantize::Dense,
            _ => Requantize::F32,
        };
        Ok(Self {
            st,
            device: device.clone(),
            tied,
            requantize,
            precision: opts.precision,
            dtype: opts.dtype.resolve(device),
        })
    }

    pub fn is_int8(&self) -> bool {
        self.requantize == Requantize::Int8
    }

    /// Maps a GGUF tensor name to its Hugging Face counterpart.
    fn hf_name(gguf: &str) -> Option<String> {
        let (stem, suffix) = gguf.rsplit_once('.')?;
        if let Some(rest) = stem.strip_prefix("blk.") {
            let (idx, part) = rest.split_once('.')?;
            let hf = match part {
                "attn_q" => "self_attn.q_proj",
                "attn_k" => "self_attn.k_proj",
                "attn_v" => "self_attn.v_proj",
                "attn_output" => "self_attn.o_proj",
                "ffn_gate" => "mlp.gate_proj",
                "ffn_up" => "mlp.up_proj",
                "ffn_down" => "mlp.down_proj",
                "attn_norm" => "input_layernorm",
                "ffn_norm" => "post_attention_layernorm",
                _ => return None,
            };
            return Some(format!("model.layers.{idx}.{hf}.{suffix}"));
        }
        let hf = match stem {
            "token_embd" => "model.embed_tokens",
            "output_norm" => "model.norm",
            "output" => "lm_head",
            _ => return None,
        };
        Some(format!("{hf}.{suffix}"))
    }

    fn load(&self, gguf: &str) -> Result<Tensor> {
        let hf =
            Self::hf_name(gguf).ok_or_else(|| candle_core::Error::msg(format!("no Hugging Face name for `{gguf}`")))?;
        self.st.load(&hf, &self.device)?.to_dtype(DType::F32)
    }
}

impl WeightSource for SafetensorsSource {
    fn matmul(&mut self, name: &str, role: MatmulRole) -> Result<QMatMul> {
        Ok(QMatMul::Tensor(self.load(name)?.to_dtype(dense_dtype(self.requantize, role, self.dtype))?))
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        self.load(name)
    }

    fn contains(&self, name: &str) -> bool {
        if name == "output.weight" && self.tied {
            return false;
        }
        Self::hf_name(name).is_some_and(|hf| self.st.get(&hf).is_ok())
    }

    fn wants_int8(&self) -> bool {
        self.is_int8()
    }

    fn dense_matmuls(&self) -> bool {
        !self.is_int8()
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn compute_dtype(&self) -> DType {
        self.dtype
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_names_map_exactly() {
        assert_eq!(
            SafetensorsSource::hf_name("blk.3.attn_q.weight").as_deref(),
            Some("model.layers.3.self_attn.q_proj.weight")
        );
        assert_eq!(
            SafetensorsSource::hf_name("blk.0.attn_k.bias").as_deref(),
            Some("model.layers.0.self_attn.k_proj.bias")
        );
        assert_eq!(SafetensorsSource::hf_name("output_norm.weight").as_deref(), Some("model.norm.weight"));
        assert_eq!(SafetensorsSource::hf_name("blk.1.unknown.weight"), None);
    }

    #[test]
    fn only_slow_formats_are_requantized() {
        assert_eq!(Requantize::Q8_0.target(GgmlDType::Q4_1), Some(GgmlDType::Q8_0));
        assert_eq!(effective(Requantize::None, &Device::Cpu), Requantize::None);
        assert_eq!(Requantize::Q8_0.target(GgmlDType::Q4K), None);
        assert_eq!(Requantize::None.target(GgmlDType::Q4_1), None);
        assert_eq!(Requantize::Q4_0.target(GgmlDType::Q5_0), Some(GgmlDType::Q4_0));
        assert_eq!(Requantize::Dense.target(GgmlDType::Q4_1), None);
    }

    #[test]
    fn auto_picks_the_device_s_best() {
        let cpu = if crate::model::cpu::supported() { Requantize::Int8 } else { Requantize::Q8_0 };
        assert_eq!(effective(Requantize::Auto, &Device::Cpu), cpu);
        assert_eq!(effective(Requantize::Dense, &Device::Cpu), Requantize::Dense);
        assert_eq!(ComputeDtype::Auto.resolve(&Device::Cpu), DType::F32);
        assert_eq!(ComputeDtype::Bf16.resolve(&Device::Cpu), DType::BF16);
        assert_eq!(dense_dtype(Requantize::Dense, MatmulRole::Output, DType::F16), DType::F32);
        assert_eq!(dense_dtype(Requantize::Dense, MatmulRole::Other, DType::F16), DType::F16);
        assert_eq!(dense_dtype(Requantize::F32, MatmulRole::Other, DType::F16), DType::F32);
        assert_eq!(Requantize::parse("DENSE"), Some(Requantize::Dense));
        assert_eq!(ComputeDtype::parse("bf16"), Some(ComputeDtype::Bf16));
        assert_eq!(ComputeDtype::parse("fp8"), None);
    }
}
