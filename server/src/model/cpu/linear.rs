//! The block-quantized linear op: activations quantized once per call, then every weight tile
//! multiplied against all activation rows by the fastest kernel this CPU has. A
//! [`FusedLinear`] puts weights that share an input side by side (q|k|v, gate|up), each in its
//! own block layout, and runs all their tiles in one parallel pass.

use super::kquant::{QK_K, SUB};
use super::packing::{Blocks, Offsets};
use super::quantize::Activations;
use super::scalar::{scalar_int4, scalar_int8, scalar_uint8};
use super::{ActRows, BLOCK, COLS, GROUP, OUT_W, ROW_TILE, SendPtr, TILE, contiguous_f32, supported, vnni_supported};
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// The largest weight tile [`QLinear::prefetch`] hints ahead (see [`QLinear::prefetches`]).
const PREFETCH_MAX_BYTES: usize = 16 * 1024;

/// A `[n, k]` weight matrix in block-quantized form.
pub struct QLinear {
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) blocks: Blocks,
    /// Activations quantized in two levels (see [`QLinear::set_two_levels`]).
    pub(super) two_levels: bool,
    /// The stored format the blocks came from (`q4_k`, `q4_1`, `dense` …) and whether they
    /// carry its values exactly.
    pub(super) origin: Origin,
}

/// Where a weight's blocks came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub format: &'static str,
    pub exact: bool,
}

impl QLinear {
    /// Quantizes activations in two levels (the second holds the first's rounding error):
    /// twice the integer arithmetic on the same weight loads, nearly float accuracy.
    pub fn set_two_levels(&mut self, on: bool) {
        self.two_levels = on;
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }

    pub fn origin(&self) -> Origin {
        self.origin
    }

    /// The layout's name, e.g. `q4_k` (kept as stored), `int8 from q6_k` (re-blocked).
    pub fn layout(&self) -> String {
        let kind = match &self.blocks {
            Blocks::K4 { .. } => return "q4_k".into(),
            Blocks::K6 { .. } => return "q6_k".into(),
            Blocks::Int4 { .. } | Blocks::Packed16 { four: true, .. } => "int4",
            _ => "int8",
        };
        match self.origin.format {
            "dense" => kind.to_string(),
            from => format!("{kind} from {from}"),
        }
    }

    /// Bytes the weight holds (values, scales and offsets).
    pub fn bytes(&self) -> usize {
        fn b<T>(v: &[T]) -> usize {
            std::mem::size_of_val(v)
        }
        match &self.blocks {
            Blocks::Int8 { q, d } => b(q) + b(d),
            Blocks::Int4 { qs, d, m } => b(qs) + b(d) + b(m),
            Blocks::Uint8 { q, d, m } => b(q) + b(d) + b(m),
            Blocks::Packed16 { q, d, m, .. } => b(q) + b(d) + b(m.stored()),
            Blocks::K4 { q, sc, m, d, dmin } => b(q) + b(sc) + b(m) + b(d) + b(dmin),
            Blocks::K6 { lo, hi, sc, d } => b(lo) + b(hi) + b(sc) + b(d),
        }
    }

    /// Weight rows per task tile: a whole interleaved group, or [`TILE`] rows.
    fn width(&self) -> usize {
        match self.blocks {
            Blocks::Packed16 { .. } | Blocks::K4 { .. } | Blocks::K6 { .. } => GROUP,
            _ => TILE,
        }
    }

