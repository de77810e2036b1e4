//! The forward pass's device path: what CUDA and Metal run, in candle tensor ops, and what the
//! CPU runs too when its host kernels are switched off (so every CI run exercises it).
//!
//! - [`kv`]: one KV pool per model, a slot per live sequence, in the compute dtype;
//! - [`attention`]: the batch's attention in a few kernels per layer, whatever its size;
//! - [`steering`]: per-row steering addends kept on the device between steps.
//!
//! Weights are dense in the compute dtype (f16 by default on a GPU) or stay in their GGUF
//! blocks; the residual stream, norms, softmax and logits stay f32.

pub mod attention;
pub mod kv;
pub mod steering;

use candle_core::{D, Result, Tensor};

/// Greedy choice of each row of a `[rows, vocab]` logits tensor, computed where the logits are,
/// so only one id per row crosses to the host.
pub fn argmax_rows(logits: &Tensor) -> Result<Vec<u32>> {
    logits.argmax(D::Minus1)?.to_vec1()
}
