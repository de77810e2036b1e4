//! Layer recommendation: how well projections onto a vector separate positive from negative
//! rollouts, per residual layer.

use super::projection;
use super::store::LayerScore;

/// `(mean_pos - mean_neg) / pooled standard deviation`; 0 when either side has no samples or
/// there is no spread at all.
pub fn cohens_d(pos: &[f32], neg: &[f32]) -> f32 {
    let (np, nn) = (pos.len(), neg.len());
    if np == 0 || nn == 0 {
        return 0.0;
    }
    let mean = |x: &[f32]| x.iter().sum::<f32>() / x.len() as f32;
    let (mp, mn) = (mean(pos), mean(neg));
    let ss = |x: &[f32], m: f32| x.iter().map(|v| (v - m) * (v - m)).sum::<f32>();
    let dof = (np + nn).saturating_sub(2).max(1) as f32;
    let sd = ((ss(pos, mp) + ss(neg, mn)) / dof).sqrt();
    if sd > 0.0 { (mp - mn) / sd } else { 0.0 }
}

/// Probability that a random positive sample scores above a random negative one (ties count
/// half); 0.5 when either side is empty.
pub fn auroc(pos: &[f32], neg: &[f32]) -> f32 {
    if pos.is_empty() || neg.is_empty() {
        return 0.5;
    }
    let wins: f32 = pos
        .iter()
        .map(|p| {
            neg.iter()
                .map(|n| match p.partial_cmp(n) {
                    Some(std::cmp::Ordering::Greater) => 1.0,
                    Some(std::cmp::Ordering::Equal) => 0.5,
                    _ => 0.0,
                })
                .sum::<f32>()
        })
        .sum();
    wins / (pos.len() * neg.len()) as f32
}

/// Scores every residual layer: samples (`[n_rows * d]` activations each) are projected onto
/// `direction`'s row at that layer.
pub fn layer_scores(direction: &[f32], pos: &[&[f32]], neg: &[&[f32]], n_rows: usize, d: usize) -> Vec<LayerScore> {
    (0..n_rows)
        .map(|layer| {
            let span = layer * d..(layer + 1) * d;
            let dir = &direction[span.clone()];
            let proj = |set: &[&[f32]]| set.iter().map(|a| projection(&a[span.clone()], dir)).collect::<Vec<f32>>();
            let (p, n) = (proj(pos), proj(neg));
            LayerScore { layer, cohens_d: cohens_d(&p, &n), auroc: auroc(&p, &n) }
        })
        .collect()
}

/// The earliest block output (layer >= 1) whose Cohen's d reaches 95% of the best one: past that
/// point separation has saturated, and earlier layers steer more of the network.
pub fn recommend(scores: &[LayerScore]) -> Option<usize> {
    let best = scores.iter().filter(|s| s.layer >= 1).map(|s| s.cohens_d).fold(f32::NEG_INFINITY, f32::max);
    // Also false for NaN and for no layers at all (best = -inf).
    if best.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
        return None;
    }
    scores.iter().find(|s| s.layer >= 1 && s.cohens_d >= 0.95 * best).map(|s| s.layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_match_hand_computed_values() {
        // Means 2 and 0, pooled variance (2 + 2) / 4 = 1.
        assert!((cohens_d(&[1.0, 2.0, 3.0], &[-1.0, 0.0, 1.0]) - 2.0).abs() < 1e-6);
        assert_eq!(cohens_d(&[], &[1.0]), 0.0);
        assert_eq!(cohens_d(&[1.0, 1.0], &[1.0]), 0.0);
        assert_eq!(auroc(&[3.0, 4.0], &[1.0, 2.0]), 1.0);
        assert_eq!(auroc(&[1.0, 3.0], &[2.0, 3.0]), 0.375);
        assert_eq!(auroc(&[], &[2.0]), 0.5);
    }

    #[test]
    fn layers_are_scored_by_projection_and_the_saturation_point_is_recommended() {
        // Two layers of d = 2. Layer 0 does not separate; layer 1 does, along the direction.
        let direction = [0.0, 0.0, 1.0, 0.0];
        let pos: [&[f32]; 2] = [&[5.0, 5.0, 2.0, 9.0], &[1.0, 1.0, 3.0, -9.0]];
        let neg: [&[f32]; 2] = [&[5.0, 5.0, -1.0, 0.0], &[1.0, 1.0, -2.0, 4.0]];
        let s = layer_scores(&direction, &pos, &neg, 2, 2);
        assert_eq!((s[0].cohens_d, s[0].auroc), (0.0, 0.5));
        assert_eq!(s[1].auroc, 1.0);
        assert!(s[1].cohens_d > 3.0);
        let mk = |d: &[f32]| -> Vec<LayerScore> {
            d.iter().enumerate().map(|(layer, &cohens_d)| LayerScore { layer, cohens_d, auroc: 0.5 }).collect()
        };
        assert_eq!(recommend(&mk(&[9.0, 1.0, 2.97, 3.0, 2.0])), Some(2));
        assert_eq!(recommend(&mk(&[0.0, -1.0, -2.0])), None);
    }
}
