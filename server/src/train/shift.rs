//! The finetuning shift during training: how far the adapter moves the model's last-prompt-token
//! activation along a persona vector, over a fixed set of prompts (a trait's eval questions).
//!
//! The base activations are read once, with no adapter; each measurement reads them again with
//! the adapter as it is and projects the per-prompt differences on the unit vector.

use super::lora::Adapter;
use super::model::{Batch, TrainModel};
use candle_core::{Result, Tensor};

/// Mean and standard deviation of a set of per-prompt shifts.
#[derive(Debug, Clone, PartialEq)]
pub struct Shift {
    pub mean: f32,
    pub std: f32,
    pub per_prompt: Vec<f32>,
}

impl Shift {
    pub fn of(per_prompt: Vec<f32>) -> Self {
        let n = per_prompt.len().max(1) as f32;
        let mean = per_prompt.iter().sum::<f32>() / n;
        let var = per_prompt.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / n;
        Self { mean, std: var.sqrt(), per_prompt }
    }
}

/// One vector's probe: its unit direction at `layer`, the prompts, and the base's readings.
pub struct ShiftProbe {
    pub vector: String,
    pub layer: usize,
    unit: Vec<f32>,
    prompts: Vec<Vec<u32>>,
    base: Vec<f32>,
}

/// The residual stream at `layer` at each prompt's last token (rows padded at the end, so the
/// causal mask keeps padding out of every real position).
fn last_token_states(
    model: &TrainModel,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    layer: usize,
) -> Result<Vec<Vec<f32>>> {
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let batch = Batch::unlabelled(&rows, 0, model.device())?;
    let (_, kept) = model.residual(&batch, adapter, &[], false, &[layer])?;
    let idx: Vec<u32> = prompts.iter().enumerate().map(|(r, p)| (r * batch.len + p.len() - 1) as u32).collect();
    let n = idx.len();
    kept[0].index_select(&Tensor::from_vec(idx, n, model.device())?, 0)?.to_vec2()
}

fn project(states: &[Vec<f32>], unit: &[f32]) -> Vec<f32> {
    states.iter().map(|s| s.iter().zip(unit).map(|(a, b)| a * b).sum()).collect()
}

impl ShiftProbe {
    /// Reads the base model's activations for `prompts`; `direction` need not be unit length.
    pub fn new(
        model: &TrainModel,
        vector: &str,
        layer: usize,
        direction: &[f32],
        prompts: Vec<Vec<u32>>,
    ) -> Result<Self> {
        let norm = direction.iter().map(|x| x * x).sum::<f32>().sqrt();
        if !(norm.is_finite() && norm > 0.0) {
            candle_core::bail!("vector `{vector}` is zero at layer {layer}");
        }
        if prompts.is_empty() {
            candle_core::bail!("no prompts to measure the shift of `{vector}` on");
        }
        let unit: Vec<f32> = direction.iter().map(|x| x / norm).collect();
        let base = project(&last_token_states(model, None, &prompts, layer)?, &unit);
        Ok(Self { vector: vector.to_string(), layer, unit, prompts, base })
    }

    /// The shift of the adapted model along the vector.
    pub fn measure(&self, model: &TrainModel, adapter: &Adapter) -> Result<Shift> {
        let tuned = project(&last_token_states(model, Some(adapter), &self.prompts, self.layer)?, &self.unit);
        Ok(Shift::of(tuned.iter().zip(&self.base).map(|(t, b)| t - b).collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shifts_summarise_as_mean_and_spread() {
        let s = Shift::of(vec![1.0, 3.0]);
        assert_eq!((s.mean, s.std), (2.0, 1.0));
        assert_eq!(project(&[vec![1.0, 2.0]], &[0.0, 1.0]), vec![2.0]);
    }
}
