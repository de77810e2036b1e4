//! Steering evaluation, the pure parts: the offline coherence score, and choosing the steering
//! recommendation from a layer × coefficient sweep.

use serde::{Deserialize, Serialize};

/// Per-token mean log-probability, in nats, below the unsteered answers' at which fluency reaches
/// zero: an answer whose tokens are on average e^6 ≈ 400 times less likely under the unsteered
/// model than its own answers reads as word salad.
pub const FLUENCY_RANGE: f32 = 6.0;
/// Distinct-bigram ratio of a degenerate loop (a short phrase repeated to the token limit); at or
/// below it diversity is zero.
pub const LOOP_DISTINCT: f32 = 0.3;

/// What coherence is measured against: the unsteered answers' own figures.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reference {
    pub mean_logprob: f32,
    pub distinct_bigrams: f32,
}

impl Reference {
    /// Typical of the embedded model's own greedy answers (used where no unsteered answers were
    /// scored alongside, e.g. a single spectrum point).
    pub const DEFAULT: Self = Self { mean_logprob: -1.0, distinct_bigrams: 0.97 };

    /// The means of the unsteered answers' figures; `DEFAULT` when there are none.
    pub fn of(answers: &[(f32, f32)]) -> Self {
        if answers.is_empty() {
            return Self::DEFAULT;
        }
        let n = answers.len() as f32;
        Self {
            mean_logprob: answers.iter().map(|a| a.0).sum::<f32>() / n,
            distinct_bigrams: answers.iter().map(|a| a.1).sum::<f32>() / n,
        }
    }
}

/// Distinct token bigrams over all bigrams (1 for fewer than two tokens).
pub fn distinct_bigrams(tokens: &[u32]) -> f32 {
    if tokens.len() < 2 {
        return 1.0;
    }
    let pairs: std::collections::HashSet<(u32, u32)> = tokens.windows(2).map(|w| (w[0], w[1])).collect();
    pairs.len() as f32 / (tokens.len() - 1) as f32
}

/// Offline coherence, 0-100: `100 × fluency × diversity`, where
/// - fluency = clamp((lp − (ref_lp − FLUENCY_RANGE)) / FLUENCY_RANGE, 0, 1), lp being the answer's
///   mean log-probability per token under the unsteered model after the bare question;
/// - diversity = clamp((d − LOOP_DISTINCT) / (ref_d − LOOP_DISTINCT), 0, 1), d being its
///   distinct-bigram ratio.
///
/// Unsteered answers score about 100 (the reference is their own mean); word salad loses on
/// fluency, loops (which the model finds likely once started) on diversity. An empty answer is 0.
pub fn coherence(mean_logprob: f32, distinct: f32, n_tokens: usize, reference: Reference) -> f32 {
    if n_tokens == 0 || !mean_logprob.is_finite() {
        return 0.0;
    }
    let fluency = ((mean_logprob - (reference.mean_logprob - FLUENCY_RANGE)) / FLUENCY_RANGE).clamp(0.0, 1.0);
    let span = (reference.distinct_bigrams - LOOP_DISTINCT).max(1e-3);
    let diversity = ((distinct - LOOP_DISTINCT) / span).clamp(0.0, 1.0);
    100.0 * fluency * diversity
}

/// The evaluation's verdict, stored with the vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SteeringRecommendation {
    pub layer: usize,
    pub coefficient: f32,
    pub trait_score: f32,
    pub unsteered_trait_score: f32,
    pub coherence: f32,
    pub unsteered_coherence: f32,
    pub scorer: String,
    pub evaluated_unix: i64,
    pub layers: Vec<LayerRecommendation>,
    /// Every evaluated cell, layer-major (recommendations stored before grids were kept have
    /// none).
    #[serde(default)]
    pub grid: Vec<CellScore>,
    /// The coherence a cell needed to pass.
    #[serde(default)]
    pub coherence_threshold: f32,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerRecommendation {
    pub layer: usize,
    pub coefficient: f32,
    pub trait_score: f32,
    pub coherence: f32,
}

