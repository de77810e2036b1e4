//! Portable dot products of one weight row with one quantized activation row: the fallback
//! for odd tile edges and CPUs without AVX2, and the reference the SIMD kernels are tested
//! against.

use super::{ActRows, BLOCK};

pub(super) fn scalar_int8(w: &[i8], wd: &[f32], a: &ActRows<'_>, r: usize) -> f32 {
    let k = a.nb * BLOCK;
    (0..a.nb)
        .map(|b| {
            let dot: i32 = (0..BLOCK).map(|t| w[b * BLOCK + t] as i32 * a.q[r * k + b * BLOCK + t] as i32).sum();
            dot as f32 * wd[b] * a.d[r * a.nb + b]
        })
        .sum()
}

pub(super) fn scalar_uint8(w: &[u8], wd: &[f32], wm: &[f32], a: &ActRows<'_>, r: usize) -> f32 {
    let k = a.nb * BLOCK;
    (0..a.nb)
        .map(|b| {
            let dot: i32 = (0..BLOCK).map(|t| w[b * BLOCK + t] as i32 * a.q[r * k + b * BLOCK + t] as i32).sum();
            dot as f32 * wd[b] * a.d[r * a.nb + b] + wm[b] * a.s[r * a.nb + b]
        })
        .sum()
}

pub(super) fn scalar_int4(w: &[u8], wd: &[f32], wm: &[f32], a: &ActRows<'_>, r: usize) -> f32 {
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
