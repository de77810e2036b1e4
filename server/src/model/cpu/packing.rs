//! Weight layouts for the block kernels, built once at load: int8 blocks (from any dense
//! weight), 4-bit blocks copied bit for bit from GGUF Q4_0/Q4_1 (value = q·d + m), and the
//! column-interleaved groups of 16 rows ([`Blocks::Packed16`]) the fastest kernels read.

use super::kquant;
use super::linear::{Origin, QLinear};
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
    /// group's 16 scales per block in `d` and their offsets in `m`.
    Packed16 { four: bool, q: Vec<u8>, d: Vec<f32>, m: Offsets },
    /// GGUF Q4_K in groups of 16 rows ([`super::kquant`]): 4-bit values laid out as
    /// [`Self::Packed16`]'s, then per group and 32-value block the 16 rows' 6-bit scales `sc`
    /// and mins `m` as bytes, and per group and 256-value super-block their `d` and `−dmin`:
    /// value = `d·sc·q + (−dmin)·m`.
    K4 { q: Vec<u8>, sc: Vec<u8>, m: Vec<u8>, d: Vec<f32>, dmin: Vec<f32> },
    /// GGUF Q6_K in groups of 16 rows: the low four bits of each 6-bit value laid out as
    /// 4-bit values, the top two in `hi` (two 64-byte vectors per group and block, see
    /// [`super::kquant`]), per group, block and 16-value half the 16 rows' int8 scales `sc`, and
    /// per group and super-block their `d`: value = `d·sc·(q − 32)`.
    K6 { lo: Vec<u8>, hi: Vec<u8>, sc: Vec<i8>, d: Vec<f32> },
}

/// The per-block offsets of [`Blocks::Packed16`].
pub(super) enum Offsets {
    /// One per block and row, in the order of the scales.
    Stored(Vec<f32>),
    /// Every block's offset is this multiple of its scale: `−128·d` for Q8_0 (and any signed
    /// int8 block made unsigned), `−16·d` for Q5_0, `−8·d` for Q4_0. Checked bit for bit when
    /// packing and formed again by the kernels with the same f32 product, so the results are
    /// the stored offsets' exactly while an 8-bit group keeps a tenth less memory (Gemma 3's
    /// Q8_0 embedding and Q5_0 projections).
    OfScale(f32),
}

/// [`Offsets`] for one group's blocks.
#[derive(Clone, Copy)]
pub(super) enum OffsetView<'a> {
    Stored(&'a [f32]),
    OfScale(f32),
}

impl Offsets {
    /// Offsets `range` (indices into the scales).
    pub(super) fn view(&self, range: std::ops::Range<usize>) -> OffsetView<'_> {
        match self {
            Self::Stored(m) => OffsetView::Stored(&m[range]),
            Self::OfScale(c) => OffsetView::OfScale(*c),
        }
    }

    /// The offset of the block whose scale is `d[i]`.
    pub(super) fn at(&self, d: &[f32], i: usize) -> f32 {
        match self {
            Self::Stored(m) => m[i],
            Self::OfScale(c) => c * d[i],
        }
    }

    pub(super) fn stored(&self) -> &[f32] {
        match self {
            Self::Stored(m) => m,
            Self::OfScale(_) => &[],
        }
    }

    /// `m` as one multiple of `d` where every offset is that multiple's f32 product bit for
    /// bit, else stored as it is.
    fn of(d: &[f32], m: Vec<f32>) -> Self {
        let Some(c) = d.iter().zip(&m).find(|(d, _)| **d != 0.0 && d.is_finite()).map(|(d, m)| m / d) else {
            return Self::Stored(m);
        };
        if c.is_finite() && d.iter().zip(&m).all(|(d, m)| (c * d).to_bits() == m.to_bits()) {
            Self::OfScale(c)
        } else {
            Self::Stored(m)
        }
    }
}

