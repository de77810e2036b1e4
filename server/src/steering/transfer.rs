//! Linear maps between two models' residual streams, for carrying a persona vector from one
//! model to another (TransferVector).
//!
//! Both models read the same texts; at each aligned text unit (the end of a word, where both
//! tokenizers end a token) the source model's hidden state at layer Ls and the target's at layer
//! Lt form one sample pair. A map `y ≈ (x − x̄)·W + ȳ` is fitted on the pairs of some texts and
//! judged by R² on the pairs of others (texts are never split across the two), and a source
//! direction `v` is carried over as `v·W` (a difference of states maps through the linear part
//! alone). Two fits:
//! - ridge regression, its penalty chosen on a validation split;
//! - orthogonal Procrustes between the two whitened streams (a rotation, with the least-squares
//!   scale), which cannot overfit the way a full map can but assumes the two geometries agree
//!   up to rotation once whitened.

use nalgebra::{DMatrix, DVector, SymmetricEigen};

/// Which texts fit, choose the penalty, and test: by text index, three of every five train,
/// the fourth validates, the fifth tests.
#[derive(Debug, Clone, Default)]
pub struct Split {
    pub train: Vec<usize>,
    pub val: Vec<usize>,
    pub test: Vec<usize>,
}

impl Split {
    /// Sample rows by the text each came from.
    pub fn by_text(texts: &[usize]) -> Self {
        let mut s = Self::default();
        for (row, &t) in texts.iter().enumerate() {
            match t % 5 {
                3 => s.val.push(row),
                4 => s.test.push(row),
                _ => s.train.push(row),
            }
        }
        s
    }
}

/// Aligned sample pairs: row `i` of `x` (`[n, dx]`) and of `y` (`[n, dy]`), row-major f32.
pub struct Pairs<'a> {
    pub x: &'a [f32],
    pub dx: usize,
    pub y: &'a [f32],
    pub dy: usize,
}

impl Pairs<'_> {
    fn rows(data: &[f32], d: usize, rows: &[usize]) -> DMatrix<f64> {
        DMatrix::from_fn(rows.len(), d, |i, j| data[rows[i] * d + j] as f64)
    }

    fn x(&self, rows: &[usize]) -> DMatrix<f64> {
        Self::rows(self.x, self.dx, rows)
    }

    fn y(&self, rows: &[usize]) -> DMatrix<f64> {
        Self::rows(self.y, self.dy, rows)
    }
}

/// `y ≈ (x − x̄)·W + ȳ`.
#[derive(Debug, Clone)]
pub struct Map {
    /// `[dx, dy]`.
    pub w: DMatrix<f64>,
    pub x_mean: DVector<f64>,
    pub y_mean: DVector<f64>,
}

impl Map {
    /// A source direction carried to the target: `v·W`.
    pub fn carry(&self, v: &[f32]) -> Vec<f32> {
        let v = DMatrix::from_fn(1, v.len(), |_, j| v[j] as f64);
        (v * &self.w).iter().map(|&x| x as f32).collect()
    }

    fn predict(&self, x: &DMatrix<f64>) -> DMatrix<f64> {
        let mut centered = x.clone();
        for mut row in centered.row_iter_mut() {
            row -= self.x_mean.transpose();
        }
        let mut y = centered * &self.w;
        for mut row in y.row_iter_mut() {
            row += self.y_mean.transpose();
        }
        y
    }

    /// R² of the map on `rows`: one minus the squared error over the squared deviation from the
    /// fit's own target mean.
    pub fn r2(&self, pairs: &Pairs<'_>, rows: &[usize]) -> f64 {
        let (x, y) = (pairs.x(rows), pairs.y(rows));
        let err = (self.predict(&x) - &y).norm_squared();
        let mut dev = y;
        for mut row in dev.row_iter_mut() {
            row -= self.y_mean.transpose();
        }
        1.0 - err / dev.norm_squared().max(f64::MIN_POSITIVE)
    }
}

/// A fitted map and how it did.
#[derive(Debug, Clone)]
pub struct Fit {
    pub map: Map,
    /// R² on the test texts.
    pub r2: f64,
    /// Ridge: the penalty chosen, relative to the mean eigenvalue of the source covariance
    /// (0 for Procrustes).
    pub lambda: f64,
}

fn column_means(m: &DMatrix<f64>) -> DVector<f64> {
    m.row_mean().transpose()
}

