//! Each half of a transformer block as one differentiable CPU op: attention with its RMSNorm
//! and residual add, and the gated MLP with its RMSNorm and residual add. Both call the GEMM
//! kernels directly on the frozen weights and keep what their backward needs.
//!
//! As candle graphs, the halves are about twenty nodes each. candle's backward gives every
//! node's input a zero-filled gradient buffer and adds the node's gradient into it, and a
//! custom matmul copies its operands in and out of tensors; at training sizes those passes over
//! memory cost as much as the matmuls. Here a half has one input edge (the residual stream) and
//! two small ones (its adapters' `A` and `B`, flattened and concatenated), q/k/v and gate/up
//! are one GEMM each over concatenated weights, and a projection with an adapter accumulates
//! the low-rank path into the frozen product's output instead of adding tensors.
//!
//! Off the CPU the model runs the composite graph ([`super::model::TrainModel`]'s `attention`
//! and `linear`); the tests check these ops against it in value and in every gradient.

use super::lora::Target;
use super::ops::{
    on_cpu_f32, rms_norm_grad_row, rms_norm_row, rotate, sigmoid, silu_mul_grad, slice, softmax_grad_row, softmax_row,
};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Storage, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

// ---------------------------------------------------------------------------------------------
// Matrices and GEMM
// ---------------------------------------------------------------------------------------------

