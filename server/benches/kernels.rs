//! The block-quantized matmul kernels alone, on the embedded model's projection shapes with
//! random weights: time per call and per (activation row, weight row, 32-value block) for
//! batches of 1/4/16/64 rows. Every shape has up to 30 distinct weight matrices, used in turn as
//! the model's 30 layers do, so the weights come from memory rather than cache (the output
//! head, 28 MB, is one matrix as in the model).
//! `cargo bench -p persona-server --bench kernels`.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use persona_server::model::cpu::QLinear;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    // SAFETY: single-threaded at this point.
    unsafe { persona_server::set_cpu_threads(0) };
    let dev = Device::Cpu;
    // (name, output rows, input width): SmolLM2-135M's fused q|k|v, o, gate|up and down.
    let shapes =
        [("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536), ("head", 49152, 576)];
    println!("threads: {}", candle_core::utils::get_num_threads());
    for (kind, dtype) in [("int4", Some(GgmlDType::Q4_1)), ("int8", None)] {
        for &(name, n, k) in &shapes {
            if name == "head" && dtype.is_some() {
                continue; // the head stays 8-bit
            }
            let layers = (0..if name == "head" { 1 } else { 30 })
                .map(|_| {
                    let w = Tensor::randn(0f32, 0.05, (n, k), &dev)?;
                    let lin = match dtype {
                        Some(d) => QLinear::from_q4(&QTensor::quantize(&w, d)?)?.expect("q4 converts"),
                        None => QLinear::from_dense(&w)?,
                    };
                    // The layout the model uses on this CPU.
                    Ok(lin.for_this_cpu())
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            for m in [1usize, 4, 16, 64] {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
                layers[0].forward(&x)?; // warm the pool
                let mut times = Vec::new();
                for _ in 0..7 {
                    let reps = (2000 / m).max(20);
                    let t = Instant::now();
                    for lin in layers.iter().cycle().take(reps) {
                        std::hint::black_box(lin.forward(&x)?);
                    }
                    times.push(t.elapsed().as_secs_f64() / reps as f64);
                }
                times.sort_by(f64::total_cmp);
                let per_call = times[times.len() / 2];
                let units = (m * n * k / 32) as f64;
                println!(
                    "{kind} {name:<8} m={m:<3} {:>8.1} µs/call  {:>6.2} ns per row·col·block (both cores)",
                    per_call * 1e6,
                    per_call * 1e9 / units
                );
            }
        }
    }
    Ok(())
}
