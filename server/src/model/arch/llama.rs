//! Llama-family decoder: Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2 (q/k/v bias), and Gemma 3
//! (its differences are listed in [`gemma3`](super::gemma3)).
//!
//! Pre-norm transformer blocks (RMSNorm → grouped-query attention with rotary embeddings →
//! residual; RMSNorm → SwiGLU MLP → residual). Weights come from a [`WeightSource`] that speaks
//! GGUF tensor names, so GGUF and safetensors checkpoints share one loader.
//!
//! The forward pass works on a *packed* batch: the new tokens of every row are concatenated into
//! one `[n_tokens, d_model]` matrix, so prefill chunks and single decode tokens of different
//! sequences run through the projections and MLPs together, with no padding. Two hooks act on
//! the residual stream, row by row: steering (add a vector after block L) and capture (keep the
//! hidden state after every block).
//!
//! Two implementations share this file. On the CPU, matmuls run the block kernels of
//! [`cpu`](super::super::cpu) and attention runs host loops over each row's own cache. Elsewhere
//! (CUDA, Metal, and the CPU with host kernels switched off) everything is candle tensor ops in
//! the compute dtype ([`device`](super::super::device)): rows' caches are slots of one pool per
//! model and a batch attends in one padded, masked pass. The residual stream is f32 on both.

