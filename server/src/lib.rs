//! persona-steer server: a gRPC inference service for persona vectors (extraction, steering,
//! monitoring) over llama-family models.

pub mod auth;
pub mod config;
pub mod error;
pub mod http;
pub mod jobs;
pub mod judge;
pub mod live;
pub mod metrics;
pub mod model;
pub mod observe;
pub mod scheduler;
pub mod security;
pub mod server;
pub mod service;
pub mod steering;
pub mod support;
pub mod telemetry;
pub mod train;
pub mod traits;

/// Pins the CPU kernel thread count for the whole process: `threads`, or when 0 the value of
/// `RAYON_NUM_THREADS` if set, else the available parallelism.
///
/// Besides choosing the pool size, this matters for speed: when `RAYON_NUM_THREADS` is unset,
/// candle works out the core count again on every matmul by reading `/proc/cpuinfo`, which
/// costs tens of microseconds per call, hundreds of times per decoded token.
///
/// # Safety
/// Changes the process environment: call it before any other thread exists.
pub unsafe fn set_cpu_threads(threads: usize) -> usize {
    let from_env = std::env::var("RAYON_NUM_THREADS").ok().and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0);
    let n = match (threads, from_env) {
        (0, Some(n)) => n,
        (0, None) => std::thread::available_parallelism().map_or(1, |n| n.get()),
        (n, _) => n,
    };
    // SAFETY: the caller guarantees no other thread reads the environment concurrently.
    unsafe {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    }
    n
}