impl OffsetView<'_> {
    /// Whether it holds the offsets of `len` scales.
    pub(super) fn covers(&self, len: usize) -> bool {
        match self {
            Self::Stored(m) => m.len() >= len,
            Self::OfScale(_) => true,
        }
    }
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
        let mut h = vec![0i32; 2 * n * k / BLOCK];
        quantize_blocks(&data, &mut q, &mut d, &mut s, &mut h);
        let blocks = if unsigned {
            let m = d.iter().map(|d| -128.0 * d).collect();
            Blocks::Uint8 { q: q.into_iter().map(|v| (v as i16 + 128) as u8).collect(), d, m }
        } else {
            Blocks::Int8 { q, d }
        };
        Ok(Self::new(n, k, blocks, Origin { format: "dense", exact: false }))
    }

    pub(super) fn new(n: usize, k: usize, blocks: Blocks, origin: Origin) -> Self {
        Self { n, k, blocks, two_levels: false, origin }
    }

    /// Copies Q4_0/Q4_1 blocks losslessly; `None` for other formats.
    pub fn from_q4(t: &QTensor) -> Result<Option<Self>> {
        let (n, k) = t.shape().dims2()?;
        let (size, has_min, format) = match t.dtype() {
            GgmlDType::Q4_0 => (18, false, "q4_0"),
            GgmlDType::Q4_1 => (20, true, "q4_1"),
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
        Ok(Some(Self::new(n, k, Blocks::Int4 { qs, d, m }, Origin { format, exact: true })))
    }

    /// Any other GGUF-quantized weight. Kept exactly where the CPU and the shape allow: Q4_K and
    /// Q6_K in their interleaved K layouts (AVX2, rows in groups of 16, whole super-blocks);
    /// Q8_0, Q5_0 and Q5_1 as int8 blocks with their own scales (Q5_1's offsets need the
    /// unsigned form, i.e. VNNI). Everything else is dequantized and re-blocked to int8, a
    /// slice of rows at a time so a large matrix (Gemma 3's 262 144-row embedding) never exists
    /// in f32 whole; [`Self::origin`] says which happened.
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
        let format = match dtype {
            GgmlDType::Q4K => "q4_k",
            GgmlDType::Q6K => "q6_k",
            GgmlDType::Q5K => "q5_k",
            GgmlDType::Q3K => "q3_k",
            GgmlDType::Q2K => "q2_k",
            GgmlDType::Q8_0 => "q8_0",
            GgmlDType::Q5_0 => "q5_0",
            GgmlDType::Q5_1 => "q5_1",
            _ => "other",
        };
        let exact = Origin { format, exact: true };
        if supported() && kquant::fits(n, k) {
            match dtype {
                GgmlDType::Q4K => return Ok(Self::new(n, k, kquant::pack_q4k(&raw, n, k)?, exact)),
                GgmlDType::Q6K => return Ok(Self::new(n, k, kquant::pack_q6k(&raw, n, k)?, exact)),
                _ => {}
            }
        }
        if let Some(small) = kquant::decode_small(dtype, &raw) {
            let kquant::SmallBlocks { q, d, m, zero } = small;
            if vnni_supported() {
                return Ok(Self::new(n, k, Blocks::Uint8 { q, d, m }, exact));
            }
            if let Some(z) = zero {
                let q = q.into_iter().map(|v| (v as i16 - z as i16) as i8).collect();
                return Ok(Self::new(n, k, Blocks::Int8 { q, d }, exact));
            }
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
        let mut whole = Self::concat(parts)?;
        whole.origin = Origin { format, exact: false };
        Ok(whole)
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
                // Interleaved layouts: group g, row r within it; vector v holds values
                // 4v..4v+4 of the block for each row (two vectors per 64 bytes when 4-bit).
                let (g, r, v) = (j / GROUP, j % GROUP, t / 4);
                let gb = g * nb + b;
                let nibble = |q: &[u8]| {
                    let byte = q[(gb * 4 + v / 2) * 64 + r * 4 + t % 4];
                    if v % 2 == 0 { byte & 0x0F } else { byte >> 4 }
                };
                match &self.blocks {
                    Blocks::Int8 { q, d } => q[j * k + i] as f32 * d[j * nb + b],
                    Blocks::Uint8 { q, d, m } => q[j * k + i] as f32 * d[j * nb + b] + m[j * nb + b],
                    Blocks::Int4 { qs, d, m } => {
                        let byte = qs[(j * nb + b) * 16 + t % 16];
                        let v = if t < 16 { byte & 0x0F } else { byte >> 4 };
                        v as f32 * d[j * nb + b] + m[j * nb + b]
                    }
                    Blocks::Packed16 { four, q, d, m } => {
                        let value = if *four { nibble(q) } else { q[(gb * 8 + v) * 64 + r * 4 + t % 4] };
                        value as f32 * d[gb * GROUP + r] + m.at(d, gb * GROUP + r)
                    }
                    Blocks::K4 { q, sc, m, d, dmin } => {
                        let s = (g * (nb / kquant::SUB) + b / kquant::SUB) * GROUP + r;
                        let scale = d[s] * sc[gb * GROUP + r] as f32;
                        let offset = dmin[s] * m[gb * GROUP + r] as f32;
                        nibble(q) as f32 * scale + offset
                    }
                    Blocks::K6 { lo, hi, sc, d } => {
                        let s = (g * (nb / kquant::SUB) + b / kquant::SUB) * GROUP + r;
                        let pair = (hi[(gb * 2 + v / 4) * 64 + r * 4 + t % 4] >> (2 * (v % 4))) & 3;
                        let q = (nibble(lo) | (pair << 4)) as i32 - 32;
                        let scale = d[s] * sc[(gb * 2 + t / 16) * GROUP + r] as f32;
                        q as f32 * scale
                    }
                }
            }));
        }
        Ok(())
    }

    /// Concatenates weights along the output dimension (all of one block kind, row layouts).
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
        matches!(self.blocks, Blocks::Int4 { .. } | Blocks::Packed16 { four: true, .. } | Blocks::K4 { .. })
    }

    /// The layout the fastest kernel on this CPU wants: weights whose row count is a multiple of
    /// [`GROUP`] are interleaved in groups of 16 rows (done once, at load) — with VNNI all of
    /// them, with AVX2 alone the 4-bit ones (8-bit products would overflow its 16-bit sums).
    /// The K layouts are interleaved from the start.
    pub fn for_this_cpu(self) -> Self {
        let four = matches!(self.blocks, Blocks::Int4 { .. });
        if !self.n.is_multiple_of(GROUP) || !(vnni_supported() || (four && supported())) {
            return self;
        }
        let (n, k, origin) = (self.n, self.k, self.origin);
        let blocks = match self.blocks {
            Blocks::Int4 { qs, d, m } => {
                let value = |j: usize, i: usize| {
                    let (b, t) = (i / BLOCK, i % BLOCK);
                    let byte = qs[(j * k / BLOCK + b) * 16 + t % 16];
                    if t < 16 { byte & 0x0F } else { byte >> 4 }
                };
                pack16(n, k, true, value, &d, &m)
            }
            Blocks::Uint8 { q, d, m } => pack16(n, k, false, |j, i| q[j * k + i], &d, &m),
            blocks => blocks,
        };
        Self::new(n, k, blocks, origin)
    }
}