use super::super::cpu::attention::{self, Heads, HostKv, RowSpan};
use super::super::cpu::elementwise::{Activation, GatedMul, inv_rms};
use super::super::cpu::{FusedLinear, QLinear};
use super::super::device::attention::{self as batch_attention, RowPlace, StepPlan};
use super::super::device::kv::{KvGeometry, KvPool, SlotLease};
use super::super::device::steering::SteeringCache;
use super::super::weights::{MatmulRole, Precision};
use super::embedding::TokenEmbedding;
use super::gemma3::Gemma3Params;
use candle_core::quantized::{GgmlDType, QMatMul};
use candle_core::{DType, Device, Module, Result, Tensor};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Architecture hyper-parameters, read from GGUF metadata or a `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub context_length: usize,
    /// GGUF llama checkpoints store q/k permuted for interleaved (GPT-J style) rotary pairs;
    /// Hugging Face checkpoints and Qwen2 use the half-split (NeoX) layout.
    pub rope_interleaved: bool,
    /// Qwen2 adds biases to the q, k and v projections.
    pub qkv_bias: bool,
    /// Gemma 3's block (sandwich norms, QK-norm, GeGLU, scaled embeddings, sliding windows).
    pub gemma3: Option<Gemma3Params>,
}

impl LlamaConfig {
    /// Residual rows a persona vector has for this model: the embeddings plus one per block.
    pub fn n_residual_rows(&self) -> usize {
        self.n_layers + 1
    }

    /// The sliding window layer `layer` attends over, if it is a local layer.
    pub fn window(&self, layer: usize) -> Option<usize> {
        self.gemma3.as_ref().filter(|g| g.is_local(layer)).map(|g| g.sliding_window)
    }

    /// Rotary bases in use: the global one first, then the local layers' if they have their own.
    pub fn rope_thetas(&self) -> Vec<f32> {
        match &self.gemma3 {
            Some(g) => vec![self.rope_theta, g.rope_theta_local],
            None => vec![self.rope_theta],
        }
    }

    /// Index into [`Self::rope_thetas`] of layer `layer`'s base.
    pub fn rope_table(&self, layer: usize) -> usize {
        usize::from(self.window(layer).is_some())
    }

    /// The MLP gate's activation.
    pub fn activation(&self) -> Activation {
        if self.gemma3.is_some() { Activation::GeluTanh } else { Activation::Silu }
    }

    /// Factor applied to token embeddings before the first block (√d_model for Gemma).
    pub fn embedding_scale(&self) -> Option<f32> {
        self.gemma3.as_ref().map(|_| (self.hidden_size as f32).sqrt())
    }
}

/// Named weights in GGUF naming (`blk.N.attn_q.weight`, `token_embd.weight`, …).
pub trait WeightSource {
    /// A weight used as `x · Wᵀ`, quantized or dense, as the source was asked to load it.
    fn matmul(&mut self, name: &str, role: MatmulRole) -> Result<QMatMul>;
    /// Whether matmul weights should be converted to the batched block-quantized CPU kernel.
    fn wants_int8(&self) -> bool {
        false
    }
    /// Whether [`Self::matmul`] returns dense tensors (which can be fused by concatenation).
    fn dense_matmuls(&self) -> bool {
        false
    }
    /// Element type of the device path's activations and KV cache.
    fn compute_dtype(&self) -> DType {
        DType::F32
    }
    /// Activation precision of the block kernels (only used with [`Self::wants_int8`]).
    fn precision(&self) -> Precision {
        Precision::default()
    }
    /// The stored quantized tensor, for sources that have one (GGUF).
    fn raw(&mut self, _name: &str) -> Result<Option<candle_core::quantized::QTensor>> {
        Ok(None)
    }
    /// A small dense tensor (norm weights, biases, embeddings), as f32.
    fn dense(&mut self, name: &str) -> Result<Tensor>;
    /// The token embedding table (sources that store blocks keep them).
    fn embedding(&mut self, name: &str) -> Result<TokenEmbedding> {
        Ok(TokenEmbedding::Dense(self.dense(name)?))
    }
    fn contains(&self, name: &str) -> bool;
    fn device(&self) -> &Device;
}

enum Weight {
    Quantized(QMatMul),
    Blocks(FusedLinear),
}

/// One weight in the block-quantized CPU format: Q4_0/Q4_1, Q4_K, Q6_K, Q8_0 and Q5_0/Q5_1
/// blocks are kept bit for bit where the CPU allows ([`QLinear::from_quantized`]), dense
/// weights and other formats become int8 blocks.
fn block_weight(src: &mut dyn WeightSource, name: &str) -> Result<QLinear> {
    match src.raw(name)? {
        Some(qt) => match QLinear::from_q4(&qt)? {
            Some(l) => Ok(l),
            None if matches!(qt.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) => {
                QLinear::from_dense(&qt.dequantize(&Device::Cpu)?)
            }
            None => QLinear::from_quantized(&qt),
        },
        None => QLinear::from_dense(&src.dense(name)?),
    }
}

struct Linear {
    weight: Weight,
    /// In the dtype of the matmul's output.
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads one or more weights (concatenated along the output dimension when several, so
    /// q/k/v or gate/up run as one matmul on the int8 and dense paths).
    fn load(src: &mut dyn WeightSource, names: &[String], with_bias: bool, role: MatmulRole) -> Result<Self> {
        let weight = if src.wants_int8() {
            // Each part keeps its own blocks, whatever format its neighbours have.
            let parts = names
                .iter()
                .map(|n| Ok(block_weight(src, &format!("{n}.weight"))?.for_this_cpu()))
                .collect::<Result<Vec<_>>>()?;
            let mut fused = FusedLinear::new(parts)?;
            fused.set_two_levels(src.precision().two_levels(role));
            Weight::Blocks(fused)
        } else {
            let mut parts =
                names.iter().map(|n| src.matmul(&format!("{n}.weight"), role)).collect::<Result<Vec<_>>>()?;
            match parts.len() {
                1 => Weight::Quantized(parts.remove(0)),
                _ => {
                    let dense = parts
                        .iter()
                        .map(|p| match p {
                            QMatMul::Tensor(t) => Ok(t.clone()),
                            _ => candle_core::bail!("fused projections need int8 blocks or dense weights"),
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Weight::Quantized(QMatMul::Tensor(Tensor::cat(&dense, 0)?))
                }
            }
        };
        let out_dtype = match &weight {
            Weight::Quantized(QMatMul::Tensor(t)) => t.dtype(),
            Weight::Quantized(QMatMul::TensorF16(_)) => DType::F16,
            _ => DType::F32,
        };
        let bias = if with_bias {
            let parts = names.iter().map(|n| src.dense(&format!("{n}.bias"))).collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?.to_dtype(out_dtype)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// The layout of each weight (one per fused part), e.g. `q4_k` or `int8 from q5_k`.
    fn formats(&self) -> Vec<String> {
        let one = |s: &str| vec![s.to_string()];
        match &self.weight {
            Weight::Quantized(QMatMul::QTensor(_)) => one("ggml-quantized"),
            Weight::Quantized(QMatMul::Tensor(t)) if t.dtype() == DType::F16 => one("f16"),
            Weight::Quantized(QMatMul::Tensor(t)) if t.dtype() == DType::BF16 => one("bf16"),
            Weight::Quantized(QMatMul::Tensor(t)) if t.dtype() == DType::F32 => one("f32"),
            Weight::Quantized(_) => one("dense"),
            Weight::Blocks(b) => b.parts().iter().map(QLinear::layout).collect(),
        }
    }

    /// Stored formats whose values the blocks do not carry exactly (re-blocked to int8).
    fn inexact(&self) -> Vec<&'static str> {
        match &self.weight {
            Weight::Blocks(b) => b
                .parts()
                .iter()
                .map(QLinear::origin)
                .filter(|o| !o.exact && o.format != "dense")
                .map(|o| o.format)
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Bytes the weight and its bias hold.
    fn bytes(&self) -> usize {
        let bias = self.bias.as_ref().map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes());
        bias + match &self.weight {
            Weight::Blocks(b) => b.bytes(),
            Weight::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Weight::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }

    /// `xs · Wᵀ (+ b)`: the input is brought to the dtype the weight multiplies (the weight's
    /// own when dense, f32 for blocks), the output comes in that dtype.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = match &self.weight {
            Weight::Quantized(w @ QMatMul::Tensor(t)) => w.forward(&xs.to_dtype(t.dtype())?)?,
            Weight::Quantized(w @ QMatMul::TensorF16(_)) => w.forward(xs)?,
            Weight::Quantized(w @ QMatMul::QTensor(_)) => w.forward(&xs.to_dtype(DType::F32)?)?,
            Weight::Blocks(w) => w.forward(&xs.to_dtype(DType::F32)?)?,
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// Projections that share an input: fused into one matmul for int8 blocks and dense weights,
/// separate for GGUF blocks.
enum Projections {
    Fused { linear: Linear, sizes: Vec<usize> },
    Separate(Vec<Linear>),
}

impl Projections {
    fn load(
        src: &mut dyn WeightSource,
        names: &[String],
        sizes: Vec<usize>,
        with_bias: bool,
        role: MatmulRole,
    ) -> Result<Self> {
        if src.wants_int8() || src.dense_matmuls() {
            Ok(Self::Fused { linear: Linear::load(src, names, with_bias, role)?, sizes })
        } else {
            let parts = names
                .iter()
                .map(|n| Linear::load(src, std::slice::from_ref(n), with_bias, role))
                .collect::<Result<Vec<_>>>()?;
            Ok(Self::Separate(parts))
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            Self::Fused { linear, sizes } => {
                let ys = linear.forward(xs)?;
                let mut off = 0;
                sizes
                    .iter()
                    .map(|&s| {
                        let part = ys.narrow(1, off, s);
                        off += s;
                        part
                    })
                    .collect()
            }
            Self::Separate(parts) => parts.iter().map(|l| l.forward(xs)).collect(),
        }
    }

    /// All outputs side by side in one `[t, Σ sizes]` tensor.
    fn forward_joint(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Fused { linear, .. } => linear.forward(xs),
            Self::Separate(parts) => {
                let ys = parts.iter().map(|l| l.forward(xs)).collect::<Result<Vec<_>>>()?;
                Tensor::cat(&ys, 1)
            }
        }
    }
}

struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(src: &mut dyn WeightSource, name: &str, eps: f64) -> Result<Self> {
        Ok(Self { weight: src.dense(name)?, eps: eps as f32 })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        candle_nn::ops::rms_norm(xs, &self.weight, self.eps)
    }
}

struct Mlp {
    gate_up: Projections,
    down: Linear,
    act: Activation,
}

impl Mlp {
    fn load(src: &mut dyn WeightSource, prefix: &str, cfg: &LlamaConfig) -> Result<Self> {
        let names = [format!("{prefix}.ffn_gate"), format!("{prefix}.ffn_up")];
        Ok(Self {
            gate_up: Projections::load(src, &names, vec![cfg.intermediate_size; 2], false, MatmulRole::Other)?,
            down: Linear::load(src, &[format!("{prefix}.ffn_down")], false, MatmulRole::Other)?,
            act: cfg.activation(),
        })
    }

    /// `host`: the host path, where the fused act(gate)·up runs as one CPU op.
    fn forward(&self, xs: &Tensor, host: bool) -> Result<Tensor> {
        if let Projections::Fused { sizes, .. } = &self.gate_up
            && host
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
        {
            // The block kernels return f32 for f32 input: one fused pass on the host.
            let gu = self.gate_up.forward_joint(xs)?;
            return self.down.forward(&GatedMul { inter: sizes[0], act: self.act }.forward(&gu.contiguous()?)?);
        }
        let gu = self.gate_up.forward(xs)?;
        let gate = match self.act {
            Activation::Silu => candle_nn::ops::silu(&gu[0])?,
            Activation::GeluTanh => gu[0].gelu()?,
        };
        self.down.forward(&(gate * &gu[1])?)
    }
}

/// Per-sequence key/value cache. On the host path, one `[n_kv_heads, capacity, head_dim]`
/// buffer pair per layer, grown by doubling; on the device path, a slot of the model's pool,
/// leased at the first pass and given back on drop. `len` tokens are valid either way.
pub struct KvCache {
    host: Vec<HostKv>,
    lease: Option<SlotLease>,
    len: usize,
    capacity: usize,
    max_len: usize,
}

impl KvCache {
    pub fn new(cfg: &LlamaConfig) -> Self {
        Self::with_limit(cfg, cfg.context_length)
    }

    /// A cache that never grows past `limit` tokens (the engine's reservation for a sequence),
    /// so memory stays within what was reserved.
    pub fn with_limit(cfg: &LlamaConfig, limit: usize) -> Self {
        Self {
            host: (0..cfg.n_layers).map(|_| HostKv::default()).collect(),
            lease: None,
            len: 0,
            capacity: 0,
            max_len: limit.min(cfg.context_length),
        }
    }

    /// Tokens already cached, which is also the position of the next token.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated token slots of the host buffers (for memory accounting).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn ensure_capacity(&mut self, needed: usize) {
        if needed > self.capacity {
            let mut cap = self.capacity.max(64);
            while cap < needed {
                cap *= 2;
            }
            self.capacity = cap.min(self.max_len.max(needed));
        }
    }

    fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// A row's steering: per residual layer (`n_layers + 1` entries), the `d_model` floats to add
/// or `None`. Each value gets a process-unique [`Self::id`], so the device path can keep a
/// batch's addends uploaded while the same rows keep the same steering.
#[derive(Debug, Clone)]
pub struct SteeringAddends {
    id: u64,
    layers: Vec<Option<Vec<f32>>>,
}

impl SteeringAddends {
    pub fn new(layers: Vec<Option<Vec<f32>>>) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        Self { id: NEXT.fetch_add(1, Ordering::Relaxed), layers }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn layers(&self) -> &[Option<Vec<f32>>] {
        &self.layers
    }

    /// Whether any layer is steered.
    pub fn is_active(&self) -> bool {
        self.layers.iter().any(Option::is_some)
    }
}

impl PartialEq for SteeringAddends {
    /// Equal values, whatever their identities.
    fn eq(&self, other: &Self) -> bool {
        self.layers == other.layers
    }
}

/// One row of a packed forward pass.
pub struct RowInput<'a> {
    /// New tokens for this row (a prefill chunk, or the last sampled token).
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Steering applied to every token of this row in this pass.
    pub steering: Option<&'a SteeringAddends>,
    /// Keep this row's hidden states at every residual layer.
    pub capture: bool,
    /// Compute logits for the row's last `logits` tokens (0: none; 1: the next-token logits of a
    /// generation; more: the per-position logits a scoring pass reads).
    pub logits: usize,
}

/// Everything one forward pass needs; rows are processed in order.
pub struct ForwardContext<'a> {
    pub rows: Vec<RowInput<'a>>,
}

/// Results of a packed forward pass.
pub struct ForwardOutput {
    /// `[sum of the rows' logits counts, vocab]` f32, where the model runs: each row's last
    /// tokens in position order, rows in order.
    pub logits: Option<Tensor>,
    /// For each row that asked for capture (in row order): `n_layers + 1` f32 tensors of
    /// shape `[n_tokens_of_row, d_model]`.
    pub captures: Vec<Vec<Tensor>>,
}

