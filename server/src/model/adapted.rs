//! A weight source with LoRA deltas merged in at load: each adapted weight becomes
//! `W + scale · B A` (dense, then whatever the load makes of dense weights — int8 blocks for the
//! CPU kernels, the compute dtype on a GPU); every other weight loads exactly as without the
//! adapter (GGUF Q4 blocks stay bit for bit). Serving an adapted model costs what serving the
//! base costs.

use super::arch::embedding::TokenEmbedding;
use super::arch::llama::WeightSource;
use super::weights::{MatmulRole, Precision};
use candle_core::quantized::{QMatMul, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use std::collections::{BTreeMap, BTreeSet};

pub struct AdaptedSource<'a> {
    inner: &'a mut dyn WeightSource,
    /// `[out, in]` f32 changes by GGUF tensor name.
    deltas: BTreeMap<String, Tensor>,
    /// Names merged so far (every delta must be used).
    merged: BTreeSet<String>,
}

impl<'a> AdaptedSource<'a> {
    pub fn new(inner: &'a mut dyn WeightSource, deltas: BTreeMap<String, Tensor>) -> Self {
        Self { inner, deltas, merged: BTreeSet::new() }
    }

    /// Deltas no weight took (names the model does not have).
    pub fn unused(&self) -> Vec<&str> {
        self.deltas.keys().filter(|k| !self.merged.contains(*k)).map(String::as_str).collect()
    }

    fn merged_dense(&mut self, name: &str) -> Result<Option<Tensor>> {
        let Some(delta) = self.deltas.get(name) else { return Ok(None) };
        let w = self.inner.dense(name)?;
        if w.dims() != delta.dims() {
            candle_core::bail!("adapter delta for {name} is {:?}, the weight is {:?}", delta.dims(), w.dims());
        }
        let delta = delta.to_device(w.device())?;
        self.merged.insert(name.to_string());
        Ok(Some((w + delta)?))
    }
}

impl WeightSource for AdaptedSource<'_> {
    fn matmul(&mut self, name: &str, role: MatmulRole) -> Result<QMatMul> {
        match self.merged_dense(name)? {
            Some(w) => {
                let dtype = if self.inner.dense_matmuls() && role != MatmulRole::Output {
                    self.inner.compute_dtype()
                } else {
                    DType::F32
                };
                Ok(QMatMul::Tensor(w.to_dtype(dtype)?))
            }
            None => self.inner.matmul(name, role),
        }
    }

    fn wants_int8(&self) -> bool {
        self.inner.wants_int8()
    }

    fn dense_matmuls(&self) -> bool {
        self.inner.dense_matmuls()
    }

    fn compute_dtype(&self) -> DType {
        self.inner.compute_dtype()
    }

    fn precision(&self) -> Precision {
        self.inner.precision()
    }

    fn embedding(&mut self, name: &str) -> Result<TokenEmbedding> {
        // Adapters change projections, never the embedding table.
        if self.deltas.contains_key(name) {
            Ok(TokenEmbedding::Dense(self.dense(name)?))
        } else {
            self.inner.embedding(name)
        }
    }

    fn raw(&mut self, name: &str) -> Result<Option<QTensor>> {
        // An adapted weight has no stored blocks: the loader takes it dense.
        if self.deltas.contains_key(name) { Ok(None) } else { self.inner.raw(name) }
    }

    fn dense(&mut self, name: &str) -> Result<Tensor> {
        match self.merged_dense(name)? {
            Some(w) => Ok(w),
            None => self.inner.dense(name),
        }
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }
}