    /// Whether [`Self::prefetch`] pays: only while a tile is small enough to sit in L1 beside
    /// the one being multiplied. A tile of Qwen2.5 1.5B's down projection (16 rows × 8,960
    /// columns in Q4_K, 85 KB) hinted two tiles ahead evicts its own rows before they are used:
    /// on the AMD EPYC VM the forward bench's decode fell from 21.1 to 15.3 tok/s with the hint
    /// on every weight (on an Intel Sapphire Rapids VM the hint made no difference either way).
    fn prefetches(&self) -> bool {
        self.bytes() / self.n.max(1) * self.width() <= PREFETCH_MAX_BYTES
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
            let (s0, s1) = (j0 * (self.k / QK_K), (j0 + cols) * (self.k / QK_K));
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
                    if let Offsets::Stored(m) = m {
                        lines(m, b0, b1);
                    }
                }
                Blocks::K4 { q, sc, m, d, dmin } => {
                    lines(q, j0 * self.k / 2, (j0 + cols) * self.k / 2);
                    lines(sc, b0, b1);
                    lines(m, b0, b1);
                    lines(d, s0, s1);
                    lines(dmin, s0, s1);
                }
                Blocks::K6 { lo, hi, sc, d } => {
                    lines(lo, j0 * self.k / 2, (j0 + cols) * self.k / 2);
                    lines(hi, j0 * self.k / 4, (j0 + cols) * self.k / 4);
                    lines(sc, 2 * b0, 2 * b1);
                    lines(d, s0, s1);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (j0, cols);
    }

