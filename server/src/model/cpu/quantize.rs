//! Activation quantization: rows of f32 values to int8 blocks of 32 with a scale (and the scale
//! times the block's sum, for the offset terms of 4-bit and unsigned weights) per block, and the
//! integer sums of each block's two 16-value halves (for Q6_K's `q − 32`), in one level or two.

use super::{BLOCK, SendPtr, supported};

/// Quantizes `x` (a multiple of 32 long) into `q` with one scale per block in `d`; `s` gets
/// `d · Σq` per block (used by the offset terms) and `h` the two integer sums `Σq` over each
/// block's halves (values 0..16 and 16..32).
pub(super) fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], h: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if supported() {
        // SAFETY: AVX2/FMA detected.
        unsafe { quantize_blocks_avx2(x, q, d, s, h) };
        return;
    }
    quantize_blocks_body(x, q, d, s, h);
}

/// [`quantize_blocks_body`] in AVX2: a block of 32 values is four registers, its maximum a
/// short reduction, and the rounded values are packed to bytes in registers. Rounding is to
/// nearest even (the scalar loop rounds ties away from zero).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_blocks_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], h: &mut [i32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / BLOCK;
    assert!(q.len() >= nb * BLOCK && d.len() >= nb && s.len() >= nb && h.len() >= 2 * nb);
    // The sum of eight i32 lanes.
    let lanes = |v: __m256i| {
        let v = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        let v = _mm_add_epi32(v, _mm_shuffle_epi32(v, 0b01_00_11_10));
        _mm_cvtsi128_si32(_mm_add_epi32(v, _mm_shuffle_epi32(v, 0b00_00_00_01)))
    };
    let sign = _mm256_set1_ps(-0.0);
    // packs interleave the 128-bit halves; this puts the 4-byte groups back in order.
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for b in 0..nb {
        // SAFETY: block b of x and q is in bounds (nb blocks, asserted above).
        unsafe {
            let p = x.as_ptr().add(b * BLOCK);
            let v =
                [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
            let abs = v.map(|v| _mm256_andnot_ps(sign, v));
            let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
            let scale = amax / 127.0;
            let inv = _mm256_set1_ps(if scale > 0.0 { 1.0 / scale } else { 0.0 });
            let i = v.map(|v| _mm256_cvtps_epi32(_mm256_mul_ps(v, inv)));
            let (lo, hi) = (lanes(_mm256_add_epi32(i[0], i[1])), lanes(_mm256_add_epi32(i[2], i[3])));
            let sum = lo + hi;
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            _mm256_storeu_si256(
                q.as_mut_ptr().add(b * BLOCK) as *mut __m256i,
                _mm256_permutevar8x32_epi32(bytes, order),
            );
            d[b] = scale;
            s[b] = scale * sum as f32;
            h[2 * b] = lo;
            h[2 * b + 1] = hi;
        }
    }
}

#[inline(always)]
pub(super) fn quantize_blocks_body(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32], h: &mut [i32]) {
    let blocks = x.chunks_exact(BLOCK).zip(q.chunks_exact_mut(BLOCK));
    for (((xs, qs), (ds, ss)), hs) in blocks.zip(d.iter_mut().zip(s.iter_mut())).zip(h.chunks_exact_mut(2)) {
        let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs()));
        let scale = amax / 127.0;
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (qv, xv) in qs.iter_mut().zip(xs) {
            *qv = (xv * inv).round() as i8;
        }
        hs[0] = qs[..16].iter().map(|&v| v as i32).sum();
        hs[1] = qs[16..].iter().map(|&v| v as i32).sum();
        *ds = scale;
        *ss = scale * (hs[0] + hs[1]) as f32;
    }
}

/// Activations quantized per block: values, scales, scale·sum per block and the integer sums
/// of its halves.
pub(super) struct Activations {
    pub(super) q: Vec<i8>,
    pub(super) d: Vec<f32>,
    pub(super) s: Vec<f32>,
    pub(super) h: Vec<i32>,
}

impl Activations {
    /// Room for `rows` rows of `k` values.
    pub(super) fn new(rows: usize, k: usize) -> Self {
        let nb = k / BLOCK;
        Self { q: vec![0; rows * k], d: vec![0.0; rows * nb], s: vec![0.0; rows * nb], h: vec![0; rows * nb * 2] }
    }

