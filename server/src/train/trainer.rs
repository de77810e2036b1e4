//! The LoRA supervised fine-tuning loop: shuffled batches per epoch, AdamW (candle-nn) with
//! linear warm-up and decay, gradients clipped by global norm, and an optional steering addend
//! in every forward pass (preventative steering).
//!
//! A step whose loss or gradient is not finite is not applied: training stops with the
//! adapter as it was after the last good step.

use super::data::Example;
use super::lora::{Adapter, LoraConfig};
use super::model::{Batch, Steering, TrainModel};
use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Optimisation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Hyper {
    pub lora: LoraConfig,
    pub learning_rate: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub weight_decay: f64,
    /// Fraction of the steps spent warming the learning rate up from zero.
    pub warmup_ratio: f64,
    /// Global gradient-norm clip (0: none).
    pub max_grad_norm: f64,
    /// Stop after this many steps (0: run every epoch).
    pub max_steps: usize,
    pub seed: u64,
}

impl Default for Hyper {
    fn default() -> Self {
        Self {
            lora: LoraConfig::default(),
            learning_rate: 1e-4,
            epochs: 1,
            batch_size: 8,
            max_seq_len: 256,
            weight_decay: 0.0,
            warmup_ratio: 0.05,
            max_grad_norm: 1.0,
            max_steps: 0,
            seed: 0,
        }
    }
}

impl Hyper {
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.lora.validate()?;
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return Err(format!("learning_rate must be in (0, 1), got {}", self.learning_rate));
        }
        if self.epochs == 0 || self.epochs > 100 {
            return Err(format!("epochs must be in 1..=100, got {}", self.epochs));
        }
        if self.batch_size == 0 || self.batch_size > 256 {
            return Err(format!("batch_size must be in 1..=256, got {}", self.batch_size));
        }
        if self.max_seq_len < 8 {
            return Err(format!("max_seq_len must be at least 8, got {}", self.max_seq_len));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(format!("warmup_ratio must be in [0, 1), got {}", self.warmup_ratio));
        }
        if !(self.weight_decay >= 0.0 && self.max_grad_norm >= 0.0) {
            return Err("weight_decay and max_grad_norm must not be negative".to_string());
        }
        Ok(())
    }

    /// Optimizer steps a dataset of `n` examples takes.
    pub fn total_steps(&self, n: usize) -> usize {
        let all = n.div_ceil(self.batch_size) * self.epochs;
        if self.max_steps > 0 { all.min(self.max_steps) } else { all }
    }

    fn lr_at(&self, step: usize, total: usize) -> f64 {
        let warm = ((total as f64) * self.warmup_ratio).ceil() as usize;
        if step < warm {
            return self.learning_rate * (step + 1) as f64 / warm as f64;
        }
        let rest = (total - warm).max(1) as f64;
        self.learning_rate * (1.0 - (step - warm) as f64 / rest).max(0.0)
    }
}

/// After each step.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: usize,
    pub total_steps: usize,
    pub epoch: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub learning_rate: f64,
    /// Real tokens (prompt and answer) per second of training so far.
    pub tokens_per_second: f64,
    pub elapsed_s: f64,
    pub eta_s: f64,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ending {
    Finished,
    Cancelled,
    /// A non-finite loss or gradient at `step`; the adapter is as after the step before.
    NonFinite {
        step: usize,
        what: String,
    },
}

#[derive(Debug, Clone)]
pub struct Outcome {
    pub ending: Ending,
    pub steps: usize,
    pub tokens: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub elapsed_s: f64,
}

