//! GGUF blocks carried into the kernels' layouts without a second rounding.
//!
//! - **Q4_K** super-blocks (256 values) are eight 32-value sub-blocks whose value is
//!   `d·sc·q − dmin·m` with 4-bit `q` and 6-bit `sc`, `m`: a 4-bit block with a scale and an offset.
//!   They become [`Blocks::K4`]: the 4-bit values in the interleaved groups of 16 rows the 4-bit
//!   kernels read, `sc` and `m` kept as bytes per sub-block and `d`, `dmin` as f32 per super-block,
//!   so the scale `d·sc` and offset `dmin·m` are formed in the kernel, in f32, exactly (an f16
//!   times a 6-bit integer needs 17 bits; f32 has 24). 4.75 bits a weight against the file's 4.5.
//! - **Q6_K** super-blocks are sixteen 16-value sub-blocks, `d·sc·(q − 32)` with 6-bit `q` and an
//!   int8 `sc`. They become [`Blocks::K6`]: the low four bits of `q` interleaved like 4-bit values,
//!   the top two bits in a plane of their own, `sc` as int8 per 16 values and `d` as f32 per
//!   super-block; the kernel subtracts `32·Σa` per 16 values (the activations carry those sums)
//!   and applies `d·sc` (exact in f32). 6.625 bits a weight against the file's 6.5625.
//! - **Q8_0, Q5_0, Q5_1** (32-value blocks, one f16 scale, Q5_1 an f16 offset) fit int8 as they
//!   are: Q8_0's values, Q5_0's `q − 16` and Q5_1's `q` (with its offset) are the int8 blocks'
//!   values and the f16 scales their f32 scales, bit for bit.
//!
//! Everything here is plain Rust run once at load; only the kernels hold intrinsics.

use super::packing::{Blocks, group_nibbles};
use super::{BLOCK, GROUP};
use candle_core::Result;
use rayon::prelude::*;

/// Values per K-quant super-block.
pub(super) const QK_K: usize = 256;
/// 32-value sub-blocks per super-block.
pub(super) const SUB: usize = QK_K / BLOCK;
const Q4K_BYTES: usize = 144;
const Q6K_BYTES: usize = 210;

