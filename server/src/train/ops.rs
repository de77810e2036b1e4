//! Fused, differentiable CPU ops for the training forward pass: RMSNorm (frozen weight), rotary
//! embedding, causal softmax and SiLU-gated product, each one pass over memory forward and one
//! backward, in place of the five to ten candle ops (and their backward graphs) each would be
//! as composites. Rows run in parallel on the current rayon pool (a training job's own).
//!
//! Off the CPU, or for anything but f32, each falls back to the composite candle ops, which
//! compute the same function.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// The f32 values of a contiguous CPU storage.
pub(super) fn slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else { candle_core::bail!("{op} takes f32") };
    let Some((a, b)) = l.contiguous_offsets() else { candle_core::bail!("{op} takes contiguous input") };
    Ok(&v[a..b])
}

/// Whether every tensor is f32 on the CPU (where the fused ops run).
pub(super) fn on_cpu_f32(xs: &[&Tensor]) -> bool {
    xs.iter().all(|x| x.device().is_cpu() && x.dtype() == DType::F32)
}

// ---------------------------------------------------------------------------------------------
// RMSNorm with a frozen weight
// ---------------------------------------------------------------------------------------------

struct RmsNorm {
    weight: Vec<f32>,
    eps: f32,
}

pub(super) use crate::model::cpu::elementwise::inv_rms;

/// One row of RMSNorm: `y = x r w` with `r = 1/rms(x)`, which it returns.
pub(super) fn rms_norm_row(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) -> f32 {
    let r = inv_rms(x, eps);
    for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
        *y = x * r * w;
    }
    r
}