/// Global L2 norm of the gradients of `adapter`'s variables.
fn grad_norm(adapter: &Adapter, grads: &GradStore) -> Result<f64> {
    let mut sq = 0f64;
    for v in adapter.vars() {
        if let Some(g) = grads.get(v.as_tensor()) {
            sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    Ok(sq.sqrt())
}

/// Scales every gradient in place by `factor`.
fn scale_grads(adapter: &Adapter, grads: &mut GradStore, factor: f64) -> Result<()> {
    for v in adapter.vars() {
        if let Some(g) = grads.remove(v.as_tensor()) {
            grads.insert(v.as_tensor(), (g * factor)?);
        }
    }
    Ok(())
}

/// Trains `adapter` on `examples`. `on_step` sees every step's progress and may ask to stop
/// (return `false`); `cancel` stops at the next step boundary.
pub fn train(
    model: &TrainModel,
    adapter: &Adapter,
    examples: &[Example],
    hyper: &Hyper,
    steering: &Steering,
    cancel: &AtomicBool,
    mut on_step: impl FnMut(&Progress, &Adapter) -> bool,
) -> Result<Outcome> {
    let total = hyper.total_steps(examples.len());
    let mut opt = AdamW::new(
        adapter.vars(),
        ParamsAdamW { lr: hyper.learning_rate, weight_decay: hyper.weight_decay, ..Default::default() },
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(hyper.seed);
    let pad = 0u32;
    let started = Instant::now();
    let mut out =
        Outcome { ending: Ending::Finished, steps: 0, tokens: 0, first_loss: None, last_loss: None, elapsed_s: 0.0 };
    'epochs: for epoch in 0..hyper.epochs {
        let mut order: Vec<usize> = (0..examples.len()).collect();
        order.shuffle(&mut rng);
        for chunk in order.chunks(hyper.batch_size) {
            if out.steps >= total {
                break 'epochs;
            }
            if cancel.load(Ordering::Relaxed) {
                out.ending = Ending::Cancelled;
                break 'epochs;
            }
            let rows: Vec<(&[u32], usize)> =
                chunk.iter().map(|&i| (examples[i].tokens.as_slice(), examples[i].prompt_len)).collect();
            let batch = Batch::new(&rows, pad, model.device())?;
            let loss = model.loss(&batch, Some(adapter), steering, true)?;
            let loss_v = loss.to_scalar::<f32>()? as f64;
            if !loss_v.is_finite() {
                out.ending = Ending::NonFinite { step: out.steps + 1, what: format!("loss is {loss_v}") };
                break 'epochs;
            }
            let mut grads = loss.backward()?;
            let norm = grad_norm(adapter, &grads)?;
            if !norm.is_finite() {
                out.ending = Ending::NonFinite { step: out.steps + 1, what: format!("gradient norm is {norm}") };
                break 'epochs;
            }
            if hyper.max_grad_norm > 0.0 && norm > hyper.max_grad_norm {
                scale_grads(adapter, &mut grads, hyper.max_grad_norm / norm)?;
            }
            let lr = hyper.lr_at(out.steps, total);
            opt.set_learning_rate(lr);
            opt.step(&grads)?;
            out.steps += 1;
            out.tokens += batch.n_tokens;
            out.first_loss.get_or_insert(loss_v);
            out.last_loss = Some(loss_v);
            let elapsed = started.elapsed().as_secs_f64();
            let p = Progress {
                step: out.steps,
                total_steps: total,
                epoch,
                loss: loss_v,
                grad_norm: norm,
                learning_rate: lr,
                tokens_per_second: out.tokens as f64 / elapsed.max(1e-9),
                elapsed_s: elapsed,
                eta_s: elapsed / out.steps as f64 * (total - out.steps) as f64,
            };
            if !on_step(&p, adapter) {
                out.ending = Ending::Cancelled;
                break 'epochs;
            }
        }
    }
    out.elapsed_s = started.elapsed().as_secs_f64();
    Ok(out)
}

/// The steering addends of a training run: `coefficient · vector` at each named residual layer.
pub fn steering_addends(
    n_residual: usize,
    items: &[(usize, f32, Vec<f32>)],
    device: &candle_core::Device,
) -> Result<Vec<Option<Tensor>>> {
    let mut layers: Vec<Option<Vec<f32>>> = vec![None; n_residual];
    for (layer, coef, v) in items {
        let Some(slot) = layers.get_mut(*layer) else {
            candle_core::bail!("steering layer {layer} is outside the model's {n_residual} residual layers")
        };
        let acc = slot.get_or_insert_with(|| vec![0.0; v.len()]);
        if acc.len() != v.len() {
            candle_core::bail!("steering vectors at layer {layer} differ in width");
        }
        acc.iter_mut().zip(v).for_each(|(a, x)| *a += coef * x);
    }
    layers
        .into_iter()
        .map(|l| {
            l.map(|v| {
                let n = v.len();
                Tensor::from_vec(v, n, device)
            })
            .transpose()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_learning_rate_warms_up_then_decays_to_zero() {
        let h = Hyper { learning_rate: 1.0, warmup_ratio: 0.2, ..Default::default() };
        let lrs: Vec<f64> = (0..10).map(|s| h.lr_at(s, 10)).collect();
        assert_eq!(lrs[0], 0.5);
        assert_eq!(lrs[1], 1.0);
        assert!(lrs.windows(2).skip(2).all(|w| w[1] < w[0]), "{lrs:?}");
        assert!(lrs[9] > 0.0 && lrs[9] < 0.2);
        assert_eq!(h.total_steps(17), 3);
        assert_eq!(Hyper { max_steps: 2, ..h.clone() }.total_steps(17), 2);
    }

    #[test]
    fn bad_settings_are_named() {
        for (h, what) in [
            (Hyper { learning_rate: 0.0, ..Default::default() }, "learning_rate"),
            (Hyper { epochs: 0, ..Default::default() }, "epochs"),
            (Hyper { batch_size: 0, ..Default::default() }, "batch_size"),
            (Hyper { max_seq_len: 2, ..Default::default() }, "max_seq_len"),
            (Hyper { warmup_ratio: 1.0, ..Default::default() }, "warmup_ratio"),
        ] {
            assert!(h.validate().unwrap_err().contains(what), "{what}");
        }
    }

    #[test]
    fn steering_addends_sum_per_layer_and_check_bounds() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let s = steering_addends(3, &[(1, 2.0, vec![1.0, 0.0]), (1, 1.0, vec![0.0, 1.0])], &dev)?;
        assert!(s[0].is_none() && s[2].is_none());
        assert_eq!(s[1].as_ref().unwrap().to_vec1::<f32>()?, vec![2.0, 1.0]);
        assert!(steering_addends(3, &[(3, 1.0, vec![1.0])], &dev).is_err());
        Ok(())
    }
}
