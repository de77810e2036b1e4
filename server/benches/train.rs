//! LoRA training step benchmark on the embedded model: forward (loss), backward and optimizer
//! times per step for a batch of chat samples, and training tokens/s.
//! `cargo bench -p persona-server --bench train` (`BENCH_BATCH=8`, `BENCH_LEN=96`,
//! `BENCH_STEPS=6`, `BENCH_RANK=32`).

use candle_core::Device;
use candle_nn::Optimizer;
use persona_server::model::LoadOptions;
use persona_server::model::source::ensure_embedded;
use persona_server::model::weights::GgufSource;
use persona_server::train::lora::{Adapter, LoraConfig};
use persona_server::train::model::{Batch, TrainModel};
use std::time::Instant;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // SAFETY: single-threaded at this point.
    unsafe { persona_server::set_cpu_threads(0) };
    let dir = std::env::var_os("PERSONA_MODEL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
    let (batch, len, steps, rank) =
        (env("BENCH_BATCH", 8), env("BENCH_LEN", 96), env("BENCH_STEPS", 6), env("BENCH_RANK", 32));
    let mut src = GgufSource::open(&ensure_embedded(&dir, true)?, &Device::Cpu, &LoadOptions::default())?;
    let cfg = src.config()?;
    let model = TrainModel::load(&mut src, cfg)?;
    let lora = LoraConfig { rank, alpha: 2.0 * rank as f64, ..Default::default() };
    let adapter = Adapter::new(lora, model.dims(), 0, &Device::Cpu)?;
    let mut opt = candle_nn::AdamW::new_lr(adapter.vars(), 1e-4)?;
    // Rows of slightly different lengths, the last 60% of each learned.
    let rows: Vec<Vec<u32>> =
        (0..batch).map(|r| (0..len - r * 2).map(|i| ((i * 31 + r * 7) % 40000) as u32 + 100).collect()).collect();
    let spec: Vec<(&[u32], usize)> = rows.iter().map(|r| (r.as_slice(), r.len() * 2 / 5)).collect();
    let b = Batch::new(&spec, 0, &Device::Cpu)?;
    println!(
        "batch {batch} x {len} tokens, rank {rank}, {} trainable, threads {}",
        adapter.n_params(),
        candle_core::utils::get_num_threads()
    );
    let (mut fwd, mut bwd, mut upd) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..=steps {
        let t0 = Instant::now();
        let loss = model.loss(&b, Some(&adapter), &[], true)?;
        let _ = loss.to_scalar::<f32>()?;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        opt.step(&grads)?;
        let t3 = Instant::now();
        if step > 0 {
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            upd.push((t3 - t2).as_secs_f64());
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let total = mean(&fwd) + mean(&bwd) + mean(&upd);
    println!(
        "forward {:.0} ms  backward {:.0} ms  optimizer {:.0} ms  step {:.0} ms  {:.0} tok/s",
        mean(&fwd) * 1e3,
        mean(&bwd) * 1e3,
        mean(&upd) * 1e3,
        total * 1e3,
        b.n_tokens as f64 / total
    );
    Ok(())
}
