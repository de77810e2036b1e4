//! AVX2 kernels (and their 256-bit VNNI variant): register-blocked tiles in which each weight
//! block is unpacked once per group of four activation rows, and each activation block is
//! loaded once for [`COLS`] weight rows.

use super::kquant::SUB;
use super::packing::OffsetView;
use super::{ActRows, BLOCK, COLS, GROUP, K4View, K6View, OUT_W};
use std::arch::x86_64::*;

pub(super) const ROWS: usize = 4;

#[target_feature(enable = "avx2,fma")]
pub(super) fn hsum(v: __m256) -> f32 {
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
pub(super) unsafe fn udot<const VNNI: bool>(w_unsigned: __m256i, a: __m256i) -> __m256 {
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
pub(super) fn dot_f32(x: &[f32], y: &[f32]) -> f32 {
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

pub(super) fn check(a: &ActRows<'_>, out_len: usize, w_bytes: &[usize], block_bytes: usize) {
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
#[target_feature(enable = "avx2,fma,avx512f,avx512vl,avx512bw,avx512vnni")]
pub unsafe fn tile_int4_vnni(w: [(&[u8], &[f32], &[f32]); COLS], a: &ActRows<'_>, out: &mut [[f32; OUT_W]], c0: usize) {
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

/// [`tile_packed16`] for 4-bit groups on CPUs with AVX2 but no VNNI: each 64-byte vector is
/// taken as two halves of eight weight rows, and the four-product sums come from
/// `maddubs` + `madd` (4-bit weights times int8 activations cannot overflow their 16-bit
/// pair sums).
///
/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_packed16_avx2(w: (&[u8], &[f32], OffsetView<'_>), a: &ActRows<'_>, out: &mut [[f32; OUT_W]]) {
    let nb = a.nb;
    let k = nb * BLOCK;
    assert!(a.q.len() >= a.rows * k && a.d.len() >= a.rows * nb && a.s.len() >= a.rows * nb);
    assert!(out.len() >= a.rows);
    assert!(w.0.len() >= nb * 256 && w.1.len() >= nb * GROUP && w.2.covers(nb * GROUP));
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
    w: (&[u8], &[f32], OffsetView<'_>),
    a: &ActRows<'_>,
    r: usize,
    half: usize,
    out: &mut [[f32; OUT_W]],
) {
    let nb = a.nb;
    let k = nb * BLOCK;
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let (wq, wd) = (w.0.as_ptr().add(32 * half), w.1.as_ptr().add(8 * half));
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
        let scales = _mm256_loadu_ps(wd.add(b * GROUP));
        let offsets = match w.2 {
            OffsetView::Stored(m) => _mm256_loadu_ps(m.as_ptr().add(8 * half + b * GROUP)),
            OffsetView::OfScale(c) => _mm256_mul_ps(scales, _mm256_set1_ps(c)),
        };
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

/// [`super::avx512::tile_k4`] on CPUs with AVX2 but no VNNI: each 64-byte vector is taken as
/// two halves of eight weight rows, as in [`tile_packed16_avx2`], with the scales and offsets
/// formed from the stored bytes.
///
/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_k4_avx2(w: &K4View<'_>, a: &ActRows<'_>, out: &mut [[f32; OUT_W]]) {
    super::avx512::check_k(w, a, out.len());
    for half in 0..2 {
        let mut r = 0;
        while r + ROWS <= a.rows {
            // SAFETY: bounds checked above; features enabled above.
            unsafe { k4_half_rows::<ROWS>(w, a, r, half, out) };
            r += ROWS;
        }
        // SAFETY: as above, for the remaining rows.
        unsafe {
            match a.rows - r {
                1 => k4_half_rows::<1>(w, a, r, half, out),
                2 => k4_half_rows::<2>(w, a, r, half, out),
                3 => k4_half_rows::<3>(w, a, r, half, out),
                _ => {}
            }
        }
    }
}

/// Eight bytes at `p` as eight f32 lanes, unsigned.
///
/// # Safety
/// Eight bytes at `p`; AVX2 in the caller.
#[inline(always)]
unsafe fn u8_lanes(p: *const u8) -> __m256 {
    // SAFETY: as documented.
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
}

/// Eight bytes at `p` as eight f32 lanes, signed.
///
/// # Safety
/// As [`u8_lanes`].
#[inline(always)]
unsafe fn i8_lanes(p: *const i8) -> __m256 {
    // SAFETY: as documented.
    unsafe { _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i))) }
}

/// Rows `r..r + R` and weight rows `8·half..8·half + 8` of [`tile_k4_avx2`].
///
/// # Safety
/// The caller checked every view's bounds for these rows and enabled AVX2 and FMA.
#[inline(always)]
#[allow(unsafe_op_in_unsafe_fn)]
unsafe fn k4_half_rows<const R: usize>(
    w: &K4View<'_>,
    a: &ActRows<'_>,
    r: usize,
    half: usize,
    out: &mut [[f32; OUT_W]],
) {
    let nb = a.nb;
    let k = nb * BLOCK;
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let wq = w.q.as_ptr().add(32 * half);
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
        let (lane, sb) = (b * GROUP + 8 * half, b / SUB * GROUP + 8 * half);
        let scales = _mm256_mul_ps(_mm256_loadu_ps(w.d.as_ptr().add(sb)), u8_lanes(w.sc.as_ptr().add(lane)));
        let offsets = _mm256_mul_ps(_mm256_loadu_ps(w.dmin.as_ptr().add(sb)), u8_lanes(w.m.as_ptr().add(lane)));
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

/// [`super::avx512::tile_k6`] on CPUs with AVX2 but no VNNI, eight weight rows at a time. 6-bit
/// values times int8 activations stay within `maddubs`' 16-bit pair sums (2·63·127 < 2¹⁵).
///
/// # Safety
/// AVX2 and FMA must be available.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn tile_k6_avx2(w: &K6View<'_>, a: &ActRows<'_>, out: &mut [[f32; OUT_W]]) {
    super::avx512::check_k6(w, a, out.len());
    for half in 0..2 {
        let mut r = 0;
        while r + ROWS <= a.rows {
            // SAFETY: bounds checked above; features enabled above.
            unsafe { k6_half_rows::<ROWS>(w, a, r, half, out) };
            r += ROWS;
        }
        // SAFETY: as above, for the remaining rows.
        unsafe {
            match a.rows - r {
                1 => k6_half_rows::<1>(w, a, r, half, out),
                2 => k6_half_rows::<2>(w, a, r, half, out),
                3 => k6_half_rows::<3>(w, a, r, half, out),
                _ => {}
            }
        }
    }
}

/// Rows `r..r + R` and weight rows `8·half..8·half + 8` of [`tile_k6_avx2`].
///
/// # Safety
/// The caller checked every view's bounds for these rows and enabled AVX2 and FMA.
#[inline(always)]
#[allow(unsafe_op_in_unsafe_fn)]
unsafe fn k6_half_rows<const R: usize>(
    w: &K6View<'_>,
    a: &ActRows<'_>,
    r: usize,
    half: usize,
    out: &mut [[f32; OUT_W]],
) {
    let nb = a.nb;
    let k = nb * BLOCK;
    let (low, pair) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(0x03));
    let ones = _mm256_set1_epi16(1);
    let (lo, hi) = (w.lo.as_ptr().add(32 * half), w.hi.as_ptr().add(32 * half));
    let aq = a.q.as_ptr().add(r * k);
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..nb {
        let (lo, hi) = (lo.add(b * 256), hi.add(b * 128));
        let mut wv = [_mm256_setzero_si256(); 8];
        for h in 0..2 {
            let bits = _mm256_loadu_si256(hi.add(h * 64) as *const __m256i);
            let pairs = [bits, _mm256_srli_epi16(bits, 2), _mm256_srli_epi16(bits, 4), _mm256_srli_epi16(bits, 6)];
            for (j, p) in pairs.into_iter().enumerate() {
                let v = 4 * h + j;
                let packed = _mm256_loadu_si256(lo.add(v / 2 * 64) as *const __m256i);
                let nibble = if v % 2 == 0 { packed } else { _mm256_srli_epi16(packed, 4) };
                let top = _mm256_slli_epi16(_mm256_and_si256(p, pair), 4);
                wv[v] = _mm256_or_si256(_mm256_and_si256(nibble, low), top);
            }
        }
        let d = _mm256_loadu_ps(w.d.as_ptr().add(b / SUB * GROUP + 8 * half));
        let s_lo = _mm256_mul_ps(d, i8_lanes(w.sc.as_ptr().add(2 * b * GROUP + 8 * half)));
        let s_hi = _mm256_mul_ps(d, i8_lanes(w.sc.as_ptr().add((2 * b + 1) * GROUP + 8 * half)));
        for (t, acc) in acc.iter_mut().enumerate() {
            let row = aq.add(t * k + b * BLOCK);
            let (mut lo_dot, mut hi_dot) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for (v, wv) in wv.iter().enumerate() {
                let four_values = _mm256_set1_epi32((row.add(4 * v) as *const i32).read_unaligned());
                let dot = _mm256_madd_epi16(_mm256_maddubs_epi16(*wv, four_values), ones);
                if v < 4 {
                    lo_dot = _mm256_add_epi32(lo_dot, dot);
                } else {
                    hi_dot = _mm256_add_epi32(hi_dot, dot);
                }
            }
            let sums = a.h.as_ptr().add(((r + t) * nb + b) * 2);
            let lo_dot = _mm256_sub_epi32(lo_dot, _mm256_set1_epi32(32 * *sums));
            let hi_dot = _mm256_sub_epi32(hi_dot, _mm256_set1_epi32(32 * *sums.add(1)));
            let ad = _mm256_set1_ps(*a.d.get_unchecked((r + t) * nb + b));
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo_dot), _mm256_mul_ps(s_lo, ad), *acc);
            *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi_dot), _mm256_mul_ps(s_hi, ad), *acc);
        }
    }
    for (t, acc) in acc.iter().enumerate() {
        _mm256_storeu_ps(out[r + t].as_mut_ptr().add(8 * half), *acc);
    }
}
