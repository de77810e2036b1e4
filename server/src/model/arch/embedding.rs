//! Token embeddings, looked up without keeping the table in f32.
//!
//! A vocabulary of 262 144 tokens × 640 (Gemma 3 270M) is 671 MB as f32 but 178 MB in the
//! GGUF's Q8_0 blocks, so the table stays in its stored blocks and only the rows a pass needs
//! are dequantized. Where the output head shares the embedding matrix and was loaded as block
//! weights for the CPU kernels, the lookup reads the head's rows instead, and the table is not
//! held twice.

use candle_core::quantized::{GgmlDType, QTensor, ggml_file};
use candle_core::{DType, Device, Result, Tensor};

pub enum TokenEmbedding {
    /// `[vocab, d_model]` f32 on the model's device.
    Dense(Tensor),
    /// The GGUF's own blocks, on the host.
    Blocks { dtype: GgmlDType, data: Vec<u8>, rows: usize, dim: usize },
    /// The rows of the output head's block weights (a tied embedding).
    Head,
}

impl TokenEmbedding {
    /// Keeps a stored tensor as it is when it is block-quantized, dense otherwise.
    pub fn from_qtensor(qt: &QTensor) -> Result<Self> {
        if matches!(qt.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(Self::Dense(qt.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?));
        }
        let (rows, dim) = qt.shape().dims2()?;
        Ok(Self::Blocks { dtype: qt.dtype(), data: qt.data()?.into_owned(), rows, dim })
    }

    /// Moves a dense table to `device` (block tables stay on the host).
    pub fn to_device(self, device: &Device) -> Result<Self> {
        Ok(match self {
            Self::Dense(t) => Self::Dense(t.to_device(device)?),
            other => other,
        })
    }

    /// `[ids.len(), d_model]` f32 on `device`; `None` for [`Self::Head`], which the model reads
    /// from its output head.
    pub fn lookup(&self, ids: &[u32], device: &Device) -> Result<Option<Tensor>> {
        match self {
            Self::Dense(t) => {
                let idx = Tensor::from_slice(ids, ids.len(), t.device())?;
                Ok(Some(t.index_select(&idx, 0)?.to_device(device)?))
            }
            Self::Blocks { dtype, data, rows, dim } => {
                let row_bytes = dim / dtype.block_size() * dtype.type_size();
                let mut picked = Vec::with_capacity(ids.len() * row_bytes);
                for &id in ids {
                    let id = id as usize;
                    if id >= *rows {
                        candle_core::bail!("token id {id} is outside the embedding table ({rows} rows)");
                    }
                    picked.extend_from_slice(&data[id * row_bytes..(id + 1) * row_bytes]);
                }
                let qt = ggml_file::qtensor_from_ggml(*dtype, &picked, vec![ids.len(), *dim], &Device::Cpu)?;
                Ok(Some(qt.dequantize(&Device::Cpu)?.to_device(device)?))
            }
            Self::Head => Ok(None),
        }
    }

    /// Host or device bytes the table holds.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Blocks { data, .. } => data.len(),
            Self::Head => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_lookups_equal_the_dequantized_table() -> Result<()> {
        let dev = Device::Cpu;
        let table = Tensor::randn(0f32, 1.0, (50, 64), &dev)?;
        for dtype in [GgmlDType::Q8_0, GgmlDType::Q4_1, GgmlDType::F32] {
            let qt = QTensor::quantize(&table, dtype)?;
            let want = qt.dequantize(&dev)?;
            let emb = TokenEmbedding::from_qtensor(&qt)?;
            assert_eq!(matches!(emb, TokenEmbedding::Blocks { .. }), dtype != GgmlDType::F32);
            let ids = [7u32, 0, 49, 7];
            let got: Vec<Vec<f32>> = emb.lookup(&ids, &dev)?.expect("a table").to_vec2()?;
            let want: Vec<Vec<f32>> = want.to_vec2()?;
            for (row, &id) in got.iter().zip(&ids) {
                assert_eq!(row, &want[id as usize], "{dtype:?} row {id}");
            }
            assert!(emb.lookup(&[50], &dev).is_err());
        }
        Ok(())
    }
}
