//! A request's steering, resolved to per-layer addends for the prompt and response phases.

use crate::model::arch::llama::SteeringAddends;

/// Which phase of a sequence a steering vector acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    All,
    Prompt,
    Response,
}

/// Per residual layer (`n_layers + 1` entries): the summed `coefficient · v` to add, or `None`.
pub type LayerAddends = Vec<Option<Vec<f32>>>;

#[derive(Debug, Clone, PartialEq)]
pub struct SteeringPlan {
    prompt: SteeringAddends,
    response: SteeringAddends,
}

impl Default for SteeringPlan {
    fn default() -> Self {
        Self::new(0)
    }
}

impl SteeringPlan {
    pub fn new(n_rows: usize) -> Self {
        Self { prompt: SteeringAddends::new(vec![None; n_rows]), response: SteeringAddends::new(vec![None; n_rows]) }
    }

    /// Adds `coefficient · values` at residual `layer` for the given phase. Zero coefficients
    /// are dropped, so they leave the computation (and its output) exactly unchanged.
    pub fn add(&mut self, layer: usize, values: &[f32], coefficient: f32, phase: Phase) {
        if coefficient == 0.0 {
            return;
        }
        let targets: &mut [&mut SteeringAddends] = match phase {
            Phase::All => &mut [&mut self.prompt, &mut self.response],
            Phase::Prompt => &mut [&mut self.prompt],
            Phase::Response => &mut [&mut self.response],
        };
        for t in targets.iter_mut() {
            // A new value gets a new identity, so nothing uploaded for the old one is reused.
            let mut layers: LayerAddends = t.layers().to_vec();
            let slot = layers[layer].get_or_insert_with(|| vec![0.0; values.len()]);
            slot.iter_mut().zip(values).for_each(|(a, v)| *a += coefficient * v);
            **t = SteeringAddends::new(layers);
        }
    }

    /// The addends for a phase, or `None` when nothing is steered in it.
    pub fn addends(&self, response: bool) -> Option<&SteeringAddends> {
        let a = if response { &self.response } else { &self.prompt };
        a.is_active().then_some(a)
    }

    pub fn is_empty(&self) -> bool {
        self.addends(false).is_none() && self.addends(true).is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_sum_per_phase_and_zero_coefficients_vanish() {
        let mut p = SteeringPlan::new(3);
        p.add(1, &[1.0, 2.0], 2.0, Phase::All);
        p.add(1, &[1.0, 0.0], -1.0, Phase::Response);
        p.add(2, &[5.0, 5.0], 0.0, Phase::Prompt);
        assert_eq!(p.addends(false).unwrap().layers()[1], Some(vec![2.0, 4.0]));
        assert_eq!(p.addends(true).unwrap().layers()[1], Some(vec![1.0, 4.0]));
        assert_eq!(p.addends(false).unwrap().layers()[2], None);
        assert_ne!(p.addends(false).unwrap().id(), p.addends(true).unwrap().id());
        let mut z = SteeringPlan::new(3);
        z.add(0, &[1.0], 0.0, Phase::All);
        assert!(z.is_empty());
    }
}
