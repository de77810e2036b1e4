//! The training forward pass of a llama-family model: dense f32 weights, whole sequences with a
//! causal mask, every op differentiable, LoRA on the chosen projections, and the same residual
//! steering hook as inference (an addend per residual layer, on every token).
//!
//! The base weights are dequantized once from the model's files (the served model keeps its
//! block kernels); nothing here is shared with the inference path's state.

use super::frozen::{frozen_linear, lora_linear};
use super::lora::{Adapter, Dims, Target};
use super::ops;
use crate::model::arch::llama::{LlamaConfig, WeightSource, rope_tables};
use candle_core::{DType, Device, Result, Tensor};

struct Block {
    attn_norm: Tensor,
    ffn_norm: Tensor,
    /// Frozen `[out, in]` weights in [`Target`] order.
    proj: [Tensor; 7],
    /// q, k, v biases (Qwen2).
    qkv_bias: Option<[Tensor; 3]>,
}

/// A model prepared for training: frozen dense weights and rotary tables.
pub struct TrainModel {
    cfg: LlamaConfig,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
    device: Device,
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
                let proj = Target::ALL.map(|t| src.dense(&format!("{p}.{}.weight", t.gguf_name())));
                let [q, k, v, o, g, u, d] = proj;
                let qkv_bias = if cfg.qkv_bias {
                    let mut b = |t: Target| src.dense(&format!("{p}.{}.bias", t.gguf_name()));
                    Some([b(Target::Q)?, b(Target::K)?, b(Target::V)?])
                } else {
                    None
                };
                Ok(Block {
                    attn_norm: src.dense(&format!("{p}.attn_norm.weight"))?,
                    ffn_norm: src.dense(&format!("{p}.ffn_norm.weight"))?,
                    proj: [q?, k?, v?, o?, g?, u?, d?],
                    qkv_bias,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = src.dense("output_norm.weight")?;
        let (cos, sin) = rope_tables(&cfg, &device)?;
        Ok(Self { cos, sin, cfg, embed, blocks, norm, lm_head, device })
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
        let w = &self.blocks[block].proj[t.index()];
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
        let bias = self.blocks[block].qkv_bias.as_ref();
        let proj = |target: Target, heads: usize, i: usize| -> Result<Tensor> {
            let mut y = self.linear(h, block, target, ad, train)?;
            if let Some(bs) = bias {
                y = y.broadcast_add(&bs[i])?;
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
        for (i, blk) in self.blocks.iter().enumerate() {
            let h = self.rms_norm(&x, &blk.attn_norm)?;
            x = (x + self.attention(&h, i, b, t, adapter, train)?)?;
            let h = self.rms_norm(&x, &blk.ffn_norm)?;
            let gate = self.linear(&h, i, Target::Gate, adapter, train)?;
            let up = self.linear(&h, i, Target::Up, adapter, train)?;
            let act = ops::silu_mul(&gate, &up)?;
            x = steer((&x + self.linear(&act, i, Target::Down, adapter, train)?)?, i + 1)?;
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