    /// Rows `i0..i0 + rows` as the kernels read them.
    pub(super) fn rows(&self, i0: usize, rows: usize, k: usize) -> super::ActRows<'_> {
        let nb = k / BLOCK;
        super::ActRows {
            q: &self.q[i0 * k..],
            d: &self.d[i0 * nb..],
            s: &self.s[i0 * nb..],
            h: &self.h[i0 * 2 * nb..],
            rows,
            nb,
        }
    }
}

impl Activations {
    /// Quantizes rows of `k` values from `x`, split over the worker pool when there are
    /// several rows (on the calling thread alone, the other cores would wait for it).
    pub(super) fn quantize(&mut self, x: &[f32], k: usize) {
        let (m, nb) = (x.len() / k, k / BLOCK);
        if m < 4 {
            quantize_blocks(x, &mut self.q, &mut self.d, &mut self.s, &mut self.h);
            return;
        }
        let (q, d, s) = (SendPtr(self.q.as_mut_ptr()), SendPtr(self.d.as_mut_ptr()), SendPtr(self.s.as_mut_ptr()));
        let h = SendPtr(self.h.as_mut_ptr());
        assert!(
            self.q.len() >= m * k && self.d.len() >= m * nb && self.s.len() >= m * nb && self.h.len() >= 2 * m * nb
        );
        candle_core::utils::barrier_pool().execute_chunked(m, |rows| {
            let (q, d, s, h) = (&q, &d, &s, &h);
            let n = rows.len();
            // SAFETY: each task gets its own rows of the four buffers, in bounds per the
            // assertion above.
            let (q, d, s, h) = unsafe {
                (
                    std::slice::from_raw_parts_mut(q.0.add(rows.start * k), n * k),
                    std::slice::from_raw_parts_mut(d.0.add(rows.start * nb), n * nb),
                    std::slice::from_raw_parts_mut(s.0.add(rows.start * nb), n * nb),
                    std::slice::from_raw_parts_mut(h.0.add(rows.start * 2 * nb), n * 2 * nb),
                )
            };
            quantize_blocks(&x[rows.start * k..rows.end * k], q, d, s, h);
        });
    }
}

impl Activations {
    /// Second level: rows `m..2m` quantize what rows `0..m` left out (`x - d·q`, at most half a
    /// step per value), so the two rows' dot products add up to ~15 bits of activation
    /// precision.
    pub(super) fn quantize_residual(&mut self, x: &[f32], k: usize, m: usize) {
        let nb = k / BLOCK;
        let mut r = vec![0f32; m * k];
        for (i, rv) in r.iter_mut().enumerate() {
            *rv = x[i] - self.d[i / BLOCK] * self.q[i] as f32;
        }
        let (q, d, s, h) =
            (&mut self.q[m * k..], &mut self.d[m * nb..], &mut self.s[m * nb..], &mut self.h[2 * m * nb..]);
        quantize_blocks(&r, q, d, s, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Result, Tensor};

    #[test]
    fn simd_quantization_matches_the_scalar_loop() -> Result<()> {
        // Random values (no exact rounding ties), a block of zeros, and one with a lone value.
        let mut x: Vec<f32> = Tensor::randn(0f32, 3.0, (10 * BLOCK,), &Device::Cpu)?.to_vec1()?;
        x.extend([0.0; BLOCK]);
        x.extend((0..BLOCK).map(|i| if i == 7 { -2.5 } else { 0.0 }));
        let nb = x.len() / BLOCK;
        let run = |simd: bool| {
            let (mut q, mut d, mut s, mut h) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb], vec![0i32; 2 * nb]);
            if simd {
                quantize_blocks(&x, &mut q, &mut d, &mut s, &mut h);
            } else {
                quantize_blocks_body(&x, &mut q, &mut d, &mut s, &mut h);
            }
            (q, d, s, h)
        };
        let (simd, scalar) = (run(true), run(false));
        assert_eq!(simd, scalar);
        for b in 0..nb {
            let half = |i: usize| simd.0[b * BLOCK + 16 * i..][..16].iter().map(|&v| v as i32).sum::<i32>();
            assert_eq!((simd.3[2 * b], simd.3[2 * b + 1]), (half(0), half(1)), "half sums of block {b}");
        }
        assert_eq!(simd.0[11 * BLOCK + 7], -127);
        assert!(simd.0[10 * BLOCK..11 * BLOCK].iter().all(|&v| v == 0) && simd.1[10] == 0.0);
        Ok(())
    }
}
