//! Model architectures with residual-stream hooks.

pub mod llama;