fn centered(m: &DMatrix<f64>, mean: &DVector<f64>) -> DMatrix<f64> {
    let mut c = m.clone();
    for mut row in c.row_iter_mut() {
        row -= mean.transpose();
    }
    c
}

/// Penalties tried, relative to the mean eigenvalue of the source covariance.
const RIDGE_GRID: [f64; 9] = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 0.3, 1.0, 3.0, 10.0];

/// Ridge regression on the training texts, its penalty the one with the best validation R².
pub fn fit_ridge(pairs: &Pairs<'_>, split: &Split) -> Result<Fit, String> {
    check(pairs, split)?;
    let (x, y) = (pairs.x(&split.train), pairs.y(&split.train));
    let (x_mean, y_mean) = (column_means(&x), column_means(&y));
    let (xc, yc) = (centered(&x, &x_mean), centered(&y, &y_mean));
    let gram = xc.transpose() * &xc;
    let cross = xc.transpose() * &yc;
    let scale = gram.trace() / pairs.dx as f64;
    let mut best: Option<(f64, f64, Map)> = None;
    for rel in RIDGE_GRID {
        let mut a = gram.clone();
        for i in 0..pairs.dx {
            a[(i, i)] += rel * scale;
        }
        let Some(chol) = a.cholesky() else { continue };
        let map = Map { w: chol.solve(&cross), x_mean: x_mean.clone(), y_mean: y_mean.clone() };
        let val = map.r2(pairs, &split.val);
        if best.as_ref().is_none_or(|(b, ..)| val > *b) {
            best = Some((val, rel, map));
        }
    }
    let (_, lambda, map) = best.ok_or("the source states are degenerate (no penalty makes them solvable)")?;
    Ok(Fit { r2: map.r2(pairs, &split.test), lambda, map })
}

/// `C^(p)` of a symmetric positive semi-definite matrix, its eigenvalues floored at `floor`.
fn sym_power(c: DMatrix<f64>, p: f64, floor: f64) -> DMatrix<f64> {
    let eig = SymmetricEigen::new(c);
    let d = DMatrix::from_diagonal(&eig.eigenvalues.map(|l| l.max(floor).powf(p)));
    &eig.eigenvectors * d * eig.eigenvectors.transpose()
}

/// Orthogonal Procrustes between the whitened streams of the training (and validation) texts:
/// `W = Cx^(-1/2)·s·Q·Cy^(1/2)` with `Q = U·Vᵀ` from the SVD of the whitened cross-covariance
/// and `s` the least-squares scale.
pub fn fit_procrustes(pairs: &Pairs<'_>, split: &Split) -> Result<Fit, String> {
    check(pairs, split)?;
    let rows: Vec<usize> = split.train.iter().chain(&split.val).copied().collect();
    let (x, y) = (pairs.x(&rows), pairs.y(&rows));
    let (x_mean, y_mean) = (column_means(&x), column_means(&y));
    let (xc, yc) = (centered(&x, &x_mean), centered(&y, &y_mean));
    let n = rows.len() as f64;
    let (cx, cy) = (xc.transpose() * &xc / n, yc.transpose() * &yc / n);
    // Whitening amplifies the smallest directions; floor them at 1% of the mean eigenvalue.
    let (fx, fy) = (1e-2 * cx.trace() / pairs.dx as f64, 1e-2 * cy.trace() / pairs.dy as f64);
    let (wx, wy, wy_inv) = (sym_power(cx.clone(), -0.5, fx), sym_power(cy.clone(), -0.5, fy), sym_power(cy, 0.5, fy));
    let (xw, yw) = (&xc * &wx, &yc * &wy);
    let svd = (xw.transpose() * &yw).svd(true, true);
    let (u, v_t) = (svd.u.ok_or("SVD gave no U")?, svd.v_t.ok_or("SVD gave no V")?);
    let q = u * v_t;
    let rotated = &xw * &q;
    let s = (rotated.component_mul(&yw)).sum() / rotated.norm_squared().max(f64::MIN_POSITIVE);
    let map = Map { w: wx * q * s * wy_inv, x_mean, y_mean };
    Ok(Fit { r2: map.r2(pairs, &split.test), lambda: 0.0, map })
}

fn check(pairs: &Pairs<'_>, split: &Split) -> Result<(), String> {
    let n = pairs.x.len() / pairs.dx.max(1);
    if pairs.x.len() != n * pairs.dx || pairs.y.len() != n * pairs.dy {
        return Err(format!("{} source and {} target values do not make whole rows", pairs.x.len(), pairs.y.len()));
    }
    if split.train.len() < 2 || split.val.is_empty() || split.test.is_empty() {
        return Err(format!(
            "too few texts to fit and test a map ({} training, {} validation, {} test samples)",
            split.train.len(),
            split.val.len(),
            split.test.len()
        ));
    }
    Ok(())
}

