//! Timing helpers both benchmarks use (gRPC in `bench`, HTTP against gRPC in `http_bench`).

use anyhow::Result;
use persona_client::{Client, pb};

pub(crate) fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() { f64::NAN } else { xs[xs.len() / 2] }
}

pub(crate) fn percentile(xs: &mut [f64], p: f64) -> f64 {
    xs.sort_by(f64::total_cmp);
    if xs.is_empty() { f64::NAN } else { xs[((xs.len() - 1) as f64 * p).round() as usize] }
}

/// Arrival times of one stream's token messages, relative to the start of its request.
pub(crate) async fn timed_stream(mut c: Client, req: pb::GenerateRequest, t0: std::time::Instant) -> Result<Vec<f64>> {
    let mut stream = c.generate(req).await?.into_inner();
    let mut times = Vec::new();
    while let Some(msg) = stream.message().await? {
        for _ in &msg.token_ids {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    Ok(times)
}