    /// Dot products of activation rows `i0..i0 + rows` with weight rows `j0..j0 + cols`
    /// (`cols` ≤ [`Self::width`]) into `out[row][col]`. Every output goes through the same
    /// sequence of operations whichever kernel or tile position computes it, so a row's result
    /// does not depend on the rows batched with it.
    fn dot_tile(&self, j0: usize, cols: usize, a: &Activations, i0: usize, rows: usize, out: &mut [[f32; OUT_W]]) {
        let nb = self.k / BLOCK;
        let act = a.rows(i0, rows, self.k);
        // Interleaved groups exist only where the kernels chosen below can run (see
        // for_this_cpu and the K-quant constructors).
        let g = j0 / GROUP;
        match &self.blocks {
            Blocks::Packed16 { four, q, d, m } => {
                let per_group = if *four { nb * 256 } else { nb * 512 };
                let w = (
                    &q[g * per_group..][..per_group],
                    &d[g * nb * GROUP..][..nb * GROUP],
                    m.view(g * nb * GROUP..(g + 1) * nb * GROUP),
                );
                #[cfg(target_arch = "x86_64")]
                // SAFETY: Packed16 exists only where the features of the kernel chosen here were
                // detected (see for_this_cpu); the kernels check their views.
                unsafe {
                    match (*four, vnni_supported()) {
                        (true, true) => avx512::tile_packed16::<true>(w, &act, out),
                        (false, _) => avx512::tile_packed16::<false>(w, &act, out),
                        (true, false) => avx2::tile_packed16_avx2(w, &act, out),
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (cols, w);
                return;
            }
            Blocks::K4 { q, sc, m, d, dmin } => {
                let nsb = nb / SUB;
                let w = super::K4View {
                    q: &q[g * nb * 256..][..nb * 256],
                    sc: &sc[g * nb * GROUP..][..nb * GROUP],
                    m: &m[g * nb * GROUP..][..nb * GROUP],
                    d: &d[g * nsb * GROUP..][..nsb * GROUP],
                    dmin: &dmin[g * nsb * GROUP..][..nsb * GROUP],
                };
                #[cfg(target_arch = "x86_64")]
                // SAFETY: K4 blocks are only built where AVX2 and FMA run (kquant's
                // constructor); VNNI is checked here; the kernels check their views.
                unsafe {
                    if vnni_supported() { avx512::tile_k4(&w, &act, out) } else { avx2::tile_k4_avx2(&w, &act, out) }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = w;
                return;
            }
            Blocks::K6 { lo, hi, sc, d } => {
                let nsb = nb / SUB;
                let w = super::K6View {
                    lo: &lo[g * nb * 256..][..nb * 256],
                    hi: &hi[g * nb * 128..][..nb * 128],
                    sc: &sc[g * nb * 2 * GROUP..][..nb * 2 * GROUP],
                    d: &d[g * nsb * GROUP..][..nsb * GROUP],
                };
                #[cfg(target_arch = "x86_64")]
                // SAFETY: as for K4.
                unsafe {
                    if vnni_supported() { avx512::tile_k6(&w, &act, out) } else { avx2::tile_k6_avx2(&w, &act, out) }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = w;
                return;
            }
            _ => {}
        }
        #[cfg(target_arch = "x86_64")]
        if supported() {
            let vnni = vnni_supported();
            if vnni && cols == TILE {
                // SAFETY: VNNI detected; the kernels bounds-check their views.
                match &self.blocks {
                    Blocks::Int4 { qs, d, m } => {
                        unsafe { avx512::tile_vnni_wide::<true>(self.offset_cols(qs, 16, d, m, j0), &act, out) };
                        return;
                    }
                    Blocks::Uint8 { q, d, m } => {
                        unsafe { avx512::tile_vnni_wide::<false>(self.offset_cols(q, BLOCK, d, m, j0), &act, out) };
                        return;
                    }
                    // Signed blocks (built for a CPU without VNNI): the AVX2 pairs below.
                    _ => {}
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
                    _ => break,
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
                    Blocks::Packed16 { .. } | Blocks::K4 { .. } | Blocks::K6 { .. } => {
                        unreachable!("interleaved groups never reach the scalar path")
                    }
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

/// Weights that share an input, side by side along the output dimension (q|k|v, gate|up),
/// each part in its own block layout: the input is quantized once and every part's tiles run
/// in one parallel pass, so a fused projection whose parts were stored in different formats
/// (Q4_K queries beside Q6_K values) keeps each part's own blocks.
pub struct FusedLinear {
    k: usize,
    n: usize,
    parts: Vec<QLinear>,
    two_levels: bool,
}

impl FusedLinear {
    pub fn new(parts: Vec<QLinear>) -> Result<Self> {
        let Some(first) = parts.first() else { candle_core::bail!("nothing to fuse") };
        let k = first.k;
        if parts.iter().any(|p| p.k != k) {
            candle_core::bail!("cannot fuse weights with different input sizes");
        }
        let n = parts.iter().map(|p| p.n).sum();
        Ok(Self { k, n, parts, two_levels: false })
    }

    /// See [`QLinear::set_two_levels`].
    pub fn set_two_levels(&mut self, on: bool) {
        self.two_levels = on;
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.apply_op1_no_bwd(self)
    }

    pub fn parts(&self) -> &[QLinear] {
        &self.parts
    }

    /// Bytes all parts hold.
    pub fn bytes(&self) -> usize {
        self.parts.iter().map(QLinear::bytes).sum()
    }

    /// Rows of the fused weight as f32, appended to `out` (see [`QLinear::rows_into`]).
    pub fn rows_into(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        for &j in ids {
            let (mut j, mut found) = (j as usize, false);
            for p in &self.parts {
                if j < p.n {
                    p.rows_into(&[j as u32], out)?;
                    found = true;
                    break;
                }
                j -= p.n;
            }
            if !found {
                candle_core::bail!("row of a weight with {} rows", self.n);
            }
        }
        Ok(())
    }
}

/// `out[m, n] = a[m, k] · wᵀ` for quantized activations, over the parts of a fused weight
/// (their outputs side by side, `n` in all). Tiles are numbered across the parts, so one pass
/// over the worker pool covers them all.
fn matmul(parts: &[QLinear], n: usize, a: &Activations, m: usize, out: &mut [f32]) {
    let out_ptr = SendPtr(out.as_mut_ptr());
    // Per part: its first tile, its first output column, its tile width and whether its tiles
    // are prefetched.
    let mut starts = Vec::with_capacity(parts.len());
    let (mut tiles, mut col) = (0, 0);
    for p in parts {
        let width = p.width();
        starts.push((tiles, col, width, p.prefetches()));
        tiles += p.n.div_ceil(width);
        col += p.n;
    }
    candle_core::utils::barrier_pool().execute_chunked(tiles, |range| {
        let out_ptr = &out_ptr;
        let mut acc = [[0f32; OUT_W]; ROW_TILE];
        for i0 in (0..m).step_by(ROW_TILE) {
            let rows = ROW_TILE.min(m - i0);
            for tile in range.clone() {
                let p = starts.partition_point(|s| s.0 <= tile) - 1;
                let (part, (first, col0, width, prefetch)) = (&parts[p], starts[p]);
                let j0 = (tile - first) * width;
                let cols = width.min(part.n - j0);
                if prefetch && tile + 2 < range.end && j0 + 2 * width < part.n {
                    part.prefetch(j0 + 2 * width, width.min(part.n - j0 - 2 * width));
                }
                part.dot_tile(j0, cols, a, i0, rows, &mut acc[..rows]);
                for (r, vals) in acc[..rows].iter().enumerate() {
                    for (c, v) in vals[..cols].iter().enumerate() {
                        // SAFETY: this tile's columns belong to this task alone; in bounds.
                        unsafe { *out_ptr.0.add((i0 + r) * n + col0 + j0 + c) = *v };
                    }
                }
            }
        }
    });
}

/// The op both [`QLinear`] and [`FusedLinear`] run: quantize the input (in one level or two),
/// multiply, and add the second level's products to the first's.
fn forward_parts(
    parts: &[QLinear],
    k: usize,
    n: usize,
    two_levels: bool,
    storage: &CpuStorage,
    layout: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let dims = layout.shape().dims();
    let got = *dims.last().unwrap_or(&0);
    if got != k {
        candle_core::bail!("block-quantized linear: input has {got} features, weight expects {k}");
    }
    let x = contiguous_f32(storage, layout, "block-quantized linear")?;
    let m = x.len() / k;
    let levels = if two_levels { 2 } else { 1 };
    let rows = levels * m;
    let mut act = Activations::new(rows, k);
    act.quantize(x, k);
    if two_levels {
        act.quantize_residual(x, k, m);
    }
    let mut out = vec![0f32; rows * n];
    matmul(parts, n, &act, rows, &mut out);
    if two_levels {
        let (first, second) = out.split_at_mut(m * n);
        first.iter_mut().zip(second.iter()).for_each(|(a, b)| *a += *b);
        out.truncate(m * n);
    }
    let mut shape = dims.to_vec();
    *shape.last_mut().expect("rank >= 1") = n;
    Ok((CpuStorage::F32(out), Shape::from(shape)))
}

impl CustomOp1 for QLinear {
    fn name(&self) -> &'static str {
        "block-quantized-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        forward_parts(std::slice::from_ref(self), self.k, self.n, self.two_levels, storage, layout)
    }
}

impl CustomOp1 for FusedLinear {
    fn name(&self) -> &'static str {
        "fused-block-quantized-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        forward_parts(&self.parts, self.k, self.n, self.two_levels, storage, layout)
    }
}

#[cfg(test)]
mod tests {
    use super::super::quantize::quantize_blocks;
    use super::*;
    use candle_core::Device;
    use candle_core::quantized::{GgmlDType, QTensor};

    /// `m` rows of `k` standard-normal values, quantized.
    fn random_activations(m: usize, k: usize) -> Result<Activations> {
        let xs: Vec<f32> = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?.flatten_all()?.to_vec1()?;
        let mut act = Activations::new(m, k);
        quantize_blocks(&xs, &mut act.q, &mut act.d, &mut act.s, &mut act.h);
        Ok(act)
    }

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

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vnni_and_avx2_kernels_agree() -> Result<()> {
        if !vnni_supported() {
            super::super::skipped("vnni_and_avx2_kernels_agree", "this CPU lacks AVX-512 VNNI");
            return Ok(());
        }
        // Seven rows: one full group of four for the wide kernel and a tail of three; five blocks:
        // two pairs and an odd one.
        let (m, k) = (7, 160);
        let w = Tensor::randn(0f32, 1.0, (TILE, k), &Device::Cpu)?;
        let act = random_activations(m, k)?;
        let rows = act.rows(0, m, k);
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
                    avx512::tile_vnni_wide::<true>(int4.offset_cols(qs, 16, d4, m4, 0), rows, &mut out);
                } else {
                    avx512::tile_vnni_wide::<false>(uint8.offset_cols(qu, BLOCK, du, mu, 0), rows, &mut out);
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
            let one = act.rows(r, 1, k);
            assert_eq!(wide(true, &one)[0], wide4[r], "int4 row {r}");
            assert_eq!(wide(false, &one)[0], wide8[r], "int8 row {r}");
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_vnni_interleaved_kernels_agree() -> Result<()> {
        if !vnni_supported() {
            super::super::skipped("avx2_and_vnni_interleaved_kernels_agree", "this CPU lacks AVX-512 VNNI");
            return Ok(());
        }
        let (n, k, m) = (GROUP, 160, 7);
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let act = random_activations(m, k)?;
        let rows = act.rows(0, m, k);
        let packed = QLinear::from_q4(&QTensor::quantize(&w, GgmlDType::Q4_1)?)?.expect("q4_1 converts").for_this_cpu();
        let Blocks::Packed16 { four: true, q, d, m: offs } = &packed.blocks else { unreachable!() };
        let (mut vnni, mut avx2) = (vec![[0f32; OUT_W]; m], vec![[0f32; OUT_W]; m]);
        // SAFETY: VNNI (and so AVX2) support checked above.
        unsafe {
            let offs = offs.view(0..d.len());
            avx512::tile_packed16::<true>((q, d, offs), &rows, &mut vnni);
            avx2::tile_packed16_avx2((q, d, offs), &rows, &mut avx2);
        }
        // Same integer sums and the same float steps in the same order per output.
        assert_eq!(vnni, avx2);
        Ok(())
    }

    #[test]
    fn interleaved_groups_match_the_row_layout() -> Result<()> {
        if !supported() {
            // The interleaved layout is only built where AVX2 runs.
            super::super::skipped("interleaved_groups_match_the_row_layout", "this CPU lacks AVX2 and FMA");
            return Ok(());
        }
        // Two groups of 16 rows, five blocks (an odd count), eleven activation rows (a pass of
        // eight and a tail of three).
        let (n, k, m) = (2 * GROUP, 160, 11);
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
        let (m, k) = (6, 96);
        let mut act = Activations::new(m, k);
        quantize_blocks(&xs, &mut act.q, &mut act.d, &mut act.s, &mut act.h);
        // Both int8 layouts run on every machine: the unsigned one falls back to scalar code
        // where VNNI is missing.
        let int8 = QLinear::from_dense_as(&w, false)?;
        let uint8 = QLinear::from_dense_as(&w, true)?;
        let int4 = QLinear::from_q4(&QTensor::quantize(&w, GgmlDType::Q4_1)?)?.expect("q4_1 converts");
        for lin in [&int8, &uint8, &int4] {
            let mut simd = vec![0f32; m * 7];
            matmul(std::slice::from_ref(lin), 7, &act, m, &mut simd);
            let rows = act.rows(0, m, k);
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
                        _ => unreachable!("interleaved layouts are built by for_this_cpu only"),
                    };
                    let got = simd[r * 7 + j];
                    assert!((got - want).abs() <= 1e-4 * want.abs().max(1.0), "({r}, {j}): {got} vs {want}");
                }
            }
        }
        Ok(())
    }

    /// A K-quant weight as the kernels see it: `[n, k]` random values quantized by candle, and
    /// the same tensor dequantized (the f32 reference).
    fn k_weight(dtype: GgmlDType, n: usize, k: usize) -> Result<(QTensor, Tensor)> {
        let qt = QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?, dtype)?;
        let dense = qt.dequantize(&Device::Cpu)?;
        Ok((qt, dense))
    }

    /// Where every block's offset is one multiple of its scale (Q8_0 −128·d, Q5_0 −16·d, Q4_0
    /// −8·d), interleaved groups keep the multiple instead of the offsets: the kernels' results
    /// are the stored offsets' bit for bit, the values the file's, and the weight smaller
    /// (Q8_0 and Q5_0 need VNNI for their unsigned groups; Q4_0's 4-bit ones run on AVX2).
    #[test]
    fn offsets_formed_from_the_scales_give_the_stored_offsets_results() -> Result<()> {
        if !supported() {
            super::super::skipped("offsets_formed_from_the_scales_give_the_stored_offsets_results", "no AVX2");
            return Ok(());
        }
        let (n, k, m) = (2 * GROUP, 256, 5);
        let mut formats = vec![(GgmlDType::Q4_0, -8.0, 5.0)];
        if vnni_supported() {
            formats.extend([(GgmlDType::Q8_0, -128.0, 9.0), (GgmlDType::Q5_0, -16.0, 9.0)]);
        }
        for (dtype, multiple, bits) in formats {
            let (qt, dense) = k_weight(dtype, n, k)?;
            let lin = match QLinear::from_q4(&qt)? {
                Some(four) => four,
                None => QLinear::from_quantized(&qt)?,
            }
            .for_this_cpu();
            let Blocks::Packed16 { four, q, d, m: Offsets::OfScale(c) } = &lin.blocks else {
                panic!("{dtype:?}: not interleaved with offsets formed from the scales")
            };
            assert_eq!(*c, multiple, "{dtype:?}");
            assert_eq!(lin.bytes() as f64 * 8.0 / (n * k) as f64, bits, "{dtype:?} bits per weight");
            let mut rows = Vec::new();
            lin.rows_into(&(0..n as u32).collect::<Vec<_>>(), &mut rows)?;
            let want: Vec<f32> = dense.flatten_all()?.to_vec1()?;
            for (i, (a, b)) in rows.iter().zip(&want).enumerate() {
                // Equal as numbers: q·d − 8·d at q = 8 gives 0 where (q − 8)·d gives −0.
                assert_eq!(a, b, "{dtype:?} value {i}");
            }
            let stored = QLinear::new(
                n,
                k,
                Blocks::Packed16 {
                    four: *four,
                    q: q.clone(),
                    d: d.clone(),
                    m: Offsets::Stored(d.iter().map(|d| c * d).collect()),
                },
                lin.origin,
            );
            let act = random_activations(m, k)?;
            let (mut got, mut want) = (vec![0f32; m * n], vec![0f32; m * n]);
            matmul(std::slice::from_ref(&lin), n, &act, m, &mut got);
            matmul(std::slice::from_ref(&stored), n, &act, m, &mut want);
            assert_eq!(got, want, "{dtype:?}");
        }
        Ok(())
    }

    /// Q4_K and Q6_K weights keep their blocks (no second rounding): the values the kernels
    /// multiply by are the dequantized file's, bit for bit, at their own size.
    #[test]
    fn k_quants_are_carried_exactly() -> Result<()> {
        if !supported() {
            super::super::skipped("k_quants_are_carried_exactly", "this CPU lacks AVX2 and FMA");
            return Ok(());
        }
        let (n, k) = (2 * GROUP, 512);
        for (dtype, layout, bits) in [(GgmlDType::Q4K, "q4_k", 4.75), (GgmlDType::Q6K, "q6_k", 6.625)] {
            let (qt, dense) = k_weight(dtype, n, k)?;
            let lin = QLinear::from_quantized(&qt)?;
            assert_eq!(lin.layout(), layout);
            assert!(lin.origin().exact);
            let mut rows = Vec::new();
            lin.rows_into(&(0..n as u32).collect::<Vec<_>>(), &mut rows)?;
            let want: Vec<f32> = dense.flatten_all()?.to_vec1()?;
            for (i, (a, b)) in rows.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{layout} value {i}: {a} vs {b}");
            }
            assert_eq!(lin.bytes() as f64 * 8.0 / (n * k) as f64, bits, "{layout} bits per weight");
        }
        // A shape the K layouts cannot take falls back to int8 and says so.
        let (qt, _) = k_weight(GgmlDType::Q4K, GROUP + 1, 256)?;
        let odd = QLinear::from_quantized(&qt)?;
        assert_eq!((odd.layout().as_str(), odd.origin().exact), ("int8 from q4_k", false));
        Ok(())
    }

    /// The K kernels against a plain-Rust reference that applies the same integer dot products
    /// and scales block by block, and against the f32 matmul of the dequantized weights; each row
    /// gets the same values alone as in a batch.
    #[test]
    fn k_quant_kernels_match_the_reference() -> Result<()> {
        if !supported() {
            super::super::skipped("k_quant_kernels_match_the_reference", "this CPU lacks AVX2 and FMA");
            return Ok(());
        }
        let (n, k, m) = (2 * GROUP, 768, 9);
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let (qt, dense) = k_weight(dtype, n, k)?;
            let lin = QLinear::from_quantized(&qt)?;
            let act = random_activations(m, k)?;
            let mut got = vec![0f32; m * n];
            matmul(std::slice::from_ref(&lin), n, &act, m, &mut got);
            let mut w = Vec::new();
            lin.rows_into(&(0..n as u32).collect::<Vec<_>>(), &mut w)?;
            let nb = k / BLOCK;
            for r in 0..m {
                for j in 0..n {
                    // Σ over blocks of (weight values · activation ints) · activation scale.
                    let want: f64 = (0..nb)
                        .map(|b| {
                            let dot: f64 = (0..BLOCK)
                                .map(|t| w[j * k + b * BLOCK + t] as f64 * act.q[r * k + b * BLOCK + t] as f64)
                                .sum();
                            dot * act.d[r * nb + b] as f64
                        })
                        .sum();
                    let g = got[r * n + j] as f64;
                    assert!((g - want).abs() <= 1e-4 * want.abs().max(1.0), "{dtype:?} ({r}, {j}): {g} vs {want}");
                }
                let mut one = vec![0f32; n];
                let alone = random_rows(&act, r, k);
                matmul(std::slice::from_ref(&lin), n, &alone, 1, &mut one);
                assert_eq!(one[..], got[r * n..(r + 1) * n], "{dtype:?} row {r} alone");
            }
            // Two activation levels: as close to the f32 product as rounding allows.
            let mut two = QLinear::from_quantized(&qt)?;
            two.set_two_levels(true);
            let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
            let e = rel_err(&two.forward(&x)?, &x.matmul(&dense.t()?)?)?;
            assert!(e < 1e-4, "{dtype:?} two levels: relative error {e}");
        }
        Ok(())
    }

    /// Row `r` of quantized activations on its own.
    fn random_rows(act: &Activations, r: usize, k: usize) -> Activations {
        let nb = k / BLOCK;
        Activations {
            q: act.q[r * k..(r + 1) * k].to_vec(),
            d: act.d[r * nb..(r + 1) * nb].to_vec(),
            s: act.s[r * nb..(r + 1) * nb].to_vec(),
            h: act.h[2 * r * nb..2 * (r + 1) * nb].to_vec(),
        }
    }

    /// On a CPU with VNNI, the AVX2 K kernels (what a CPU without it runs) give the same values:
    /// the same integer sums and the same float steps in the same order.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_and_vnni_k_quant_kernels_agree() -> Result<()> {
        if !vnni_supported() {
            super::super::skipped("avx2_and_vnni_k_quant_kernels_agree", "this CPU lacks AVX-512 VNNI");
            return Ok(());
        }
        let (k, m) = (512, 7);
        let act = random_activations(m, k)?;
        let rows = act.rows(0, m, k);
        let nb = k / BLOCK;
        let nsb = nb / SUB;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            let lin = QLinear::from_quantized(&k_weight(dtype, GROUP, k)?.0)?;
            let (mut vnni, mut avx2) = (vec![[0f32; OUT_W]; m], vec![[0f32; OUT_W]; m]);
            // SAFETY: VNNI (and so AVX2) support checked above; one whole group of views.
            unsafe {
                match &lin.blocks {
                    Blocks::K4 { q, sc, m, d, dmin } => {
                        let w = super::super::K4View { q, sc, m, d, dmin };
                        avx512::tile_k4(&w, &rows, &mut vnni);
                        avx2::tile_k4_avx2(&w, &rows, &mut avx2);
                    }
                    Blocks::K6 { lo, hi, sc, d } => {
                        let w = super::super::K6View { lo, hi, sc, d };
                        avx512::tile_k6(&w, &rows, &mut vnni);
                        avx2::tile_k6_avx2(&w, &rows, &mut avx2);
                    }
                    _ => unreachable!("K layouts where AVX2 runs"),
                }
            }
            assert_eq!(vnni, avx2, "{dtype:?}");
            assert_eq!(nsb * SUB, nb);
        }
        Ok(())
    }

