//! CPU kernels of the forward pass, one concern per file:
//!
//! - [`quantize`]: activation quantization to int8 blocks of 32 (one or two levels);
//! - [`packing`]: weight layouts — int8 and 4-bit blocks in row order, and the column-interleaved
//!   groups of 16 rows the fastest kernels want — built once at load;
//! - [`kquant`]: GGUF K-quant (Q4_K, Q6_K) and 5/8-bit blocks carried into those layouts bit for
//!   bit, without dequantizing and quantizing again;
//! - [`scalar`]: the portable reference every SIMD kernel is tested against;
//! - [`avx2`] and [`avx512`]: the SIMD kernels per instruction set (only these hold intrinsics);
//! - [`linear`]: the batched matmul op that picks a kernel per weight tile;
//! - [`attention`] and [`elementwise`]: attention over the KV cache, fused SiLU·up and softmax.
//!
//! candle's quantized CPU matmul runs one vector-dot pass over the whole weight matrix per
//! activation row, so a batch of 16 decode rows or a 128-token prefill reads the weights 16 or
//! 128 times. Here every weight block is loaded once and multiplied against all activation rows
//! of a tile while it sits in registers. The work runs on candle's own worker pool, so tensor
//! ops and these matmuls never compete for the cores.

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
pub mod elementwise;
mod kquant;
mod linear;
mod packing;
mod quantize;
mod scalar;

pub use linear::{FusedLinear, QLinear};

use candle_core::{CpuStorage, Layout, Result};

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
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vnni")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
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
pub(crate) struct SendPtr<T: Send>(pub(crate) *mut T);
// SAFETY: tasks write disjoint parts of the buffer behind this pointer.
unsafe impl<T: Send> Sync for SendPtr<T> {}
unsafe impl<T: Send> Send for SendPtr<T> {}

/// A tile of quantized activation rows: values, per-block scales and scale·sums, and the
/// integer sums of each block's two halves.
pub(crate) struct ActRows<'a> {
    q: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
    h: &'a [i32],
    rows: usize,
    nb: usize,
}

/// One group of 16 rows of [`packing::Blocks::K4`] weights (Q4_K): 4-bit values, per block the
/// rows' scale and min bytes, per super-block their `d` and `−dmin`.
pub(crate) struct K4View<'a> {
    q: &'a [u8],
    sc: &'a [u8],
    m: &'a [u8],
    d: &'a [f32],
    dmin: &'a [f32],
}

/// One group of 16 rows of [`packing::Blocks::K6`] weights (Q6_K): low nibbles, top bit pairs,
/// per 16-value half-block the rows' int8 scales, per super-block their `d`.
pub(crate) struct K6View<'a> {
    lo: &'a [u8],
    hi: &'a [u8],
    sc: &'a [i8],
    d: &'a [f32],
}

/// Reports a kernel test that cannot run on this CPU, by name, straight to the terminal (the
/// test harness captures `eprintln!` of passing tests, so a skip would otherwise be silent).
#[cfg(test)]
pub(crate) fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}

#[cfg(test)]
mod tests {
    /// The SIMD kernel tests skip themselves on CPUs without the instruction sets they test; on
    /// CI that would leave every kernel untested while the run passes. CI's machine must run at
    /// least the AVX2 kernels (and the VNNI ones when `PERSONA_REQUIRE_VNNI` is set).
    #[test]
    fn ci_runs_the_simd_kernel_tests() {
        if std::env::var_os("CI").is_none() {
            super::skipped("ci_runs_the_simd_kernel_tests", "not a CI run (CI is unset)");
            return;
        }
        assert!(super::supported(), "CI machine lacks AVX2/FMA: every SIMD kernel test would skip");
        if std::env::var_os("PERSONA_REQUIRE_VNNI").is_some() {
            assert!(super::vnni_supported(), "PERSONA_REQUIRE_VNNI is set but the VNNI kernel tests skip here");
        }
    }
}
