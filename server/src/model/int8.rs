//! Batched quantized matmul for the CPU: activations quantized to int8 in blocks of 32, weights
//! either int8 blocks (any source format, Q8_0 semantics with f32 scales) or 4-bit blocks copied
//! bit for bit from GGUF Q4_0/Q4_1 (value = q·d + m), with AVX2 integer dot products.
//!
//! candle's quantized CPU matmul runs one vector-dot pass over the whole weight matrix per
//! activation row, so a batch of 16 decode rows or a 128-token prefill reads the weights 16 or
//! 128 times. Here every weight block is loaded once and multiplied against all activation rows
//! of a tile while it sits in registers. The work runs on candle's own worker pool, so tensor
//! ops and these matmuls never compete for the cores.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

pub const BLOCK: usize = 32;
/// Activation rows handled per pass over a weight row (bounds the accumulators and keeps the
/// activation tile in cache).
const ROW_TILE: usize = 64;

/// True when this CPU can run the kernels.
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

enum Blocks {
    /// `q[n*k]` int8, one scale per block.
    Int8 { q: Vec<i8>, d: Vec<f32> },
    /// Two 4-bit values per byte (low nibble = element i, high = element i + 16 of a block),
    /// one scale and one offset per block.
    Int4 { qs: Vec<u8>, d: Vec<f32>, m: Vec<f32> },
}

/// A `[n, k]` weight matrix in block-quantized form.
pub struct QLinear {
    n: usize,
    k: usize,
    blocks: Blocks,
}

/// Quantizes `x` (a multiple of 32 long) into `q` with one scale per block in `d`; `s` gets
/// `d · Σq` per block (used by the 4-bit offset term).
pub fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    for (((xs, qs), ds), ss) in x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK)).zip(d.iter_mut()).zip(s.iter_mut())
    {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        let mut sum = 0i32;
        for (qv, xv) in qs.iter_mut().zip(xs) {
            *qv = (xv * inv).round() as i8;
            sum += *qv as i32;
        }
        *ds = scale;
        *ss = scale * sum as f32;
    }
}

impl QLinear {
    /// Quantizes a dense `[n, k]` weight to int8 blocks.
    pub fn from_dense(w: &Tensor) -> Result<Self> {
        let (n, k) = w.dims2()?;
        check_k(k)?;
        let data: Vec<f32> = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let mut q = vec![0i8; n * k];
        let mut d = vec![0f32; n * k / BLOCK];
        let mut s = vec![0f32; n * k / BLOCK];
        quantize_blocks(&data, &mut q, &mut d, &mut s);
        Ok(Self { n, k, blocks: Blocks::Int8 { q, d } })
    }

    /// Copies Q4_0/Q4_1 blocks losslessly; `None` for other formats.
    pub fn from_q4(t: &QTensor) -> Result<Option<Self>> {
        let (n, k) = t.shape().dims2()?;
        let (size, has_min) = match t.dtype() {
            GgmlDType::Q4_0 => (18, false),
            GgmlDType::Q4_1 => (20, true),
            _ => return Ok(None),
        };
        check_k(k)?;
        let raw = t.data()?;
        let n_blocks = n * k / BLOCK;
        if raw.len() != n_blocks * size {
            candle_core::bail!("{:?} tensor has {} bytes, expected {}", t.dtype(), raw.len(), n_blocks * size);
        }
        let (mut qs, mut d, mut m) =
            (Vec::with_capacity(n_blocks * 16), Vec::with_capacity(n_blocks), Vec::with_capacity(n_blocks));
        let f16 = |b: &[u8]| half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        for b in raw.chunks_exact(size) {
            let scale = f16(&b[0..2]);
            d.push(scale);
            if has_min {
                m.push(f16(&b[2..4]));
                qs.extend_from_slice(&b[4..20]);
            } else {
                // Q4_0 stores (q - 8)·d: an offset of -8·d.
                m.push(-8.0 * scale);
                qs.extend_from_slice(&b[2..18]);
            }
        }
        Ok(Some(Self { n, k, blocks: Blocks::Int4 { qs, d, m } }))
    }