/// A strided read-only matrix: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Row-major `rows × cols` at the start of `data`.
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self { data, rows, cols, rs: cols, cs: 1 }
    }

    /// Row-major with rows `ld` apart.
    fn strided(data: &'a [f32], rows: usize, cols: usize, ld: usize) -> Self {
        Self { data, rows, cols, rs: ld, cs: 1 }
    }

    fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// Columns `start..start + len`.
    fn cols(self, start: usize, len: usize) -> Self {
        Self { data: &self.data[(start * self.cs).min(self.data.len())..], cols: len, ..self }
    }

    fn in_bounds(&self) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = scale · a · b`, or `dst += scale · a · b` with `accumulate`; `dst` is row-major with
/// rows `ld` apart. `par` splits the product over the current rayon pool (a training job's).
fn gemm(dst: &mut [f32], ld: usize, a: Mat, b: Mat, scale: f32, accumulate: bool, par: bool) -> Result<()> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    if b.rows != k || !a.in_bounds() || !b.in_bounds() || (m > 0 && n > 0 && (m - 1) * ld + n > dst.len()) {
        candle_core::bail!("fused block: a {m}×{k} by {}×{n} product does not fit its buffers", b.rows);
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| dst[i * ld..i * ld + n].fill(0.0));
        }
        return Ok(());
    }
    let threads = if par { rayon::current_num_threads() } else { 1 };
    let parallelism = if threads > 1 { Parallelism::Rayon(threads) } else { Parallelism::None };
    // SAFETY: the three extents were checked against their slices above, and `dst` is a unique
    // borrow, so no operand aliases it. gemm computes `dst = 1·dst + scale·a·b` when it reads
    // `dst`, and `scale·a·b` otherwise.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

/// A read lock on a frozen weight's storage, for its f32 values.
struct Host<'a>(candle_core::StorageRef<'a>, &'a Layout);

impl<'a> Host<'a> {
    fn of(t: &'a Tensor) -> Self {
        let (s, l) = t.storage_and_layout();
        Self(s, l)
    }

    fn f32(&self) -> Result<&[f32]> {
        match &*self.0 {
            Storage::Cpu(c) => slice(c, self.1, "fused block half"),
            _ => candle_core::bail!("the fused block halves run on the CPU"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Projections with adapters
// ---------------------------------------------------------------------------------------------

/// One projection inside a concatenated `[out, in]` weight: output columns `col..col + width`,
/// and, when it is adapted, where its `A` (`[r, in]`) and `B` (`[width, r]`) start in the
/// half's flat parameter vectors.
#[derive(Clone, Copy, Debug)]
struct Seg {
    col: usize,
    width: usize,
    lora: Option<(usize, usize)>,
}

/// A frozen `[out, in]` weight made of segments.
struct Proj {
    out: usize,
    inp: usize,
    segs: Vec<Seg>,
}

/// The adapters' parameters of one half, flat, and their shared rank and scale.
struct Lora<'a> {
    a: &'a [f32],
    b: &'a [f32],
    rank: usize,
    scale: f32,
}

impl Proj {
    /// How many of the segments are adapted (the width of the low-rank activations, in ranks).
    fn n_adapted(&self) -> usize {
        self.segs.iter().filter(|s| s.lora.is_some()).count()
    }

    /// `y (= or +=) x Wᵀ + Σ s (x Aᵀ) Bᵀ` over `x` `[n, in]`; returns the low-rank activations
    /// `x Aᵀ` of the adapted segments side by side (`[n, k·r]`) for the backward pass.
    fn forward(&self, x: Mat, w: &[f32], lora: Option<&Lora>, y: &mut [f32], accumulate: bool) -> Result<Vec<f32>> {
        gemm(y, self.out, x, Mat::new(w, self.out, self.inp).t(), 1.0, accumulate, true)?;
        let Some(l) = lora else { return Ok(Vec::new()) };
        let (n, r) = (x.rows, l.rank);
        let lw = self.n_adapted() * r;
        let mut low = vec![0f32; n * lw];
        for (j, (seg, (ao, bo))) in self.segs.iter().filter_map(|s| s.lora.map(|o| (s, o))).enumerate() {
            let a = Mat::new(&l.a[ao..], r, self.inp);
            gemm(&mut low[j * r..], lw, x, a.t(), 1.0, false, true)?;
            let b = Mat::new(&l.b[bo..], seg.width, r);
            gemm(
                &mut y[seg.col..],
                self.out,
                Mat::strided(&low, n, lw, lw).cols(j * r, r),
                b.t(),
                l.scale,
                true,
                true,
            )?;
        }
        Ok(low)
    }

    /// From `dy` (`[n, out]`): `dx (= or +=) dy W + Σ s (dy_seg B) A`, and each adapted
    /// segment's `dA = s (dy_seg B)ᵀ x` and `dB = s dy_segᵀ (x Aᵀ)` into `da` and `db`.
    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dy: Mat,
        x: Mat,
        low: &[f32],
        w: &[f32],
        lora: Option<&Lora>,
        dx: &mut [f32],
        accumulate: bool,
        grads: (&mut [f32], &mut [f32]),
    ) -> Result<()> {
        gemm(dx, self.inp, dy, Mat::new(w, self.out, self.inp), 1.0, accumulate, true)?;
        let Some(l) = lora else { return Ok(()) };
        let (n, r) = (dy.rows, l.rank);
        let lw = self.n_adapted() * r;
        let (da, db) = grads;
        let mut g = vec![0f32; n * r];
        for (j, (seg, (ao, bo))) in self.segs.iter().filter_map(|s| s.lora.map(|o| (s, o))).enumerate() {
            let dys = dy.cols(seg.col, seg.width);
            gemm(&mut g, r, dys, Mat::new(&l.b[bo..], seg.width, r), l.scale, false, true)?;
            let g = Mat::new(&g, n, r);
            gemm(dx, self.inp, g, Mat::new(&l.a[ao..], r, self.inp), 1.0, true, true)?;
            gemm(&mut da[ao..], self.inp, g.t(), x, 1.0, false, true)?;
            let low = Mat::strided(low, n, lw, lw).cols(j * r, r);
            gemm(&mut db[bo..], r, dys.t(), low, l.scale, false, true)?;
        }
        Ok(())
    }
}

/// Lays out the adapted targets' `A` and `B` one after another, in `targets` order, and
/// returns the segments of each projection (`groups` lists the targets of each, with their
/// output widths and common input width) and the two vectors' lengths.
fn lay_out(groups: &[(&[(Target, usize)], usize)], adapted: &[Target], rank: usize) -> (Vec<Proj>, usize, usize) {
    let (mut a_len, mut b_len) = (0, 0);
    let projs = groups
        .iter()
        .map(|&(targets, inp)| {
            let mut col = 0;
            let segs = targets
                .iter()
                .map(|&(t, width)| {
                    let lora = adapted.contains(&t).then(|| {
                        let at = (a_len, b_len);
                        a_len += rank * inp;
                        b_len += width * rank;
                        at
                    });
                    let seg = Seg { col, width, lora };
                    col += width;
                    seg
                })
                .collect();
            Proj { out: col, inp, segs }
        })
        .collect();
    (projs, a_len, b_len)
}

// ---------------------------------------------------------------------------------------------
// Shared pieces
// ---------------------------------------------------------------------------------------------

/// RMSNorm of the rows of `x` (`d` wide): the normalized, weighted rows and each row's 1/rms.
fn rms_forward(x: &[f32], w: &[f32], eps: f32) -> (Vec<f32>, Vec<f32>) {
    let d = w.len();
    let mut h = vec![0f32; x.len()];
    let mut inv = vec![0f32; x.len() / d];
    h.par_chunks_mut(d).zip(inv.par_iter_mut()).zip(x.par_chunks(d)).for_each(|((h, r), x)| {
        *r = rms_norm_row(x, w, eps, h);
    });
    (h, inv)
}

/// `dx += r (dh w - x r² mean(dh w x))`, RMSNorm's input gradient.
fn rms_backward(x: &[f32], inv: &[f32], w: &[f32], dh: &[f32], dx: &mut [f32]) {
    let d = w.len();
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dh.par_chunks(d)))
        .zip(inv.par_iter())
        .for_each(|((dx, (x, dh)), &r)| rms_norm_grad_row(x, dh, w, r, dx));
}

/// The rotary tables' first `t` rows (`[t, hd/2]` each) and the pairing convention.
struct Rotary {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
    interleaved: bool,
}

impl Rotary {
    /// Rotates one head vector at position `p`, by minus the angle with `inverse`.
    fn rotate(&self, v: &mut [f32], p: usize, inverse: bool) {
        let at = p * self.half..(p + 1) * self.half;
        rotate(v, &self.cos[at.clone()], &self.sin[at], self.interleaved, inverse);
    }
}

/// A batch's geometry: `b` sequences of `t` tokens, a `d`-wide residual stream, RMSNorm's eps.
#[derive(Clone, Copy)]
pub(super) struct Geometry {
    pub b: usize,
    pub t: usize,
    pub d: usize,
    pub eps: f32,
}

/// What both halves keep besides their weights: the batch geometry, their projections'
/// segments, and their adapters' rank, scale and flat lengths.
struct Frame {
    geometry: Geometry,
    projs: Vec<Proj>,
    rank: usize,
    scale: f32,
    lens: (usize, usize),
}

impl Frame {
    /// Lays out the projections of one half (see [`lay_out`]) for `adapter`'s targets.
    fn new(geometry: Geometry, groups: &[(&[(Target, usize)], usize)], adapter: Option<&HalfAdapter>) -> Self {
        let targets = adapter.map(|a| a.targets.as_slice()).unwrap_or(&[]);
        let rank = adapter.map_or(0, |a| a.rank);
        let (projs, a_len, b_len) = lay_out(groups, targets, rank);
        Self { geometry, projs, rank, scale: adapter.map_or(0.0, |a| a.scale as f32), lens: (a_len, b_len) }
    }
}

// ---------------------------------------------------------------------------------------------
// Attention half
// ---------------------------------------------------------------------------------------------

/// `x + o(attention(rope(q), rope(k), v))` with `q, k, v` from `rms_norm(x)`.
pub(super) struct AttentionHalf {
    /// Projections `[qkv, o]`.
    frame: Frame,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
    norm: Tensor,
    /// `[q + k + v widths, d]`, and its bias when the model has one.
    qkv: Tensor,
    qkv_bias: Option<Tensor>,
    o: Tensor,
    rotary: Rotary,
    saved: Mutex<Option<Arc<AttentionSaved>>>,
}

struct AttentionSaved {
    inv: Vec<f32>,
    h: Vec<f32>,
    low_qkv: Vec<f32>,
    /// Head-major, rotated: `[b, heads, t, hd]`.
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    /// `[b, heads, t, t]`, zero above the diagonal.
    probs: Vec<f32>,
    /// The heads' outputs, token-major `[n, heads · hd]` (the o projection's input).
    y: Vec<f32>,
    low_o: Vec<f32>,
}

/// What a block half needs from the model: its frozen tensors and geometry.
pub(super) struct AttentionWeights<'a> {
    pub norm: &'a Tensor,
    pub qkv: &'a Tensor,
    pub qkv_bias: Option<&'a Tensor>,
    pub o: &'a Tensor,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub rope_interleaved: bool,
}

/// The adapted targets of one half and their flattened `A` and `B` in target order.
pub(super) struct HalfAdapter {
    pub targets: Vec<Target>,
    pub a: Tensor,
    pub b: Tensor,
    pub rank: usize,
    pub scale: f64,
}

impl AttentionHalf {
    fn new(geometry: Geometry, w: &AttentionWeights, adapter: Option<&HalfAdapter>) -> Result<Self> {
        let (nh, nkv, hd) = (w.n_heads, w.n_kv_heads, w.head_dim);
        let (qw, kvw) = (nh * hd, nkv * hd);
        let qkv = [(Target::Q, qw), (Target::K, kvw), (Target::V, kvw)];
        let frame = Frame::new(geometry, &[(&qkv, geometry.d), (&[(Target::O, geometry.d)], qw)], adapter);
        let half = hd / 2;
        let table = |t: &Tensor| -> Result<Vec<f32>> { t.narrow(0, 0, geometry.t)?.flatten_all()?.to_vec1() };
        Ok(Self {
            frame,
            n_heads: nh,
            n_kv_heads: nkv,
            head_dim: hd,
            norm: w.norm.clone(),
            qkv: w.qkv.clone(),
            qkv_bias: w.qkv_bias.cloned(),
            o: w.o.clone(),
            rotary: Rotary { cos: table(w.cos)?, sin: table(w.sin)?, half, interleaved: w.rope_interleaved },
            saved: Mutex::new(None),
        })
    }
}

impl Half for AttentionHalf {
    const NAME: &'static str = "train-attention-half";

    fn frame(&self) -> &Frame {
        &self.frame
    }

    fn forward(&self, x: &[f32], lora: Option<&Lora>) -> Result<Vec<f32>> {
        let Geometry { b, t, d, eps } = self.frame.geometry;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (n, qw, kvw) = (b * t, nh * hd, nkv * hd);
        let width = qw + 2 * kvw;
        let (norm, wqkv, wo) = (Host::of(&self.norm), Host::of(&self.qkv), Host::of(&self.o));
        let (h, inv) = rms_forward(x, norm.f32()?, eps);
        let mut qkv = vec![0f32; n * width];
        let low_qkv = self.frame.projs[0].forward(Mat::new(&h, n, d), wqkv.f32()?, lora, &mut qkv, false)?;
        if let Some(bias) = &self.qkv_bias {
            let bias = Host::of(bias);
            let bias = bias.f32()?;
            qkv.par_chunks_mut(width).for_each(|row| row.iter_mut().zip(bias).for_each(|(y, b)| *y += b));
        }
        // Head-major copies, rotated: one `[t, hd]` tile per (row, head).
        let heads = |heads: usize, col: usize, rotate: bool| -> Vec<f32> {
            let mut out = vec![0f32; b * heads * t * hd];
            out.par_chunks_mut(t * hd).enumerate().for_each(|(i, tile)| {
                let (row, head) = (i / heads, i % heads);
                for p in 0..t {
                    let v = &mut tile[p * hd..(p + 1) * hd];
                    let at = (row * t + p) * width + col + head * hd;
                    v.copy_from_slice(&qkv[at..at + hd]);
                    if rotate {
                        self.rotary.rotate(v, p, false);
                    }
                }
            });
            out
        };
        let (q, k, v) = (heads(nh, 0, true), heads(nkv, qw, true), heads(nkv, qw + kvw, false));
        drop(qkv);
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut y = vec![0f32; n * qw];
        let mut probs = vec![0f32; b * nh * t * t];
        y.par_chunks_mut(t * qw).zip(probs.par_chunks_mut(nh * t * t)).enumerate().try_for_each(
            |(row, (y, probs))| -> Result<()> {
                for head in 0..nh {
                    let kv = row * nkv + head / group;
                    let qh = Mat::new(&q[(row * nh + head) * t * hd..], t, hd);
                    let kh = Mat::new(&k[kv * t * hd..], t, hd);
                    let vh = Mat::new(&v[kv * t * hd..], t, hd);
                    let p = &mut probs[head * t * t..(head + 1) * t * t];
                    gemm(p, t, qh, kh.t(), scale, false, false)?;
                    for (i, r) in p.chunks_mut(t).enumerate() {
                        let (seen, masked) = r.split_at_mut(i + 1);
                        softmax_row(seen);
                        masked.fill(0.0);
                    }
                    gemm(&mut y[head * hd..], qw, Mat::new(p, t, t), vh, 1.0, false, false)?;
                }
                Ok(())
            },
        )?;
        let mut out = x.to_vec();
        let low_o = self.frame.projs[1].forward(Mat::new(&y, n, qw), wo.f32()?, lora, &mut out, true)?;
        let saved = AttentionSaved { inv, h, low_qkv, q, k, v, probs, y, low_o };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(saved));
        Ok(out)
    }

    fn backward(&self, x: &[f32], dz: &[f32], lora: Option<&Lora>) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let s = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(s) = s else { candle_core::bail!("attention backward before its forward") };
        let Geometry { b, t, d, .. } = self.frame.geometry;
        let (nh, nkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let (n, qw, kvw) = (b * t, nh * hd, nkv * hd);
        let width = qw + 2 * kvw;
        let (norm, wqkv, wo) = (Host::of(&self.norm), Host::of(&self.qkv), Host::of(&self.o));
        let (mut da, mut db) = (vec![0f32; self.frame.lens.0], vec![0f32; self.frame.lens.1]);
        let mut dy = vec![0f32; n * qw];
        let dzm = Mat::new(dz, n, d);
        self.frame.projs[1].backward(
            dzm,
            Mat::new(&s.y, n, qw),
            &s.low_o,
            wo.f32()?,
            lora,
            &mut dy,
            false,
            (&mut da, &mut db),
        )?;
        let group = nh / nkv;
        let scale = 1.0 / (hd as f32).sqrt();
        let mut dqkv = vec![0f32; n * width];
        dqkv.par_chunks_mut(t * width).enumerate().try_for_each(|(row, dq)| -> Result<()> {
            let mut ds = vec![0f32; t * t];
            let (mut dk, mut dv) = (vec![0f32; nkv * t * hd], vec![0f32; nkv * t * hd]);
            for head in 0..nh {
                let (kv, kvi) = (head / group, row * nkv + head / group);
                let p = Mat::new(&s.probs[(row * nh + head) * t * t..], t, t);
                let doh = Mat::strided(&dy[row * t * qw..], t, qw, qw).cols(head * hd, hd);
                let qh = Mat::new(&s.q[(row * nh + head) * t * hd..], t, hd);
                let kh = Mat::new(&s.k[kvi * t * hd..], t, hd);
                let vh = Mat::new(&s.v[kvi * t * hd..], t, hd);
                gemm(&mut ds, t, doh, vh.t(), 1.0, false, false)?;
                gemm(&mut dv[kv * t * hd..], hd, p.t(), doh, 1.0, true, false)?;
                for (i, (ds, p)) in ds.chunks_mut(t).zip(p.data.chunks(t)).enumerate() {
                    softmax_grad_row(&p[..=i], &mut ds[..=i], scale);
                    ds[i + 1..].fill(0.0);
                }
                let dsm = Mat::new(&ds, t, t);
                gemm(&mut dq[head * hd..], width, dsm, kh, 1.0, false, false)?;
                gemm(&mut dk[kv * t * hd..], hd, dsm.t(), qh, 1.0, true, false)?;
            }
            for p in 0..t {
                let r = &mut dq[p * width..(p + 1) * width];
                for head in 0..nh {
                    self.rotary.rotate(&mut r[head * hd..(head + 1) * hd], p, true);
                }
                for kv in 0..nkv {
                    let at = (kv * t + p) * hd;
                    self.rotary.rotate(&mut dk[at..at + hd], p, true);
                    r[qw + kv * hd..qw + (kv + 1) * hd].copy_from_slice(&dk[at..at + hd]);
                    r[qw + kvw + kv * hd..qw + kvw + (kv + 1) * hd].copy_from_slice(&dv[at..at + hd]);
                }
            }
            Ok(())
        })?;
        drop(dy);
        let mut dh = vec![0f32; n * d];
        let dqkv = Mat::new(&dqkv, n, width);
        self.frame.projs[0].backward(
            dqkv,
            Mat::new(&s.h, n, d),
            &s.low_qkv,
            wqkv.f32()?,
            lora,
            &mut dh,
            false,
            (&mut da, &mut db),
        )?;
        let mut dx = dz.to_vec();
        rms_backward(x, &s.inv, norm.f32()?, &dh, &mut dx);
        Ok((dx, da, db))
    }
}

// ---------------------------------------------------------------------------------------------
// MLP half
// ---------------------------------------------------------------------------------------------

/// `x + down(silu(gate(h)) · up(h))` with `h = rms_norm(x)`.
pub(super) struct MlpHalf {
    /// Projections `[gate_up, down]`.
    frame: Frame,
    inter: usize,
    norm: Tensor,
    /// `[2 · intermediate, d]`: gate rows, then up rows.
    gate_up: Tensor,
    down: Tensor,
    saved: Mutex<Option<Arc<MlpSaved>>>,
}

struct MlpSaved {
    inv: Vec<f32>,
    h: Vec<f32>,
    low_gu: Vec<f32>,
    gu: Vec<f32>,
    act: Vec<f32>,
    low_d: Vec<f32>,
}

pub(super) struct MlpWeights<'a> {
    pub norm: &'a Tensor,
    pub gate_up: &'a Tensor,
    pub down: &'a Tensor,
    pub intermediate: usize,
}

impl MlpHalf {
    fn new(geometry: Geometry, w: &MlpWeights, adapter: Option<&HalfAdapter>) -> Self {
        let f = w.intermediate;
        let gu = [(Target::Gate, f), (Target::Up, f)];
        Self {
            frame: Frame::new(geometry, &[(&gu, geometry.d), (&[(Target::Down, geometry.d)], f)], adapter),
            inter: f,
            norm: w.norm.clone(),
            gate_up: w.gate_up.clone(),
            down: w.down.clone(),
            saved: Mutex::new(None),
        }
    }
}

impl Half for MlpHalf {
    const NAME: &'static str = "train-mlp-half";

    fn frame(&self) -> &Frame {
        &self.frame
    }

    fn forward(&self, x: &[f32], lora: Option<&Lora>) -> Result<Vec<f32>> {
        let Geometry { b, t, d, eps } = self.frame.geometry;
        let (n, f) = (b * t, self.inter);
        let (norm, wgu, wd) = (Host::of(&self.norm), Host::of(&self.gate_up), Host::of(&self.down));
        let (h, inv) = rms_forward(x, norm.f32()?, eps);
        let mut gu = vec![0f32; n * 2 * f];
        let low_gu = self.frame.projs[0].forward(Mat::new(&h, n, d), wgu.f32()?, lora, &mut gu, false)?;
        let mut act = vec![0f32; n * f];
        act.par_chunks_mut(f).zip(gu.par_chunks(2 * f)).for_each(|(a, gu)| {
            let (g, u) = gu.split_at(f);
            for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                *a = g * sigmoid(g) * u;
            }
        });
        let mut out = x.to_vec();
        let low_d = self.frame.projs[1].forward(Mat::new(&act, n, f), wd.f32()?, lora, &mut out, true)?;
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(Arc::new(MlpSaved { inv, h, low_gu, gu, act, low_d }));
        Ok(out)
    }

    fn backward(&self, x: &[f32], dz: &[f32], lora: Option<&Lora>) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let s = self.saved.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let Some(s) = s else { candle_core::bail!("MLP backward before its forward") };
        let Geometry { b, t, d, .. } = self.frame.geometry;
        let (n, f) = (b * t, self.inter);
        let (norm, wgu, wd) = (Host::of(&self.norm), Host::of(&self.gate_up), Host::of(&self.down));
        let (mut da, mut db) = (vec![0f32; self.frame.lens.0], vec![0f32; self.frame.lens.1]);
        let mut d_act = vec![0f32; n * f];
        let dzm = Mat::new(dz, n, d);
        self.frame.projs[1].backward(
            dzm,
            Mat::new(&s.act, n, f),
            &s.low_d,
            wd.f32()?,
            lora,
            &mut d_act,
            false,
            (&mut da, &mut db),
        )?;
        let mut dgu = vec![0f32; n * 2 * f];
        dgu.par_chunks_mut(2 * f).zip(s.gu.par_chunks(2 * f)).zip(d_act.par_chunks(f)).for_each(|((dgu, gu), da)| {
            let (dg, du) = dgu.split_at_mut(f);
            let (g, u) = gu.split_at(f);
            for i in 0..f {
                (dg[i], du[i]) = silu_mul_grad(g[i], u[i], da[i]);
            }
        });
        drop(d_act);
        let mut dh = vec![0f32; n * d];
        let dgu = Mat::new(&dgu, n, 2 * f);
        self.frame.projs[0].backward(
            dgu,
            Mat::new(&s.h, n, d),
            &s.low_gu,
            wgu.f32()?,
            lora,
            &mut dh,
            false,
            (&mut da, &mut db),
        )?;
        let mut dx = dz.to_vec();
        rms_backward(x, &s.inv, norm.f32()?, &dh, &mut dx);
        Ok((dx, da, db))
    }
}

// ---------------------------------------------------------------------------------------------
// candle ops
// ---------------------------------------------------------------------------------------------

/// One block half as a candle op: `apply_op1` on the residual stream without an adapter,
/// `apply_op3` with the half's flat `A` and `B` with one.
trait Half: Send + Sync + 'static {
    const NAME: &'static str;
    fn frame(&self) -> &Frame;
    /// The half's output; keeps what [`Half::backward`] needs.
    fn forward(&self, x: &[f32], lora: Option<&Lora>) -> Result<Vec<f32>>;
    /// The gradients of the input and of the flat `A` and `B`, from the output's.
    fn backward(&self, x: &[f32], dz: &[f32], lora: Option<&Lora>) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)>;
}

struct Op<H>(H);

impl<H: Half> Op<H> {
    fn residual_shape(&self) -> Shape {
        let g = self.0.frame().geometry;
        Shape::from((g.b * g.t, g.d))
    }

    fn check(&self, l: &Layout) -> Result<()> {
        if l.shape() != &self.residual_shape() {
            candle_core::bail!("{} takes a {:?} residual stream, got {:?}", H::NAME, self.residual_shape(), l.shape());
        }
        Ok(())
    }

    fn lora<'a>(&self, a: &'a [f32], b: &'a [f32]) -> Result<Lora<'a>> {
        let f = self.0.frame();
        if (a.len(), b.len()) != f.lens {
            candle_core::bail!("{}: adapter vectors of {} and {}, expected {:?}", H::NAME, a.len(), b.len(), f.lens);
        }
        Ok(Lora { a, b, rank: f.rank, scale: f.scale })
    }
}

impl<H: Half> CustomOp1 for Op<H> {
    fn name(&self) -> &'static str {
        H::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check(l)?;
        Ok((CpuStorage::F32(self.0.forward(slice(s, l, H::NAME)?, None)?), self.residual_shape()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (x, grad) = (x.contiguous()?, grad.contiguous()?);
        let (x, grad) = (Host::of(&x), Host::of(&grad));
        let (dx, _, _) = self.0.backward(x.f32()?, grad.f32()?, None)?;
        Ok(Some(Tensor::from_vec(dx, self.residual_shape(), &Device::Cpu)?))
    }
}

impl<H: Half> CustomOp3 for Op<H> {
    fn name(&self) -> &'static str {
        H::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check(l1)?;
        let lora = self.lora(slice(s2, l2, H::NAME)?, slice(s3, l3, H::NAME)?)?;
        Ok((CpuStorage::F32(self.0.forward(slice(s1, l1, H::NAME)?, Some(&lora))?), self.residual_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, grad) = (x.contiguous()?, a.contiguous()?, b.contiguous()?, grad.contiguous()?);
        let (x, a, b, grad) = (Host::of(&x), Host::of(&a), Host::of(&b), Host::of(&grad));
        let lora = self.lora(a.f32()?, b.f32()?)?;
        let (dx, da, db) = self.0.backward(x.f32()?, grad.f32()?, Some(&lora))?;
        let dev = Device::Cpu;
        let (na, nb) = (da.len(), db.len());
        Ok((
            Some(Tensor::from_vec(dx, self.residual_shape(), &dev)?),
            Some(Tensor::from_vec(da, na, &dev)?),
            Some(Tensor::from_vec(db, nb, &dev)?),
        ))
    }
}

fn apply<H: Half>(half: H, x: &Tensor, adapter: Option<&HalfAdapter>) -> Result<Tensor> {
    let x = x.contiguous()?;
    match adapter {
        Some(ad) if !ad.targets.is_empty() => x.apply_op3(&ad.a.contiguous()?, &ad.b.contiguous()?, Op(half)),
        _ => x.apply_op1(Op(half)),
    }
}

/// Whether the fused halves can run on these tensors (f32 on the CPU).
pub(super) fn available(x: &Tensor) -> bool {
    on_cpu_f32(&[x])
}

/// The attention half over the residual stream `x` (`[b · t, d]`).
pub(super) fn attention(
    x: &Tensor,
    geometry: Geometry,
    w: &AttentionWeights,
    adapter: Option<&HalfAdapter>,
) -> Result<Tensor> {
    apply(AttentionHalf::new(geometry, w, adapter)?, x, adapter)
}

/// The MLP half over the residual stream `x` (`[b · t, d]`).
pub(super) fn mlp(x: &Tensor, geometry: Geometry, w: &MlpWeights, adapter: Option<&HalfAdapter>) -> Result<Tensor> {
    apply(MlpHalf::new(geometry, w, adapter), x, adapter)
}