impl SteeringRecommendation {
    /// The coefficient recommended at `layer`, when that layer was evaluated and one passed.
    pub fn coefficient_at(&self, layer: usize) -> Option<f32> {
        self.layers.iter().find(|l| l.layer == layer).map(|l| l.coefficient)
    }
}

/// One cell's averaged scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CellScore {
    pub layer: usize,
    pub coefficient: f32,
    pub trait_score: f32,
    pub coherence: f32,
}

/// Per layer, the positive coefficient with the largest trait gain over `unsteered_trait` whose
/// coherence is at least `min_coherence` (the smaller coefficient on ties); layers where none
/// gains are left out. The overall pick is the layer whose pick gains most.
pub fn recommend(cells: &[CellScore], unsteered_trait: f32, min_coherence: f32) -> Vec<LayerRecommendation> {
    let mut layers: Vec<usize> = cells.iter().map(|c| c.layer).collect();
    layers.sort_unstable();
    layers.dedup();
    let mut picks: Vec<LayerRecommendation> = layers
        .into_iter()
        .filter_map(|layer| {
            cells
                .iter()
                .filter(|c| c.layer == layer && c.coefficient > 0.0)
                .filter(|c| c.coherence >= min_coherence && c.trait_score > unsteered_trait)
                .max_by(|a, b| a.trait_score.total_cmp(&b.trait_score).then(b.coefficient.total_cmp(&a.coefficient)))
                .map(|c| LayerRecommendation {
                    layer,
                    coefficient: c.coefficient,
                    trait_score: c.trait_score,
                    coherence: c.coherence,
                })
        })
        .collect();
    // Best first, so the caller's overall pick is picks[0].
    picks.sort_by(|a, b| b.trait_score.total_cmp(&a.trait_score).then(a.layer.cmp(&b.layer)));
    picks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsteered_answers_score_about_one_hundred_loops_and_salad_near_zero() {
        let r = Reference { mean_logprob: -0.8, distinct_bigrams: 0.95 };
        assert!((coherence(-0.8, 0.95, 40, r) - 100.0).abs() < 1e-3);
        assert_eq!(coherence(-0.5, 1.0, 40, r), 100.0, "capped");
        assert_eq!(coherence(-9.0, 1.0, 40, r), 0.0, "word salad");
        assert_eq!(coherence(-0.2, 0.2, 40, r), 0.0, "a loop");
        let half = coherence(-3.8, 0.95, 40, r);
        assert!((half - 50.0).abs() < 1e-3, "{half}");
        assert_eq!(coherence(-0.8, 0.95, 0, r), 0.0, "empty answer");
    }

    #[test]
    fn distinct_bigrams_counts_repeats() {
        assert_eq!(distinct_bigrams(&[1, 2, 3, 4]), 1.0);
        assert_eq!(distinct_bigrams(&[7, 7, 7, 7, 7]), 0.25);
        assert_eq!(distinct_bigrams(&[1]), 1.0);
    }

    #[test]
    fn the_largest_coherent_gain_wins_per_layer_and_overall() {
        let cell =
            |layer, coefficient, trait_score, coherence| CellScore { layer, coefficient, trait_score, coherence };
        let cells = [
            cell(5, -1.0, 2.0, 100.0),
            cell(5, 1.0, 30.0, 95.0),
            cell(5, 2.0, 60.0, 85.0),
            cell(5, 4.0, 90.0, 20.0),
            cell(9, 1.0, 40.0, 90.0),
            cell(9, 2.0, 40.0, 88.0),
            cell(12, 1.0, 5.0, 50.0),
        ];
        let picks = recommend(&cells, 10.0, 80.0);
        assert_eq!(picks.len(), 2, "layer 12 never passes");
        assert_eq!((picks[0].layer, picks[0].coefficient), (5, 2.0));
        assert_eq!((picks[1].layer, picks[1].coefficient), (9, 1.0), "tie goes to the smaller coefficient");
        assert!(recommend(&cells, 95.0, 80.0).is_empty(), "nothing gains");
    }
}