/// Builds [`Blocks::Packed16`] from `value(row, index)` (each an unsigned 4- or 8-bit value)
/// and per-block scales and offsets in row order.
fn pack16(n: usize, k: usize, four: bool, value: impl Fn(usize, usize) -> u8, d: &[f32], m: &[f32]) -> Blocks {
    let nb = k / BLOCK;
    let mut q = Vec::with_capacity(if four { n * k / 2 } else { n * k });
    let (mut gd, mut gm) = (Vec::with_capacity(n * nb), Vec::with_capacity(n * nb));
    for g in 0..n / GROUP {
        let value = |r: usize, i: usize| value(g * GROUP + r, i);
        if four {
            group_nibbles(nb, value, &mut q);
        } else {
            for b in 0..nb {
                for v in 0..8 {
                    q.extend(vector(b, v).map(|(r, i)| value(r, i)));
                }
            }
        }
        for b in 0..nb {
            gd.extend((0..GROUP).map(|r| d[(g * GROUP + r) * nb + b]));
            gm.extend((0..GROUP).map(|r| m[(g * GROUP + r) * nb + b]));
        }
    }
    Blocks::Packed16 { four, q, m: Offsets::of(&gd, gm), d: gd }
}

/// Vector `v` of block `b` in a group: for each of the 16 rows, values `4v..4v + 4` of the
/// block, as (row in the group, index in the row).
fn vector(b: usize, v: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..GROUP).flat_map(move |r| (0..4).map(move |t| (r, b * BLOCK + 4 * v + t)))
}

/// Appends one group's 4-bit values (`value(row in the group, index)` below 16): per block four
/// 64-byte vectors, vector `u` holding the group's vector `2u` in its low nibbles and `2u + 1`
/// in its high ones.
pub(super) fn group_nibbles(nb: usize, value: impl Fn(usize, usize) -> u8, out: &mut Vec<u8>) {
    for b in 0..nb {
        for v in (0..8).step_by(2) {
            out.extend(vector(b, v).zip(vector(b, v + 1)).map(|((r, i), (r2, i2))| value(r, i) | (value(r2, i2) << 4)));
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
        QLinear::new(n, k, blocks, l.origin)
    }

    /// Formats without an exact layout (Q5_K, Q3_K, and K-quants whose shape the K layouts
    /// cannot take) re-block to the same int8 blocks as their whole dequantized matrix and say
    /// they are not exact; Q8_0, Q5_0 and Q5_1 keep their values.
    #[test]
    fn quantized_weights_re_block_or_keep_their_values() -> Result<()> {
        let dev = Device::Cpu;
        let ids: Vec<u32> = (0..72).collect();
        let w = Tensor::randn(0f32, 1.0, (72, 256), &dev)?;
        for dtype in [GgmlDType::Q5K, GgmlDType::Q3K, GgmlDType::Q4K, GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q5_1]
        {
            let qt = QTensor::quantize(&w, dtype)?;
            let dense = qt.dequantize(&dev)?;
            let got = QLinear::from_quantized(&qt)?;
            let exact =
                matches!(dtype, GgmlDType::Q8_0 | GgmlDType::Q5_0) || (dtype == GgmlDType::Q5_1 && vnni_supported());
            assert_eq!(got.origin().exact, exact, "{dtype:?}");
            if exact {
                let want: Vec<f32> = dense.flatten_all()?.to_vec1()?;
                for (a, b) in rows(&got, &ids).iter().zip(&want) {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{dtype:?}: {a} vs {b}");
                }
            } else {
                // 72 rows: not whole groups of 16, so Q4_K re-blocks too.
                assert_eq!(rows(&got, &ids), rows(&QLinear::from_dense(&dense)?, &ids), "{dtype:?}");
            }
        }
        Ok(())
    }
}
