//! A request's steering, resolved to per-layer addends for the prompt and response phases.

/// Which phase of a sequence a steering vector acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    All,
    Prompt,
    Response,
}

/// Per residual layer (`n_layers + 1` entries): the summed `coefficient · v` to add, or `None`.
pub type LayerAddends = Vec<Option<Vec<f32>>>;

#[derive(Debug, Clone, Default, PartialEq)]
pub struct SteeringPlan {
    prompt: LayerAddends,
    response: LayerAddends,
}

impl SteeringPlan {
    pub fn new(n_rows: usize) -> Self {
        Self { prompt: vec![None; n_rows], response: vec![None; n_rows] }
    }

    /// Adds `coefficient · values` at residual `layer` for the given phase. Zero coefficients
    /// are dropped, so they leave the computation (and its output) exactly unchanged.
    pub fn add(&mut self, layer: usize, values: &[f32], coefficient: f32, phase: Phase) {
        if coefficient == 0.0 {
            return;
        }
        let targets: &mut [&mut LayerAddends] = match phase {
            Phase::All => &mut [&mut self.prompt, &mut self.response],
            Phase::Prompt => &mut [&mut self.prompt],
            Phase::Response => &mut [&mut self.response],
        };
        for t in targets.iter_mut() {
            let slot = t[layer].get_or_insert_with(|| vec![0.0; values.len()]);
            slot.iter_mut().zip(values).for_each(|(a, v)| *a += coefficient * v);
        }
    }

    /// The addends for a phase, or `None` when nothing is steered in it.
    pub fn addends(&self, response: bool) -> Option<&[Option<Vec<f32>>]> {
        let a = if response { &self.response } else { &self.prompt };
        a.iter().any(Option::is_some).then_some(a.as_slice())
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
        assert_eq!(p.addends(false).unwrap()[1], Some(vec![2.0, 4.0]));
        assert_eq!(p.addends(true).unwrap()[1], Some(vec![1.0, 4.0]));
        assert_eq!(p.addends(false).unwrap()[2], None);
        let mut z = SteeringPlan::new(3);
        z.add(0, &[1.0], 0.0, Phase::All);
        assert!(z.is_empty());
    }
}
