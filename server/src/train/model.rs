//! The training forward pass of a llama-family model: dense f32 weights, whole sequences with a
//! causal mask, every op differentiable, LoRA on the chosen projections, and the same residual
//! steering hook as inference (an addend per residual layer, on every token).
//!
//! The base weights are dequantized once from the model's files (the served model keeps its
//! block kernels); nothing here is shared with the inference path's state.

use super::block::{self, AttentionWeights, Geometry, HalfAdapter, MlpWeights};
use super::frozen::{frozen_linear, lora_linear};
use super::lora::{Adapter, Dims, Target};
use super::ops;
use crate::model::arch::llama::{LlamaConfig, WeightSource, rope_tables};
use candle_core::{DType, Device, Result, Tensor};

#[derive(Clone)]
struct Block {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// The frozen q, k and v weights stacked (`[q + k + v widths, d]`), as the fused attention
    /// reads them; the composite graph takes row ranges.
    qkv: Tensor,
    o: Tensor,
    /// Gate rows, then up rows: `[2 · intermediate, d]`.
    gate_up: Tensor,
    down: Tensor,
    /// q, k, v biases stacked (Qwen2).
    qkv_bias: Option<Tensor>,
}

impl Block {
    /// The frozen `[out, in]` weight of one projection.
    fn proj(&self, t: Target, cfg: &LlamaConfig) -> Result<Tensor> {
        let (qw, kvw, f) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim, cfg.intermediate_size);
        match t {
            Target::Q => self.qkv.narrow(0, 0, qw),
            Target::K => self.qkv.narrow(0, qw, kvw),
            Target::V => self.qkv.narrow(0, qw + kvw, kvw),
            Target::O => Ok(self.o.clone()),
            Target::Gate => self.gate_up.narrow(0, 0, f),
            Target::Up => self.gate_up.narrow(0, f, f),
            Target::Down => Ok(self.down.clone()),
        }
    }

    /// One of the q, k, v biases.
    fn bias(&self, i: usize, cfg: &LlamaConfig) -> Result<Option<Tensor>> {
        let (qw, kvw) = (cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim);
        let (start, len) = [(0, qw), (qw, kvw), (qw + kvw, kvw)][i];
        self.qkv_bias.as_ref().map(|b| b.narrow(0, start, len)).transpose()
    }
}

/// The attention targets, then the MLP's: each block half's adapted projections in the order
/// the fused halves lay out their parameters.
const ATTENTION: [Target; 4] = [Target::Q, Target::K, Target::V, Target::O];
const MLP: [Target; 3] = [Target::Gate, Target::Up, Target::Down];

/// A model prepared for training: frozen dense weights and rotary tables. Clones share the
/// weights.
#[derive(Clone)]
pub struct TrainModel {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    device: Device,
    /// Whether block halves run as the fused CPU ops ([`block`]) where they can.
    fused: bool,
}

/// A padded batch of token sequences and the positions whose next token is learned.
pub struct Batch {
    /// `[rows, len]` token ids.
    pub ids: Tensor,
    pub rows: usize,
    pub len: usize,
    /// Flat positions (`row * len + p`) whose next token is a target.
    pub positions: Tensor,
    /// The target tokens, one per position.
    pub targets: Tensor,
    pub n_targets: usize,
    /// Real (unpadded) tokens in the batch.
    pub n_tokens: usize,
}

impl Batch {
    /// Sequences to read, not learn: padded like [`Self::new`], with no targets.
    pub fn unlabelled(rows: &[&[u32]], pad: u32, device: &Device) -> Result<Self> {
        let len = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        if len == 0 || rows.iter().any(|r| r.is_empty()) {
            candle_core::bail!("every sequence needs at least one token");
        }
        let mut ids = Vec::with_capacity(rows.len() * len);
        for r in rows {
            ids.extend_from_slice(r);
            ids.extend(std::iter::repeat_n(pad, len - r.len()));
        }
        let none = Tensor::zeros(0, DType::U32, device)?;
        Ok(Self {
            ids: Tensor::from_vec(ids, (rows.len(), len), device)?,
            rows: rows.len(),
            len,
            positions: none.clone(),
            targets: none,
            n_targets: 0,
            n_tokens: rows.iter().map(|r| r.len()).sum(),
        })
    }

