//! The finetuning shift during training: how far the adapter moves the model's last-prompt-token
//! activation along a persona vector, over a fixed set of prompts (a trait's eval questions).
//!
//! The base activations are read once, with no adapter; each measurement reads them again with
//! the adapter as it is and projects the per-prompt differences on the unit vector.

use super::lora::Adapter;
use super::model::{Batch, TrainModel};
use crate::steering::probe::Probe;
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

/// One vector's probe at its layer, the prompts, and the base's readings along it.
pub struct ShiftProbe {
    pub vector: String,
    probe: Probe,
    prompts: Vec<Vec<u32>>,
    base: Vec<f32>,
}

/// The projection on `probe` of the residual stream at its layer at each prompt's last token
/// (rows padded at the end, so the causal mask keeps padding out of every real position).
fn last_token_scores(
    model: &TrainModel,
    adapter: Option<&Adapter>,
    prompts: &[Vec<u32>],
    probe: &Probe,
) -> Result<Vec<f32>> {
    let rows: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let batch = Batch::unlabelled(&rows, 0, model.device())?;
    let (_, kept) = model.residual(&batch, adapter, &[], false, &[probe.layer])?;
    let idx: Vec<u32> = prompts.iter().enumerate().map(|(r, p)| (r * batch.len + p.len() - 1) as u32).collect();
    let n = idx.len();
    let states: Vec<Vec<f32>> = kept[0].index_select(&Tensor::from_vec(idx, n, model.device())?, 0)?.to_vec2()?;
    Ok(states.iter().map(|s| probe.score(s)).collect())
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
        let Some(probe) = Probe::new(layer, direction) else {
            candle_core::bail!("vector `{vector}` is zero at layer {layer}")
        };
        if prompts.is_empty() {
            candle_core::bail!("no prompts to measure the shift of `{vector}` on");
        }
        let base = last_token_scores(model, None, &prompts, &probe)?;
        Ok(Self { vector: vector.to_string(), probe, prompts, base })
    }

    pub fn layer(&self) -> usize {
        self.probe.layer
    }

    /// The shift of the adapted model along the vector.
    pub fn measure(&self, model: &TrainModel, adapter: &Adapter) -> Result<Shift> {
        let tuned = last_token_scores(model, Some(adapter), &self.prompts, &self.probe)?;
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
    }
}
