//! Comparing vectors of one model layer by layer: the cosine of each with a reference vector and
//! how well each separates the same positive and negative readings, next to what random
//! directions give (the chance level a transferred vector is judged against).

use super::projection;
use super::separation::{auroc, cohens_d};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// One layer of a comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerComparison {
    pub layer: usize,
    pub cosine: f32,
    pub auroc: f32,
    pub cohens_d: f32,
}

/// Readings to separate: per side (0 positive, 1 negative), one `n_rows * d` activation each.
pub struct Readings<'a> {
    pub sides: [&'a [Vec<f32>]; 2],
    pub n_rows: usize,
    pub d: usize,
}

impl Readings<'_> {
    fn projections(&self, layer: usize, dir: &[f32]) -> [Vec<f32>; 2] {
        let span = layer * self.d..(layer + 1) * self.d;
        self.sides.map(|side| side.iter().map(|a| projection(&a[span.clone()], dir)).collect())
    }
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let n = norm(a) * norm(b);
    if n > 0.0 { dot / n } else { 0.0 }
}

/// `vector` against `reference` (both `n_rows * d`) at every layer where `vector` is non-zero.
pub fn compare(vector: &[f32], reference: &[f32], readings: &Readings<'_>) -> Vec<LayerComparison> {
    let d = readings.d;
    (0..readings.n_rows)
        .filter_map(|layer| {
            let row = &vector[layer * d..(layer + 1) * d];
            if row.iter().all(|&x| x == 0.0) {
                return None;
            }
            let [p, n] = readings.projections(layer, row);
            Some(LayerComparison {
                layer,
                cosine: cosine(row, &reference[layer * d..(layer + 1) * d]),
                auroc: auroc(&p, &n),
                cohens_d: cohens_d(&p, &n),
            })
        })
        .collect()
}

/// Per layer, the `quantile` over `directions` seeded random Gaussian directions of |cosine| with
/// `reference` and of the folded AUROC `max(a, 1 - a)` and |d| (a random direction has no sign).
pub fn random_baseline(
    reference: &[f32],
    readings: &Readings<'_>,
    directions: usize,
    quantile: f32,
    seed: u64,
) -> Vec<LayerComparison> {
    let d = readings.d;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut gaussian = move || {
        // Box-Muller; 1 - u keeps the logarithm's argument in (0, 1].
        let (u, v): (f32, f32) = (1.0 - rng.random::<f32>(), rng.random());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    };
    let pick = |mut xs: Vec<f32>| {
        xs.sort_by(f32::total_cmp);
        let i = ((xs.len() as f32 - 1.0) * quantile).round() as usize;
        xs.get(i).copied().unwrap_or(0.0)
    };
    (0..readings.n_rows)
        .map(|layer| {
            let reference = &reference[layer * d..(layer + 1) * d];
            let (mut cos, mut au, mut cd) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..directions {
                let dir: Vec<f32> = (0..d).map(|_| gaussian()).collect();
                let [p, n] = readings.projections(layer, &dir);
                let a = auroc(&p, &n);
                cos.push(cosine(&dir, reference).abs());
                au.push(a.max(1.0 - a));
                cd.push(cohens_d(&p, &n).abs());
            }
            LayerComparison { layer, cosine: pick(cos), auroc: pick(au), cohens_d: pick(cd) }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two layers of width 4; positives lie along +e0 at layer 1, negatives along -e0.
    fn readings() -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let at = |x: f32, jitter: f32| vec![0.0, 0.0, 0.0, 0.0, x, jitter, -jitter, 0.5];
        let pos = (0..6).map(|i| at(1.0 + i as f32 * 0.1, i as f32 * 0.01)).collect();
        let neg = (0..6).map(|i| at(-1.0 - i as f32 * 0.1, -(i as f32) * 0.02)).collect();
        (pos, neg)
    }

    #[test]
    fn a_vector_along_the_difference_separates_and_one_against_it_inverts() {
        let (pos, neg) = readings();
        let r = Readings { sides: [&pos, &neg], n_rows: 2, d: 4 };
        let reference = [0.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0];
        let along = compare(&[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], &reference, &r);
        assert_eq!(along.len(), 1, "the zero row at layer 0 is skipped");
        assert_eq!((along[0].layer, along[0].cosine, along[0].auroc), (1, 1.0, 1.0));
        assert!(along[0].cohens_d > 5.0);
        let against = compare(&[0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 1.0], &reference, &r);
        assert_eq!(against[0].auroc, 0.0);
        assert!((against[0].cosine + std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        // Orthogonal to the difference and constant across readings: no separation.
        let flat = compare(&[0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0], &reference, &r);
        assert_eq!((flat[0].cosine, flat[0].auroc, flat[0].cohens_d), (0.0, 0.5, 0.0));
    }

    #[test]
    fn random_directions_give_the_chance_level_and_are_seeded() {
        // d = 256 along one separating axis: |cos| with it is about 1.96 / sqrt(256) = 0.12 at the
        // 95th percentile, and a random direction rarely lines up enough to separate perfectly.
        let d = 256;
        let mut pos = Vec::new();
        let mut neg = Vec::new();
        for i in 0..10 {
            let mut a = vec![0.0f32; d];
            let mut b = vec![0.0f32; d];
            for (j, (x, y)) in a.iter_mut().zip(b.iter_mut()).enumerate() {
                *x = ((i * 31 + j * 17) % 13) as f32 / 13.0 - 0.5;
                *y = ((i * 7 + j * 29) % 11) as f32 / 11.0 - 0.5;
            }
            a[0] += 3.0;
            b[0] -= 3.0;
            pos.push(a);
            neg.push(b);
        }
        let r = Readings { sides: [&pos, &neg], n_rows: 1, d };
        let mut reference = vec![0.0; d];
        reference[0] = 1.0;
        let base = random_baseline(&reference, &r, 200, 0.95, 7);
        assert!((0.08..0.17).contains(&base[0].cosine), "{:?}", base[0]);
        assert!(base[0].auroc >= 0.5 && base[0].auroc < 1.0, "{:?}", base[0]);
        assert_eq!(base, random_baseline(&reference, &r, 200, 0.95, 7));
        assert_ne!(base, random_baseline(&reference, &r, 200, 0.95, 8));
        assert_eq!(compare(&reference, &reference, &r)[0].auroc, 1.0);
    }
}