    /// Pads `rows` (tokens, first learned token index) to the longest; the loss covers
    /// every token from each row's first learned one on.
    pub fn new(rows: &[(&[u32], usize)], pad: u32, device: &Device) -> Result<Self> {
        let len = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
        if len < 2 {
            candle_core::bail!("a training batch needs sequences of at least two tokens");
        }
        let mut ids = Vec::with_capacity(rows.len() * len);
        let (mut positions, mut targets) = (Vec::new(), Vec::new());
        for (r, &(tokens, first)) in rows.iter().enumerate() {
            ids.extend_from_slice(tokens);
            ids.extend(std::iter::repeat_n(pad, len - tokens.len()));
            for (p, &token) in tokens.iter().enumerate().skip(first.max(1)) {
                positions.push((r * len + p - 1) as u32);
                targets.push(token);
            }
        }
        let n_targets = positions.len();
        if n_targets == 0 {
            candle_core::bail!("a training batch has no target tokens");
        }
        Ok(Self {
            ids: Tensor::from_vec(ids, (rows.len(), len), device)?,
            rows: rows.len(),
            len,
            positions: Tensor::from_vec(positions, n_targets, device)?,
            targets: Tensor::from_vec(targets, n_targets, device)?,
            n_targets,
            n_tokens: rows.iter().map(|r| r.0.len()).sum(),
        })
    }
}

/// Per residual layer (`n_layers + 1`: embeddings, then after each block), a `[d_model]` f32
/// addend or `None`.
pub type Steering = [Option<Tensor>];

