//! Element-wise host math for the CPU forward pass: the MLP's `act(gate) · up` (SiLU for the
//! llama family, tanh-approximated GELU for Gemma) as one custom op over the fused gate|up
//! output, and softmax for attention, all with an AVX2 `exp`.
//!
//! With 16 decode rows, candle's `silu` (libm `exp` per value on rayon threads) then `mul`
//! took a few percent of every step while the matmul workers spun idle; here it is one pass,
//! eight values per instruction, split over the same worker pool as the matmuls.

use super::{SendPtr, contiguous_f32};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The gate's activation in a gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Activation {
    /// `x · σ(x)` (SwiGLU: Llama, SmolLM, Mistral, Qwen2).
    #[default]
    Silu,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))` (GeGLU: Gemma).
    GeluTanh,
}

/// `act(g) · u` for a `[t, 2·inter]` tensor holding gate and up side by side: `[t, inter]`.
pub struct GatedMul {
    pub inter: usize,
    pub act: Activation,
}

impl GatedMul {
    pub fn forward(&self, gate_up: &Tensor) -> Result<Tensor> {
        gate_up.apply_op1_no_bwd(self)
    }
}

impl CustomOp1 for GatedMul {
    fn name(&self) -> &'static str {
        "gated-mul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, width) = layout.shape().dims2()?;
        if width != 2 * self.inter {
            candle_core::bail!("gated-mul: {width} columns, expected 2 x {}", self.inter);
        }
        let x = contiguous_f32(storage, layout, "gated-mul")?;
        let (inter, act) = (self.inter, self.act);
        let mut out = vec![0f32; t * inter];
        let ptr = SendPtr(out.as_mut_ptr());
        let rows = |range: std::ops::Range<usize>, ptr: &SendPtr<f32>| {
            for r in range {
                let (g, u) = x[r * width..(r + 1) * width].split_at(inter);
                // SAFETY: row r of the output belongs to this task alone; in bounds.
                let o = unsafe { std::slice::from_raw_parts_mut(ptr.0.add(r * inter), inter) };
                match act {
                    Activation::Silu => silu_mul(g, u, o),
                    Activation::GeluTanh => gelu_mul(g, u, o),
                }
            }
        };
        if t < 4 {
            rows(0..t, &ptr);
        } else {
            candle_core::utils::barrier_pool().execute_chunked(t, |range| rows(range, &ptr));
        }
        Ok((CpuStorage::F32(out), Shape::from((t, inter))))
    }
}

/// `o = silu(g) · u = g / (1 + e^-g) · u`.
pub fn silu_mul(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::supported() {
        // SAFETY: AVX2/FMA detected.
        unsafe { avx2::silu_mul(g, u, o) };
        return;
    }
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

/// `√(2/π)`, and twice it: `gelu(x) = x · σ(2·√(2/π)·(x + 0.044715·x³))`, since
/// `(1 + tanh(y)) / 2 = σ(2y)`, so GELU shares SiLU's one `exp` per value.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_CUBIC: f32 = 0.044_715;

/// `o = gelu_tanh(g) · u`.
pub fn gelu_mul(g: &[f32], u: &[f32], o: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if super::supported() {
        // SAFETY: AVX2/FMA detected.
        unsafe { avx2::gelu_mul(g, u, o) };
        return;
    }
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = gelu_tanh(g) * u;
    }
}

/// The tanh-approximated GELU of one value.
pub fn gelu_tanh(x: f32) -> f32 {
    let z = 2.0 * SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x);
    x / (1.0 + (-z).exp())
}

/// `1 / sqrt(mean(x²) + eps)` of one row (RMSNorm's factor).
pub fn inv_rms(x: &[f32], eps: f32) -> f32 {
    1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt()
}

/// Softmax in place.
pub fn softmax(v: &mut [f32]) {
    let (_, sum) = exp_shifted(v);
    let inv = 1.0 / sum;
    v.iter_mut().for_each(|x| *x *= inv);
}

/// Replaces every value by `e^(x − max)` and returns `(max, Σ e^(x − max))`: a softmax before
/// its normalization (attention merges such partial sums over chunks of keys).
pub fn exp_shifted(v: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if super::supported() {
        // SAFETY: AVX2/FMA detected.
        return unsafe { avx2::exp_shifted(v) };
    }
    let max = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let mut sum = 0f32;
    for x in v.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    (max, sum)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// `e^x` for eight values: `x = n·ln2 + r` with `|r| ≤ ln2/2`, a degree-6 Taylor
    /// polynomial for `e^r` (error below 2e-7 relative) and `2^n` built in the exponent bits.
    /// Inputs are clamped to [-87, 88], where `2^n` stays a normal float.
    #[inline(always)]
    pub unsafe fn exp(x: __m256) -> __m256 {
        // SAFETY: callers enable AVX2 and FMA.
        unsafe {
            let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0)), _mm256_set1_ps(88.0));
            let n = _mm256_round_ps(
                _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            // ln 2 in two parts, so n·ln2 is subtracted without losing r's low bits.
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
            let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
            let mut p = _mm256_set1_ps(1.0 / 720.0);
            for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
                p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
            }
            let two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
            _mm256_mul_ps(p, _mm256_castsi256_ps(two_n))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &[f32], u: &[f32], o: &mut [f32]) {
        let n = o.len().min(g.len()).min(u.len());
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for all three slices.
            unsafe {
                let gv = _mm256_loadu_ps(g.as_ptr().add(i));
                let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
                let s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                _mm256_storeu_ps(o.as_mut_ptr().add(i), _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))));
            }
            i += 8;
        }
        for j in i..n {
            o[j] = g[j] / (1.0 + (-g[j]).exp()) * u[j];
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_mul(g: &[f32], u: &[f32], o: &mut [f32]) {
        let n = o.len().min(g.len()).min(u.len());
        let (c, cubic) = (_mm256_set1_ps(-2.0 * super::SQRT_2_OVER_PI), _mm256_set1_ps(super::GELU_CUBIC));
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for all three slices.
            unsafe {
                let x = _mm256_loadu_ps(g.as_ptr().add(i));
                // -z = -2·√(2/π)·(x + 0.044715·x³) = c·x·(1 + 0.044715·x²)
                let inner = _mm256_fmadd_ps(_mm256_mul_ps(cubic, x), x, _mm256_set1_ps(1.0));
                let e = exp(_mm256_mul_ps(_mm256_mul_ps(c, x), inner));
                let s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e));
                _mm256_storeu_ps(o.as_mut_ptr().add(i), _mm256_mul_ps(s, _mm256_loadu_ps(u.as_ptr().add(i))));
            }
            i += 8;
        }
        for j in i..n {
            o[j] = super::gelu_tanh(g[j]) * u[j];
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn exp_shifted(v: &mut [f32]) -> (f32, f32) {
        let max = v.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let n = v.len();
        let (mut i, mut sum) = (0, _mm256_setzero_ps());
        let maxv = _mm256_set1_ps(max);
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                let e = exp(_mm256_sub_ps(_mm256_loadu_ps(v.as_ptr().add(i)), maxv));
                _mm256_storeu_ps(v.as_mut_ptr().add(i), e);
                sum = _mm256_add_ps(sum, e);
            }
            i += 8;
        }
        let mut lanes = [0f32; 8];
        // SAFETY: eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), sum) };
        let mut total: f32 = lanes.iter().sum();
        for x in &mut v[i..] {
            *x = (*x - max).exp();
            total += *x;
        }
        (max, total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn simd_exp_silu_gelu_and_softmax_match_libm() -> Result<()> {
        // Wide range, including values past the clamps, and a length with a scalar tail.
        let xs: Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.9).collect();
        let (g, u) = (&xs[..], xs.iter().map(|x| 1.0 - x * 0.01).collect::<Vec<_>>());
        let mut got = vec![0f32; g.len()];
        silu_mul(g, &u, &mut got);
        for ((o, &g), &u) in got.iter().zip(g).zip(&u) {
            let want = (g as f64 / (1.0 + (-g as f64).exp()) * u as f64) as f32;
            assert!((o - want).abs() <= 1e-6 * want.abs() + 1e-30, "silu·mul({g}, {u}) = {o}, want {want}");
        }
        gelu_mul(g, &u, &mut got);
        for ((o, &g), &u) in got.iter().zip(g).zip(&u) {
            let x = g as f64;
            // 0.5·(1 + tanh(y)) written as σ(2y), which keeps its precision where tanh(y) ≈ -1.
            let y = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
            let want = (x / (1.0 + (-2.0 * y).exp()) * u as f64) as f32;
            assert!((o - want).abs() <= 2e-6 * want.abs() + 1e-30, "gelu·mul({g}, {u}) = {o}, want {want}");
        }
        let mut p: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 6.0).collect();
        let want: Vec<f64> = {
            let m = p.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
            let e: Vec<f64> = p.iter().map(|&x| (x as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|e| e / z).collect()
        };
        softmax(&mut p);
        for (got, want) in p.iter().zip(&want) {
            assert!((*got as f64 - want).abs() <= 1e-6 * want, "{got} vs {want}");
        }
        Ok(())
    }

    #[test]
    fn gated_mul_op_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (t, act) in [(1, Activation::Silu), (5, Activation::Silu), (5, Activation::GeluTanh)] {
            let gu = Tensor::randn(0f32, 2.0, (t, 2 * 24), &dev)?;
            let got = GatedMul { inter: 24, act }.forward(&gu)?;
            let gate = gu.narrow(1, 0, 24)?;
            let gate = match act {
                Activation::Silu => candle_nn::ops::silu(&gate)?,
                Activation::GeluTanh => gate.gelu()?,
            };
            let want = (gate * gu.narrow(1, 24, 24)?)?;
            let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "t={t} {act:?}: max error {err}");
        }
        assert!(
            GatedMul { inter: 10, act: Activation::Silu }
                .forward(&Tensor::zeros((2, 24), candle_core::DType::F32, &dev)?)
                .is_err()
        );
        Ok(())
    }
}
