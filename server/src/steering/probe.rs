//! Monitoring probes: projections of captured hidden states onto unit directions.

use candle_core::{Result, Tensor};
use std::collections::HashMap;

/// A watched direction: a residual layer and a unit vector, so a projection is a plain dot.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub layer: usize,
    pub unit: Vec<f32>,
}

impl Probe {
    /// `None` for an all-zero (or non-finite) direction, which has no projection.
    pub fn new(layer: usize, v: &[f32]) -> Option<Self> {
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        (norm > 0.0 && norm.is_finite()).then(|| Self { layer, unit: v.iter().map(|x| x / norm).collect() })
    }

    /// The projection `a·v/‖v‖` of one hidden state (`d_model` values).
    pub fn score(&self, a: &[f32]) -> f32 {
        a.iter().zip(&self.unit).map(|(x, u)| x * u).sum()
    }

    /// The projection of this probe's layer in per-layer activations (`[n_rows * d_model]`, row-major).
    pub fn score_at_layer(&self, acts: &[f32]) -> f32 {
        let d = self.unit.len();
        self.score(&acts[self.layer * d..(self.layer + 1) * d])
    }
}

/// For each probe, its projection at every position of `positions` (`first..first + len`) of
/// the captured `states` (one `[tokens, d]` tensor per residual layer). Each layer is read from
/// the device once, however many probes watch it.
pub fn probe_scores(states: &[Tensor], probes: &[Probe], first: usize, len: usize) -> Result<Vec<Vec<f32>>> {
    let mut rows: HashMap<usize, Vec<Vec<f32>>> = HashMap::new();
    for p in probes {
        if let std::collections::hash_map::Entry::Vacant(e) = rows.entry(p.layer) {
            let s = states.get(p.layer).ok_or_else(|| candle_core::Error::msg(format!("no layer {}", p.layer)))?;
            e.insert(s.narrow(0, first, len)?.to_dtype(candle_core::DType::F32)?.to_vec2()?);
        }
    }
    Ok(probes.iter().map(|p| rows[&p.layer].iter().map(|a| p.score(a)).collect()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn scores_are_projections_per_position() {
        let layer0 = Tensor::new(&[[1f32, 0.0], [0.0, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let layer1 = Tensor::new(&[[5f32, 5.0], [1.0, 1.0], [0.0, 0.0]], &Device::Cpu).unwrap();
        let probes = [Probe::new(0, &[0.0, 10.0]).unwrap(), Probe::new(1, &[3.0, 4.0]).unwrap()];
        let s = probe_scores(&[layer0, layer1], &probes, 1, 2).unwrap();
        assert_eq!(s[0], [2.0, 4.0]);
        assert!((s[1][0] - 1.4).abs() < 1e-6 && s[1][1] == 0.0, "{:?}", s[1]);
        assert!(Probe::new(0, &[0.0, 0.0]).is_none());
        // Per-layer activations [3 rows x 2]: layer 1 is the middle pair.
        assert!((probes[1].score_at_layer(&[9.0, 9.0, 3.0, 4.0, 9.0, 9.0]) - 5.0).abs() < 1e-6);
        assert!(probe_scores(&[], &probes, 0, 1).is_err());
    }
}
