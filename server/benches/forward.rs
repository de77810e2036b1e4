//! Engine-free forward-pass benchmark on a packaged model (the embedded one unless
//! `BENCH_MODEL=gemma3-270m|qwen2.5-coder-1.5b`): prefill and decode tok/s for one sequence and
//! packed batches, steered and unsteered. `cargo bench -p persona-server --bench forward`
//! (`BENCH_BATCHES=1,4,16`, `BENCH_DECODE_STEPS=64` after a prompt of `BENCH_PROMPT_TOKENS=128`
//! prefilled in one pass, `BENCH_RUNS=5` per median, `BENCH_REQUANTIZE`,
//! `BENCH_PRECISION=fast|balanced|exact`).

use persona_server::model::arch::llama::{ForwardContext, KvCache, RowInput, SteeringAddends};
use persona_server::model::source::{EMBEDDED_ID, Packaged, ensure_packaged, local_files};
use persona_server::model::weights::{Precision, Requantize};
use persona_server::model::{LoadOptions, LoadedModel};
use std::time::Instant;

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// A count from the environment, or `default` when unset or not a number.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    // SAFETY: single-threaded at this point.
    unsafe { persona_server::set_cpu_threads(0) };
    let dir = std::env::var_os("PERSONA_MODEL_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models"));
    let requantize = match std::env::var("BENCH_REQUANTIZE").as_deref() {
        Ok("none") => Requantize::None,
        Ok("q4_0") => Requantize::Q4_0,
        Ok("q8_0") => Requantize::Q8_0,
        _ => Requantize::Auto,
    };
    let precision = std::env::var("BENCH_PRECISION").ok().and_then(|p| Precision::parse(&p)).unwrap_or_default();
    let model = std::env::var("BENCH_MODEL").unwrap_or_else(|_| EMBEDDED_ID.to_string());
    let files = local_files(&ensure_packaged(Packaged::named(&model)?, &dir, true)?)?;
    let m = LoadedModel::from_files(
        "bench",
        &files,
        &candle_core::Device::Cpu,
        &LoadOptions { precision, ..LoadOptions::new(requantize, 4096) },
    )?;
    let c = m.config().clone();
    println!("weights: {}  precision: {precision:?}  threads: {}", m.weights, candle_core::utils::get_num_threads());
    let prompt_tokens = env_or("BENCH_PROMPT_TOKENS", 128);
    let sentence = "The lighthouse keeper found a bottle on the shore. ";
    let prompt: Vec<u32> = m.tokenizer.encode(&sentence.repeat(prompt_tokens / 10 + 2))?;
    let prompt = &prompt[..prompt_tokens.min(prompt.len())];
    let mut layers: Vec<Option<Vec<f32>>> = vec![None; c.n_residual_rows()];
    layers[c.n_layers / 2] = Some(vec![0.01; c.hidden_size]);
    let steer = SteeringAddends::new(layers);
    // 0 runs would leave no median: the default instead.
    let runs = match env_or("BENCH_RUNS", 5) {
        0 => 5,
        n => n,
    };
    let decode_steps = env_or("BENCH_DECODE_STEPS", 64);
    let batches: Vec<usize> = std::env::var("BENCH_BATCHES")
        .map(|s| s.split(',').filter_map(|b| b.trim().parse().ok()).collect())
        .unwrap_or_else(|_| vec![1, 4, 16]);
    for batch in batches {
        for steered in [false, true] {
            let s = steered.then_some(&steer);
            let (mut pre, mut dec) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                let mut caches: Vec<KvCache> = (0..batch).map(|_| KvCache::new(&c)).collect();
                let t = Instant::now();
                for cache in caches.iter_mut() {
                    let rows = vec![RowInput { tokens: prompt, cache, steering: s, capture: false, logits: 1 }];
                    m.model.forward(ForwardContext { rows })?;
                }
                pre.push((batch * prompt.len()) as f64 / t.elapsed().as_secs_f64());
                let t = Instant::now();
                let tok = [42u32];
                for _ in 0..decode_steps {
                    let rows = caches
                        .iter_mut()
                        .map(|cache| RowInput { tokens: &tok, cache, steering: s, capture: false, logits: 1 })
                        .collect();
                    m.model.forward(ForwardContext { rows })?;
                }
                dec.push((batch * decode_steps) as f64 / t.elapsed().as_secs_f64());
            }
            println!(
                "batch {batch:>2} {:<10} prefill {:>7.1} tok/s   decode {:>7.1} tok/s (aggregate)",
                if steered { "steered" } else { "unsteered" },
                median(pre),
                median(dec)
            );
        }
    }
    Ok(())
}
