//! Weight layouts for the block kernels, built once at load: int8 blocks (from any dense
//! weight), 4-bit blocks copied bit for bit from GGUF Q4_0/Q4_1 (value = q·d + m), and the
//! column-interleaved groups of 16 rows ([`Blocks::Packed16`]) the fastest kernels read.

use super::linear::QLinear;
use super::quantize::quantize_blocks;
use super::{BLOCK, GROUP, supported, vnni_supported};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

pub(super) enum Blocks {
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

impl QLinear {
    /// Quantizes a dense `[n, k]` weight to int8 blocks (stored unsigned where VNNI runs).
    pub fn from_dense(w: &Tensor) -> Result<Self> {
        Self::from_dense_as(w, vnni_supported())
    }

    pub(super) fn from_dense_as(w: &Tensor, unsigned: bool) -> Result<Self> {
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
        Ok(Self { n, k, blocks, two_levels: false })
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
        Ok(Some(Self { n, k, blocks: Blocks::Int4 { qs, d, m }, two_levels: false }))
    }

    /// Re-blocks any GGUF-quantized weight (K-quants, Q5_0, Q8_0 …) to int8 blocks, dequantizing
    /// a slice of rows at a time so a large matrix (Gemma 3's 262 144-row embedding) never
    /// exists in f32 whole.
    pub fn from_quantized(t: &QTensor) -> Result<Self> {
        let (n, k) = t.shape().dims2()?;
        let dtype = t.dtype();
        if !k.is_multiple_of(dtype.block_size()) {
            candle_core::bail!("{dtype:?} weight with rows of {k} values is not whole blocks");
        }
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        let raw = t.data()?;
        if raw.len() != n * row_bytes {
            candle_core::bail!("{dtype:?} tensor has {} bytes, expected {}", raw.len(), n * row_bytes);
        }
        // About 16 MB of f32 per slice.
        let rows = ((4 << 20) / k).max(GROUP) / GROUP * GROUP;
        let parts = (0..n)
            .step_by(rows)
            .map(|r0| {
                let r1 = (r0 + rows).min(n);
                let slice = &raw[r0 * row_bytes..r1 * row_bytes];
                let part = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    dtype,
                    slice,
                    vec![r1 - r0, k],
                    &candle_core::Device::Cpu,
                )?;
                Self::from_dense(&part.dequantize(&candle_core::Device::Cpu)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Self::concat(parts)
    }

    /// Rows of the weight as f32 (what the kernels multiply by), appended to `out`: the
    /// embedding lookup of a model whose output head shares the token embeddings.
    pub fn rows_into(&self, ids: &[u32], out: &mut Vec<f32>) -> Result<()> {
        let (n, k, nb) = (self.n, self.k, self.k / BLOCK);
        if let Some(&bad) = ids.iter().find(|&&j| j as usize >= n) {
            candle_core::bail!("row {bad} of a weight with {n} rows");
        }
        for &j in ids {
            let j = j as usize;
            out.extend((0..k).map(|i| {
                let (b, t) = (i / BLOCK, i % BLOCK);
                match &self.blocks {
                    Blocks::Int8 { q, d } => q[j * k + i] as f32 * d[j * nb + b],
                    Blocks::Uint8 { q, d, m } => q[j * k + i] as f32 * d[j * nb + b] + m[j * nb + b],
                    Blocks::Int4 { qs, d, m } => {
                        let byte = qs[(j * nb + b) * 16 + t % 16];
                        let v = if t < 16 { byte & 0x0F } else { byte >> 4 };
                        v as f32 * d[j * nb + b] + m[j * nb + b]
                    }
                    Blocks::Packed16 { four, q, d, m } => {
                        // Inverse of [`pack16`]: group g, row r within it; vector v holds values
                        // 4v..4v+4 of the block for each row (two vectors per 64 bytes when 4-bit).
                        let (g, r, v) = (j / GROUP, j % GROUP, t / 4);
                        let gb = g * nb + b;
                        let value = if *four {
                            let byte = q[(gb * 4 + v / 2) * 64 + r * 4 + t % 4];
                            if v % 2 == 0 { byte & 0x0F } else { byte >> 4 }
                        } else {
                            q[(gb * 8 + v) * 64 + r * 4 + t % 4]
                        };
                        value as f32 * d[gb * GROUP + r] + m[gb * GROUP + r]
                    }
                }
            }));
        }
        Ok(())
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
                Self { n, k, blocks: pack16(n, k, true, value, &d, &m), two_levels: false }
            }
            Blocks::Uint8 { q, d, m } => {
                let value = |j: usize, i: usize| q[j * k + i];
                Self { n, k, blocks: pack16(n, k, false, value, &d, &m), two_levels: false }
            }
            blocks => Self { n, k, blocks, two_levels: false },
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use candle_core::quantized::GgmlDType;

    fn rows(l: &QLinear, ids: &[u32]) -> Vec<f32> {
        let mut out = Vec::new();
        l.rows_into(ids, &mut out).unwrap();
        out
    }

    /// Every block layout gives back the values it multiplies by: int8 and unsigned int8 from a
    /// dense weight, 4-bit from Q4_1, each also packed in groups of 16 rows.
    #[test]
    fn rows_read_back_every_block_layout() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (48, 64), &dev)?;
        let dense: Vec<f32> = w.flatten_all()?.to_vec1()?;
        let ids = [0u32, 17, 47, 16, 3];
        let want: Vec<f32> = ids.iter().flat_map(|&j| dense[j as usize * 64..][..64].to_vec()).collect();
        let q41 = QTensor::quantize(&w, GgmlDType::Q4_1)?;
        let q41_dense: Vec<f32> = q41.dequantize(&dev)?.flatten_all()?.to_vec1()?;
        let want4: Vec<f32> = ids.iter().flat_map(|&j| q41_dense[j as usize * 64..][..64].to_vec()).collect();
        for unsigned in [false, true] {
            let plain = QLinear::from_dense_as(&w, unsigned)?;
            let got = rows(&plain, &ids);
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() <= 0.03, "int8 (unsigned {unsigned}): {a} vs {b}");
            }
            // Signed blocks come back as (q + 128)·d - 128·d once packed: equal to rounding.
            let packed = rows(&pack_for_test(plain), &ids);
            for (a, b) in packed.iter().zip(&got) {
                assert!((a - b).abs() <= 1e-5, "packing keeps the values (unsigned {unsigned}): {a} vs {b}");
            }
        }
        let four = QLinear::from_q4(&q41)?.expect("q4_1 converts");
        let got = rows(&four, &ids);
        for (a, b) in got.iter().zip(&want4) {
            assert!((a - b).abs() <= 1e-5, "int4: {a} vs {b}");
        }
        assert_eq!(rows(&pack_for_test(four), &ids), got, "4-bit packing keeps the values");
        assert!(QLinear::from_dense(&w)?.rows_into(&[48], &mut Vec::new()).is_err());
        Ok(())
    }

    /// [`QLinear::for_this_cpu`]'s packing, whatever this CPU is.
    fn pack_for_test(l: QLinear) -> QLinear {
        let (n, k) = (l.n, l.k);
        let blocks = match l.blocks {
            Blocks::Int4 { qs, d, m } => {
                let value = |j: usize, i: usize| {
                    let (b, t) = (i / BLOCK, i % BLOCK);
                    let byte = qs[(j * k / BLOCK + b) * 16 + t % 16];
                    if t < 16 { byte & 0x0F } else { byte >> 4 }
                };
                pack16(n, k, true, value, &d, &m)
            }
            Blocks::Uint8 { q, d, m } => pack16(n, k, false, |j, i| q[j * k + i], &d, &m),
            Blocks::Int8 { q, d } => {
                let m: Vec<f32> = d.iter().map(|d| -128.0 * d).collect();
                pack16(n, k, false, |j, i| (q[j * k + i] as i16 + 128) as u8, &d, &m)
            }
            b => b,
        };
        QLinear { n, k, blocks, two_levels: false }
    }

    /// K-quant and Q8_0 weights re-block slice by slice to the same int8 blocks as their whole
    /// dequantized matrix; Q8_0 converts without loss.
    #[test]
    fn quantized_weights_re_block_in_slices() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (80, 256), &dev)?;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K, GgmlDType::Q5_0, GgmlDType::Q8_0] {
            let qt = QTensor::quantize(&w, dtype)?;
            let dense = qt.dequantize(&dev)?;
            let got = QLinear::from_quantized(&qt)?;
            let want = QLinear::from_dense(&dense)?;
            let ids: Vec<u32> = (0..80).collect();
            assert_eq!(rows(&got, &ids), rows(&want, &ids), "{dtype:?}");
            if dtype == GgmlDType::Q8_0 {
                let exact: Vec<f32> = dense.flatten_all()?.to_vec1()?;
                for (a, b) in rows(&got, &ids).iter().zip(&exact) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "q8_0: {a} vs {b}");
                }
            }
        }
        Ok(())
    }
}
