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
/// Weight rows (output columns) per register tile of the AVX2 kernels (16 vector registers).
const COLS: usize = 2;
/// Weight rows per task tile: the VNNI kernels, with 32 vector registers, take all four at once;
/// the AVX2 ones two pairs.
const TILE: usize = 4;
/// Weight rows per tile of the column-interleaved VNNI layout ([`Blocks::Packed16`]): one
/// 512-bit register holds 16 weight rows' partial sums.
const GROUP: usize = 16;
/// Width of the per-tile output buffers (the widest tile).
const OUT_W: usize = GROUP;

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

/// True when the CPU also has AVX-512 VNNI (one-instruction u8·i8 dot products) and
/// `PERSONA_NO_VNNI` is unset. Decided once per process: it is asked for every weight tile, and
/// reading the environment each time cost a tenth of the decode time.
fn vnni_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static VNNI: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *VNNI.get_or_init(|| {
            supported()
                && std::env::var_os("PERSONA_NO_VNNI").is_none()
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512vl")
                && is_x86_feature_detected!("avx512vnni")
        })
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
    /// Int8 blocks as VNNI wants them: `q + 128` unsigned, with the offset `-128·d` per block
    /// taken out like the 4-bit one, so no sign juggling is needed per product.
    Uint8 { q: Vec<u8>, d: Vec<f32>, m: Vec<f32> },
    /// Groups of [`GROUP`] weight rows interleaved for VNNI, so that one instruction adds four
    /// products to each of 16 rows' sums and a block's scales apply once per 16 rows: for group
    /// g and block b, eight 64-byte vectors, vector j holding values 4j..4j+4 of the block for
    /// each of the 16 rows (`four`: two such vectors share 64 bytes, one per nibble), then the
    /// group's 16 scales and 16 offsets per block in `d` and `m`.
    Packed16 { four: bool, q: Vec<u8>, d: Vec<f32>, m: Vec<f32> },
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
    #[cfg(target_arch = "x86_64")]
    if supported() {
        // SAFETY: AVX2/FMA detected.
        unsafe { quantize_blocks_avx2(x, q, d, s) };
        return;
    }
    quantize_blocks_body(x, q, d, s);
}

/// [`quantize_blocks_body`] in AVX2: a block of 32 values is four registers, its maximum a
/// short reduction, and the rounded values are packed to bytes in registers. Rounding is to
/// nearest even (the scalar loop rounds ties away from zero).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn quantize_blocks_avx2(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
    use std::arch::x86_64::*;
    let nb = x.len() / BLOCK;
    assert!(q.len() >= nb * BLOCK && d.len() >= nb && s.len() >= nb);
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
            let sum = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
            let sum = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
            let sum = _mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b01_00_11_10));
            let sum = _mm_cvtsi128_si32(_mm_add_epi32(sum, _mm_shuffle_epi32(sum, 0b00_00_00_01)));
            let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
            _mm256_storeu_si256(
                q.as_mut_ptr().add(b * BLOCK) as *mut __m256i,
                _mm256_permutevar8x32_epi32(bytes, order),
            );
            d[b] = scale;
            s[b] = scale * sum as f32;
        }
    }
}

