//! persona-steer server: a gRPC inference service for persona vectors (extraction, steering,
//! monitoring) over llama-family models.

pub mod config;
pub mod error;
pub mod model;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod steering;
pub mod telemetry;
