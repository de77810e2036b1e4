//! Calibrated scores: a raw projection `a·v/‖v‖` mapped onto 0-100, where 0 is where the
//! helpful-side extraction rollouts project on average and 100 where the trait-side ones do,
//! at the same layer and reading position.

use serde::{Deserialize, Serialize};

/// Projections of one side's rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct SideStats {
    pub mean: f32,
    /// Population standard deviation.
    pub std: f32,
    pub n: u32,
}

impl SideStats {
    pub fn of(xs: &[f32]) -> Self {
        let n = xs.len().max(1) as f64;
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        Self { mean: mean as f32, std: var.sqrt() as f32, n: xs.len() as u32 }
    }
}

/// One reading position's scale at one layer: helpful (0) and trait (100) rollouts.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Scale {
    pub neg: SideStats,
    pub pos: SideStats,
}

impl Scale {
    /// `None` unless both sides have samples.
    pub fn from_samples(pos: &[f32], neg: &[f32]) -> Option<Self> {
        (!pos.is_empty() && !neg.is_empty()).then(|| Self { neg: SideStats::of(neg), pos: SideStats::of(pos) })
    }

    /// Raw units per calibrated point, or `None` when the two sides do not separate (their means
    /// coincide to within float noise), which leaves no scale to speak of.
    fn span(&self) -> Option<f32> {
        let span = self.pos.mean - self.neg.mean;
        let noise = 1e-5 * self.pos.mean.abs().max(self.neg.mean.abs()).max(1.0);
        (span.is_finite() && span.abs() > noise).then_some(span)
    }

    /// The raw projection on the 0-100 scale (unbounded: beyond the trait rollouts is above 100).
    pub fn calibrate(&self, raw: f32) -> Option<f32> {
        self.span().map(|s| 100.0 * (raw - self.neg.mean) / s)
    }

    /// A raw difference of projections in calibrated points.
    pub fn points(&self, raw_difference: f32) -> Option<f32> {
        self.span().map(|s| 100.0 * raw_difference / s)
    }

    /// The raw projection that a calibrated score corresponds to.
    pub fn raw(&self, calibrated: f32) -> Option<f32> {
        self.span().map(|s| self.neg.mean + calibrated / 100.0 * s)
    }
}

/// The scales of one residual layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerCalibration {
    pub layer: usize,
    /// Response averages of the rollouts' answers re-read after the bare question; also the scale
    /// of per-token scores and prompt averages (averages of per-token values).
    pub response: Scale,
    /// The last prompt token of the rollouts' prompts, system prompt included.
    pub prompt_last: Scale,
}

/// Per layer, the projections of `acts` (one `n_rows × d` row-major activation summary per
/// rollout) onto the unit direction of `vector`'s row at that layer.
pub fn projections_per_layer(vector: &[f32], acts: &[&[f32]], n_rows: usize, d: usize) -> Vec<Vec<f32>> {
    (0..n_rows)
        .map(|l| {
            let v = &vector[l * d..(l + 1) * d];
            if v.iter().all(|&x| x == 0.0) {
                return Vec::new();
            }
            acts.iter().map(|a| super::projection(&a[l * d..(l + 1) * d], v)).collect()
        })
        .collect()
}

/// The calibration of `vector` from the rollouts' re-read response averages and their last
/// prompt tokens; layers where either side is missing (or the vector is zero) are left out.
pub fn calibrate(
    vector: &[f32],
    response: (&[&[f32]], &[&[f32]]),
    prompt_last: (&[&[f32]], &[&[f32]]),
    n_rows: usize,
    d: usize,
) -> Vec<LayerCalibration> {
    let per_layer = |set: &[&[f32]]| projections_per_layer(vector, set, n_rows, d);
    let response = [per_layer(response.0), per_layer(response.1)];
    let prompt_last = [per_layer(prompt_last.0), per_layer(prompt_last.1)];
    calibrate_projections(&response, &prompt_last)
}

/// [`calibrate`] from projections already taken: per side (positive, negative), per layer, the
/// re-read response projections and the last-prompt-token projections. A layer without
/// projections on both sides gets no calibration.
pub fn calibrate_projections(response: &[Vec<Vec<f32>>; 2], prompt_last: &[Vec<Vec<f32>>; 2]) -> Vec<LayerCalibration> {
    let n_rows = response[0].len();
    let (rp, rn, pp, pn) = (&response[0], &response[1], &prompt_last[0], &prompt_last[1]);
    (0..n_rows)
        .filter_map(|l| {
            Some(LayerCalibration {
                layer: l,
                response: Scale::from_samples(&rp[l], &rn[l])?,
                prompt_last: Scale::from_samples(&pp[l], &pn[l])?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpful_mean_is_zero_and_trait_mean_is_one_hundred() {
        let s = Scale::from_samples(&[9.0, 11.0], &[1.0, 3.0]).unwrap();
        assert_eq!(s.calibrate(2.0), Some(0.0));
        assert_eq!(s.calibrate(10.0), Some(100.0));
        assert_eq!(s.calibrate(14.0), Some(150.0));
        assert_eq!(s.points(4.0), Some(50.0));
        assert_eq!(s.raw(50.0), Some(6.0));
        assert_eq!((s.pos.std, s.pos.n), (1.0, 2));
        assert!(Scale::from_samples(&[], &[1.0]).is_none());
        let flat = Scale::from_samples(&[5.0], &[5.0]).unwrap();
        assert_eq!(flat.calibrate(7.0), None, "no separation, no scale");
    }

    #[test]
    fn calibration_projects_each_layer_onto_its_own_unit_row() {
        // Two layers, d = 2: layer 0 points along x (norm 2), layer 1 is zero.
        let vector = [2.0, 0.0, 0.0, 0.0];
        let (p1, p2, n1): (&[f32], &[f32], &[f32]) =
            (&[4.0, 1.0, 0.0, 0.0], &[6.0, 1.0, 0.0, 0.0], &[1.0, 5.0, 0.0, 0.0]);
        let cal = calibrate(&vector, (&[p1, p2], &[n1]), (&[p1], &[n1]), 2, 2);
        assert_eq!(cal.len(), 1, "the zero layer has no scale");
        assert_eq!(cal[0].layer, 0);
        assert_eq!(cal[0].response.pos.mean, 5.0);
        assert_eq!(cal[0].response.neg.mean, 1.0);
        assert_eq!(cal[0].response.calibrate(3.0), Some(50.0));
        assert_eq!(cal[0].prompt_last.pos.mean, 4.0);
    }
}