#[inline(always)]
fn quantize_blocks_body(x: &[f32], q: &mut [i8], d: &mut [f32], s: &mut [f32]) {
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
    /// Quantizes a dense `[n, k]` weight to int8 blocks (stored unsigned where VNNI runs).
    pub fn from_dense(w: &Tensor) -> Result<Self> {
        Self::from_dense_as(w, vnni_supported())
    }

    fn from_dense_as(w: &Tensor, unsigned: bool) -> Result<Self> {
        let (n, k) = w.dims2()?;
        check_k(k)?;
        let data: Vec<f32> = w.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        let mut q = vec![0i8; n * k];
        let mut d = vec![0f32; n * k / BLOCK];
        let mut s = vec![0f32; n * k / BLOCK];
        quantize_blocks(&data, &mut q, &mut d, &mut s);
        let blocks = if unsigned {
            let m = d.iter().map(|d| -128.0 * d).collect();
            Blocks::Uint8 { q: q.into_iter().map(|v| (v as i16 + 128) as u8).collect(), d, m }
        } else {
            Blocks::Int8 { q, d }
        };
        Ok(Self { n, k, blocks })
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
                (Blocks::Int4 { qs, d, m }, Blocks::Int4 { qs: q2, d: d2, m: m2 })
                | (Blocks::Uint8 { q: qs, d, m }, Blocks::Uint8 { q: q2, d: d2, m: m2 }) => {
                    qs.extend(q2);
                    d.extend(d2);
                    m.extend(m2);
                }
                _ => candle_core::bail!("cannot concatenate weights of different block formats"),
            }
        }
        first.n = n;
        Ok(first)
    }

    pub fn is_int4(&self) -> bool {
        matches!(self.blocks, Blocks::Int4 { .. } | Blocks::Packed16 { four: true, .. })
    }

    /// The layout the fastest kernel on this CPU wants: weights whose row count is a multiple of
    /// [`GROUP`] are interleaved in groups of 16 rows (done once, at load) — with VNNI all of
    /// them, with AVX2 alone the 4-bit ones (8-bit products would overflow its 16-bit sums).
    pub fn for_this_cpu(self) -> Self {
        let four = matches!(self.blocks, Blocks::Int4 { .. });
        if !self.n.is_multiple_of(GROUP) || !(vnni_supported() || (four && supported())) {
            return self;
        }
        let (n, k) = (self.n, self.k);
        match self.blocks {
            Blocks::Int4 { qs, d, m } => {
                let value = |j: usize, i: usize| {
                    let (b, t) = (i / BLOCK, i % BLOCK);
                    let byte = qs[(j * k / BLOCK + b) * 16 + t % 16];
                    if t < 16 { byte & 0x0F } else { byte >> 4 }
                };
                Self { n, k, blocks: pack16(n, k, true, value, &d, &m) }
            }
            Blocks::Uint8 { q, d, m } => {
                let value = |j: usize, i: usize| q[j * k + i];
                Self { n, k, blocks: pack16(n, k, false, value, &d, &m) }
            }
            blocks => Self { n, k, blocks },
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }

    /// `out[m, n] = a[m, k] · wᵀ` for quantized activations.
    fn matmul(&self, a: &Activations, m: usize, out: &mut [f32]) {
        let n = self.n;
        let out_ptr = SendPtr(out.as_mut_ptr());
        let width = if matches!(self.blocks, Blocks::Packed16 { .. }) { GROUP } else { TILE };
        candle_core::utils::barrier_pool().execute_chunked(n.div_ceil(width), |tiles| {
            let out_ptr = &out_ptr;
            let mut acc = [[0f32; OUT_W]; ROW_TILE];
            for i0 in (0..m).step_by(ROW_TILE) {
                let rows = ROW_TILE.min(m - i0);
                for tile in tiles.clone() {
                    let j0 = tile * width;
                    let cols = width.min(n - j0);
                    if tile + 2 < tiles.end {
                        self.prefetch(j0 + 2 * width, width.min(n - j0 - 2 * width));
                    }
                    self.dot_tile(j0, cols, a, i0, rows, &mut acc[..rows]);
                    for (r, vals) in acc[..rows].iter().enumerate() {
                        for (c, v) in vals[..cols].iter().enumerate() {
                            // SAFETY: this tile's columns belong to this task alone; in bounds.
                            unsafe { *out_ptr.0.add((i0 + r) * n + j0 + c) = *v };
                        }
                    }
                }
            }
        });
    }

    /// Asks the CPU to start loading weight rows `j0..j0 + cols` into cache. Weights stream from
    /// memory once per pass; without the hint, the first row group of each tile waits on a
    /// handful of serial cache misses, which cost as much as the tile's arithmetic at 16 rows.
    fn prefetch(&self, j0: usize, cols: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            fn lines<T>(v: &[T], from: usize, to: usize) {
                let bytes = std::mem::size_of_val(&v[from..to]);
                let base = v[from..].as_ptr() as *const i8;
                for off in (0..bytes).step_by(64) {
                    // SAFETY: prefetching is a hint and never faults; the address is in bounds.
                    unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(base.add(off)) };
                }
            }
            let nb = self.k / BLOCK;
            let (b0, b1) = (j0 * nb, (j0 + cols) * nb);
            match &self.blocks {
                Blocks::Int8 { q, d } => {
                    lines(q, j0 * self.k, (j0 + cols) * self.k);
                    lines(d, b0, b1);
                }
                Blocks::Uint8 { q, d, m } => {
                    lines(q, j0 * self.k, (j0 + cols) * self.k);
                    lines(d, b0, b1);
                    lines(m, b0, b1);
                }
                Blocks::Int4 { qs, d, m } => {
                    lines(qs, b0 * 16, b1 * 16);
                    lines(d, b0, b1);
                    lines(m, b0, b1);
                }
                // Groups are whole (n is a multiple of GROUP), so row ranges map to byte ranges.
                Blocks::Packed16 { four, q, d, m } => {
                    let per_row = if *four { self.k / 2 } else { self.k };
                    lines(q, j0 * per_row, (j0 + cols) * per_row);
                    lines(d, b0, b1);
                    lines(m, b0, b1);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (j0, cols);
    }

    /// Dot products of activation rows `i0..i0 + rows` with weight rows `j0..j0 + cols`
    /// (`cols` ≤ [`TILE`]) into `out[row][col]`. Every output goes through the same sequence of
    /// operations whichever kernel or tile position computes it, so a row's result does not
    /// depend on the rows batched with it.
    fn dot_tile(&self, j0: usize, cols: usize, a: &Activations, i0: usize, rows: usize, out: &mut [[f32; OUT_W]]) {
        let nb = self.k / BLOCK;
        let act = ActRows { q: &a.q[i0 * self.k..], d: &a.d[i0 * nb..], s: &a.s[i0 * nb..], rows, nb };
        if let Blocks::Packed16 { four, q, d, m } = &self.blocks {
            // Only built for whole groups, where VNNI runs or (4-bit) where AVX2 does.
            let g = j0 / GROUP;
            let per_group = if *four { nb * 256 } else { nb * 512 };
            let w = (
                &q[g * per_group..][..per_group],
                &d[g * nb * GROUP..][..nb * GROUP],
                &m[g * nb * GROUP..][..nb * GROUP],
            );
            #[cfg(target_arch = "x86_64")]
            // SAFETY: Packed16 exists only where the features of the kernel chosen here were
            // detected (see for_this_cpu); the kernels check their views.
            unsafe {
                match (*four, vnni_supported()) {
                    (true, true) => avx2::tile_packed16::<true>(w, &act, out),
                    (false, _) => avx2::tile_packed16::<false>(w, &act, out),
                    (true, false) => avx2::tile_packed16_avx2(w, &act, out),
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (cols, w);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if supported() {
            let vnni = vnni_supported();
            if vnni && cols == TILE {
                // SAFETY: VNNI detected; the kernels bounds-check their views.
                match &self.blocks {
                    Blocks::Int4 { qs, d, m } => {
                        unsafe { avx2::tile_vnni_wide::<true>(self.offset_cols(qs, 16, d, m, j0), &act, out) };
                        return;
                    }
                    Blocks::Uint8 { q, d, m } => {
                        unsafe { avx2::tile_vnni_wide::<false>(self.offset_cols(q, BLOCK, d, m, j0), &act, out) };
                        return;
                    }
                    // Signed blocks (built for a CPU without VNNI): the AVX2 pairs below.
                    Blocks::Int8 { .. } | Blocks::Packed16 { .. } => {}
                }
            }
            let mut c0 = 0;
            // SAFETY (all three calls): the features each kernel needs were detected; the views
            // are bounds-checked by the kernels.
            while c0 + COLS <= cols {
                let j = j0 + c0;
                match &self.blocks {
                    Blocks::Int8 { q, d } => unsafe { avx2::tile_int8(self.int8_cols(q, d, j), &act, out, c0) },
                    Blocks::Int4 { qs, d, m } if vnni => unsafe {
                        avx2::tile_int4_vnni(self.offset_cols(qs, 16, d, m, j), &act, out, c0)
                    },
                    Blocks::Int4 { qs, d, m } => unsafe {
                        avx2::tile_int4(self.offset_cols(qs, 16, d, m, j), &act, out, c0)
                    },
                    // A tile narrower than TILE: only at the end of an odd-sized weight.
                    Blocks::Uint8 { .. } | Blocks::Packed16 { .. } => break,
                }
                c0 += COLS;
            }
            self.dot_scalar(j0, c0..cols, &act, out);
            return;
        }
        self.dot_scalar(j0, 0..cols, &act, out);
    }

    /// The portable fallback, also used for a tile's odd last column.
    fn dot_scalar(&self, j0: usize, cols: std::ops::Range<usize>, act: &ActRows<'_>, out: &mut [[f32; OUT_W]]) {
        for c in cols {
            let j = j0 + c;
            for (r, o) in out.iter_mut().enumerate().take(act.rows) {
                o[c] = match &self.blocks {
                    Blocks::Int8 { q, d } => {
                        let [(w, wd)] = self.int8_cols::<1>(q, d, j);
                        scalar_int8(w, wd, act, r)
                    }
                    Blocks::Int4 { qs, d, m } => {
                        let [(w, wd, wm)] = self.offset_cols::<1>(qs, 16, d, m, j);
                        scalar_int4(w, wd, wm, act, r)
                    }
                    Blocks::Uint8 { q, d, m } => {
                        let [(w, wd, wm)] = self.offset_cols::<1>(q, BLOCK, d, m, j);
                        scalar_uint8(w, wd, wm, act, r)
                    }
                    Blocks::Packed16 { .. } => unreachable!("packed groups never reach the scalar path"),
                };
            }
        }
    }

    fn int8_cols<'a, const C: usize>(&self, q: &'a [i8], d: &'a [f32], j0: usize) -> [(&'a [i8], &'a [f32]); C] {
        let nb = self.k / BLOCK;
        std::array::from_fn(|c| {
            let j = j0 + c;
            (&q[j * self.k..(j + 1) * self.k], &d[j * nb..(j + 1) * nb])
        })
    }

    /// Views of weight rows `j0..j0 + C` for the offset formats (4-bit or unsigned 8-bit
    /// blocks of `block_bytes` each, with per-block scales and offsets).
    #[allow(clippy::type_complexity)]
    fn offset_cols<'a, const C: usize>(
        &self,
        q: &'a [u8],
        block_bytes: usize,
        d: &'a [f32],
        m: &'a [f32],
        j0: usize,
    ) -> [(&'a [u8], &'a [f32], &'a [f32]); C] {
        let nb = self.k / BLOCK;
        std::array::from_fn(|c| {
            let j = j0 + c;
            (&q[j * nb * block_bytes..(j + 1) * nb * block_bytes], &d[j * nb..(j + 1) * nb], &m[j * nb..(j + 1) * nb])
        })
    }
}

/// Builds [`Blocks::Packed16`] from `value(row, index)` (each an unsigned 4- or 8-bit value)
/// and per-block scales and offsets in row order.
fn pack16(n: usize, k: usize, four: bool, value: impl Fn(usize, usize) -> u8, d: &[f32], m: &[f32]) -> Blocks {
    let nb = k / BLOCK;
    let mut q = Vec::with_capacity(if four { n * k / 2 } else { n * k });
    let (mut gd, mut gm) = (Vec::with_capacity(n * nb), Vec::with_capacity(n * nb));
    for g in 0..n / GROUP {
        for b in 0..nb {
            // Vector v: for each of the 16 rows, values 4v..4v+4 of block b.
            let vector =
                |v: usize| (0..GROUP).flat_map(move |r| (0..4).map(move |t| (g * GROUP + r, b * BLOCK + 4 * v + t)));
            if four {
                for v in (0..8).step_by(2) {
                    q.extend(vector(v).zip(vector(v + 1)).map(|((j, i), (j2, i2))| value(j, i) | (value(j2, i2) << 4)));
                }
            } else {
                for v in 0..8 {
                    q.extend(vector(v).map(|(j, i)| value(j, i)));
                }
            }
            gd.extend((0..GROUP).map(|r| d[(g * GROUP + r) * nb + b]));
            gm.extend((0..GROUP).map(|r| m[(g * GROUP + r) * nb + b]));
        }
    }
    Blocks::Packed16 { four, q, d: gd, m: gm }
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

impl Activations {
    /// Quantizes rows of `k` values from `x`, split over the worker pool when there are
    /// several rows (on the calling thread alone, the other cores would wait for it).
    fn quantize(&mut self, x: &[f32], k: usize) {
        let (m, nb) = (x.len() / k, k / BLOCK);
        if m < 4 {
            quantize_blocks(x, &mut self.q, &mut self.d, &mut self.s);
            return;
        }
        let (q, d, s) = (SendPtr(self.q.as_mut_ptr()), SendPtr(self.d.as_mut_ptr()), SendPtr(self.s.as_mut_ptr()));
        assert!(self.q.len() >= m * k && self.d.len() >= m * nb && self.s.len() >= m * nb);
        candle_core::utils::barrier_pool().execute_chunked(m, |rows| {
            let (q, d, s) = (&q, &d, &s);
            let n = rows.len();
            // SAFETY: each task gets its own rows of the three buffers, in bounds per the
            // assertion above.
            let (q, d, s) = unsafe {
                (
                    std::slice::from_raw_parts_mut(q.0.add(rows.start * k), n * k),
                    std::slice::from_raw_parts_mut(d.0.add(rows.start * nb), n * nb),
                    std::slice::from_raw_parts_mut(s.0.add(rows.start * nb), n * nb),
                )
            };
            quantize_blocks(&x[rows.start * k..rows.end * k], q, d, s);
        });
    }
}

/// The f32 values a host custom op reads: its input must be f32 and contiguous.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op} expects f32 values");
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op} expects contiguous values"),
    }
}

/// A raw pointer shared with the worker pool's tasks, each of which writes its own disjoint
/// part of the buffer behind it (every user states which part in its SAFETY comment).
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
// SAFETY: tasks write disjoint parts of the buffer behind this pointer.
unsafe impl<T> Sync for SendPtr<T> {}
unsafe impl<T> Send for SendPtr<T> {}

/// A tile of quantized activation rows: values, per-block scales and scale·sums.
struct ActRows<'a> {
    q: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
    rows: usize,
    nb: usize,
}