impl TrainModel {
    /// Dequantizes every weight of `src` to f32 on `device`.
    pub fn load(src: &mut dyn WeightSource, cfg: LlamaConfig) -> Result<Self> {
        let device = src.device().clone();
        let embed = src.dense("token_embd.weight")?;
        let head = if src.contains("output.weight") { "output.weight" } else { "token_embd.weight" };
        let lm_head = if head == "token_embd.weight" { embed.clone() } else { src.dense(head)? };
        let blocks = (0..cfg.n_layers)
            .map(|i| {
                let p = format!("blk.{i}");
                let mut w = |t: Target, what: &str| src.dense(&format!("{p}.{}.{what}", t.gguf_name()));
                let mut stack = |ts: &[Target], what: &str| -> Result<Tensor> {
                    Tensor::cat(&ts.iter().map(|&t| w(t, what)).collect::<Result<Vec<_>>>()?, 0)
                };
                let qkv = stack(&[Target::Q, Target::K, Target::V], "weight")?;
                let qkv_bias =
                    if cfg.qkv_bias { Some(stack(&[Target::Q, Target::K, Target::V], "bias")?) } else { None };
                let gate_up = stack(&[Target::Gate, Target::Up], "weight")?;
                Ok(Block {
                    attn_norm: src.dense(&format!("{p}.attn_norm.weight"))?,
                    ffn_norm: src.dense(&format!("{p}.ffn_norm.weight"))?,
                    qkv,
                    o: src.dense(&format!("{p}.{}.weight", Target::O.gguf_name()))?,
                    gate_up,
                    down: src.dense(&format!("{p}.{}.weight", Target::Down.gguf_name()))?,
                    qkv_bias,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = src.dense("output_norm.weight")?;
        let (cos, sin) = rope_tables(&cfg, &device)?;
        Ok(Self { cos, sin, cfg, embed, blocks, norm, lm_head, device, fused: true })
    }

    /// Runs block halves as candle's composite graph even on the CPU (`false`), to compare the
    /// fused ops with it; they compute the same function.
    pub fn set_fused(&mut self, fused: bool) {
        self.fused = fused;
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dimensions an adapter for this model has.
    pub fn dims(&self) -> Dims {
        super::peft::dims_of(&self.cfg)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        ops::rms_norm(x, w, self.cfg.rms_norm_eps)
    }

    fn linear(&self, x: &Tensor, block: usize, t: Target, adapter: Option<&Adapter>, train: bool) -> Result<Tensor> {
        let w = &self.blocks[block].proj(t, &self.cfg)?;
        match adapter.and_then(|ad| ad.layer(block, t).map(|l| (ad, l))) {
            // Dropout gives the adapter its own input: the composite path.
            Some((ad, l)) if train && ad.config.dropout > 0.0 => {
                frozen_linear(x, w)? + l.forward(x, ad.config.scale(), ad.config.dropout, train)?
            }
            Some((ad, l)) => lora_linear(x, w, l.a.as_tensor(), l.b.as_tensor(), ad.config.scale()),
            None => frozen_linear(x, w),
        }
    }

    fn attention(
        &self,
        h: &Tensor,
        block: usize,
        b: usize,
        t: usize,
        ad: Option<&Adapter>,
        train: bool,
    ) -> Result<Tensor> {
        let c = &self.cfg;
        let (nh, nkv, hd) = (c.n_heads, c.n_kv_heads, c.head_dim);
        let proj = |target: Target, heads: usize, i: usize| -> Result<Tensor> {
            let mut y = self.linear(h, block, target, ad, train)?;
            if let Some(bias) = self.blocks[block].bias(i, c)? {
                y = y.broadcast_add(&bias)?;
            }
            y.reshape((b, t, heads, hd))?.transpose(1, 2)?.contiguous()
        };
        let rope = |x: Tensor| ops::rope(&x, &self.cos, &self.sin, c.rope_interleaved);
        let q = rope(proj(Target::Q, nh, 0)?)?;
        let k = rope(proj(Target::K, nkv, 1)?)?;
        let v = proj(Target::V, nkv, 2)?;
        // Grouped-query attention without repeating keys and values: the query heads sharing
        // a key head are stacked along the rows (`[b, kv, group · t, hd]`, a free reshape of
        // `[b, heads, t, hd]` since heads are kv-major), each row at position `row mod t`.
        let q = q.reshape((b, nkv, (nh / nkv) * t, hd))?;
        let probs = ops::causal_softmax(&q.matmul(&k.t()?)?, 1.0 / (hd as f64).sqrt())?;
        let y = probs.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b * t, nh * hd))?;
        self.linear(&y, block, Target::O, ad, train)
    }

    /// The residual stream after the last block, `[rows * len, d_model]`, and, when `keep` is
    /// given, the stream at those residual layers (same shape each).
    pub fn residual(
        &self,
        batch: &Batch,
        adapter: Option<&Adapter>,
        steering: &Steering,
        train: bool,
        keep: &[usize],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let (b, t) = (batch.rows, batch.len);
        if t > self.cfg.context_length {
            candle_core::bail!("sequences of {t} tokens exceed the context of {}", self.cfg.context_length);
        }
        if steering.len() > self.cfg.n_residual_rows() {
            candle_core::bail!(
                "steering names {} residual layers, the model has {}",
                steering.len(),
                self.cfg.n_residual_rows()
            );
        }
        let steer = |x: Tensor, layer: usize| -> Result<Tensor> {
            match steering.get(layer).and_then(Option::as_ref) {
                Some(v) => x.broadcast_add(v),
                None => Ok(x),
            }
        };
        let mut kept = Vec::new();
        let mut x = steer(self.embed.index_select(&batch.ids.flatten_all()?, 0)?, 0)?;
        if keep.contains(&0) {
            kept.push(x.clone());
        }
        // Dropout gives each adapter its own input, which only the composite graph does.
        let dropout = train && adapter.is_some_and(|a| a.config.dropout > 0.0);
        let fused = self.fused && !dropout && block::available(&x);
        let geometry = Geometry { b, t, d: self.cfg.hidden_size, eps: self.cfg.rms_norm_eps as f32 };
        for (i, blk) in self.blocks.iter().enumerate() {
            if fused {
                let ad = |targets: &[Target]| adapter.map(|a| half_adapter(a, i, targets)).transpose();
                let w = AttentionWeights {
                    norm: &blk.attn_norm,
                    qkv: &blk.qkv,
                    qkv_bias: blk.qkv_bias.as_ref(),
                    o: &blk.o,
                    cos: &self.cos,
                    sin: &self.sin,
                    n_heads: self.cfg.n_heads,
                    n_kv_heads: self.cfg.n_kv_heads,
                    head_dim: self.cfg.head_dim,
                    rope_interleaved: self.cfg.rope_interleaved,
                };
                x = block::attention(&x, geometry, &w, ad(&ATTENTION)?.flatten().as_ref())?;
                let w = MlpWeights {
                    norm: &blk.ffn_norm,
                    gate_up: &blk.gate_up,
                    down: &blk.down,
                    intermediate: self.cfg.intermediate_size,
                };
                x = steer(block::mlp(&x, geometry, &w, ad(&MLP)?.flatten().as_ref())?, i + 1)?;
            } else {
                let h = self.rms_norm(&x, &blk.attn_norm)?;
                x = (x + self.attention(&h, i, b, t, adapter, train)?)?;
                let h = self.rms_norm(&x, &blk.ffn_norm)?;
                let gate = self.linear(&h, i, Target::Gate, adapter, train)?;
                let up = self.linear(&h, i, Target::Up, adapter, train)?;
                let act = ops::silu_mul(&gate, &up)?;
                x = steer((&x + self.linear(&act, i, Target::Down, adapter, train)?)?, i + 1)?;
            }
            if keep.contains(&(i + 1)) {
                kept.push(x.clone());
            }
        }
        Ok((x, kept))
    }

    /// Logits `[n, vocab]` at flat positions of a final residual stream.
    pub fn logits_at(&self, residual: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let h = self.rms_norm(&residual.index_select(positions, 0)?, &self.norm)?;
        frozen_linear(&h, &self.lm_head)
    }

    /// Mean cross-entropy of the batch's targets (nats per token).
    pub fn loss(&self, batch: &Batch, adapter: Option<&Adapter>, steering: &Steering, train: bool) -> Result<Tensor> {
        let (x, _) = self.residual(batch, adapter, steering, train, &[])?;
        let logits = self.logits_at(&x, &batch.positions)?;
        ops::cross_entropy(&logits, &batch.targets)
    }
}

/// One block half's adapted projections among `targets`, their `A` and `B` flattened and
/// concatenated in that order (autograd splits the gradients back), or `None` when none is.
fn half_adapter(adapter: &Adapter, block: usize, targets: &[Target]) -> Result<Option<HalfAdapter>> {
    let present: Vec<_> = targets.iter().filter_map(|&t| adapter.layer(block, t).map(|l| (t, l))).collect();
    if present.is_empty() {
        return Ok(None);
    }
    let flat = |f: &dyn Fn(&super::lora::LoraLayer) -> Tensor| -> Result<Tensor> {
        Tensor::cat(&present.iter().map(|(_, l)| f(l).flatten_all()).collect::<Result<Vec<_>>>()?, 0)
    };
    Ok(Some(HalfAdapter {
        targets: present.iter().map(|(t, _)| *t).collect(),
        a: flat(&|l| l.a.as_tensor().clone())?,
        b: flat(&|l| l.b.as_tensor().clone())?,
        rank: adapter.config.rank,
        scale: adapter.config.scale(),
    }))
}
