//! Model architectures with residual-stream hooks.

pub mod embedding;
pub mod gemma3;
pub mod llama;