struct Attention {
    qkv: Projections,
    o: Linear,
    /// Gemma's per-head RMSNorm of queries and keys, before rotation.
    qk_norm: Option<QkNorm>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    /// Sliding window of a local layer.
    window: Option<usize>,
    /// Which of the model's rotary tables this layer uses.
    rope_table: usize,
}

/// Query and key norms over head_dim, as tensors (device path) and host copies.
struct QkNorm {
    q: RmsNorm,
    k: RmsNorm,
    q_host: Vec<f32>,
    k_host: Vec<f32>,
}

impl QkNorm {
    fn load(src: &mut dyn WeightSource, prefix: &str, eps: f64) -> Result<Self> {
        let q = RmsNorm::load(src, &format!("{prefix}.attn_q_norm.weight"), eps)?;
        let k = RmsNorm::load(src, &format!("{prefix}.attn_k_norm.weight"), eps)?;
        let (q_host, k_host) = (q.weight.to_vec1()?, k.weight.to_vec1()?);
        Ok(Self { q, k, q_host, k_host })
    }

    /// Normalises the query and key heads of packed q|k|v rows in place.
    fn apply_host(&self, h: &Heads, qkv: &mut [f32]) {
        let (hd, eps) = (h.head_dim, self.q.eps);
        for row in qkv.chunks_exact_mut(h.qkv_width()) {
            let (q, rest) = row.split_at_mut(h.n_heads * hd);
            let k = &mut rest[..h.n_kv_heads * hd];
            for (heads, w) in [(q, &self.q_host), (k, &self.k_host)] {
                for head in heads.chunks_exact_mut(hd) {
                    let r = inv_rms(head, eps);
                    head.iter_mut().zip(w.iter()).for_each(|(x, w)| *x *= r * w);
                }
            }
        }
    }
}

