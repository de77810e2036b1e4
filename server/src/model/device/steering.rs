//! Steering addends on the device, uploaded once per batch composition.
//!
//! A decode step's batch is usually the batch of the step before. The per-layer addends of a
//! batch (`[rows, d_model]`, zero for rows a layer does not steer) are built on the host and
//! uploaded when the batch's steering changes, by row order or by a row's addends' identity
//! ([`SteeringAddends::id`]), and reused as they are otherwise.

use crate::model::arch::llama::SteeringAddends;
use candle_core::{DType, Device, Result, Tensor};

#[derive(Default)]
pub struct SteeringCache {
    /// The steering identity of each row of the batch the tensors were built for.
    key: Vec<Option<u64>>,
    /// Per residual layer: `[rows, d_model]` f32, or `None` where no row steers.
    layers: Vec<Option<Tensor>>,
    /// Uploads since start (for tests and tracing).
    pub builds: usize,
}

impl SteeringCache {
    /// Makes the cache hold the per-row addends of a batch whose rows carry `steering`
    /// (`n_rows` residual layers, `d` wide), uploading them only if they changed.
    pub fn prepare(
        &mut self,
        steering: &[Option<&SteeringAddends>],
        n_rows: usize,
        d: usize,
        device: &Device,
    ) -> Result<()> {
        let key: Vec<Option<u64>> = steering.iter().map(|s| s.map(SteeringAddends::id)).collect();
        if key != self.key || self.layers.len() != n_rows {
            self.layers = build(steering, n_rows, d, device)?;
            self.key = key;
            self.builds += 1;
        }
        Ok(())
    }

    /// Per-row addends (`[rows, d_model]` f32) of residual layer `layer` for the batch last
    /// [prepared](Self::prepare), or `None` when no row steers that layer.
    pub fn layer(&self, layer: usize) -> Option<&Tensor> {
        self.layers.get(layer).and_then(Option::as_ref)
    }

    /// Forgets the uploaded tensors (after a failed pass).
    pub fn clear(&mut self) {
        self.key.clear();
        self.layers.clear();
    }
}

fn build(
    steering: &[Option<&SteeringAddends>],
    n_rows: usize,
    d: usize,
    device: &Device,
) -> Result<Vec<Option<Tensor>>> {
    (0..n_rows)
        .map(|layer| {
            let vectors: Vec<Option<&Vec<f32>>> =
                steering.iter().map(|s| s.and_then(|s| s.layers().get(layer)).and_then(Option::as_ref)).collect();
            if vectors.iter().all(Option::is_none) {
                return Ok(None);
            }
            let mut host = vec![0f32; steering.len() * d];
            for (row, v) in vectors.iter().enumerate() {
                if let Some(v) = v {
                    host[row * d..(row + 1) * d].copy_from_slice(v);
                }
            }
            Tensor::from_vec(host, (steering.len(), d), device)?.to_dtype(DType::F32).map(Some)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebuilds_only_when_the_batch_steering_changes() -> Result<()> {
        let a = SteeringAddends::new(vec![None, Some(vec![1.0, 2.0])]);
        let b = SteeringAddends::new(vec![None, Some(vec![1.0, 2.0])]);
        assert_ne!(a.id(), b.id(), "identities are unique, whatever the values");
        let mut c = SteeringCache::default();
        let dev = Device::Cpu;
        c.prepare(&[Some(&a), None], 2, 2, &dev)?;
        assert!(c.layer(0).is_none());
        let l1 = c.layer(1).expect("layer 1 is steered");
        assert_eq!(l1.to_vec2::<f32>()?, vec![vec![1.0, 2.0], vec![0.0, 0.0]]);
        c.prepare(&[Some(&a), None], 2, 2, &dev)?;
        assert_eq!(c.builds, 1, "same batch, same tensors");
        c.prepare(&[None, Some(&b)], 2, 2, &dev)?;
        let l1 = c.layer(1).expect("layer 1 is steered");
        assert_eq!(l1.to_vec2::<f32>()?, vec![vec![0.0, 0.0], vec![1.0, 2.0]]);
        assert_eq!(c.builds, 2);
        Ok(())
    }
}