    /// Concatenates weights along the output dimension (all of one block kind).
    pub fn concat(parts: Vec<QLinear>) -> Result<Self> {
        let k = parts.first().map(|p| p.k).unwrap_or(0);
        if parts.iter().any(|p| p.k != k) {
            candle_core::bail!("cannot concatenate weights with different input sizes");
        }
        let n = parts.iter().map(|p| p.n).sum();
        let mut iter = parts.into_iter();
        let mut first = iter.next().ok_or_else(|| candle_core::Error::msg("nothing to concatenate"))?;
        for p in iter {
            match (&mut first.blocks, p.blocks) {
                (Blocks::Int8 { q, d }, Blocks::Int8 { q: q2, d: d2 }) => {
                    q.extend(q2);
                    d.extend(d2);
                }
                (Blocks::Int4 { qs, d, m }, Blocks::Int4 { qs: q2, d: d2, m: m2 }) => {
                    qs.extend(q2);
                    d.extend(d2);
                    m.extend(m2);
                }
                _ => candle_core::bail!("cannot concatenate int8 and 4-bit weights"),
            }
        }
        first.n = n;
        Ok(first)
    }

    pub fn is_int4(&self) -> bool {
        matches!(self.blocks, Blocks::Int4 { .. })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }

    /// `out[m, n] = a[m, k] · wᵀ` for quantized activations.
    fn matmul(&self, a: &Activations, m: usize, out: &mut [f32]) {
        let n = self.n;
        let out_ptr = SendPtr(out.as_mut_ptr());
        candle_core::utils::barrier_pool().execute_chunked(n, |cols| {
            let out_ptr = &out_ptr;
            let mut acc = [0f32; ROW_TILE];
            for i0 in (0..m).step_by(ROW_TILE) {
                let rows = ROW_TILE.min(m - i0);
                for j in cols.clone() {
                    self.dot_rows(j, a, i0, rows, &mut acc[..rows]);
                    for (r, v) in acc[..rows].iter().enumerate() {
                        // SAFETY: column j belongs to this chunk alone; (i0 + r, j) is in bounds.
                        unsafe { *out_ptr.0.add((i0 + r) * n + j) = *v };
                    }
                }
            }
        });
    }

    fn dot_rows(&self, j: usize, a: &Activations, i0: usize, rows: usize, out: &mut [f32]) {
        let nb = self.k / BLOCK;
        let (aq, ad, asum) = (&a.q[i0 * self.k..], &a.d[i0 * nb..], &a.s[i0 * nb..]);
        match &self.blocks {
            Blocks::Int8 { q, d } => {
                let (w, wd) = (&q[j * self.k..(j + 1) * self.k], &d[j * nb..(j + 1) * nb]);
                #[cfg(target_arch = "x86_64")]
                if supported() {
                    // SAFETY: AVX2/FMA detected; slice lengths as documented on the kernel.
                    unsafe { avx2::dot_int8(w, wd, aq, ad, rows, nb, out) };
                    return;
                }
                scalar_int8(w, wd, aq, ad, rows, nb, out);
            }
            Blocks::Int4 { qs, d, m } => {
                let w = &qs[j * nb * 16..(j + 1) * nb * 16];
                let (wd, wm) = (&d[j * nb..(j + 1) * nb], &m[j * nb..(j + 1) * nb]);
                #[cfg(target_arch = "x86_64")]
                if supported() {
                    // SAFETY: as above.
                    unsafe { avx2::dot_int4(w, wd, wm, aq, ad, asum, rows, nb, out) };
                    return;
                }
                scalar_int4(w, wd, wm, aq, ad, asum, rows, nb, out);
            }
        }
    }
}

fn check_k(k: usize) -> Result<()> {
    if k.is_multiple_of(BLOCK) {
        Ok(())
    } else {
        candle_core::bail!("quantized weight needs k divisible by {BLOCK}, got {k}")
    }
}