/// Row layout shared by all layers of one pass.
struct PackedRows {
    /// (offset into the packed tokens, number of tokens, first position).
    spans: Vec<(usize, usize, usize)>,
    /// Per-token rotary tables, `[n_tokens, head_dim / 2]`, one per rotary base: host copies
    /// (f32) on the host path, tensors in the compute dtype on the device path.
    rope: Vec<Rope>,
    /// The device path's batch layout.
    plan: Option<StepPlan>,
}

enum Rope {
    Host(Vec<f32>, Vec<f32>),
    Device(Tensor, Tensor),
}

impl Attention {
    fn load(src: &mut dyn WeightSource, idx: usize, cfg: &LlamaConfig) -> Result<Self> {
        let prefix = &format!("blk.{idx}");
        let names = [format!("{prefix}.attn_q"), format!("{prefix}.attn_k"), format!("{prefix}.attn_v")];
        let kv = cfg.n_kv_heads * cfg.head_dim;
        Ok(Self {
            qkv: Projections::load(
                src,
                &names,
                vec![cfg.n_heads * cfg.head_dim, kv, kv],
                cfg.qkv_bias,
                MatmulRole::Attention,
            )?,
            o: Linear::load(src, &[format!("{prefix}.attn_output")], false, MatmulRole::Other)?,
            qk_norm: match cfg.gemma3 {
                Some(_) => Some(QkNorm::load(src, prefix, cfg.rms_norm_eps)?),
                None => None,
            },
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            window: cfg.window(idx),
            rope_table: cfg.rope_table(idx),
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        layer: usize,
        packed: &PackedRows,
        rows: &mut [RowInput<'_>],
        interleaved: bool,
        pool: Option<&KvPool>,
    ) -> Result<Tensor> {
        match (&packed.rope[self.rope_table], &packed.plan, pool) {
            (Rope::Host(cos, sin), _, _) => self.forward_host(xs, layer, packed, rows, interleaved, cos, sin),
            (Rope::Device(cos, sin), Some(plan), Some(pool)) => {
                self.forward_device(xs, layer, plan, pool, interleaved, cos, sin)
            }
            _ => candle_core::bail!("the device path runs without its KV pool"),
        }
    }

    /// The device path: rotary embedding on the packed q/k, one scatter of the new keys and
    /// values into the pool, and the batch's attention in [`StepPlan::attend`].
    #[allow(clippy::too_many_arguments)]
    fn forward_device(
        &self,
        xs: &Tensor,
        layer: usize,
        plan: &StepPlan,
        pool: &KvPool,
        interleaved: bool,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Tensor> {
        let n = xs.dim(0)?;
        let (q_w, kv_w) = (self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim);
        let qkv = self.qkv.forward_joint(xs)?;
        let part = |off: usize, width: usize, heads: usize, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let x = qkv.narrow(1, off, width)?.reshape((n, heads, self.head_dim))?;
            let x = match norm {
                // In f32, like the residual stream's norms.
                Some(norm) => norm.forward(&x.to_dtype(DType::F32)?)?,
                None => x,
            };
            x.to_dtype(cos.dtype())
        };
        let (q_norm, k_norm) = (self.qk_norm.as_ref().map(|n| &n.q), self.qk_norm.as_ref().map(|n| &n.k));
        let q = batch_attention::rope(&part(0, q_w, self.n_heads, q_norm)?, cos, sin, interleaved)?;
        let k = batch_attention::rope(&part(q_w, kv_w, self.n_kv_heads, k_norm)?, cos, sin, interleaved)?;
        let v = part(q_w + kv_w, kv_w, self.n_kv_heads, None)?;
        pool.write(layer, &plan.write_index, &k, &v)?;
        let y = plan.attend(&self.device_heads(), pool, layer, &q, self.window.is_some())?;
        self.o.forward(&y)
    }

    fn device_heads(&self) -> batch_attention::Heads {
        batch_attention::Heads { n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: self.head_dim }
    }
}

impl Attention {
    fn heads_geometry(&self) -> Heads {
        Heads { n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: self.head_dim, window: self.window }
    }

    /// The CPU path: q|k|v come back to host memory once per layer; rotary embedding, cache
    /// append and attention run in [`attention`]'s loops.
    #[allow(clippy::too_many_arguments)]
    fn forward_host(
        &self,
        xs: &Tensor,
        layer: usize,
        packed: &PackedRows,
        rows: &mut [RowInput<'_>],
        interleaved: bool,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<Tensor> {
        let h = self.heads_geometry();
        let n_tokens = xs.dim(0)?;
        let mut qkv: Vec<f32> = self.qkv.forward_joint(xs)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if let Some(norm) = &self.qk_norm {
            norm.apply_host(&h, &mut qkv);
        }
        attention::rope(&h, &mut qkv, cos, sin, interleaved);
        for (row, &(off, t, start)) in rows.iter_mut().zip(&packed.spans) {
            let cache = &mut *row.cache;
            cache.ensure_capacity(start + t);
            let cap = cache.capacity;
            attention::append(&mut cache.host[layer], &h, &qkv, off, t, start, cap);
        }
        let spans: Vec<RowSpan<'_>> = rows
            .iter()
            .zip(&packed.spans)
            .map(|(row, &(off, t, start))| RowSpan { off, t, start, kv: &row.cache.host[layer] })
            .collect();
        let y = attention::attend(&h, &qkv, &spans, n_tokens);
        self.o.forward(&Tensor::from_vec(y, (n_tokens, self.n_heads * self.head_dim), xs.device())?)
    }
}

struct Block {
    attn_norm: RmsNorm,
    attn: Attention,
    ffn_norm: RmsNorm,
    mlp: Mlp,
    /// Gemma's norms of the attention and MLP outputs, before their residual adds.
    post_attn_norm: Option<RmsNorm>,
    post_ffn_norm: Option<RmsNorm>,
}

impl Block {
    fn load(src: &mut dyn WeightSource, idx: usize, cfg: &LlamaConfig) -> Result<Self> {
        let prefix = format!("blk.{idx}");
        let eps = cfg.rms_norm_eps;
        let mut post = |name: &str| -> Result<Option<RmsNorm>> {
            match cfg.gemma3 {
                Some(_) => Ok(Some(RmsNorm::load(src, &format!("{prefix}.{name}.weight"), eps)?)),
                None => Ok(None),
            }
        };
        let (post_attn_norm, post_ffn_norm) = (post("post_attention_norm")?, post("post_ffw_norm")?);
        Ok(Self {
            attn_norm: RmsNorm::load(src, &format!("{prefix}.attn_norm.weight"), eps)?,
            attn: Attention::load(src, idx, cfg)?,
            ffn_norm: RmsNorm::load(src, &format!("{prefix}.ffn_norm.weight"), eps)?,
            mlp: Mlp::load(src, &prefix, cfg)?,
            post_attn_norm,
            post_ffn_norm,
        })
    }

    /// A sublayer's output through its post-norm, if the block has one.
    fn post(norm: &Option<RmsNorm>, h: Tensor) -> Result<Tensor> {
        match norm {
            Some(n) => n.forward(&h.to_dtype(DType::F32)?),
            None => Ok(h),
        }
    }
}

/// A loaded llama-family model. Its weights are immutable after loading; all per-sequence state
/// lives in [`KvCache`]s owned by the caller (on the device path, as leases on the model's pool).
pub struct Llama {
    cfg: LlamaConfig,
    embed: TokenEmbedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    /// Rotary tables `[context, head_dim / 2]` per base ([`LlamaConfig::rope_thetas`]), f32
    /// and in the compute dtype.
    rope: Vec<(Tensor, Tensor)>,
    rope_compute: Vec<(Tensor, Tensor)>,
    device: Device,
    /// Element type of the device path's activations and KV cache.
    dtype: DType,
    /// Attention in host loops ([`attention`]) rather than the device path; on by default on
    /// the CPU in f32.
    host_attention: bool,
    state: Mutex<DeviceState>,
}

/// What the forward pass keeps between passes: the device path's KV pool, and the steering
/// addends of the last batch.
struct DeviceState {
    pool: KvPool,
    steering: SteeringCache,
}

impl Llama {
    pub fn load(src: &mut dyn WeightSource, cfg: LlamaConfig) -> Result<Self> {
        let device = src.device().clone();
        let dtype = src.compute_dtype();
        let tied = !src.contains("output.weight");
        let head = if tied { "token_embd" } else { "output" };
        let lm_head = Linear::load(src, &[head.to_string()], false, MatmulRole::Output)?;
        // A tied head in block form doubles as the embedding table.
        let embed = match &lm_head.weight {
            Weight::Blocks(_) if tied => TokenEmbedding::Head,
            _ => src.embedding("token_embd.weight")?.to_device(&device)?,
        };
        let blocks = (0..cfg.n_layers).map(|i| Block::load(src, i, &cfg)).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(src, "output_norm.weight", cfg.rms_norm_eps)?;
        let rope =
            cfg.rope_thetas().into_iter().map(|t| rope_tables_with(&cfg, t, &device)).collect::<Result<Vec<_>>>()?;
        let rope_compute =
            rope.iter().map(|(c, s)| Ok((c.to_dtype(dtype)?, s.to_dtype(dtype)?))).collect::<Result<Vec<_>>>()?;
        let host_attention = device.is_cpu() && dtype == DType::F32;
        let geo = KvGeometry {
            n_layers: cfg.n_layers,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
            max_capacity: cfg.context_length,
            dtype,
        };
        let state = Mutex::new(DeviceState { pool: KvPool::new(geo, &device), steering: SteeringCache::default() });
        Ok(Self { cfg, embed, blocks, norm, lm_head, rope, rope_compute, device, dtype, host_attention, state })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Every matmul weight of the model.
    fn linears(&self) -> Vec<&Linear> {
        let mut all = Vec::new();
        for b in &self.blocks {
            for p in [&b.attn.qkv, &b.mlp.gate_up] {
                match p {
                    Projections::Fused { linear, .. } => all.push(linear),
                    Projections::Separate(parts) => all.extend(parts),
                }
            }
            all.extend([&b.attn.o, &b.mlp.down]);
        }
        all.push(&self.lm_head);
        all
    }

    /// Matmul weight formats as loaded, e.g. `int4 x 60, int8 x 61` (a fused projection counts
    /// once per part).
    pub fn weight_formats(&self) -> String {
        let mut counts = std::collections::BTreeMap::new();
        for f in self.linears().iter().flat_map(|l| l.formats()) {
            *counts.entry(f).or_insert(0usize) += 1;
        }
        counts.iter().map(|(k, v)| format!("{k} x {v}")).collect::<Vec<_>>().join(", ")
    }

    /// Stored formats whose values were re-blocked to int8 instead of kept exactly, with how
    /// many weights each (empty when every quantized weight kept its values).
    pub fn inexact_formats(&self) -> String {
        let mut counts = std::collections::BTreeMap::new();
        for f in self.linears().iter().flat_map(|l| l.inexact()) {
            *counts.entry(f).or_insert(0usize) += 1;
        }
        counts.iter().map(|(k, v)| format!("{k} x {v}")).collect::<Vec<_>>().join(", ")
    }

    /// Bytes the weights hold where the model runs: matmul weights and biases, norms, and the
    /// token embedding table.
    pub fn weight_bytes(&self) -> usize {
        let tensor = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let norms: usize = self
            .blocks
            .iter()
            .flat_map(|b| {
                let qk = b.attn.qk_norm.as_ref().map(|n| [&n.q, &n.k]);
                [Some(&b.attn_norm), Some(&b.ffn_norm), b.post_attn_norm.as_ref(), b.post_ffn_norm.as_ref()]
                    .into_iter()
                    .flatten()
                    .chain(qk.into_iter().flatten())
            })
            .chain([&self.norm])
            .map(|n| tensor(&n.weight))
            .sum();
        self.linears().iter().map(|l| l.bytes()).sum::<usize>() + norms + self.embed.bytes()
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Element type of the device path (f32 on the host path).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Bytes of KV cache one token occupies across all layers: keys and values in f32 on the
    /// host path, in the compute dtype on the device path.
    pub fn kv_bytes_per_token(&self) -> usize {
        let c = &self.cfg;
        c.n_layers * 2 * c.n_kv_heads * c.head_dim * self.dtype.size_in_bytes()
    }

    /// Whether this model runs the device path (candle ops, pooled KV cache).
    pub fn on_device_path(&self) -> bool {
        !self.host_attention
    }

    /// Chooses the CPU implementation: host loops (default) or the device path, kept
    /// selectable on the CPU to test one against the other. Only honoured on the CPU in f32.
    /// Caches filled by one path cannot be continued by the other.
    pub fn set_host_attention(&mut self, on: bool) {
        self.host_attention = on && self.device.is_cpu() && self.dtype == DType::F32;
    }

    /// Replaces every MLP's gate activation. Only for comparing with implementations that
    /// differ from the architecture's definition: candle-transformers 0.11's quantized Gemma 3
    /// gates with SiLU where Gemma 3 uses tanh-GELU, and the logits test checks everything else
    /// against it this way.
    pub fn set_mlp_activation(&mut self, act: Activation) {
        self.blocks.iter_mut().for_each(|b| b.mlp.act = act);
    }

    /// Device memory held by the KV pool (0 on the host path).
    pub fn kv_pool_bytes(&self) -> usize {
        self.state().pool.bytes()
    }

    /// Uploads of steering addends so far (they are reused while a batch's steering holds).
    pub fn steering_uploads(&self) -> usize {
        self.state().steering.builds
    }

    fn state(&self) -> MutexGuard<'_, DeviceState> {
        // A pass that panicked leaves nothing half-written that a later pass reads: the pool's
        // tensors are replaced whole, and the steering cache is rebuilt on its next use.
        self.state.lock().unwrap_or_else(|poisoned| {
            let mut s = poisoned.into_inner();
            s.steering.clear();
            s
        })
    }

    /// Runs the new tokens of every row through the model, updating each row's cache.
    pub fn forward(&self, ctx: ForwardContext<'_>) -> Result<ForwardOutput> {
        let mut rows = ctx.rows;
        let mut state = self.state();
        let packed = self.pack(&mut rows, &mut state.pool)?;
        let ids: Vec<u32> = rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
        let mut xs = self.embed_tokens(&ids)?;
        let capturing = rows.iter().any(|r| r.capture);
        let mut layer_states = Vec::new();
        let steering: Vec<Option<&SteeringAddends>> = rows.iter().map(|r| r.steering).collect();
        let steered = steering.iter().any(Option::is_some);
        // Rows and tokens coincide unless a row carries several tokens; the index that spreads
        // per-row addends over tokens is only needed when something is steered.
        let token_rows = if steered { self.token_rows(&packed)? } else { None };
        if steered {
            state.steering.prepare(&steering, self.cfg.n_residual_rows(), self.cfg.hidden_size, &self.device)?;
        }
        let state = &*state;
        let steer = |xs: Tensor, layer: usize| -> Result<Tensor> {
            match state.steering.layer(layer).filter(|_| steered) {
                Some(per_row) => match &token_rows {
                    Some(idx) => xs + per_row.index_select(idx, 0)?,
                    None => xs + per_row,
                },
                None => Ok(xs),
            }
        };
        xs = steer(xs, 0)?;
        if capturing {
            layer_states.push(xs.clone());
        }
        let pool = packed.plan.as_ref().map(|_| &state.pool);
        for (i, block) in self.blocks.iter().enumerate() {
            let residual = &xs;
            let h = block.attn_norm.forward(&xs)?;
            let h = block.attn.forward(&h, i, &packed, &mut rows, self.cfg.rope_interleaved, pool)?;
            let h = Block::post(&block.post_attn_norm, h)?;
            let xs_mid = (h.to_dtype(DType::F32)? + residual)?;
            let h = block.mlp.forward(&block.ffn_norm.forward(&xs_mid)?, self.host_attention)?;
            let h = Block::post(&block.post_ffn_norm, h)?;
            xs = steer((h.to_dtype(DType::F32)? + xs_mid)?, i + 1)?;
            if capturing {
                layer_states.push(xs.clone());
            }
        }
        for (row, &(_, t, _)) in rows.iter_mut().zip(&packed.spans) {
            row.cache.advance(t);
        }

        let captures = rows
            .iter()
            .zip(&packed.spans)
            .filter(|(r, _)| r.capture)
            .map(|(_, &(off, t, _))| layer_states.iter().map(|s| s.narrow(0, off, t)).collect::<Result<Vec<_>>>())
            .collect::<Result<Vec<_>>>()?;

        let last: Vec<u32> = rows
            .iter()
            .zip(&packed.spans)
            .flat_map(|(r, &(off, t, _))| (off + t - r.logits.min(t)..off + t).map(|p| p as u32))
            .collect();
        let logits = if last.is_empty() {
            None
        } else {
            let idx = Tensor::from_vec(last.clone(), last.len(), &self.device)?;
            let h = self.norm.forward(&xs.index_select(&idx, 0)?)?;
            Some(self.lm_head.forward(&h)?.to_dtype(DType::F32)?)
        };
        Ok(ForwardOutput { logits, captures })
    }

    /// The embeddings of `ids`, `[n, d_model]` f32, scaled where the architecture scales them.
    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor> {
        let xs = match (self.embed.lookup(ids, &self.device)?, &self.lm_head.weight) {
            (Some(xs), _) => xs,
            (None, Weight::Blocks(head)) => {
                let mut rows = Vec::with_capacity(ids.len() * self.cfg.hidden_size);
                head.rows_into(ids, &mut rows)?;
                Tensor::from_vec(rows, (ids.len(), self.cfg.hidden_size), &self.device)?
            }
            (None, _) => candle_core::bail!("the embedding table is the output head's, which is not in blocks"),
        };
        match self.cfg.embedding_scale() {
            Some(scale) => xs * scale as f64,
            None => Ok(xs),
        }
    }

    /// The row of every packed token, for spreading per-row steering over the tokens; `None`
    /// when every row has one token (a decode step), where rows and tokens coincide.
    fn token_rows(&self, packed: &PackedRows) -> Result<Option<Tensor>> {
        if packed.spans.iter().all(|s| s.1 == 1) {
            return Ok(None);
        }
        let idx: Vec<u32> =
            packed.spans.iter().enumerate().flat_map(|(r, s)| std::iter::repeat_n(r as u32, s.1)).collect();
        let n = idx.len();
        Tensor::from_vec(idx, n, &self.device).map(Some)
    }

    /// Whether one row can run: the engine checks every row before a step, so a bad row fails
    /// alone instead of failing the forward pass of every row batched with it.
    pub fn check_row(&self, row: &RowInput<'_>) -> std::result::Result<(), String> {
        let t = row.tokens.len();
        if t == 0 {
            return Err("the row has no tokens".to_string());
        }
        if let Some(&bad) = row.tokens.iter().find(|&&id| id as usize >= self.cfg.vocab_size) {
            return Err(format!("token id {bad} is outside the vocabulary ({} tokens)", self.cfg.vocab_size));
        }
        let end = row.cache.len() + t;
        if end > self.cfg.context_length {
            return Err(format!("the row needs {end} positions, the context is {}", self.cfg.context_length));
        }
        if end > row.cache.max_len {
            return Err(format!("the row needs {end} positions, its cache reservation holds {}", row.cache.max_len));
        }
        if row.logits > t {
            return Err(format!("the row asks for logits at {} positions but carries {t} tokens", row.logits));
        }
        let device_cache = row.cache.lease.is_some();
        if !row.cache.is_empty() && device_cache == self.host_attention {
            return Err("the row's cache was filled by the other attention path".to_string());
        }
        if let Some(addends) = row.steering.map(SteeringAddends::layers) {
            if addends.len() > self.cfg.n_residual_rows() {
                return Err(format!(
                    "steering names {} residual layers, the model has {}",
                    addends.len(),
                    self.cfg.n_residual_rows()
                ));
            }
            if let Some((layer, v)) = addends
                .iter()
                .enumerate()
                .find_map(|(l, a)| a.as_ref().filter(|v| v.len() != self.cfg.hidden_size).map(|v| (l, v)))
            {
                return Err(format!(
                    "steering addend at layer {layer} has {} values, d_model is {}",
                    v.len(),
                    self.cfg.hidden_size
                ));
            }
        }
        Ok(())
    }

    /// Checks the rows, and on the device path leases pool slots for new caches and grows the
    /// pool to the pass's longest row, then lays the batch out once for every layer.
    fn pack(&self, rows: &mut [RowInput<'_>], pool: &mut KvPool) -> Result<PackedRows> {
        let mut spans = Vec::with_capacity(rows.len());
        let mut positions = Vec::new();
        let mut off = 0;
        for (i, row) in rows.iter().enumerate() {
            let t = row.tokens.len();
            let start = row.cache.len();
            self.check_row(row).map_err(|e| candle_core::Error::msg(format!("row {i}: {e}")))?;
            positions.extend((start..start + t).map(|p| p as u32));
            spans.push((off, t, start));
            off += t;
        }
        let pos = Tensor::from_vec(positions, off, &self.device)?;
        if self.host_attention {
            let rope = self
                .rope
                .iter()
                .map(|(cos, sin)| {
                    let host = |t: &Tensor| t.index_select(&pos, 0)?.flatten_all()?.to_vec1();
                    Ok(Rope::Host(host(cos)?, host(sin)?))
                })
                .collect::<Result<Vec<_>>>()?;
            return Ok(PackedRows { spans, rope, plan: None });
        }
        for (i, row) in rows.iter_mut().enumerate() {
            match &row.cache.lease {
                Some(lease) if !pool.owns(lease) => {
                    candle_core::bail!("row {i}: the row's cache belongs to another model")
                }
                Some(_) => {}
                None => row.cache.lease = Some(pool.acquire()?),
            }
        }
        pool.reserve(spans.iter().map(|&(_, t, start)| start + t).max().unwrap_or(0))?;
        let places: Vec<RowPlace> = rows
            .iter()
            .zip(&spans)
            .map(|(row, &(off, t, start))| RowPlace {
                off,
                t,
                start,
                slot: row.cache.lease.as_ref().map_or(0, SlotLease::slot),
            })
            .collect();
        let window = self.cfg.gemma3.as_ref().map(|g| g.sliding_window);
        let plan = StepPlan::new(&places, pool, &self.device, window)?;
        let rope = self
            .rope_compute
            .iter()
            .map(|(cos, sin)| Ok(Rope::Device(cos.index_select(&pos, 0)?, sin.index_select(&pos, 0)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(PackedRows { spans, rope, plan: Some(plan) })
    }
}

/// Rotary `cos` and `sin` tables `[context, head_dim / 2]` of the global base, f32.
pub(crate) fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    rope_tables_with(cfg, cfg.rope_theta, device)
}

/// Rotary tables of base `theta`.
fn rope_tables_with(cfg: &LlamaConfig, theta: f32, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq: Vec<f32> = (0..half).map(|i| 1f32 / theta.powf((2 * i) as f32 / cfg.head_dim as f32)).collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let t = Tensor::arange(0u32, cfg.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.context_length, 1))?;
    let freqs = t.matmul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steering_identities_are_unique_and_equality_is_by_value() {
        let a = SteeringAddends::new(vec![None, Some(vec![1.0])]);
        let b = SteeringAddends::new(vec![None, Some(vec![1.0])]);
        assert_ne!(a.id(), b.id());
        assert_eq!(a, b);
        assert_eq!(a.clone().id(), a.id(), "a clone is the same value");
        assert!(a.is_active());
        assert!(!SteeringAddends::new(vec![None, None]).is_active());
    }
}