/// The target layer at the source layer's relative depth (residual rows: 0 = embeddings).
pub fn same_depth(source_layer: usize, source_rows: usize, target_rows: usize) -> usize {
    let rel = source_layer as f64 / (source_rows - 1).max(1) as f64;
    ((rel * (target_rows - 1) as f64).round() as usize).min(target_rows - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(seed: u64, n: usize) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `n` samples of `dx` source values and their image `x·A + b` (+ noise) in `dy`.
    fn samples(n: usize, dx: usize, dy: usize, a: &[f32], noise_level: f32) -> (Vec<f32>, Vec<f32>, Vec<usize>) {
        let x = noise(1, n * dx);
        let e = noise(2, n * dy);
        let mut y = vec![0f32; n * dy];
        for i in 0..n {
            for j in 0..dy {
                let dot: f32 = (0..dx).map(|k| x[i * dx + k] * a[k * dy + j]).sum();
                y[i * dy + j] = dot + 0.5 + noise_level * e[i * dy + j];
            }
        }
        (x, y, (0..n).map(|i| i / 4).collect())
    }

    #[test]
    fn ridge_recovers_a_linear_map_and_carries_directions_through_it() {
        let (dx, dy) = (6, 9);
        let a = noise(3, dx * dy);
        let (x, y, texts) = samples(400, dx, dy, &a, 0.0);
        let pairs = Pairs { x: &x, dx, y: &y, dy };
        let fit = fit_ridge(&pairs, &Split::by_text(&texts)).unwrap();
        assert!(fit.r2 > 0.999, "R² {}", fit.r2);
        let v = [1.0, 0.0, -2.0, 0.5, 0.0, 0.0];
        let want: Vec<f32> = (0..dy).map(|j| (0..dx).map(|k| v[k] * a[k * dy + j]).sum()).collect();
        for (g, w) in fit.map.carry(&v).iter().zip(&want) {
            assert!((g - w).abs() < 1e-2, "{g} vs {w}");
        }
        // Noise the map cannot explain lowers held-out R² instead of being fitted.
        let (x, y, texts) = samples(400, dx, dy, &a, 1.5);
        let noisy = fit_ridge(&Pairs { x: &x, dx, y: &y, dy }, &Split::by_text(&texts)).unwrap();
        assert!(noisy.r2 < 0.8 && noisy.r2 > 0.1, "R² {}", noisy.r2);
    }

    #[test]
    fn procrustes_recovers_a_rotation_and_fails_honestly_on_unrelated_streams() {
        // y = x·R with R orthogonal (a rotation in the plane of coordinates 0 and 1).
        let (dx, dy) = (4, 4);
        let (c, s) = (0.6f32, 0.8f32);
        let r = [c, s, 0.0, 0.0, -s, c, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        let (x, y, texts) = samples(300, dx, dy, &r, 0.0);
        let pairs = Pairs { x: &x, dx, y: &y, dy };
        let fit = fit_procrustes(&pairs, &Split::by_text(&texts)).unwrap();
        assert!(fit.r2 > 0.99, "R² {}", fit.r2);
        let unrelated = noise(9, 300 * dy);
        let fit = fit_procrustes(&Pairs { x: &x, dx, y: &unrelated, dy }, &Split::by_text(&texts)).unwrap();
        assert!(fit.r2 < 0.1, "R² {} on unrelated streams", fit.r2);
        let ridge = fit_ridge(&Pairs { x: &x, dx, y: &unrelated, dy }, &Split::by_text(&texts)).unwrap();
        assert!(ridge.r2 < 0.1, "ridge R² {} on unrelated streams", ridge.r2);
    }

    #[test]
    fn too_few_texts_are_refused_and_depth_maps_proportionally() {
        let x = noise(1, 8);
        let e = fit_ridge(&Pairs { x: &x, dx: 2, y: &x, dy: 2 }, &Split::by_text(&[0, 0, 1, 1])).unwrap_err();
        assert!(e.contains("too few texts"), "{e}");
        assert_eq!(same_depth(15, 31, 19), 9);
        assert_eq!(same_depth(0, 31, 19), 0);
        assert_eq!(same_depth(30, 31, 19), 18);
    }
}
