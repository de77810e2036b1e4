//! AVX-512 VNNI kernels: one instruction adds four u8·i8 products to each of 16 lanes, and the
//! 32 vector registers hold a whole tile of accumulators.

use super::avx2::{ROWS, check, dot_f32, hsum, udot};
use super::kquant::SUB;
use super::packing::OffsetView;
use super::{ActRows, BLOCK, GROUP, K4View, K6View, OUT_W, TILE};
use std::arch::x86_64::*;

/// Activation rows the 16-row group kernels take per pass over a group's blocks: each block's
/// weights are unpacked and its scales formed once for all of them. Eight rather than four took
/// Qwen2.5 1.5B's prefill from about 142 to 153 tok/s in the forward bench (4 alternating runs
/// each); 8 accumulators, 8 weight vectors and the two VNNI chains still fit the 32 registers.
const WIDE_ROWS: usize = 8;

/// Four weight rows against every activation row, four rows at a time, two blocks per
/// 512-bit step: 16 accumulators, four weight block pairs and their scales fit in the 32
/// registers AVX-512 brings, and one VNNI instruction does 64 products. Weights are 4-bit
/// (`FOUR`) or unsigned 8-bit blocks, both with an offset per block. A row's result depends
/// only on its own values, not on the rows beside it.
///
/// # Safety
/// AVX2, FMA, AVX-512F/VL and AVX-512 VNNI must be available.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
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
/// offsets) against every activation row, [`WIDE_ROWS`] at a time. Per row and block: eight VNNI
/// instructions, each adding four products to all 16 rows' sums, then one conversion and
/// two FMAs apply the 16 rows' scales and offsets at once.
///
/// # Safety
/// AVX-512F/VL and AVX-512 VNNI must be available.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
pub unsafe fn tile_packed16<const FOUR: bool>(
    w: (&[u8], &[f32], OffsetView<'_>),
    a: &ActRows<'_>,
    out: &mut [[f32; OUT_W]],
) {
    let nb = a.nb;
    let k = nb * BLOCK;
    assert!(a.q.len() >= a.rows * k && a.d.len() >= a.rows * nb && a.s.len() >= a.rows * nb);
    assert!(out.len() >= a.rows);
    assert!(w.0.len() >= nb * if FOUR { 256 } else { 512 } && w.1.len() >= nb * GROUP && w.2.covers(nb * GROUP));
    let mut r = 0;
    while r + WIDE_ROWS <= a.rows {
        // SAFETY: bounds checked above; features enabled above.
        unsafe { packed16_rows::<FOUR, WIDE_ROWS>(w, a, r, out) };
        r += WIDE_ROWS;
    }
    // SAFETY: as above, for the remaining rows.
    unsafe {
        match a.rows - r {
            1 => packed16_rows::<FOUR, 1>(w, a, r, out),
            2 => packed16_rows::<FOUR, 2>(w, a, r, out),
            3 => packed16_rows::<FOUR, 3>(w, a, r, out),
            4 => packed16_rows::<FOUR, 4>(w, a, r, out),
            5 => packed16_rows::<FOUR, 5>(w, a, r, out),
            6 => packed16_rows::<FOUR, 6>(w, a, r, out),
            7 => packed16_rows::<FOUR, 7>(w, a, r, out),
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
    w: (&[u8], &[f32], OffsetView<'_>),
    a: &ActRows<'_>,
    r: usize,
    out: &mut [[f32; OUT_W]],
) {
    let nb = a.nb;
    let k = nb * BLOCK;
    let low = _mm512_set1_epi8(0x0F);
    let block_bytes = if FOUR { 256 } else { 512 };
    let (wq, wd) = (w.0.as_ptr(), w.1.as_ptr());
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
        let scales = _mm512_loadu_ps(wd.add(b * GROUP));
        let offsets = match w.2 {
            OffsetView::Stored(m) => _mm512_loadu_ps(m.as_ptr().add(b * GROUP)),
            OffsetView::OfScale(c) => _mm512_mul_ps(scales, _mm512_set1_ps(c)),
        };
        for (t, acc) in acc.iter_mut().enumerate() {
            let row = aq.add(t * k + b * BLOCK);
            // Two dependent chains of VNNI sums, as in [`k4_rows`].
            let mut dot = [_mm512_setzero_si512(); 2];
            for (v, wv) in wv.iter().enumerate() {
                let four_values = (row.add(4 * v) as *const i32).read_unaligned();
                dot[v % 2] = _mm512_dpbusd_epi32(dot[v % 2], *wv, _mm512_set1_epi32(four_values));
            }
            let dot = _mm512_add_epi32(dot[0], dot[1]);
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

/// [`super::packing::Blocks::K4`] (Q4_K) weights, one group of 16 rows, against every activation
/// row, [`WIDE_ROWS`] at a time: [`tile_packed16`]'s 4-bit arithmetic, with each block's 16 scales and
/// offsets formed from the stored bytes (`d·sc`, `−dmin·m`, exact in f32) once per pass.
///
/// # Safety
/// AVX-512F/VL and AVX-512 VNNI must be available.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
pub unsafe fn tile_k4(w: &K4View<'_>, a: &ActRows<'_>, out: &mut [[f32; OUT_W]]) {
    check_k(w, a, out.len());
    let mut r = 0;
    while r + WIDE_ROWS <= a.rows {
        // SAFETY: bounds checked above; features enabled above.
        unsafe { k4_rows::<WIDE_ROWS>(w, a, r, out) };
        r += WIDE_ROWS;
    }
    // SAFETY: as above, for the remaining rows.
    unsafe {
        match a.rows - r {
            1 => k4_rows::<1>(w, a, r, out),
            2 => k4_rows::<2>(w, a, r, out),
            3 => k4_rows::<3>(w, a, r, out),
            4 => k4_rows::<4>(w, a, r, out),
            5 => k4_rows::<5>(w, a, r, out),
            6 => k4_rows::<6>(w, a, r, out),
            7 => k4_rows::<7>(w, a, r, out),
            _ => {}
        }
    }
}

/// Sixteen bytes at `p` as sixteen f32 lanes, unsigned.
///
/// # Safety
/// Sixteen bytes at `p`; AVX-512F in the caller.
#[inline(always)]
unsafe fn u8_lanes(p: *const u8) -> __m512 {
    // SAFETY: as documented.
    unsafe { _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))) }
}

/// Sixteen bytes at `p` as sixteen f32 lanes, signed.
///
/// # Safety
/// As [`u8_lanes`].
#[inline(always)]
unsafe fn i8_lanes(p: *const i8) -> __m512 {
    // SAFETY: as documented.
    unsafe { _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i))) }
}

