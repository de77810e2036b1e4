//! A matmul by a frozen weight that back-propagates to its input only.
//!
//! candle's autograd computes the gradient of both operands of every tracked matmul, so a frozen
//! `[out, in]` weight would cost a full extra matmul per projection per step for a gradient no
//! one reads. LoRA training multiplies by ~200 frozen weights per pass; this op runs the same
//! forward (candle's matmul) and returns only `∂L/∂x = ∂L/∂y · W` in its backward.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

struct FrozenMatmul {
    /// `[out, in]` f32, on the CPU.
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("frozen-matmul takes f32 input") };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-matmul takes a contiguous input")
        };
        let x = Tensor::from_slice(&data[start..end], layout.dims(), &Device::Cpu)?;
        let y = x.matmul(&self.weight.t()?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad_res.matmul(&self.weight)?))
    }
}

/// `x · Wᵀ` for a 2-D `x` (`[n, in]`) and a weight no gradient is wanted for. Off the CPU (or
/// for non-f32 input) it is candle's matmul, which also computes the weight's gradient.
pub fn frozen_linear(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 && weight.dtype() == DType::F32 && x.rank() == 2 {
        x.contiguous()?.apply_op1(FrozenMatmul { weight: weight.clone() })
    } else {
        x.matmul(&weight.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn forward_and_input_gradient_match_a_plain_matmul() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev)?)?;
        let target = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        let ours = frozen_linear(x.as_tensor(), &w)?;
        let plain = x.as_tensor().matmul(&w.t()?)?;
        let diff = (&ours - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let loss = |y: &Tensor| (y * &target)?.sqr()?.sum_all();
        let g_ours = loss(&ours)?.backward()?;
        let g_plain = loss(&plain)?.backward()?;
        let a = g_ours.get(x.as_tensor()).expect("gradient reaches the input");
        let b = g_plain.get(x.as_tensor()).expect("gradient reaches the input");
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "input gradients differ by {diff}");
        Ok(())
    }
}
