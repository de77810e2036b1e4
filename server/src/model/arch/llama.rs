//! Llama-family decoder: Llama 2/3, SmolLM/SmolLM2, Mistral, and Qwen2 (q/k/v bias).
//!
//! Pre-norm transformer blocks (RMSNorm → grouped-query attention with rotary embeddings →
//! residual; RMSNorm → SwiGLU MLP → residual). Weights come from a [`WeightSource`] that speaks
//! GGUF tensor names, so GGUF and safetensors checkpoints share one loader.
//!
//! The forward pass works on a *packed* batch: the new tokens of every row are concatenated into
//! one `[n_tokens, d_model]` matrix, so prefill chunks and single decode tokens of different
//! sequences run through the projections and MLPs together, with no padding. Attention runs per
//! row against that row's own [`KvCache`]. Two hooks act on the residual stream, row by row:
//! steering (add a vector after block L) and capture (keep the hidden state after every block).

use super::super::cpu::QLinear;
use super::super::cpu::attention::{self, Heads, HostKv, RowSpan};
use super::super::cpu::elementwise::SiluMul;
use super::super::weights::{MatmulRole, Precision};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor};
use std::collections::HashMap;

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
}

impl LlamaConfig {
    /// Residual rows a persona vector has for this model: the embeddings plus one per block.
    pub fn n_residual_rows(&self) -> usize {
        self.n_layers + 1
    }

    /// Bytes of KV cache one token occupies across all layers (f32 keys and values).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.n_layers * 2 * self.n_kv_heads * self.head_dim * std::mem::size_of::<f32>()
    }
}