/// One row of RMSNorm's input gradient, added to `dx`: `r (dy w - x r² mean(dy w x))`.
pub(super) fn rms_norm_grad_row(x: &[f32], dy: &[f32], w: &[f32], r: f32, dx: &mut [f32]) {
    let gx: f32 = x.iter().zip(dy).zip(w).map(|((x, dy), w)| dy * w * x).sum::<f32>() / w.len() as f32;
    for (((dx, x), dy), w) in dx.iter_mut().zip(x).zip(dy).zip(w) {
        *dx += r * (dy * w - x * r * r * gx);
    }
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "train-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let d = self.weight.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(y, x)| {
            rms_norm_row(x, &self.weight, self.eps, y);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormGrad { weight: self.weight.clone(), eps: self.eps };
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// `dx = r (g - x r² mean(g x))` with `g = dy w` and `r = 1/rms(x)`.
struct RmsNormGrad {
    weight: Vec<f32>,
    eps: f32,
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "train-rms-norm-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (x, dy) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let d = self.weight.len();
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(d).zip(x.par_chunks(d).zip(dy.par_chunks(d))).for_each(|(dx, (x, dy))| {
            rms_norm_grad_row(x, dy, &self.weight, inv_rms(x, self.eps), dx);
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// RMSNorm of the rows of `x` (`[.., d]`) scaled by a weight that is not trained.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if on_cpu_f32(&[x, weight]) {
        let op = RmsNorm { weight: weight.to_vec1()?, eps: eps as f32 };
        return x.contiguous()?.apply_op1(op);
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(weight)
}

// ---------------------------------------------------------------------------------------------
// Rotary embedding
// ---------------------------------------------------------------------------------------------

struct Rope {
    /// `[t, hd/2]` each.
    cos: Vec<f32>,
    sin: Vec<f32>,
    t: usize,
    hd: usize,
    interleaved: bool,
    /// Rotate by minus the angle (the backward pass).
    inverse: bool,
}

/// Rotates one head vector in place by the angles whose cosines and sines are `cos` and `sin`
/// (`hd/2` each), or by minus them with `inverse`: pairs `(2i, 2i+1)` when `interleaved`,
/// `(i, i + hd/2)` otherwise.
pub(super) fn rotate(v: &mut [f32], cos: &[f32], sin: &[f32], interleaved: bool, inverse: bool) {
    let half = cos.len();
    for i in 0..half {
        let (ia, ib) = if interleaved { (2 * i, 2 * i + 1) } else { (i, i + half) };
        let sn = if inverse { -sin[i] } else { sin[i] };
        let (a, b) = (v[ia], v[ib]);
        v[ia] = a * cos[i] - b * sn;
        v[ib] = a * sn + b * cos[i];
    }
}

impl Rope {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        let (t, hd, half) = (self.t, self.hd, self.hd / 2);
        let mut y = x.to_vec();
        // Rows of one head are t consecutive vectors of hd; position = row index mod t.
        y.par_chunks_mut(t * hd).for_each(|y| {
            for (p, v) in y.chunks_mut(hd).enumerate() {
                let at = p * half..(p + 1) * half;
                rotate(v, &self.cos[at.clone()], &self.sin[at], self.interleaved, self.inverse);
            }
        });
        y
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "train-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(self.apply(slice(s, l, self.name())?)), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            t: self.t,
            hd: self.hd,
            interleaved: self.interleaved,
            inverse: !self.inverse,
        };
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// Rotary embedding of `x` (`[b, heads, t, hd]`, positions 0..t) with tables `[≥t, hd/2]`:
/// pairs `(2i, 2i+1)` when `interleaved` (GGUF llama), `(i, i + hd/2)` otherwise.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, interleaved: bool) -> Result<Tensor> {
    let (_, _, t, hd) = x.dims4()?;
    let (cos, sin) = (cos.narrow(0, 0, t)?, sin.narrow(0, 0, t)?);
    if on_cpu_f32(&[x, &cos, &sin]) {
        let op = Rope {
            cos: cos.flatten_all()?.to_vec1()?,
            sin: sin.flatten_all()?.to_vec1()?,
            t,
            hd,
            interleaved,
            inverse: false,
        };
        return x.contiguous()?.apply_op1(op);
    }
    if interleaved {
        candle_nn::rotary_emb::rope_i_slow(x, &cos, &sin)
    } else {
        candle_nn::rotary_emb::rope_slow(x, &cos, &sin)
    }
}

// ---------------------------------------------------------------------------------------------
// Causal softmax
// ---------------------------------------------------------------------------------------------

struct CausalSoftmax {
    scale: f32,
    /// Keys per row; a row `r` is the query at position `r mod t`.
    t: usize,
}

/// Softmax in place over a row's visible scores (already scaled).
pub(super) fn softmax_row(seen: &mut [f32]) {
    let m = seen.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut sum = 0f32;
    for v in seen.iter_mut() {
        *v = (*v - m).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    seen.iter_mut().for_each(|v| *v *= inv);
}

/// Softmax's gradient over a row's visible positions, in place: `g` holds `dp` on entry and
/// `scale · p (dp - Σ p dp)` on return.
pub(super) fn softmax_grad_row(p: &[f32], g: &mut [f32], scale: f32) {
    let dot: f32 = p.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
    for (g, p) in g.iter_mut().zip(p) {
        *g = scale * p * (*g - dot);
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "train-causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let t = self.t;
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(t * t).zip(x.par_chunks(t * t)).for_each(|(y, x)| {
            for i in 0..t {
                let (x, y) = (&x[i * t..i * t + i + 1], &mut y[i * t..i * t + i + 1]);
                y.iter_mut().zip(x).for_each(|(y, x)| *y = x * self.scale);
                softmax_row(y);
            }
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = CausalSoftmaxGrad { scale: self.scale, t: self.t };
        Ok(Some(res.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &op)?))
    }
}

/// `ds = scale · p (dp - Σ p dp)` over each row's visible positions.
struct CausalSoftmaxGrad {
    scale: f32,
    t: usize,
}

impl CustomOp2 for CausalSoftmaxGrad {
    fn name(&self) -> &'static str {
        "train-causal-softmax-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (p, dp) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let t = self.t;
        let mut ds = vec![0f32; p.len()];
        ds.par_chunks_mut(t * t).zip(p.par_chunks(t * t).zip(dp.par_chunks(t * t))).for_each(|(ds, (p, dp))| {
            for i in 0..t {
                let r = i * t..i * t + i + 1;
                ds[r.clone()].copy_from_slice(&dp[r.clone()]);
                softmax_grad_row(&p[r.clone()], &mut ds[r], self.scale);
            }
        });
        Ok((CpuStorage::F32(ds), l1.shape().clone()))
    }
}

/// `softmax(scale · s)` over the last dimension of `[.., rows, t]` scores (`rows` a multiple of
/// `t`: grouped query heads stacked along the rows), row `r` being the query at position
/// `r mod t`, which sees keys `0..=r mod t` only (the rest get probability 0).
pub fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let t = scores.dim(D::Minus1)?;
    let rows = scores.dim(D::Minus2)?;
    if rows % t != 0 {
        candle_core::bail!("causal softmax over {rows} rows of {t} keys");
    }
    if on_cpu_f32(&[scores]) {
        return scores.contiguous()?.apply_op1(CausalSoftmax { scale: scale as f32, t });
    }
    let mask: Vec<f32> =
        (0..rows).flat_map(|r| (0..t).map(move |j| if j > r % t { f32::NEG_INFINITY } else { 0.0 })).collect();
    let mask = Tensor::from_vec(mask, (rows, t), scores.device())?;
    candle_nn::ops::softmax(&(scores * scale)?.broadcast_add(&mask)?, D::Minus1)
}

// ---------------------------------------------------------------------------------------------
// SiLU-gated product
// ---------------------------------------------------------------------------------------------

struct SiluMul;

pub(super) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

const CHUNK: usize = 4096;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "train-silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(y, (g, u))| {
            for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                *y = g * sigmoid(g) * u;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, dy) = (g.contiguous()?, u.contiguous()?, grad.contiguous()?);
        let dg = Tensor::cat(&[&g, &u], 0)?.apply_op2_no_bwd(&dy, &SiluMulGrad)?;
        let n = g.dim(0)?;
        Ok((Some(dg.narrow(0, 0, n)?), Some(dg.narrow(0, n, n)?)))
    }
}

