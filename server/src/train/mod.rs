//! Fine-tuning: LoRA supervised training on candle's autograd, with optional steering in the
//! training forward pass (preventative steering), and adapters in PEFT's file format.
//!
//! - [`model`]: the differentiable forward pass over dense f32 weights;
//! - [`lora`]: adapters and their initialisation;
//! - [`data`]: JSONL samples, chat-templated, loss on the answer only;
//! - [`trainer`]: the optimisation loop;
//! - [`shift`]: the finetuning shift along persona vectors, measured while training;
//! - [`peft`]: `adapter_config.json` + `adapter_model.safetensors`, read and written;
//! - [`ops`]: fused differentiable RMSNorm, rotary embedding, causal softmax, SiLU product,
//!   cross-entropy;
//! - [`frozen`]: a matmul by a frozen weight that skips the weight's gradient;
//! - [`block`]: each half of a transformer block as one fused CPU op with its own backward.

pub mod block;
pub mod data;
pub mod frozen;
pub mod lora;
pub mod model;
pub mod ops;
pub mod peft;
pub mod shift;
pub mod trainer;
