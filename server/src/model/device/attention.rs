//! Attention for a whole batch at once, in candle tensor ops.
//!
//! Rows with the same number of new tokens attend together: a decode step's rows (one token
//! each) form one group, whatever their history lengths, and each group costs the same handful
//! of kernels however many rows it holds. A group reads its rows' keys and values straight from
//! the [`KvPool`] (one gather, or a plain view when its slots are consecutive), pads every
//! history to the longest and masks what a row must not see: positions past its own length,
//! and later tokens of its own chunk. Scores are scaled, masked and normalised in f32.
//!
//! Everything that depends only on the batch's layout (groups, masks, write positions, the
//! order back to packed tokens) is built once per pass in a [`StepPlan`] and shared by all
//! layers.

use super::kv::KvPool;
use candle_core::{DType, Device, Result, Tensor};

/// Where one row of a packed pass sits.
#[derive(Debug, Clone, Copy)]
pub struct RowPlace {
    /// Offset of the row's first new token among the packed tokens.
    pub off: usize,
    /// New tokens.
    pub t: usize,
    /// Tokens already cached (the position of the first new one).
    pub start: usize,
    pub slot: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct Heads {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// A group's tokens among the packed ones, in group order.
enum Tokens {
    /// `n` consecutive tokens from `first`: a view.
    Range {
        first: usize,
        n: usize,
    },
    Index(Tensor),
}

/// How a group finds its rows' slots in the pool.
enum Slots {
    /// Consecutive slots from the first: a view of the pool.
    Range(usize),
    Index(Tensor),
}

/// Rows that attend together.
struct Group {
    rows: usize,
    t: usize,
    /// History to attend over: the longest row's cached plus new tokens.
    len: usize,
    tokens: Tokens,
    slots: Slots,
    /// Additive `[rows, 1, 1, t, len]` f32 mask, when some row may not see every position.
    mask: Option<Tensor>,
    /// The same for sliding-window layers, when some token's window starts after position 0.
    window_mask: Option<Tensor>,
}

/// The batch layout of one pass, shared by every layer.
pub struct StepPlan {
    groups: Vec<Group>,
    /// Packed token order from the groups' concatenated outputs, unless they are in order.
    unpermute: Option<Tensor>,
    /// Pool rows of every new (token, kv head), for [`KvPool::write`].
    pub write_index: Tensor,
}

impl StepPlan {
    /// `window`: the sliding window of the model's local layers, if it has any.
    pub fn new(rows: &[RowPlace], pool: &KvPool, device: &Device, window: Option<usize>) -> Result<Self> {
        let mut order: Vec<usize> = (0..rows.len()).collect();
        order.sort_by_key(|&i| (rows[i].t, rows[i].slot));
        let mut groups = Vec::new();
        let mut concat: Vec<u32> = Vec::new();
        for members in order.chunk_by(|&a, &b| rows[a].t == rows[b].t) {
            let t = rows[members[0]].t;
            let len = members.iter().map(|&i| rows[i].start + t).max().unwrap_or(0);
            let tokens: Vec<u32> =
                members.iter().flat_map(|&i| (rows[i].off..rows[i].off + t).map(|p| p as u32)).collect();
            let first = tokens[0] as usize;
            let tokens_in_order = tokens.iter().enumerate().all(|(j, &p)| p as usize == first + j);
            concat.extend(&tokens);
            let n = tokens.len();
            let tokens = if tokens_in_order {
                Tokens::Range { first, n }
            } else {
                Tokens::Index(Tensor::from_vec(tokens, n, device)?)
            };
            let s0 = rows[members[0]].slot;
            let slots = if members.iter().enumerate().all(|(j, &i)| rows[i].slot == s0 + j) {
                Slots::Range(s0)
            } else {
                let idx: Vec<u32> = members.iter().map(|&i| rows[i].slot as u32).collect();
                Slots::Index(Tensor::from_vec(idx, members.len(), device)?)
            };
            // Position p is hidden from the token at `pos` when it comes later, or (with a
            // window) lies `window` or more positions back.
            let build = |window: Option<usize>| -> Result<Tensor> {
                let mask: Vec<f32> = members
                    .iter()
                    .flat_map(|&i| {
                        let start = rows[i].start;
                        (0..t).flat_map(move |j| {
                            let pos = start + j;
                            (0..len).map(move |p| {
                                if p > pos || window.is_some_and(|w| pos - p >= w) { f32::NEG_INFINITY } else { 0.0 }
                            })
                        })
                    })
                    .collect();
                Tensor::from_vec(mask, (members.len(), 1, 1, t, len), device)
            };
            let sees_all = t == 1 && members.iter().all(|&i| rows[i].start + 1 == len);
            let mask = if sees_all { None } else { Some(build(None)?) };
            let window_mask = match window {
                Some(w) if len > w => Some(build(Some(w))?),
                _ => None,
            };
            groups.push(Group { rows: members.len(), t, len, tokens, slots, mask, window_mask });
        }
        let unpermute = if concat.iter().enumerate().all(|(j, &p)| p as usize == j) {
            None
        } else {
            let mut back = vec![0u32; concat.len()];
            for (j, &p) in concat.iter().enumerate() {
                back[p as usize] = j as u32;
            }
            Some(Tensor::from_vec(back, concat.len(), device)?)
        };
        let mut writes = vec![(0, 0); rows.iter().map(|r| r.t).sum()];
        for r in rows {
            for j in 0..r.t {
                writes[r.off + j] = (r.slot, r.start + j);
            }
        }
        Ok(Self { groups, unpermute, write_index: pool.write_index(&writes)? })
    }

    /// Attention of every packed token over its row's history (the pool's `layer`, into which
    /// this pass's keys and values were already written). `q` is `[n_tokens, n_heads,
    /// head_dim]` in the compute dtype; the result is `[n_tokens, n_heads · head_dim]`.
    /// `windowed`: the layer attends over the sliding window given to [`Self::new`].
    pub fn attend(&self, h: &Heads, pool: &KvPool, layer: usize, q: &Tensor, windowed: bool) -> Result<Tensor> {
        let group = h.n_heads / h.n_kv_heads;
        let scale = 1.0 / (h.head_dim as f64).sqrt();
        let (keys, values) = pool.layer(layer);
        let mut outs = Vec::with_capacity(self.groups.len());
        for g in &self.groups {
            let (b, t) = (g.rows, g.t);
            let qg = match &g.tokens {
                Tokens::Range { first, n } => q.narrow(0, *first, *n)?,
                Tokens::Index(idx) => q.index_select(idx, 0)?,
            };
            // Query heads sharing a kv head are adjacent: [b, n_kv, group · t, hd].
            let qg = qg
                .reshape((b, t, h.n_kv_heads, group, h.head_dim))?
                .permute((0, 2, 3, 1, 4))?
                .contiguous()?
                .reshape((b, h.n_kv_heads, group * t, h.head_dim))?;
            let history = |pool_t: &Tensor| -> Result<Tensor> {
                let rows = match &g.slots {
                    Slots::Range(s0) => pool_t.narrow(0, *s0, b)?,
                    Slots::Index(idx) => pool_t.index_select(idx, 0)?,
                };
                rows.narrow(2, 0, g.len)
            };
            let (kg, vg) = (history(keys)?, history(values)?);
            let att = (qg.matmul(&kg.t()?)?.to_dtype(DType::F32)? * scale)?;
            let mask = if windowed { g.window_mask.as_ref().or(g.mask.as_ref()) } else { g.mask.as_ref() };
            let att = match mask {
                Some(mask) => att.reshape((b, h.n_kv_heads, group, t, g.len))?.broadcast_add(mask)?.reshape((
                    b,
                    h.n_kv_heads,
                    group * t,
                    g.len,
                ))?,
                None => att,
            };
            let att = candle_nn::ops::softmax_last_dim(&att)?.to_dtype(vg.dtype())?;
            let y = att.matmul(&vg)?; // [b, n_kv, group · t, hd]
            let y = y
                .reshape((b, h.n_kv_heads, group, t, h.head_dim))?
                .permute((0, 3, 1, 2, 4))?
                .contiguous()?
                .reshape((b * t, h.n_heads * h.head_dim))?;
            outs.push(y);
        }
        let y = if outs.len() == 1 { outs.pop().expect("one group") } else { Tensor::cat(&outs, 0)? };
        match &self.unpermute {
            Some(back) => y.index_select(back, 0),
            None => Ok(y),
        }
    }
}

/// Applies rotary embeddings to `[n, heads, head_dim]` rows with per-token `cos`/`sin`
/// (`[n, head_dim / 2]`, the rows' dtype): interleaved pairs (GGUF llama) or halves (NeoX).
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let x = x.unsqueeze(0)?;
    let y = if interleaved {
        // candle's interleaved kernel wants [batch, heads, tokens, head_dim].
        let y = candle_nn::rotary_emb::rope_i(&x.transpose(1, 2)?.contiguous()?, cos, sin)?;
        y.transpose(1, 2)?.contiguous()?
    } else {
        candle_nn::rotary_emb::rope_thd(&x.contiguous()?, cos, sin)?
    };
    y.squeeze(0)
}