/// `(dg, du)` of `silu(g) · u` from its output's gradient `dy`.
pub(super) fn silu_mul_grad(g: f32, u: f32, dy: f32) -> (f32, f32) {
    let s = sigmoid(g);
    (dy * u * s * (1.0 + g * (1.0 - s)), dy * g * s)
}

/// From `[g; u]` (stacked) and `dy`: `[dg; du]` with `dg = dy u σ(g)(1 + g(1 - σ(g)))` and
/// `du = dy g σ(g)`.
struct SiluMulGrad;

impl CustomOp2 for SiluMulGrad {
    fn name(&self) -> &'static str {
        "train-silu-mul-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (gu, dy) = (slice(s1, l1, self.name())?, slice(s2, l2, self.name())?);
        let n = dy.len();
        let (g, u) = gu.split_at(n);
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(CHUNK)
            .zip(du.par_chunks_mut(CHUNK))
            .zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
            .for_each(|((dg, du), ((g, u), dy))| {
                for i in 0..g.len() {
                    (dg[i], du[i]) = silu_mul_grad(g[i], u[i], dy[i]);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// `silu(gate) · up`, elementwise.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if on_cpu_f32(&[gate, up]) && gate.dims() == up.dims() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SiluMul);
    }
    gate.silu()? * up
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

struct CrossEntropy {
    targets: Vec<u32>,
}

impl CrossEntropy {
    fn vocab(&self, n: usize) -> usize {
        n / self.targets.len().max(1)
    }
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "train-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let v = self.vocab(x.len());
        let total: f64 = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let sum: f32 = row.iter().map(|&v| (v - m).exp()).sum();
                (m + sum.ln() - row[t as usize]) as f64
            })
            .sum();
        Ok((CpuStorage::F32(vec![(total / self.targets.len() as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyGrad { targets: self.targets.clone(), scale: grad.to_scalar::<f32>()? };
        Ok(Some(arg.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// `scale · (softmax(x) - onehot(target)) / n` per row.
struct CrossEntropyGrad {
    targets: Vec<u32>,
    scale: f32,
}

impl CustomOp1 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "train-cross-entropy-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(s, l, self.name())?;
        let n = self.targets.len();
        let v = x.len() / n.max(1);
        let k = self.scale / n as f32;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(v).zip(x.par_chunks(v).zip(self.targets.par_iter())).for_each(|(d, (row, &t))| {
            let m = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            let mut sum = 0f32;
            for (d, &x) in d.iter_mut().zip(row) {
                *d = (x - m).exp();
                sum += *d;
            }
            let inv = k / sum;
            d.iter_mut().for_each(|d| *d *= inv);
            d[t as usize] -= k;
        });
        Ok((CpuStorage::F32(dx), l.shape().clone()))
    }
}

/// Mean negative log-likelihood of `targets` under `logits` (`[n, vocab]`), nats.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    if on_cpu_f32(&[logits]) {
        let targets: Vec<u32> = targets.to_vec1()?;
        let v = logits.dim(1)?;
        if let Some(bad) = targets.iter().find(|&&t| t as usize >= v) {
            candle_core::bail!("target {bad} is outside the vocabulary of {v}");
        }
        return logits.contiguous()?.apply_op1(CrossEntropy { targets });
    }
    candle_nn::loss::cross_entropy(logits, targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Value and input gradients of `f` (fused) and `g` (composite) agree on random input.
    fn agree(
        shape: &[usize],
        f: impl Fn(&Tensor) -> Result<Tensor>,
        g: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, shape, &dev)?)?;
        let (a, b) = (f(x.as_tensor())?, g(x.as_tensor())?);
        let w = Tensor::randn(0f32, 1.0, a.shape(), &dev)?;
        let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-5, "values differ by {d}");
        let ga = (a * &w)?.sum_all()?.backward()?.get(x.as_tensor()).cloned().unwrap();
        let gb = (b * &w)?.sum_all()?.backward()?.get(x.as_tensor()).cloned().unwrap();
        let d = (&ga - &gb)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = gb.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-4 * scale.max(1.0), "gradients differ by {d} (scale {scale})");
        Ok(())
    }

    #[test]
    fn fused_ops_match_their_composites_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, 8, &dev)?;
        agree(
            &[5, 8],
            |x| rms_norm(x, &w, 1e-5),
            |x| {
                let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
                x.broadcast_div(&(ms + 1e-5)?.sqrt()?)?.broadcast_mul(&w)
            },
        )?;
        let cos = Tensor::randn(0f32, 1.0, (6, 4), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (6, 4), &dev)?;
        agree(
            &[2, 3, 5, 8],
            |x| rope(x, &cos, &sin, true),
            |x| candle_nn::rotary_emb::rope_i_slow(x, &cos.narrow(0, 0, 5)?, &sin.narrow(0, 0, 5)?),
        )?;
        agree(
            &[2, 3, 5, 8],
            |x| rope(x, &cos, &sin, false),
            |x| candle_nn::rotary_emb::rope_slow(x, &cos.narrow(0, 0, 5)?, &sin.narrow(0, 0, 5)?),
        )?;
        // Three query heads per key head, stacked along the rows.
        agree(
            &[2, 3, 15, 5],
            |x| causal_softmax(x, 0.5),
            |x| {
                let mask: Vec<f32> =
                    (0..15).flat_map(|r| (0..5).map(move |j| if j > r % 5 { -1e9 } else { 0.0 })).collect();
                let mask = Tensor::from_vec(mask, (15, 5), &Device::Cpu)?;
                candle_nn::ops::softmax(&(x * 0.5)?.broadcast_add(&mask)?, D::Minus1)
            },
        )?;
        let up = Tensor::randn(0f32, 1.0, (7, 9), &dev)?;
        agree(&[7, 9], |x| silu_mul(x, &up), |x| x.silu()? * &up)?;
        // And the other operand's gradient.
        let g = Tensor::randn(0f32, 1.0, (7, 9), &dev)?;
        agree(&[7, 9], |x| silu_mul(&g, x), |x| g.silu()? * x)?;
        let targets = Tensor::new(&[3u32, 0, 8, 5], &dev)?;
        agree(&[4, 9], |x| cross_entropy(x, &targets), |x| candle_nn::loss::cross_entropy(x, &targets))?;
        Ok(())
    }
}