    /// A fused weight whose parts have different layouts (Q4_K queries, Q6_K values, an int8
    /// part) gives each part's own output side by side, bit for bit.
    #[test]
    fn fused_parts_keep_their_own_layouts() -> Result<()> {
        let k = 512;
        let alone = [
            QLinear::from_quantized(&k_weight(GgmlDType::Q4K, 2 * GROUP, k)?.0)?,
            QLinear::from_quantized(&k_weight(GgmlDType::Q6K, GROUP, k)?.0)?,
            QLinear::from_dense(&Tensor::randn(0f32, 1.0, (10, k), &Device::Cpu)?)?.for_this_cpu(),
        ];
        let copies = alone.iter().map(|p| QLinear::new(p.n, p.k, clone_blocks(&p.blocks), p.origin)).collect();
        let fused = FusedLinear::new(copies)?;
        let x = Tensor::randn(0f32, 1.0, (5, k), &Device::Cpu)?;
        let got: Vec<Vec<f32>> = fused.forward(&x)?.to_vec2()?;
        let want: Vec<Vec<Vec<f32>>> = alone.iter().map(|p| p.forward(&x)?.to_vec2()).collect::<Result<_>>()?;
        for (r, row) in got.iter().enumerate() {
            let joined: Vec<f32> = want.iter().flat_map(|w| w[r].clone()).collect();
            assert_eq!(row, &joined, "row {r}");
        }
        let mut rows = Vec::new();
        fused.rows_into(&[0, 2 * GROUP as u32, 3 * GROUP as u32 + 9], &mut rows)?;
        assert_eq!(rows.len(), 3 * k);
        assert!(fused.rows_into(&[3 * GROUP as u32 + 10], &mut rows).is_err());
        Ok(())
    }

    fn clone_blocks(b: &Blocks) -> Blocks {
        match b {
            Blocks::Int8 { q, d } => Blocks::Int8 { q: q.clone(), d: d.clone() },
            Blocks::Int4 { qs, d, m } => Blocks::Int4 { qs: qs.clone(), d: d.clone(), m: m.clone() },
            Blocks::Uint8 { q, d, m } => Blocks::Uint8 { q: q.clone(), d: d.clone(), m: m.clone() },
            Blocks::Packed16 { four, q, d, m } => {
                let m = match m {
                    Offsets::Stored(m) => Offsets::Stored(m.clone()),
                    Offsets::OfScale(c) => Offsets::OfScale(*c),
                };
                Blocks::Packed16 { four: *four, q: q.clone(), d: d.clone(), m }
            }
            Blocks::K4 { q, sc, m, d, dmin } => {
                Blocks::K4 { q: q.clone(), sc: sc.clone(), m: m.clone(), d: d.clone(), dmin: dmin.clone() }
            }
            Blocks::K6 { lo, hi, sc, d } => Blocks::K6 { lo: lo.clone(), hi: hi.clone(), sc: sc.clone(), d: d.clone() },
        }
    }
}
