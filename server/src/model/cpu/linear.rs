//! The block-quantized linear op: activations quantized once per call, then every weight tile
//! multiplied against all activation rows by the fastest kernel this CPU has.

use super::packing::Blocks;
use super::quantize::Activations;
use super::scalar::{scalar_int4, scalar_int8, scalar_uint8};
use super::{ActRows, BLOCK, COLS, GROUP, OUT_W, ROW_TILE, SendPtr, TILE, contiguous_f32, supported, vnni_supported};
#[cfg(target_arch = "x86_64")]
use super::{avx2, avx512};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// A `[n, k]` weight matrix in block-quantized form.
pub struct QLinear {
    pub(super) n: usize,
    pub(super) k: usize,
    pub(super) blocks: Blocks,
    /// Activations quantized in two levels (see [`QLinear::set_two_levels`]).
    pub(super) two_levels: bool,
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
                    (true, true) => avx512::tile_packed16::<true>(w, &act, out),
                    (false, _) => avx512::tile_packed16::<false>(w, &act, out),
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
                        unsafe { avx512::tile_vnni_wide::<true>(self.offset_cols(qs, 16, d, m, j0), &act, out) };
                        return;
                    }
                    Blocks::Uint8 { q, d, m } => {
                        unsafe { avx512::tile_vnni_wide::<false>(self.offset_cols(q, BLOCK, d, m, j0), &act, out) };
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
        let levels = if self.two_levels { 2 } else { 1 };
        let rows = levels * m;
        let mut act = Activations { q: vec![0i8; rows * k], d: vec![0f32; rows * nb], s: vec![0f32; rows * nb] };
        act.quantize(x, k);
        if self.two_levels {
            act.quantize_residual(x, k, m);
        }
        let mut out = vec![0f32; rows * self.n];
        self.matmul(&act, rows, &mut out);
        if self.two_levels {
            let (first, second) = out.split_at_mut(m * self.n);
            first.iter_mut().zip(second.iter()).for_each(|(a, b)| *a += *b);
            out.truncate(m * self.n);
        }
        let mut shape = dims.to_vec();
        *shape.last_mut().expect("rank >= 1") = self.n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
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
            super::super::skipped("avx2_and_vnni_interleaved_kernels_agree", "this CPU lacks AVX-512 VNNI");
            return Ok(());
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