/// Named weights in GGUF naming (`blk.N.attn_q.weight`, `token_embd.weight`, …).
pub trait WeightSource {
    /// A weight used as `x · Wᵀ`, quantized or dense, in the source's own format.
    fn matmul(&mut self, name: &str) -> Result<QMatMul>;
    /// Whether matmul weights should be converted to the batched block-quantized CPU kernel.
    fn wants_int8(&self) -> bool {
        false
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
    fn contains(&self, name: &str) -> bool;
    fn device(&self) -> &Device;
}

enum Weight {
    Quantized(QMatMul),
    Blocks(QLinear),
}

/// One weight in the block-quantized CPU format: Q4_0/Q4_1 blocks are kept bit for bit,
/// anything else becomes int8 blocks.
fn block_weight(src: &mut dyn WeightSource, name: &str) -> Result<QLinear> {
    if let Some(qt) = src.raw(name)?
        && let Some(l) = QLinear::from_q4(&qt)?
    {
        return Ok(l);
    }
    QLinear::from_dense(&src.dense(name)?)
}

struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads one or more weights (concatenated along the output dimension when several, so
    /// q/k/v or gate/up run as one matmul on the int8 path).
    fn load(src: &mut dyn WeightSource, names: &[String], with_bias: bool, role: MatmulRole) -> Result<Self> {
        let weight = if src.wants_int8() {
            let parts = names.iter().map(|n| block_weight(src, &format!("{n}.weight"))).collect::<Result<Vec<_>>>()?;
            let fused = if parts.len() > 1 && parts.iter().any(|p| p.is_int4() != parts[0].is_int4()) {
                // Mixed formats: bring every part to int8 so they can share one matmul.
                let dense = names.iter().map(|n| src.dense(&format!("{n}.weight"))).collect::<Result<Vec<_>>>()?;
                QLinear::from_dense(&Tensor::cat(&dense, 0)?)?
            } else {
                QLinear::concat(parts)?
            };
            let mut fused = fused.for_this_cpu();
            fused.set_two_levels(src.precision().two_levels(role));
            Weight::Blocks(fused)
        } else {
            match names {
                [one] => Weight::Quantized(src.matmul(&format!("{one}.weight"))?),
                _ => candle_core::bail!("fused projections need the int8 path"),
            }
        };
        let bias = if with_bias {
            let parts = names.iter().map(|n| src.dense(&format!("{n}.bias"))).collect::<Result<Vec<_>>>()?;
            Some(Tensor::cat(&parts, 0)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    fn format(&self) -> &'static str {
        match &self.weight {
            Weight::Quantized(QMatMul::QTensor(_)) => "ggml-quantized",
            Weight::Quantized(_) => "dense",
            Weight::Blocks(b) if b.is_int4() => "int4",
            Weight::Blocks(_) => "int8",
        }
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let ys = match &self.weight {
            Weight::Quantized(w) => w.forward(xs)?,
            Weight::Blocks(w) => w.forward(xs)?,
        };
        match &self.bias {
            Some(b) => ys.broadcast_add(b),
            None => Ok(ys),
        }
    }
}

/// Projections that share an input: fused into one matmul on the int8 path, separate otherwise.
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
        if src.wants_int8() {
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
}

impl Mlp {
    fn load(src: &mut dyn WeightSource, prefix: &str, cfg: &LlamaConfig) -> Result<Self> {
        let names = [format!("{prefix}.ffn_gate"), format!("{prefix}.ffn_up")];
        Ok(Self {
            gate_up: Projections::load(src, &names, vec![cfg.intermediate_size; 2], false, MatmulRole::Other)?,
            down: Linear::load(src, &[format!("{prefix}.ffn_down")], false, MatmulRole::Other)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Projections::Fused { sizes, .. } = &self.gate_up
            && xs.device().is_cpu()
            && xs.dtype() == DType::F32
        {
            // The block kernels return f32 for f32 input: one fused pass on the host.
            let gu = self.gate_up.forward_joint(xs)?;
            return self.down.forward(&SiluMul { inter: sizes[0] }.forward(&gu.contiguous()?)?);
        }
        let gu = self.gate_up.forward(xs)?;
        let gate = candle_nn::ops::silu(&gu[0])?;
        self.down.forward(&(gate * &gu[1])?)
    }
}

/// Per-sequence key/value cache: one `[n_kv_heads, capacity, head_dim]` buffer pair per layer,
/// grown by doubling. `len` tokens are valid. CPU models keep plain host buffers (`host`),
/// device models tensors (`layers`).
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    host: Vec<HostKv>,
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
            layers: (0..cfg.n_layers).map(|_| None).collect(),
            host: (0..cfg.n_layers).map(|_| HostKv::default()).collect(),
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

    /// Allocated token slots (for memory accounting).
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

    /// Writes `k`, `v` (`[n_kv, t, hd]`) at the current length of `layer` and returns views of
    /// all cached keys and values including them.
    fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n_kv, t, hd) = k.dims3()?;
        let end = self.len + t;
        self.ensure_capacity(end);
        let cap = self.capacity;
        let slot = &mut self.layers[layer];
        let stale = match slot {
            Some((kc, _)) => kc.dim(1)? < cap,
            None => true,
        };
        if stale {
            let kn = Tensor::zeros((n_kv, cap, hd), k.dtype(), k.device())?;
            let vn = Tensor::zeros((n_kv, cap, hd), v.dtype(), v.device())?;
            if let Some((ko, vo)) = slot.take()
                && self.len > 0
            {
                kn.slice_set(&ko.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                vn.slice_set(&vo.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
            }
            *slot = Some((kn, vn));
        }
        let (kc, vc) = slot.as_ref().expect("cache slot initialised above");
        kc.slice_set(k, 1, self.len)?;
        vc.slice_set(v, 1, self.len)?;
        Ok((kc.narrow(1, 0, end)?, vc.narrow(1, 0, end)?))
    }

    fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// One row of a packed forward pass.
pub struct RowInput<'a> {
    /// New tokens for this row (a prefill chunk, or the last sampled token).
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
    /// Steering addend per residual layer (`n_layers + 1` entries, each `d_model` floats or
    /// `None`); applied to every token of this row in this pass.
    pub steering: Option<&'a [Option<Vec<f32>>]>,
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
    /// `[sum of the rows' logits counts, vocab]`: each row's last tokens in position order, rows
    /// in order.
    pub logits: Option<Tensor>,
    /// For each row that asked for capture (in row order): `n_layers + 1` tensors of
    /// shape `[n_tokens_of_row, d_model]`.
    pub captures: Vec<Vec<Tensor>>,
}

struct Attention {
    qkv: Projections,
    o: Linear,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// Row layout shared by all layers of one pass.
struct PackedRows {
    /// (offset into the packed tokens, number of tokens, first position).
    spans: Vec<(usize, usize, usize)>,
    cos: Tensor,
    sin: Tensor,
    /// Causal masks for rows with more than one new token, keyed by row index.
    masks: HashMap<usize, Tensor>,
    /// Host copies of `cos`/`sin` (`[n_tokens, head_dim / 2]`) for the CPU attention path.
    host_rope: Option<(Vec<f32>, Vec<f32>)>,
}

impl Attention {
    fn load(src: &mut dyn WeightSource, prefix: &str, cfg: &LlamaConfig) -> Result<Self> {
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
            n_heads: cfg.n_heads,
            n_kv_heads: cfg.n_kv_heads,
            head_dim: cfg.head_dim,
        })
    }

    fn heads(&self, xs: &Tensor, n: usize) -> Result<Tensor> {
        let t = xs.dim(0)?;
        xs.reshape((1, t, n, self.head_dim))?.transpose(1, 2)?.contiguous()
    }

    fn forward(
        &self,
        xs: &Tensor,
        layer: usize,
        packed: &PackedRows,
        rows: &mut [RowInput<'_>],
        interleaved: bool,
    ) -> Result<Tensor> {
        if let Some((cos, sin)) = &packed.host_rope {
            return self.forward_host(xs, layer, packed, rows, interleaved, cos, sin);
        }
        let rope = |x: &Tensor| {
            if interleaved {
                candle_nn::rotary_emb::rope_i(x, &packed.cos, &packed.sin)
            } else {
                candle_nn::rotary_emb::rope(x, &packed.cos, &packed.sin)
            }
        };
        let qkv = self.qkv.forward(xs)?;
        let q = rope(&self.heads(&qkv[0], self.n_heads)?)?;
        let k = rope(&self.heads(&qkv[1], self.n_kv_heads)?)?;
        let v = self.heads(&qkv[2], self.n_kv_heads)?;
        let group = self.n_heads / self.n_kv_heads;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let mut outs = Vec::with_capacity(rows.len());
        for (i, (row, &(off, t, _))) in rows.iter_mut().zip(&packed.spans).enumerate() {
            let k_new = k.narrow(2, off, t)?.squeeze(0)?.contiguous()?;
            let v_new = v.narrow(2, off, t)?.squeeze(0)?.contiguous()?;
            let (k_all, v_all) = row.cache.append(layer, &k_new, &v_new)?;
            // Query heads sharing a kv head are adjacent: fold them into the row dimension so
            // one batched matmul per kv head serves the whole group.
            let q_row = q.narrow(2, off, t)?.contiguous()?.reshape((self.n_kv_heads, group * t, self.head_dim))?;
            let att = (q_row.matmul(&k_all.t()?)? * scale)?;
            let att = match packed.masks.get(&i) {
                Some(mask) => {
                    let kv_len = k_all.dim(1)?;
                    att.reshape((self.n_kv_heads, group, t, kv_len))?.broadcast_add(mask)?.reshape((
                        self.n_kv_heads,
                        group * t,
                        kv_len,
                    ))?
                }
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let y = att.matmul(&v_all)?; // [n_kv, group * t, hd]
            let y = y
                .reshape((self.n_heads, t, self.head_dim))?
                .transpose(0, 1)?
                .reshape((t, self.n_heads * self.head_dim))?;
            outs.push(y);
        }
        let y = if outs.len() == 1 { outs.pop().expect("one row") } else { Tensor::cat(&outs, 0)? };
        self.o.forward(&y)
    }
}

impl Attention {
    fn heads_geometry(&self) -> Heads {
        Heads { n_heads: self.n_heads, n_kv_heads: self.n_kv_heads, head_dim: self.head_dim }
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
        let mut qkv: Vec<f32> = self.qkv.forward_joint(xs)?.flatten_all()?.to_vec1()?;
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
}

impl Block {
    fn load(src: &mut dyn WeightSource, idx: usize, cfg: &LlamaConfig) -> Result<Self> {
        let prefix = format!("blk.{idx}");
        Ok(Self {
            attn_norm: RmsNorm::load(src, &format!("{prefix}.attn_norm.weight"), cfg.rms_norm_eps)?,
            attn: Attention::load(src, &prefix, cfg)?,
            ffn_norm: RmsNorm::load(src, &format!("{prefix}.ffn_norm.weight"), cfg.rms_norm_eps)?,
            mlp: Mlp::load(src, &prefix, cfg)?,
        })
    }
}

/// A loaded llama-family model. Immutable after loading; all per-sequence state lives in
/// [`KvCache`]s owned by the caller.
pub struct Llama {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Attention in host loops ([`attention`]) rather than tensor ops; on by default on CPU.
    host_attention: bool,
}

impl Llama {
    pub fn load(src: &mut dyn WeightSource, cfg: LlamaConfig) -> Result<Self> {
        let device = src.device().clone();
        let embed = src.dense("token_embd.weight")?;
        let head = if src.contains("output.weight") { "output" } else { "token_embd" };
        let lm_head = Linear::load(src, &[head.to_string()], false, MatmulRole::Output)?;
        let blocks = (0..cfg.n_layers).map(|i| Block::load(src, i, &cfg)).collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(src, "output_norm.weight", cfg.rms_norm_eps)?;
        let (cos, sin) = rope_tables(&cfg, &device)?;
        let host_attention = device.is_cpu();
        Ok(Self { cfg, embed, blocks, norm, lm_head, cos, sin, device, host_attention })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Matmul weight formats as loaded, e.g. `int4 x 120, int8 x 1`.
    pub fn weight_formats(&self) -> String {
        let mut counts = std::collections::BTreeMap::new();
        let mut note = |l: &Linear| *counts.entry(l.format()).or_insert(0usize) += 1;
        for b in &self.blocks {
            for p in [&b.attn.qkv, &b.mlp.gate_up] {
                match p {
                    Projections::Fused { linear, .. } => note(linear),
                    Projections::Separate(parts) => parts.iter().for_each(&mut note),
                }
            }
            note(&b.attn.o);
            note(&b.mlp.down);
        }
        note(&self.lm_head);
        counts.iter().map(|(k, v)| format!("{k} x {v}")).collect::<Vec<_>>().join(", ")
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Chooses the CPU attention implementation: host loops (default) or tensor ops (the
    /// device path, kept selectable on CPU to test one against the other). Only honoured on
    /// the CPU. Caches filled by one path cannot be continued by the other.
    pub fn set_host_attention(&mut self, on: bool) {
        self.host_attention = on && self.device.is_cpu();
    }

    /// Runs the new tokens of every row through the model, updating each row's cache.
    pub fn forward(&self, ctx: ForwardContext<'_>) -> Result<ForwardOutput> {
        let mut rows = ctx.rows;
        let packed = self.pack(&rows)?;
        let n_tokens: usize = packed.spans.iter().map(|s| s.1).sum();
        let ids: Vec<u32> = rows.iter().flat_map(|r| r.tokens.iter().copied()).collect();
        let ids = Tensor::from_vec(ids, n_tokens, &self.device)?;
        let mut xs = self.embed.index_select(&ids, 0)?;
        let capturing = rows.iter().any(|r| r.capture);
        let mut layer_states = Vec::new();
        xs = self.steer(xs, 0, &rows, &packed)?;
        if capturing {
            layer_states.push(xs.clone());
        }
        for (i, block) in self.blocks.iter().enumerate() {
            let residual = &xs;
            let h = block.attn_norm.forward(&xs)?;
            let h = block.attn.forward(&h, i, &packed, &mut rows, self.cfg.rope_interleaved)?;
            let xs_mid = (h + residual)?;
            let h = block.mlp.forward(&block.ffn_norm.forward(&xs_mid)?)?;
            xs = self.steer((h + xs_mid)?, i + 1, &rows, &packed)?;
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
        if let Some(addends) = row.steering {
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

    fn pack(&self, rows: &[RowInput<'_>]) -> Result<PackedRows> {
        let mut spans = Vec::with_capacity(rows.len());
        let mut positions = Vec::new();
        let mut masks = HashMap::new();
        let mut off = 0;
        for (i, row) in rows.iter().enumerate() {
            let t = row.tokens.len();
            let start = row.cache.len();
            self.check_row(row).map_err(|e| candle_core::Error::msg(format!("row {i}: {e}")))?;
            positions.extend((start..start + t).map(|p| p as u32));
            if t > 1 && !self.host_attention {
                masks.insert(i, causal_mask(t, start, &self.device)?);
            }
            spans.push((off, t, start));
            off += t;
        }
        let pos = Tensor::from_vec(positions, off, &self.device)?;
        let cos = self.cos.index_select(&pos, 0)?;
        let sin = self.sin.index_select(&pos, 0)?;
        let host_rope = if self.host_attention {
            Some((cos.flatten_all()?.to_vec1()?, sin.flatten_all()?.to_vec1()?))
        } else {
            None
        };
        Ok(PackedRows { spans, cos, sin, masks, host_rope })
    }

    /// Adds each row's steering addend for residual layer `layer` to its tokens.
    fn steer(&self, xs: Tensor, layer: usize, rows: &[RowInput<'_>], packed: &PackedRows) -> Result<Tensor> {
        let active = rows.iter().any(|r| r.steering.and_then(|s| s.get(layer)).is_some_and(|a| a.is_some()));
        if !active {
            return Ok(xs);
        }
        let d = self.cfg.hidden_size;
        let n_tokens = xs.dim(0)?;
        let mut addend = vec![0f32; n_tokens * d];
        for (row, &(off, t, _)) in rows.iter().zip(&packed.spans) {
            if let Some(Some(v)) = row.steering.and_then(|s| s.get(layer)) {
                for tok in 0..t {
                    let dst = &mut addend[(off + tok) * d..(off + tok + 1) * d];
                    dst.iter_mut().zip(v).for_each(|(a, b)| *a += *b);
                }
            }
        }
        let addend = Tensor::from_vec(addend, (n_tokens, d), &self.device)?.to_dtype(xs.dtype())?;
        xs + addend
    }
}

fn rope_tables(cfg: &LlamaConfig, device: &Device) -> Result<(Tensor, Tensor)> {
    let half = cfg.head_dim / 2;
    let inv_freq: Vec<f32> =
        (0..half).map(|i| 1f32 / cfg.rope_theta.powf((2 * i) as f32 / cfg.head_dim as f32)).collect();
    let inv_freq = Tensor::from_vec(inv_freq, (1, half), device)?;
    let t = Tensor::arange(0u32, cfg.context_length as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((cfg.context_length, 1))?;
    let freqs = t.matmul(&inv_freq)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Additive mask `[t, start + t]`: token j of the chunk sees cached positions and itself.
fn causal_mask(t: usize, start: usize, device: &Device) -> Result<Tensor> {
    let kv = start + t;
    let mask: Vec<f32> =
        (0..t).flat_map(|j| (0..kv).map(move |p| if p > start + j { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(mask, (t, kv), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_sees_prefix_and_itself() -> Result<()> {
        let m = causal_mask(2, 3, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[0][..4], [0.0, 0.0, 0.0, 0.0]);
        assert!(m[0][4].is_infinite());
        assert!(m[1].iter().all(|v| *v == 0.0));
        Ok(())
    }
}
