//! Persona vectors: the on-disk store, per-request steering plans, layer recommendation and
//! other programs' file formats.

pub mod calibration;
pub mod comparison;
pub mod evaluation;
pub mod interop;
pub mod plan;
pub mod probe;
pub mod separation;
pub mod store;
pub mod transfer;

/// Scalar projection of an activation onto a direction: `a·v / ‖v‖` (0 for a zero vector).
pub fn projection(a: &[f32], v: &[f32]) -> f32 {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm == 0.0 {
        return 0.0;
    }
    a.iter().zip(v).map(|(x, y)| x * y).sum::<f32>() / norm
}

#[cfg(test)]
mod tests {
    #[test]
    fn projection_is_scale_invariant_in_v() {
        let a = [3.0, 4.0];
        assert_eq!(super::projection(&a, &[1.0, 0.0]), 3.0);
        assert_eq!(super::projection(&a, &[0.0, 10.0]), 4.0);
        assert_eq!(super::projection(&a, &[0.0, 0.0]), 0.0);
    }
}