/// Activations quantized per block: values, scales, and scale·sum per block.
struct Activations {
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

struct SendPtr(*mut f32);
// SAFETY: tasks write disjoint columns of the output through this pointer.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

fn scalar_int8(w: &[i8], wd: &[f32], a: &[i8], ad: &[f32], rows: usize, nb: usize, out: &mut [f32]) {
    let k = nb * BLOCK;
    for (r, o) in out.iter_mut().enumerate().take(rows) {
        *o = (0..nb)
            .map(|b| {
                let dot: i32 = (0..BLOCK).map(|t| w[b * BLOCK + t] as i32 * a[r * k + b * BLOCK + t] as i32).sum();
                dot as f32 * wd[b] * ad[r * nb + b]
            })
            .sum();
    }
}

#[allow(clippy::too_many_arguments)]
fn scalar_int4(
    w: &[u8],
    wd: &[f32],
    wm: &[f32],
    a: &[i8],
    ad: &[f32],
    asum: &[f32],
    rows: usize,
    nb: usize,
    out: &mut [f32],
) {
    let k = nb * BLOCK;
    for (r, o) in out.iter_mut().enumerate().take(rows) {
        *o = (0..nb)
            .map(|b| {
                let dot: i32 = (0..16)
                    .map(|t| {
                        let byte = w[b * 16 + t];
                        let lo = (byte & 0x0F) as i32 * a[r * k + b * BLOCK + t] as i32;
                        let hi = (byte >> 4) as i32 * a[r * k + b * BLOCK + t + 16] as i32;
                        lo + hi
                    })
                    .sum();
                dot as f32 * wd[b] * ad[r * nb + b] + wm[b] * asum[r * nb + b]
            })
            .sum();
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Sum of u8 x i8 products of 32 pairs, as 8 f32 partial sums.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    fn udot(w_unsigned: __m256i, a: __m256i, ones: __m256i) -> __m256 {
        _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w_unsigned, a), ones))
    }

    /// # Safety
    /// AVX2 and FMA must be available; `w` holds `nb` blocks of 32, `a` at least `rows` rows of
    /// `nb` blocks, `ad` their scales, `out` at least `rows` slots.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_int8(w: &[i8], wd: &[f32], a: &[i8], ad: &[f32], rows: usize, nb: usize, out: &mut [f32]) {
        let k = nb * BLOCK;
        assert!(w.len() >= k && wd.len() >= nb && a.len() >= rows * k && ad.len() >= rows * nb && out.len() >= rows);
        let ones = _mm256_set1_epi16(1);
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            for b in 0..nb {
                // SAFETY: bounds asserted above.
                let wv = unsafe { _mm256_loadu_si256(w.as_ptr().add(b * BLOCK) as *const __m256i) };
                // maddubs needs one unsigned operand: move w's sign onto a.
                let w_abs = _mm256_sign_epi8(wv, wv);
                for (t, acc) in acc.iter_mut().enumerate().take(take) {
                    let row = r + t;
                    // SAFETY: bounds asserted above.
                    let av = unsafe { _mm256_loadu_si256(a.as_ptr().add(row * k + b * BLOCK) as *const __m256i) };
                    let s = _mm256_set1_ps(wd[b] * ad[row * nb + b]);
                    *acc = _mm256_fmadd_ps(udot(w_abs, _mm256_sign_epi8(av, wv), ones), s, *acc);
                }
            }
            for (t, acc) in acc.iter().enumerate().take(take) {
                out[r + t] = hsum(*acc);
            }
            r += take;
        }
    }

    /// # Safety
    /// As [`dot_int8`], with `w` holding `nb` blocks of 16 bytes and `wm`, `asum` the offsets
    /// and activation sums.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dot_int4(
        w: &[u8],
        wd: &[f32],
        wm: &[f32],
        a: &[i8],
        ad: &[f32],
        asum: &[f32],
        rows: usize,
        nb: usize,
        out: &mut [f32],
    ) {
        let k = nb * BLOCK;
        assert!(w.len() >= nb * 16 && wd.len() >= nb && wm.len() >= nb);
        assert!(a.len() >= rows * k && ad.len() >= rows * nb && asum.len() >= rows * nb && out.len() >= rows);
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(0x0F);
        let mut r = 0;
        while r < rows {
            let take = (rows - r).min(4);
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut offset = [0f32; 4];
            for b in 0..nb {
                // SAFETY: bounds asserted above.
                let packed = unsafe { _mm_loadu_si128(w.as_ptr().add(b * 16) as *const __m128i) };
                let lo = _mm_and_si128(packed, low);
                let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
                let wv = _mm256_set_m128i(hi, lo);
                for t in 0..take {
                    let row = r + t;
                    // SAFETY: bounds asserted above.
                    let av = unsafe { _mm256_loadu_si256(a.as_ptr().add(row * k + b * BLOCK) as *const __m256i) };
                    let s = _mm256_set1_ps(wd[b] * ad[row * nb + b]);
                    acc[t] = _mm256_fmadd_ps(udot(wv, av, ones), s, acc[t]);
                    offset[t] += wm[b] * asum[row * nb + b];
                }
            }
            for t in 0..take {
                out[r + t] = hsum(acc[t]) + offset[t];
            }
            r += take;
        }
    }
}

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "block-quantized-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else {
            candle_core::bail!("block-quantized linear expects f32 activations");
        };
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k {
            candle_core::bail!("block-quantized linear: input has {k} features, weight expects {}", self.k);
        }
        let x = match layout.contiguous_offsets() {
            Some((a, b)) => &data[a..b],
            None => candle_core::bail!("block-quantized linear expects contiguous activations"),
        };
        let m = x.len() / k;
        let nb = k / BLOCK;
        let mut act = Activations { q: vec![0i8; m * k], d: vec![0f32; m * nb], s: vec![0f32; m * nb] };
        quantize_blocks(x, &mut act.q, &mut act.d, &mut act.s);
        let mut out = vec![0f32; m * self.n];
        self.matmul(&act, m, &mut out);
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = self.n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn rel_err(got: &Tensor, want: &Tensor) -> Result<f32> {
        let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(err / scale)
    }

    #[test]
    fn int8_matches_dense_matmul_within_quantization_error() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (70, 96), &dev)?;
        let lin = QLinear::from_dense(&w)?;
        for m in [1usize, 3, 5, 67] {
            let x = Tensor::randn(0f32, 1.0, (m, 96), &dev)?;
            let got = lin.forward(&x)?;
            assert_eq!(got.dims(), &[m, 70]);
            let e = rel_err(&got, &x.matmul(&w.t()?)?)?;
            assert!(e < 0.03, "m={m}: relative error {e}");
        }
        Ok(())
    }

    #[test]
    fn int4_blocks_are_copied_losslessly_from_q4_formats() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (40, 64), &dev)?;
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0] {
            let qt = QTensor::quantize(&w, dtype)?;
            // The reference is the GGUF tensor's own dequantized values.
            let dense = qt.dequantize(&dev)?;
            let lin = QLinear::from_q4(&qt)?.expect("q4 formats convert");
            assert!(lin.is_int4());
            let x = Tensor::randn(0f32, 1.0, (6, 64), &dev)?;
            let e = rel_err(&lin.forward(&x)?, &x.matmul(&dense.t()?)?)?;
            assert!(e < 0.02, "{dtype:?}: relative error {e}");
        }
        assert!(QLinear::from_q4(&QTensor::quantize(&w, GgmlDType::Q8_0)?)?.is_none());
        Ok(())
    }

    #[test]
    fn rows_are_independent_of_the_batch_and_concat_is_exact() -> Result<()> {
        let dev = Device::Cpu;
        let w1 = Tensor::randn(0f32, 1.0, (40, 64), &dev)?;
        let w2 = Tensor::randn(0f32, 1.0, (24, 64), &dev)?;
        let q = |w: &Tensor| QLinear::from_q4(&QTensor::quantize(w, GgmlDType::Q4_1).unwrap()).unwrap().unwrap();
        let fused = QLinear::concat(vec![q(&w1), q(&w2)])?;
        let x = Tensor::randn(0f32, 1.0, (9, 64), &dev)?;
        let all: Vec<Vec<f32>> = fused.forward(&x)?.to_vec2()?;
        let first: Vec<Vec<f32>> = q(&w1).forward(&x)?.to_vec2()?;
        for i in 0..9 {
            let one: Vec<Vec<f32>> = fused.forward(&x.narrow(0, i, 1)?.contiguous()?)?.to_vec2()?;
            assert_eq!(one[0], all[i], "row {i}");
            assert_eq!(all[i][..40], first[i][..], "row {i}");
        }
        assert!(QLinear::concat(vec![q(&w1), QLinear::from_dense(&w2)?]).is_err());
        Ok(())
    }

    #[test]
    fn simd_and_scalar_kernels_agree() {
        let nb = 2;
        let w8: Vec<i8> = (0..64).map(|i| ((i * 37) % 255 - 127) as i8).collect();
        let w4: Vec<u8> = (0..32).map(|i| (i * 29 % 256) as u8).collect();
        let a: Vec<i8> = (0..128).map(|i| ((i * 11) % 200) as i8 - 100).collect();
        let (wd, wm, ad, asum) = ([0.5f32, 0.25], [0.1f32, -0.3], [1.0f32, 2.0, 0.5, 3.0], [4.0f32, -1.0, 2.0, 0.5]);
        let (mut s8, mut s4) = ([0f32; 2], [0f32; 2]);
        scalar_int8(&w8, &wd, &a, &ad, 2, nb, &mut s8);
        scalar_int4(&w4, &wd, &wm, &a, &ad, &asum, 2, nb, &mut s4);
        let (mut v8, mut v4) = ([0f32; 2], [0f32; 2]);
        let act = Activations { q: a.clone(), d: ad.to_vec(), s: asum.to_vec() };
        QLinear { n: 1, k: 64, blocks: Blocks::Int8 { q: w8, d: wd.to_vec() } }.dot_rows(0, &act, 0, 2, &mut v8);
        QLinear { n: 1, k: 64, blocks: Blocks::Int4 { qs: w4, d: wd.to_vec(), m: wm.to_vec() } }
            .dot_rows(0, &act, 0, 2, &mut v4);
        for (x, y) in s8.iter().chain(&s4).zip(v8.iter().chain(&v4)) {
            assert!((x - y).abs() <= 1e-3 * x.abs().max(1.0), "{x} vs {y}");
        }
    }
}