fn scalar_int8(w: &[i8], wd: &[f32], a: &ActRows<'_>, r: usize) -> f32 {
    let k = a.nb * BLOCK;
    (0..a.nb)
        .map(|b| {
            let dot: i32 = (0..BLOCK).map(|t| w[b * BLOCK + t] as i32 * a.q[r * k + b * BLOCK + t] as i32).sum();
            dot as f32 * wd[b] * a.d[r * a.nb + b]
        })
        .sum()
}

fn scalar_uint8(w: &[u8], wd: &[f32], wm: &[f32], a: &ActRows<'_>, r: usize) -> f32 {
    let k = a.nb * BLOCK;
    (0..a.nb)
        .map(|b| {
            let dot: i32 = (0..BLOCK).map(|t| w[b * BLOCK + t] as i32 * a.q[r * k + b * BLOCK + t] as i32).sum();
            dot as f32 * wd[b] * a.d[r * a.nb + b] + wm[b] * a.s[r * a.nb + b]
        })
        .sum()
}

fn scalar_int4(w: &[u8], wd: &[f32], wm: &[f32], a: &ActRows<'_>, r: usize) -> f32 {
    let k = a.nb * BLOCK;
    (0..a.nb)
        .map(|b| {
            let dot: i32 = (0..16)
                .map(|t| {
                    let byte = w[b * 16 + t];
                    let lo = (byte & 0x0F) as i32 * a.q[r * k + b * BLOCK + t] as i32;
                    let hi = (byte >> 4) as i32 * a.q[r * k + b * BLOCK + t + 16] as i32;
                    lo + hi
                })
                .sum();
            dot as f32 * wd[b] * a.d[r * a.nb + b] + wm[b] * a.s[r * a.nb + b]
        })
        .sum()
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    //! Register-blocked tiles: each weight block is unpacked once per group of four
    //! activation rows, and each activation block is loaded once for [`COLS`] weight rows.

    use super::{ActRows, BLOCK, COLS, GROUP, OUT_W, TILE};
    use std::arch::x86_64::*;

    const ROWS: usize = 4;

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// Sum of u8 x i8 products of 32 pairs, as 8 f32 partial sums: one VNNI instruction
    /// where the CPU has it, two AVX2 ones otherwise.
    #[inline(always)]
    unsafe fn udot<const VNNI: bool>(w_unsigned: __m256i, a: __m256i) -> __m256 {
        // SAFETY: the caller's target features cover the branch it instantiates.
        unsafe {
            let sums = if VNNI {
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), w_unsigned, a)
            } else {
                _mm256_madd_epi16(_mm256_maddubs_epi16(w_unsigned, a), _mm256_set1_epi16(1))
            };
            _mm256_cvtepi32_ps(sums)
        }
    }

    /// `Σ x[i]·y[i]` over f32 slices of equal length.
    #[target_feature(enable = "avx2,fma")]
    fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
        let n = x.len().min(y.len());
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices.
            let (xv, yv) = unsafe { (_mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(y.as_ptr().add(i))) };
            acc = _mm256_fmadd_ps(xv, yv, acc);
            i += 8;
        }
        let mut s = hsum(acc);
        while i < n {
            s += x[i] * y[i];
            i += 1;
        }
        s
    }

    fn check(a: &ActRows<'_>, out_len: usize, w_bytes: &[usize], block_bytes: usize) {
        let k = a.nb * BLOCK;
        assert!(a.q.len() >= a.rows * k && a.d.len() >= a.rows * a.nb && a.s.len() >= a.rows * a.nb);
        assert!(out_len >= a.rows);
        assert!(w_bytes.iter().all(|&len| len >= a.nb * block_bytes));
    }

    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_int8(w: [(&[i8], &[f32]); COLS], a: &ActRows<'_>, out: &mut [[f32; OUT_W]], c0: usize) {
        // SAFETY: features enabled above.
        unsafe { tile_int8_body(w, a, out, c0) }
    }

    /// # Safety
    /// Only called from the wrapper above, whose target features cover every intrinsic here.
    #[inline(always)]
    #[allow(unsafe_op_in_unsafe_fn)]
    unsafe fn tile_int8_body(w: [(&[i8], &[f32]); COLS], a: &ActRows<'_>, out: &mut [[f32; OUT_W]], c0: usize) {
        check(a, out.len(), &w.map(|(q, _)| q.len()), BLOCK);
        assert!(w.iter().all(|(_, d)| d.len() >= a.nb));
        let k = a.nb * BLOCK;
        let mut r = 0;
        while r < a.rows {
            let take = (a.rows - r).min(ROWS);
            let mut acc = [[_mm256_setzero_ps(); COLS]; ROWS];
            for b in 0..a.nb {
                let mut wv = [_mm256_setzero_si256(); COLS];
                let mut w_abs = [_mm256_setzero_si256(); COLS];
                let mut wd = [_mm256_setzero_ps(); COLS];
                for c in 0..COLS {
                    // SAFETY: checked above: every weight row holds nb blocks.
                    wv[c] = unsafe { _mm256_loadu_si256(w[c].0.as_ptr().add(b * BLOCK) as *const __m256i) };
                    // maddubs needs one unsigned operand: move w's sign onto a.
                    w_abs[c] = _mm256_sign_epi8(wv[c], wv[c]);
                    wd[c] = _mm256_set1_ps(w[c].1[b]);
                }
                for (t, acc) in acc.iter_mut().enumerate().take(take) {
                    let row = r + t;
                    // SAFETY: checked above: a holds `rows` rows of k values.
                    let av = unsafe { _mm256_loadu_si256(a.q.as_ptr().add(row * k + b * BLOCK) as *const __m256i) };
                    let ad = _mm256_set1_ps(a.d[row * a.nb + b]);
                    for c in 0..COLS {
                        let dot = udot::<false>(w_abs[c], _mm256_sign_epi8(av, wv[c]));
                        acc[c] = _mm256_fmadd_ps(dot, _mm256_mul_ps(wd[c], ad), acc[c]);
                    }
                }
            }
            for t in 0..take {
                for c in 0..COLS {
                    out[r + t][c0 + c] = hsum(acc[t][c]);
                }
            }
            r += take;
        }
    }

    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_int4(w: [(&[u8], &[f32], &[f32]); COLS], a: &ActRows<'_>, out: &mut [[f32; OUT_W]], c0: usize) {
        // SAFETY: features enabled above.
        unsafe { tile_int4_body::<false>(w, a, out, c0) }
    }

    /// # Safety
    /// AVX2, FMA, AVX-512VL and AVX-512 VNNI must be available.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn tile_int4_vnni(
        w: [(&[u8], &[f32], &[f32]); COLS],
        a: &ActRows<'_>,
        out: &mut [[f32; OUT_W]],
        c0: usize,
    ) {
        // SAFETY: features enabled above.
        unsafe { tile_int4_body::<true>(w, a, out, c0) }
    }

    /// # Safety
    /// Only called from the wrappers above, whose target features cover every intrinsic here.
    #[inline(always)]
    #[allow(unsafe_op_in_unsafe_fn)]
    unsafe fn tile_int4_body<const VNNI: bool>(
        w: [(&[u8], &[f32], &[f32]); COLS],
        a: &ActRows<'_>,
        out: &mut [[f32; OUT_W]],
        c0: usize,
    ) {
        check(a, out.len(), &w.map(|(q, _, _)| q.len()), 16);
        assert!(w.iter().all(|(_, d, m)| d.len() >= a.nb && m.len() >= a.nb));
        let k = a.nb * BLOCK;
        let low = _mm_set1_epi8(0x0F);
        let mut r = 0;
        while r < a.rows {
            let take = (a.rows - r).min(ROWS);
            let mut acc = [[_mm256_setzero_ps(); COLS]; ROWS];
            for b in 0..a.nb {
                let mut wv = [_mm256_setzero_si256(); COLS];
                let mut wd = [_mm256_setzero_ps(); COLS];
                for c in 0..COLS {
                    // SAFETY: checked above: every weight row holds nb blocks of 16 bytes.
                    let packed = unsafe { _mm_loadu_si128(w[c].0.as_ptr().add(b * 16) as *const __m128i) };
                    let lo = _mm_and_si128(packed, low);
                    let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
                    wv[c] = _mm256_set_m128i(hi, lo);
                    wd[c] = _mm256_set1_ps(w[c].1[b]);
                }
                for (t, acc) in acc.iter_mut().enumerate().take(take) {
                    let row = r + t;
                    // SAFETY: checked above.
                    let av = unsafe { _mm256_loadu_si256(a.q.as_ptr().add(row * k + b * BLOCK) as *const __m256i) };
                    let ad = _mm256_set1_ps(a.d[row * a.nb + b]);
                    for c in 0..COLS {
                        acc[c] = _mm256_fmadd_ps(udot::<VNNI>(wv[c], av), _mm256_mul_ps(wd[c], ad), acc[c]);
                    }
                }
            }
            for t in 0..take {
                let row = r + t;
                let sums = &a.s[row * a.nb..(row + 1) * a.nb];
                for c in 0..COLS {
                    // The 4-bit offset term: Σ_b m_b · (d_a · Σq_a)_b.
                    out[r + t][c0 + c] = hsum(acc[t][c]) + dot_f32(w[c].2, sums);
                }
            }
            r += take;
        }
    }

    /// Four weight rows against every activation row, four rows at a time, two blocks per
    /// 512-bit step: 16 accumulators, four weight block pairs and their scales fit in the 32
    /// registers AVX-512 brings, and one VNNI instruction does 64 products. Weights are 4-bit
    /// (`FOUR`) or unsigned 8-bit blocks, both with an offset per block. A row's result depends
    /// only on its own values, not on the rows beside it.
    ///
    /// # Safety
    /// AVX2, FMA, AVX-512F/VL and AVX-512 VNNI must be available.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn tile_vnni_wide<const FOUR: bool>(
        w: [(&[u8], &[f32], &[f32]); TILE],
        a: &ActRows<'_>,
        out: &mut [[f32; OUT_W]],
    ) {
        check(a, out.len(), &w.map(|(q, _, _)| q.len()), if FOUR { 16 } else { BLOCK });
        assert!(w.iter().all(|(_, d, m)| d.len() >= a.nb && m.len() >= a.nb));
        let mut r = 0;
        while r + ROWS <= a.rows {
            // SAFETY: rows r..r + ROWS are in bounds (checked above); features enabled above.
            unsafe { wide_rows::<FOUR, ROWS>(&w, a, r, out) };
            r += ROWS;
        }
        // SAFETY: as above, for the remaining rows.
        unsafe {
            match a.rows - r {
                1 => wide_rows::<FOUR, 1>(&w, a, r, out),
                2 => wide_rows::<FOUR, 2>(&w, a, r, out),
                3 => wide_rows::<FOUR, 3>(&w, a, r, out),
                _ => {}
            }
        }
    }

    /// Two adjacent floats at `p` as `[p[0]; 8] ++ [p[1]; 8]`: the scales of a block pair.
    #[inline(always)]
    unsafe fn pair_scales(p: *const f32) -> __m512 {
        // SAFETY: the caller guarantees two floats at p and AVX-512F.
        unsafe {
            let two = _mm_castpd_ps(_mm_load_sd(p as *const f64));
            _mm512_permutexvar_ps(
                _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                _mm512_castps128_ps512(two),
            )
        }
    }

    /// Rows `r..r + R` of [`tile_vnni_wide`].
    ///
    /// # Safety
    /// The caller checked the bounds of every view for rows `r..r + R` and enabled AVX-512
    /// VNNI.
    #[inline(always)]
    #[allow(unsafe_op_in_unsafe_fn)]
    unsafe fn wide_rows<const FOUR: bool, const R: usize>(
        w: &[(&[u8], &[f32], &[f32]); TILE],
        a: &ActRows<'_>,
        r: usize,
        out: &mut [[f32; OUT_W]],
    ) {
        let nb = a.nb;
        let k = nb * BLOCK;
        let low = _mm512_set1_epi8(0x0F);
        // A pair of 16-byte packed blocks [P0, P1] is spread to [P0, P0, P1, P1] and the copies
        // in the odd 128-bit lanes shifted down a nibble: after masking, the lanes hold block
        // b's elements 0..16 and 16..32, then block b + 1's — the activations' own order.
        let spread = _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0);
        let shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
        let wq = w.map(|(q, _, _)| q.as_ptr());
        let wd = w.map(|(_, d, _)| d.as_ptr());
        let aq = a.q.as_ptr().add(r * k);
        let ad = a.d.as_ptr().add(r * nb);
        let mut acc = [[_mm512_setzero_ps(); TILE]; R];
        let mut b = 0;
        while b + 2 <= nb {
            let mut wv = [_mm512_setzero_si512(); TILE];
            let mut ws = [_mm512_setzero_ps(); TILE];
            for c in 0..TILE {
                wv[c] = if FOUR {
                    let packed = _mm512_castsi256_si512(_mm256_loadu_si256(wq[c].add(b * 16) as *const __m256i));
                    let spread = _mm512_permutexvar_epi64(spread, packed);
                    _mm512_and_si512(_mm512_srlv_epi64(spread, shift), low)
                } else {
                    _mm512_loadu_si512(wq[c].add(b * BLOCK) as *const __m512i)
                };
                ws[c] = pair_scales(wd[c].add(b));
            }
            for (t, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_loadu_si512(aq.add(t * k + b * BLOCK) as *const __m512i);
                let adv = pair_scales(ad.add(t * nb + b));
                for c in 0..TILE {
                    let dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), wv[c], av));
                    acc[c] = _mm512_fmadd_ps(dot, _mm512_mul_ps(ws[c], adv), acc[c]);
                }
            }
            b += 2;
        }
        let mut sums = [[0f32; TILE]; R];
        for (t, acc) in acc.iter().enumerate() {
            for c in 0..TILE {
                sums[t][c] = _mm512_reduce_add_ps(acc[c]);
            }
        }
        if b < nb {
            // An odd last block, 256 bits wide.
            let low = _mm256_set1_epi8(0x0F);
            let shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
            for c in 0..TILE {
                let wv = if FOUR {
                    let packed = _mm256_broadcastsi128_si256(_mm_loadu_si128(wq[c].add(b * 16) as *const __m128i));
                    _mm256_and_si256(_mm256_srlv_epi32(packed, shift), low)
                } else {
                    _mm256_loadu_si256(wq[c].add(b * BLOCK) as *const __m256i)
                };
                for (t, sums) in sums.iter_mut().enumerate() {
                    let av = _mm256_loadu_si256(aq.add(t * k + b * BLOCK) as *const __m256i);
                    sums[c] += hsum(udot::<true>(wv, av)) * (*wd[c].add(b) * *ad.add(t * nb + b));
                }
            }
        }
        for (t, sums) in sums.iter().enumerate() {
            let offsets = &a.s[(r + t) * nb..(r + t + 1) * nb];
            for c in 0..TILE {
                // The offset term, as in the other kernels.
                out[r + t][c] = sums[c] + dot_f32(w[c].2, offsets);
            }
        }
    }

    /// [`super::Blocks::Packed16`] weights (one group of 16 rows: its bytes, scales and
    /// offsets) against every activation row, four at a time. Per row and block: eight VNNI
    /// instructions, each adding four products to all 16 rows' sums, then one conversion and
    /// two FMAs apply the 16 rows' scales and offsets at once.
    ///
    /// # Safety
    /// AVX-512F/VL and AVX-512 VNNI must be available.
    #[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn tile_packed16<const FOUR: bool>(
        w: (&[u8], &[f32], &[f32]),
        a: &ActRows<'_>,
        out: &mut [[f32; OUT_W]],
    ) {
        let nb = a.nb;
        let k = nb * BLOCK;
        assert!(a.q.len() >= a.rows * k && a.d.len() >= a.rows * nb && a.s.len() >= a.rows * nb);
        assert!(out.len() >= a.rows);
        assert!(w.0.len() >= nb * if FOUR { 256 } else { 512 } && w.1.len() >= nb * GROUP && w.2.len() >= nb * GROUP);
        let mut r = 0;
        while r + ROWS <= a.rows {
            // SAFETY: bounds checked above; features enabled above.
            unsafe { packed16_rows::<FOUR, ROWS>(w, a, r, out) };
            r += ROWS;
        }
        // SAFETY: as above, for the remaining rows.
        unsafe {
            match a.rows - r {
                1 => packed16_rows::<FOUR, 1>(w, a, r, out),
                2 => packed16_rows::<FOUR, 2>(w, a, r, out),
                3 => packed16_rows::<FOUR, 3>(w, a, r, out),
                _ => {}
            }
        }
    }

    /// Rows `r..r + R` of [`tile_packed16`].
    ///
    /// # Safety
    /// The caller checked every view's bounds for these rows and enabled AVX-512 VNNI.
    #[inline(always)]
    #[allow(unsafe_op_in_unsafe_fn)]
    unsafe fn packed16_rows<const FOUR: bool, const R: usize>(
        w: (&[u8], &[f32], &[f32]),
        a: &ActRows<'_>,
        r: usize,
        out: &mut [[f32; OUT_W]],
    ) {
        let nb = a.nb;
        let k = nb * BLOCK;
        let low = _mm512_set1_epi8(0x0F);
        let block_bytes = if FOUR { 256 } else { 512 };
        let (wq, wd, wm) = (w.0.as_ptr(), w.1.as_ptr(), w.2.as_ptr());
        let aq = a.q.as_ptr().add(r * k);
        let mut acc = [_mm512_setzero_ps(); R];
        for b in 0..nb {
            let base = wq.add(b * block_bytes);
            let mut wv = [_mm512_setzero_si512(); 8];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = if FOUR {
                    let packed = _mm512_loadu_si512(base.add(v / 2 * 64) as *const __m512i);
                    if v % 2 == 0 {
                        _mm512_and_si512(packed, low)
                    } else {
                        _mm512_and_si512(_mm512_srli_epi16(packed, 4), low)
                    }
                } else {
                    _mm512_loadu_si512(base.add(v * 64) as *const __m512i)
                };
            }
            let (scales, offsets) = (_mm512_loadu_ps(wd.add(b * GROUP)), _mm512_loadu_ps(wm.add(b * GROUP)));
            for (t, acc) in acc.iter_mut().enumerate() {
                let row = aq.add(t * k + b * BLOCK);
                let mut dot = _mm512_setzero_si512();
                for (v, wv) in wv.iter().enumerate() {
                    let four_values = (row.add(4 * v) as *const i32).read_unaligned();
                    dot = _mm512_dpbusd_epi32(dot, *wv, _mm512_set1_epi32(four_values));
                }
                let ad = _mm512_set1_ps(*a.d.get_unchecked((r + t) * nb + b));
                let sums = _mm512_set1_ps(*a.s.get_unchecked((r + t) * nb + b));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(scales, ad), *acc);
                *acc = _mm512_fmadd_ps(offsets, sums, *acc);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            _mm512_storeu_ps(out[r + t].as_mut_ptr(), *acc);
        }
    }

    /// [`tile_packed16`] for 4-bit groups on CPUs with AVX2 but no VNNI: each 64-byte vector is
    /// taken as two halves of eight weight rows, and the four-product sums come from
    /// `maddubs` + `madd` (4-bit weights times int8 activations cannot overflow their 16-bit
    /// pair sums).
    ///
    /// # Safety
    /// AVX2 and FMA must be available.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tile_packed16_avx2(w: (&[u8], &[f32], &[f32]), a: &ActRows<'_>, out: &mut [[f32; OUT_W]]) {
        let nb = a.nb;
        let k = nb * BLOCK;
        assert!(a.q.len() >= a.rows * k && a.d.len() >= a.rows * nb && a.s.len() >= a.rows * nb);
        assert!(out.len() >= a.rows);
        assert!(w.0.len() >= nb * 256 && w.1.len() >= nb * GROUP && w.2.len() >= nb * GROUP);
        for half in 0..2 {
            let mut r = 0;
            while r + ROWS <= a.rows {
                // SAFETY: bounds checked above; features enabled above.
                unsafe { packed16_half_rows::<ROWS>(w, a, r, half, out) };
                r += ROWS;
            }
            // SAFETY: as above, for the remaining rows.
            unsafe {
                match a.rows - r {
                    1 => packed16_half_rows::<1>(w, a, r, half, out),
                    2 => packed16_half_rows::<2>(w, a, r, half, out),
                    3 => packed16_half_rows::<3>(w, a, r, half, out),
                    _ => {}
                }
            }
        }
    }

    /// Rows `r..r + R` and weight rows `8·half..8·half + 8` of [`tile_packed16_avx2`].
    ///
    /// # Safety
    /// The caller checked every view's bounds for these rows and enabled AVX2 and FMA.
    #[inline(always)]
    #[allow(unsafe_op_in_unsafe_fn)]
    unsafe fn packed16_half_rows<const R: usize>(
        w: (&[u8], &[f32], &[f32]),
        a: &ActRows<'_>,
        r: usize,
        half: usize,
        out: &mut [[f32; OUT_W]],
    ) {
        let nb = a.nb;
        let k = nb * BLOCK;
        let low = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let (wq, wd, wm) = (w.0.as_ptr().add(32 * half), w.1.as_ptr().add(8 * half), w.2.as_ptr().add(8 * half));
        let aq = a.q.as_ptr().add(r * k);
        let mut acc = [_mm256_setzero_ps(); R];
        for b in 0..nb {
            let base = wq.add(b * 256);
            let mut wv = [_mm256_setzero_si256(); 8];
            for (v, wv) in wv.iter_mut().enumerate() {
                let packed = _mm256_loadu_si256(base.add(v / 2 * 64) as *const __m256i);
                *wv = if v % 2 == 0 {
                    _mm256_and_si256(packed, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16(packed, 4), low)
                };
            }
            let (scales, offsets) = (_mm256_loadu_ps(wd.add(b * GROUP)), _mm256_loadu_ps(wm.add(b * GROUP)));
            for (t, acc) in acc.iter_mut().enumerate() {
                let row = aq.add(t * k + b * BLOCK);
                let mut dot = _mm256_setzero_si256();
                for (v, wv) in wv.iter().enumerate() {
                    let four_values = _mm256_set1_epi32((row.add(4 * v) as *const i32).read_unaligned());
                    dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(*wv, four_values), ones));
                }
                let ad = _mm256_set1_ps(*a.d.get_unchecked((r + t) * nb + b));
                let sums = _mm256_set1_ps(*a.s.get_unchecked((r + t) * nb + b));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(scales, ad), *acc);
                *acc = _mm256_fmadd_ps(offsets, sums, *acc);
            }
        }
        for (t, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(out[r + t].as_mut_ptr().add(8 * half), *acc);
        }
    }
}

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "block-quantized-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&0);
        if k != self.k {
            candle_core::bail!("block-quantized linear: input has {k} features, weight expects {}", self.k);
        }
        let x = contiguous_f32(storage, layout, "block-quantized linear")?;
        let m = x.len() / k;
        let nb = k / BLOCK;
        let mut act = Activations { q: vec![0i8; m * k], d: vec![0f32; m * nb], s: vec![0f32; m * nb] };
        act.quantize(x, k);
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

    /// `m` rows of `k` standard-normal values, quantized.
    fn random_activations(m: usize, k: usize) -> Result<Activations> {
        let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?.flatten_all()?.to_vec1()?;
        let nb = k / BLOCK;
        let mut act = Activations { q: vec![0; m * k], d: vec![0.0; m * nb], s: vec![0.0; m * nb] };
        quantize_blocks(&xs, &mut act.q, &mut act.d, &mut act.s);
        Ok(act)
    }

    fn rel_err(got: &Tensor, want: &Tensor) -> Result<f32> {
        let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = want.abs()?.max_all()?.to_scalar::<f32>()?;
        Ok(err / scale)
    }

    #[test]
    fn simd_quantization_matches_the_scalar_loop() -> Result<()> {
        // Random values (no exact rounding ties), a block of zeros, and one with a lone value.
        let mut x: Vec<f32> = Tensor::randn(0f32, 3.0, (10 * BLOCK,), &Device::Cpu)?.to_vec1()?;
        x.extend([0.0; BLOCK]);
        x.extend((0..BLOCK).map(|i| if i == 7 { -2.5 } else { 0.0 }));
        let nb = x.len() / BLOCK;
        let run = |simd: bool| {
            let (mut q, mut d, mut s) = (vec![0i8; x.len()], vec![0f32; nb], vec![0f32; nb]);
            if simd {
                quantize_blocks(&x, &mut q, &mut d, &mut s);
            } else {
                quantize_blocks_body(&x, &mut q, &mut d, &mut s);
            }
            (q, d, s)
        };
        let (simd, scalar) = (run(true), run(false));
        assert_eq!(simd, scalar);
        assert_eq!(simd.0[11 * BLOCK + 7], -127);
        assert!(simd.0[10 * BLOCK..11 * BLOCK].iter().all(|&v| v == 0) && simd.1[10] == 0.0);
        Ok(())
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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_and_avx2_kernels_agree() -> Result<()> {
        if !vnni_supported() {
            return Ok(()); // nothing to compare on this CPU
        }
        // Seven rows: one full group of four for the wide kernel and a tail of three; five blocks:
        // two pairs and an odd one.
        let (m, k, nb) = (7, 160, 5);
        let w = Tensor::randn(0f32, 1.0, (TILE, k), &Device::Cpu)?;
        let act = random_activations(m, k)?;
        let rows = ActRows { q: &act.q, d: &act.d, s: &act.s, rows: m, nb };
        let int8 = QLinear::from_dense_as(&w, false)?;
        let uint8 = QLinear::from_dense_as(&w, true)?;
        let int4 = QLinear::from_q4(&QTensor::quantize(&w, GgmlDType::Q4_1)?)?.expect("q4_1 converts");
        let (Blocks::Int8 { q, d }, Blocks::Uint8 { q: qu, d: du, m: mu }, Blocks::Int4 { qs, d: d4, m: m4 }) =
            (&int8.blocks, &uint8.blocks, &int4.blocks)
        else {
            unreachable!()
        };
        let pairs = |f: &dyn Fn(usize, &mut [[f32; OUT_W]])| {
            let mut out = vec![[0f32; OUT_W]; m];
            for c0 in (0..TILE).step_by(COLS) {
                f(c0, &mut out);
            }
            out
        };
        let close = |got: &[[f32; OUT_W]], want: &[[f32; OUT_W]]| {
            for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
                assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
            }
        };
        // SAFETY (every kernel call below): VNNI, and so AVX2, support was checked above.
        let int4_avx2 =
            pairs(&|c0, out| unsafe { avx2::tile_int4(int4.offset_cols(qs, 16, d4, m4, c0), &rows, out, c0) });
        let int4_vnni =
            pairs(&|c0, out| unsafe { avx2::tile_int4_vnni(int4.offset_cols(qs, 16, d4, m4, c0), &rows, out, c0) });
        // Integer dot products are exact either way and the float steps are the same.
        assert_eq!(int4_vnni, int4_avx2);
        let wide = |four: bool, rows: &ActRows<'_>| {
            let mut out = vec![[0f32; OUT_W]; rows.rows];
            unsafe {
                if four {
                    avx2::tile_vnni_wide::<true>(int4.offset_cols(qs, 16, d4, m4, 0), rows, &mut out);
                } else {
                    avx2::tile_vnni_wide::<false>(uint8.offset_cols(qu, BLOCK, du, mu, 0), rows, &mut out);
                }
            }
            out
        };
        // The wide kernel sums two blocks per step in other lanes (and the unsigned int8 form
        // takes its offset out separately): equal up to float rounding.
        let (wide4, wide8) = (wide(true, &rows), wide(false, &rows));
        close(&wide4, &int4_avx2);
        close(&wide8, &pairs(&|c0, out| unsafe { avx2::tile_int8(int8.int8_cols(q, d, c0), &rows, out, c0) }));
        // Each row gets the same value alone as in the group.
        for r in 0..m {
            let one = ActRows { q: &act.q[r * k..], d: &act.d[r * nb..], s: &act.s[r * nb..], rows: 1, nb };
            assert_eq!(wide(true, &one)[0], wide4[r], "int4 row {r}");
            assert_eq!(wide(false, &one)[0], wide8[r], "int8 row {r}");
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_vnni_interleaved_kernels_agree() -> Result<()> {
        if !vnni_supported() {
            return Ok(()); // the VNNI side cannot run here
        }
        let (n, k, m) = (GROUP, 160, 7);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let nb = k / BLOCK;
        let act = random_activations(m, k)?;
        let rows = ActRows { q: &act.q, d: &act.d, s: &act.s, rows: m, nb };
        let packed = QLinear::from_q4(&QTensor::quantize(&w, GgmlDType::Q4_1)?)?.expect("q4_1 converts").for_this_cpu();
        let Blocks::Packed16 { four: true, q, d, m: offs } = &packed.blocks else { unreachable!() };
        let (mut vnni, mut avx2) = (vec![[0f32; OUT_W]; m], vec![[0f32; OUT_W]; m]);
        // SAFETY: VNNI (and so AVX2) support checked above.
        unsafe {
            avx2::tile_packed16::<true>((q, d, offs), &rows, &mut vnni);
            avx2::tile_packed16_avx2((q, d, offs), &rows, &mut avx2);
        }
        // Same integer sums and the same float steps in the same order per output.
        assert_eq!(vnni, avx2);
        Ok(())
    }

    #[test]
    fn interleaved_groups_match_the_row_layout() -> Result<()> {
        if !supported() {
            return Ok(()); // the interleaved layout is only built where AVX2 runs
        }
        // Two groups of 16 rows, five blocks (an odd count), seven activation rows (a group of
        // four and a tail of three).
        let (n, k, m) = (2 * GROUP, 160, 7);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let int4 = || QLinear::from_q4(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap()).unwrap().unwrap();
        let mut cases = vec![(int4(), int4().for_this_cpu())];
        if vnni_supported() {
            cases.push((QLinear::from_dense(&w)?, QLinear::from_dense(&w)?.for_this_cpu()));
        }
        for (rows, packed) in cases {
            assert!(matches!(packed.blocks, Blocks::Packed16 { .. }));
            assert_eq!(rows.is_int4(), packed.is_int4());
            let (want, got) = (rows.forward(&x)?, packed.forward(&x)?);
            let err = rel_err(&got, &want)?;
            assert!(err < 1e-5, "relative error {err}");
            // Each row alone gets exactly what it gets in the batch.
            let all: Vec<Vec<f32>> = got.to_vec2()?;
            for (i, row) in all.iter().enumerate() {
                let one: Vec<Vec<f32>> = packed.forward(&x.narrow(0, i, 1)?.contiguous()?)?.to_vec2()?;
                assert_eq!(&one[0], row, "row {i}");
            }
        }
        // A row count that is not a multiple of the group keeps the row layout.
        let odd = QLinear::from_dense(&Tensor::randn(0f32, 1.0, (GROUP + 4, 64), &Device::Cpu)?)?.for_this_cpu();
        assert!(!matches!(odd.blocks, Blocks::Packed16 { .. }));
        Ok(())
    }

    #[test]
    fn simd_and_scalar_kernels_agree() -> Result<()> {
        let dev = Device::Cpu;
        // Odd sizes exercise the row-group and column-pair tails.
        let w = Tensor::randn(0f32, 1.0, (7, 96), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (6, 96), &dev)?;
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let (m, k, nb) = (6, 96, 3);
        let mut act = Activations { q: vec![0; m * k], d: vec![0.0; m * nb], s: vec![0.0; m * nb] };
        quantize_blocks(&xs, &mut act.q, &mut act.d, &mut act.s);
        // Both int8 layouts run on every machine: the unsigned one falls back to scalar code
        // where VNNI is missing.
        let int8 = QLinear::from_dense_as(&w, false)?;
        let uint8 = QLinear::from_dense_as(&w, true)?;
        let int4 = QLinear::from_q4(&QTensor::quantize(&w, GgmlDType::Q4_1)?)?.expect("q4_1 converts");
        for lin in [&int8, &uint8, &int4] {
            let mut simd = vec![0f32; m * 7];
            lin.matmul(&act, m, &mut simd);
            let rows = ActRows { q: &act.q, d: &act.d, s: &act.s, rows: m, nb };
            for r in 0..m {
                for j in 0..7 {
                    let want = match &lin.blocks {
                        Blocks::Int8 { q, d } => {
                            let [(w, wd)] = lin.int8_cols::<1>(q, d, j);
                            scalar_int8(w, wd, &rows, r)
                        }
                        Blocks::Int4 { qs, d, m } => {
                            let [(w, wd, wm)] = lin.offset_cols::<1>(qs, 16, d, m, j);
                            scalar_int4(w, wd, wm, &rows, r)
                        }
                        Blocks::Uint8 { q, d, m } => {
                            let [(w, wd, wm)] = lin.offset_cols::<1>(q, BLOCK, d, m, j);
                            scalar_uint8(w, wd, wm, &rows, r)
                        }
                        Blocks::Packed16 { .. } => unreachable!("built by for_this_cpu only"),
                    };
                    let got = simd[r * 7 + j];
                    assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "({r}, {j}): {got} vs {want}");
                }
            }
        }
        Ok(())
    }
}