fn f16(b: &[u8]) -> f32 {
    half::f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// One Q4_K super-block: value `e` is `d·sc[e/32]·q[e] − dmin·m[e/32]`.
pub(super) struct Q4k {
    pub d: f32,
    pub dmin: f32,
    pub sc: [u8; SUB],
    pub m: [u8; SUB],
    pub q: [u8; QK_K],
}

/// Decodes a 144-byte Q4_K super-block (f16 d, f16 dmin, 12 bytes of packed 6-bit scales and
/// mins, 128 bytes of nibbles: each 32-byte run holds sub-block 2i in its low and 2i+1 in its
/// high nibbles).
pub(super) fn decode_q4k(b: &[u8]) -> Q4k {
    let scales = &b[4..16];
    let qs = &b[16..Q4K_BYTES];
    let mut out = Q4k { d: f16(&b[0..2]), dmin: f16(&b[2..4]), sc: [0; SUB], m: [0; SUB], q: [0; QK_K] };
    for j in 0..SUB {
        (out.sc[j], out.m[j]) = if j < 4 {
            (scales[j] & 63, scales[j + 4] & 63)
        } else {
            ((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4), (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4))
        };
    }
    for (e, q) in out.q.iter_mut().enumerate() {
        let sub = e / BLOCK;
        let byte = qs[sub / 2 * BLOCK + e % BLOCK];
        *q = if sub.is_multiple_of(2) { byte & 0xF } else { byte >> 4 };
    }
    out
}

/// One Q6_K super-block: value `e` is `d·sc[e/16]·(q[e] − 32)`, `q` in 0..64.
pub(super) struct Q6k {
    pub d: f32,
    pub sc: [i8; QK_K / 16],
    pub q: [u8; QK_K],
}

/// Decodes a 210-byte Q6_K super-block (128 bytes of low nibbles, 64 of high bit pairs, 16
/// int8 scales, f16 d), each 128-value half laid out as ggml writes it.
pub(super) fn decode_q6k(b: &[u8]) -> Q6k {
    let (ql, qh) = (&b[0..128], &b[128..192]);
    let mut out = Q6k { d: f16(&b[208..210]), sc: [0; 16], q: [0; QK_K] };
    for (s, &byte) in out.sc.iter_mut().zip(&b[192..208]) {
        *s = byte as i8;
    }
    for half in 0..2 {
        let (ql, qh, q) = (&ql[64 * half..], &qh[32 * half..], &mut out.q[128 * half..]);
        for l in 0..32 {
            q[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
            q[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
            q[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
            q[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
        }
    }
    out
}

/// Whether a `[n, k]` K-quant weight can take the interleaved K layouts.
pub(super) fn fits(n: usize, k: usize) -> bool {
    n.is_multiple_of(GROUP) && k.is_multiple_of(QK_K)
}

/// Builds [`Blocks::K4`] from the rows of a Q4_K tensor (`n` rows of `k` values), groups of 16
/// rows in parallel (load time only).
pub(super) fn pack_q4k(raw: &[u8], n: usize, k: usize) -> Result<Blocks> {
    let (nsb, nb) = (k / QK_K, k / BLOCK);
    let row_bytes = nsb * Q4K_BYTES;
    check(raw, n, row_bytes, "Q4_K")?;
    type Group = (Vec<u8>, Vec<u8>, Vec<u8>, Vec<f32>, Vec<f32>);
    let groups: Vec<Group> = raw
        .par_chunks(GROUP * row_bytes)
        .map(|group| {
            let rows: Vec<Vec<Q4k>> =
                group.chunks_exact(row_bytes).map(|r| r.chunks_exact(Q4K_BYTES).map(decode_q4k).collect()).collect();
            let mut q = Vec::with_capacity(GROUP * k / 2);
            group_nibbles(nb, |r, i| rows[r][i / QK_K].q[i % QK_K], &mut q);
            let (mut sc, mut m) = (Vec::with_capacity(GROUP * nb), Vec::with_capacity(GROUP * nb));
            for b in 0..nb {
                sc.extend(rows.iter().map(|row| row[b / SUB].sc[b % SUB]));
                m.extend(rows.iter().map(|row| row[b / SUB].m[b % SUB]));
            }
            let d = (0..nsb).flat_map(|s| rows.iter().map(move |row| row[s].d)).collect();
            // Stored negated: the kernels add `offset · Σa`.
            let dmin = (0..nsb).flat_map(|s| rows.iter().map(move |row| -row[s].dmin)).collect();
            (q, sc, m, d, dmin)
        })
        .collect();
    Ok(Blocks::K4 {
        q: joined(&groups, |g| &g.0),
        sc: joined(&groups, |g| &g.1),
        m: joined(&groups, |g| &g.2),
        d: joined(&groups, |g| &g.3),
        dmin: joined(&groups, |g| &g.4),
    })
}

/// One field of every group's packed blocks, in group order.
fn joined<G, T: Copy>(groups: &[G], field: impl Fn(&G) -> &[T]) -> Vec<T> {
    groups.iter().map(field).collect::<Vec<_>>().concat()
}

/// Builds [`Blocks::K6`] from the rows of a Q6_K tensor, groups in parallel.
pub(super) fn pack_q6k(raw: &[u8], n: usize, k: usize) -> Result<Blocks> {
    let (nsb, nb) = (k / QK_K, k / BLOCK);
    let row_bytes = nsb * Q6K_BYTES;
    check(raw, n, row_bytes, "Q6_K")?;
    type Group = (Vec<u8>, Vec<u8>, Vec<i8>, Vec<f32>);
    let groups: Vec<Group> = raw
        .par_chunks(GROUP * row_bytes)
        .map(|group| {
            let rows: Vec<Vec<Q6k>> =
                group.chunks_exact(row_bytes).map(|r| r.chunks_exact(Q6K_BYTES).map(decode_q6k).collect()).collect();
            let value = |r: usize, i: usize| rows[r][i / QK_K].q[i % QK_K];
            let (mut lo, mut hi) = (Vec::with_capacity(GROUP * k / 2), Vec::with_capacity(GROUP * k / 4));
            group_nibbles(nb, |r, i| value(r, i) & 0xF, &mut lo);
            group_high_pairs(nb, |r, i| value(r, i) >> 4, &mut hi);
            let mut sc = Vec::with_capacity(GROUP * k / 16);
            for b in 0..nb {
                for half in 0..2 {
                    let s = (b * BLOCK + half * 16) / 16;
                    sc.extend(rows.iter().map(|row| row[s / 16].sc[s % 16]));
                }
            }
            let d = (0..nsb).flat_map(|s| rows.iter().map(move |row| row[s].d)).collect();
            (lo, hi, sc, d)
        })
        .collect();
    Ok(Blocks::K6 {
        lo: joined(&groups, |g| &g.0),
        hi: joined(&groups, |g| &g.1),
        sc: joined(&groups, |g| &g.2),
        d: joined(&groups, |g| &g.3),
    })
}

/// Appends one group's top bit pairs: per block two 64-byte vectors; byte `r·4 + t` of vector
/// `h` holds, at bits `2j..2j + 2`, the pair of value `4(4h + j) + t` of row `r` — the same
/// value the 4-bit layout's vector `4h + j` holds at that byte position.
fn group_high_pairs(nb: usize, pair: impl Fn(usize, usize) -> u8, out: &mut Vec<u8>) {
    for b in 0..nb {
        for h in 0..2 {
            for r in 0..GROUP {
                for t in 0..4 {
                    let byte = (0..4).fold(0u8, |acc, j| acc | (pair(r, b * BLOCK + 4 * (4 * h + j) + t) << (2 * j)));
                    out.push(byte);
                }
            }
        }
    }
}

fn check(raw: &[u8], n: usize, row_bytes: usize, what: &str) -> Result<()> {
    if raw.len() != n * row_bytes {
        candle_core::bail!("{what} tensor has {} bytes, expected {}", raw.len(), n * row_bytes);
    }
    Ok(())
}

/// The 32-value blocks that fit int8 exactly: per block its f32 scale, its offset (the value of
/// a stored 0, for the unsigned form) and its values, signed (`q − zero`) and unsigned (`q`).
pub(super) struct SmallBlocks {
    /// Unsigned values (0..256) with `value = q·d + m`.
    pub q: Vec<u8>,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
    /// Whether every offset is `−z·d` for one integer `z`, so the signed form `q − z` carries it.
    pub zero: Option<u8>,
}

/// Decodes Q8_0, Q5_0 or Q5_1 blocks; `None` for other formats.
pub(super) fn decode_small(dtype: candle_core::quantized::GgmlDType, raw: &[u8]) -> Option<SmallBlocks> {
    use candle_core::quantized::GgmlDType as T;
    let size = match dtype {
        T::Q8_0 => 34,
        T::Q5_0 => 22,
        T::Q5_1 => 24,
        _ => return None,
    };
    let n = raw.len() / size;
    let mut out = SmallBlocks {
        q: Vec::with_capacity(n * BLOCK),
        d: Vec::with_capacity(n),
        m: Vec::with_capacity(n),
        zero: None,
    };
    for b in raw.chunks_exact(size) {
        let d = f16(&b[0..2]);
        out.d.push(d);
        match dtype {
            T::Q8_0 => {
                out.m.push(-128.0 * d);
                out.q.extend(b[2..34].iter().map(|&v| (v as i8 as i16 + 128) as u8));
            }
            _ => {
                let (m, qh, qs) = if dtype == T::Q5_1 {
                    (f16(&b[2..4]), &b[4..8], &b[8..24])
                } else {
                    (-16.0 * d, &b[2..6], &b[6..22])
                };
                out.m.push(m);
                let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
                for j in 0..BLOCK {
                    let nibble = if j < 16 { qs[j] & 0xF } else { qs[j - 16] >> 4 };
                    out.q.push(nibble | ((((qh >> j) & 1) as u8) << 4));
                }
            }
        }
    }
    out.zero = match dtype {
        T::Q8_0 => Some(128),
        T::Q5_0 => Some(16),
        _ => None,
    };
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    /// The decoders give back exactly what candle (ggml's reference) dequantizes, value for
    /// value, computed the way ggml computes it.
    #[test]
    fn k_quant_blocks_decode_to_the_reference_values() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (3, 512), &dev)?;
        let q4 = QTensor::quantize(&w, GgmlDType::Q4K)?;
        let want: Vec<f32> = q4.dequantize(&dev)?.flatten_all()?.to_vec1()?;
        let raw = q4.data()?;
        for (s, block) in raw.chunks_exact(Q4K_BYTES).enumerate() {
            let b = decode_q4k(block);
            for e in 0..QK_K {
                let got = b.d * b.sc[e / 32] as f32 * b.q[e] as f32 - b.dmin * b.m[e / 32] as f32;
                assert_eq!(got.to_bits(), want[s * QK_K + e].to_bits(), "q4_k super-block {s} value {e}");
            }
        }
        let q6 = QTensor::quantize(&w, GgmlDType::Q6K)?;
        let want: Vec<f32> = q6.dequantize(&dev)?.flatten_all()?.to_vec1()?;
        for (s, block) in q6.data()?.chunks_exact(Q6K_BYTES).enumerate() {
            let b = decode_q6k(block);
            for e in 0..QK_K {
                assert!(b.q[e] < 64);
                let got = b.d * b.sc[e / 16] as f32 * (b.q[e] as i8 - 32) as f32;
                assert_eq!(got.to_bits(), want[s * QK_K + e].to_bits(), "q6_k super-block {s} value {e}");
            }
        }
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q5_0, GgmlDType::Q5_1] {
            let qt = QTensor::quantize(&w, dtype)?;
            let want: Vec<f32> = qt.dequantize(&dev)?.flatten_all()?.to_vec1()?;
            let s = decode_small(dtype, &qt.data()?).expect("a 32-value format");
            for (i, w) in want.iter().enumerate() {
                let (q, d, m) = (s.q[i] as f32, s.d[i / BLOCK], s.m[i / BLOCK]);
                assert!((q * d + m - w).abs() <= 1e-6 * w.abs().max(1e-3), "{dtype:?} value {i}: {} vs {w}", q * d + m);
                if let Some(z) = s.zero {
                    assert_eq!((s.q[i] as f32 - z as f32) * d, *w, "{dtype:?} value {i}, signed");
                }
            }
        }
        assert!(decode_small(GgmlDType::Q4K, &[]).is_none());
        Ok(())
    }
}