/// The bounds every K4 kernel relies on.
pub(super) fn check_k(w: &K4View<'_>, a: &ActRows<'_>, out_len: usize) {
    let (nb, k) = (a.nb, a.nb * BLOCK);
    assert!(nb.is_multiple_of(SUB), "K4 rows are whole super-blocks");
    assert!(a.q.len() >= a.rows * k && a.d.len() >= a.rows * nb && a.s.len() >= a.rows * nb);
    assert!(out_len >= a.rows);
    let nsb = nb / SUB;
    assert!(w.q.len() >= nb * 256 && w.sc.len() >= nb * GROUP && w.m.len() >= nb * GROUP);
    assert!(w.d.len() >= nsb * GROUP && w.dmin.len() >= nsb * GROUP);
}

/// Rows `r..r + R` of [`tile_k4`].
///
/// # Safety
/// The caller checked every view's bounds for these rows and enabled AVX-512 VNNI.
#[inline(always)]
#[allow(unsafe_op_in_unsafe_fn)]
unsafe fn k4_rows<const R: usize>(w: &K4View<'_>, a: &ActRows<'_>, r: usize, out: &mut [[f32; OUT_W]]) {
    let nb = a.nb;
    let k = nb * BLOCK;
    let low = _mm512_set1_epi8(0x0F);
    let aq = a.q.as_ptr().add(r * k);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let base = w.q.as_ptr().add(b * 256);
        let mut wv = [_mm512_setzero_si512(); 8];
        for (v, wv) in wv.iter_mut().enumerate() {
            let packed = _mm512_loadu_si512(base.add(v / 2 * 64) as *const __m512i);
            *wv = if v % 2 == 0 {
                _mm512_and_si512(packed, low)
            } else {
                _mm512_and_si512(_mm512_srli_epi16(packed, 4), low)
            };
        }
        let sb = b / SUB;
        let scales =
            _mm512_mul_ps(_mm512_loadu_ps(w.d.as_ptr().add(sb * GROUP)), u8_lanes(w.sc.as_ptr().add(b * GROUP)));
        let offsets =
            _mm512_mul_ps(_mm512_loadu_ps(w.dmin.as_ptr().add(sb * GROUP)), u8_lanes(w.m.as_ptr().add(b * GROUP)));
        for (t, acc) in acc.iter_mut().enumerate() {
            let row = aq.add(t * k + b * BLOCK);
            // Two chains of four dependent VNNI sums instead of one of eight: with four or
            // more rows in flight that is eight or more independent chains, enough to hide the
            // instruction's latency.
            let mut dot = [_mm512_setzero_si512(); 2];
            for (v, wv) in wv.iter().enumerate() {
                let four_values = (row.add(4 * v) as *const i32).read_unaligned();
                dot[v % 2] = _mm512_dpbusd_epi32(dot[v % 2], *wv, _mm512_set1_epi32(four_values));
            }
            let dot = _mm512_add_epi32(dot[0], dot[1]);
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

/// [`super::packing::Blocks::K6`] (Q6_K) weights, one group of 16 rows, against every activation
/// row, [`WIDE_ROWS`] at a time. Each 6-bit value is its low nibble joined with its bit pair; the eight
/// VNNI sums of a block go to two accumulators, one per 16-value half, from which `32·Σa` of
/// that half is taken (the stored values are `q`, the weights `q − 32`) before the half's
/// scale `d·sc` applies.
///
/// # Safety
/// AVX-512F/VL and AVX-512 VNNI must be available.
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
pub unsafe fn tile_k6(w: &K6View<'_>, a: &ActRows<'_>, out: &mut [[f32; OUT_W]]) {
    check_k6(w, a, out.len());
    let mut r = 0;
    while r + WIDE_ROWS <= a.rows {
        // SAFETY: bounds checked above; features enabled above.
        unsafe { k6_rows::<WIDE_ROWS>(w, a, r, out) };
        r += WIDE_ROWS;
    }
    // SAFETY: as above, for the remaining rows.
    unsafe {
        match a.rows - r {
            1 => k6_rows::<1>(w, a, r, out),
            2 => k6_rows::<2>(w, a, r, out),
            3 => k6_rows::<3>(w, a, r, out),
            4 => k6_rows::<4>(w, a, r, out),
            5 => k6_rows::<5>(w, a, r, out),
            6 => k6_rows::<6>(w, a, r, out),
            7 => k6_rows::<7>(w, a, r, out),
            _ => {}
        }
    }
}

/// The bounds every K6 kernel relies on.
pub(super) fn check_k6(w: &K6View<'_>, a: &ActRows<'_>, out_len: usize) {
    let (nb, k) = (a.nb, a.nb * BLOCK);
    assert!(nb.is_multiple_of(SUB), "K6 rows are whole super-blocks");
    assert!(a.q.len() >= a.rows * k && a.d.len() >= a.rows * nb && a.h.len() >= a.rows * nb * 2);
    assert!(out_len >= a.rows);
    assert!(w.lo.len() >= nb * 256 && w.hi.len() >= nb * 128 && w.sc.len() >= nb * 2 * GROUP);
    assert!(w.d.len() >= nb / SUB * GROUP);
}

/// Rows `r..r + R` of [`tile_k6`].
///
/// # Safety
/// The caller checked every view's bounds for these rows and enabled AVX-512 VNNI.
#[inline(always)]
#[allow(unsafe_op_in_unsafe_fn)]
unsafe fn k6_rows<const R: usize>(w: &K6View<'_>, a: &ActRows<'_>, r: usize, out: &mut [[f32; OUT_W]]) {
    let nb = a.nb;
    let k = nb * BLOCK;
    let (low, pair) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x03));
    let aq = a.q.as_ptr().add(r * k);
    let mut acc = [_mm512_setzero_ps(); R];
    for b in 0..nb {
        let (lo, hi) = (w.lo.as_ptr().add(b * 256), w.hi.as_ptr().add(b * 128));
        let mut wv = [_mm512_setzero_si512(); 8];
        for h in 0..2 {
            let bits = _mm512_loadu_si512(hi.add(h * 64) as *const __m512i);
            let pairs = [bits, _mm512_srli_epi16(bits, 2), _mm512_srli_epi16(bits, 4), _mm512_srli_epi16(bits, 6)];
            for (j, p) in pairs.into_iter().enumerate() {
                let v = 4 * h + j;
                let packed = _mm512_loadu_si512(lo.add(v / 2 * 64) as *const __m512i);
                let nibble = if v % 2 == 0 { packed } else { _mm512_srli_epi16(packed, 4) };
                let top = _mm512_slli_epi16(_mm512_and_si512(p, pair), 4);
                wv[v] = _mm512_or_si512(_mm512_and_si512(nibble, low), top);
            }
        }
        let d = _mm512_loadu_ps(w.d.as_ptr().add(b / SUB * GROUP));
        let s_lo = _mm512_mul_ps(d, i8_lanes(w.sc.as_ptr().add(2 * b * GROUP)));
        let s_hi = _mm512_mul_ps(d, i8_lanes(w.sc.as_ptr().add((2 * b + 1) * GROUP)));
        for (t, acc) in acc.iter_mut().enumerate() {
            let row = aq.add(t * k + b * BLOCK);
            let (mut lo_dot, mut hi_dot) = (_mm512_setzero_si512(), _mm512_setzero_si512());
            for (v, wv) in wv.iter().enumerate() {
                let four_values = _mm512_set1_epi32((row.add(4 * v) as *const i32).read_unaligned());
                if v < 4 {
                    lo_dot = _mm512_dpbusd_epi32(lo_dot, *wv, four_values);
                } else {
                    hi_dot = _mm512_dpbusd_epi32(hi_dot, *wv, four_values);
                }
            }
            let sums = a.h.as_ptr().add(((r + t) * nb + b) * 2);
            let lo_dot = _mm512_sub_epi32(lo_dot, _mm512_set1_epi32(32 * *sums));
            let hi_dot = _mm512_sub_epi32(hi_dot, _mm512_set1_epi32(32 * *sums.add(1)));
            let ad = _mm512_set1_ps(*a.d.get_unchecked((r + t) * nb + b));
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo_dot), _mm512_mul_ps(s_lo, ad), *acc);
            *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi_dot), _mm512_mul_ps(s_hi, ad), *acc);
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        _mm512_storeu_ps(out[r + t].as_mut_ptr(), *acc);
    }
}
