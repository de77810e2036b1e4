//! A matmul by a frozen weight that back-propagates to its input only.
//!
//! candle's autograd computes the gradient of both operands of every tracked matmul, so a frozen
//! `[out, in]` weight would cost a full extra matmul per projection per step for a gradient no
//! one reads. LoRA training multiplies by ~200 frozen weights per pass; this op runs the same
//! forward (candle's matmul) and returns only `∂L/∂x = ∂L/∂y · W` in its backward.

use super::ops::{on_cpu_f32, slice};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct FrozenMatmul {
    /// `[out, in]` f32, on the CPU.
    weight: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = tensor(storage, layout, self.name())?.matmul(&self.weight.t()?)?;
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
    if on_cpu_f32(&[x, weight]) && x.rank() == 2 {
        x.contiguous()?.apply_op1(FrozenMatmul { weight: weight.clone() })
    } else {
        x.matmul(&weight.t()?)
    }
}

/// `x Wᵀ + s (x Aᵀ) Bᵀ` in one op: the frozen matmul and the adapter's path, whose backward
/// gives `x` (through `W` and the adapter), `A` and `B` their gradients and `W` none.
struct LoraMatmul {
    weight: Tensor,
    scale: f64,
}

/// A copy of a contiguous f32 CPU storage as a tensor, for candle's matmul.
fn tensor(s: &CpuStorage, l: &Layout, op: &str) -> Result<Tensor> {
    Tensor::from_slice(slice(s, l, op)?, l.dims(), &Device::Cpu)
}

impl CustomOp3 for LoraMatmul {
    fn name(&self) -> &'static str {
        "lora-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let (x, a, b) = (tensor(s1, l1, op)?, tensor(s2, l2, op)?, tensor(s3, l3, op)?);
        let y = x.matmul(&self.weight.t()?)?;
        let low = ((x.matmul(&a.t()?)? * self.scale)?).matmul(&b.t()?)?;
        let shape = y.shape().clone();
        let mut y: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let low: Vec<f32> = low.flatten_all()?.to_vec1()?;
        y.par_chunks_mut(4096)
            .zip(low.par_chunks(4096))
            .for_each(|(y, l)| y.iter_mut().zip(l).for_each(|(y, l)| *y += l));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, dy) = (x.detach(), a.detach(), b.detach(), dy.detach());
        // g = s dy B: the gradient reaching the adapter's rank-r activations.
        let g = (dy.matmul(&b)? * self.scale)?;
        let dx = (dy.matmul(&self.weight)? + g.matmul(&a)?)?;
        let da = g.t()?.matmul(&x)?;
        let db = (dy.t()?.matmul(&x.matmul(&a.t()?)?)? * self.scale)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

/// `x Wᵀ + scale · (x Aᵀ) Bᵀ` for a 2-D `x`, a frozen `W` and trainable `A` (`[r, in]`) and `B`
/// (`[out, r]`); composite ops off the CPU.
pub fn lora_linear(x: &Tensor, weight: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    if on_cpu_f32(&[x, weight, a, b]) && x.rank() == 2 {
        let op = LoraMatmul { weight: weight.clone(), scale };
        return x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op);
    }
    frozen_linear(x, weight)? + (x.matmul(&a.t()?)?.matmul(&b.t()?)? * scale)?
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

    #[test]
    fn the_fused_lora_matmul_matches_the_composite_in_value_and_every_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3), &dev)?)?;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (5, 2), &dev)?)?;
        let target = Tensor::randn(0f32, 1.0, (4, 5), &dev)?;
        let fused = lora_linear(x.as_tensor(), &w, a.as_tensor(), b.as_tensor(), 1.5)?;
        let plain = (x.as_tensor().matmul(&w.t()?)?
            + (x.as_tensor().matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * 1.5)?)?;
        let diff = (&fused - &plain)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "forward differs by {diff}");
        let loss = |y: &Tensor| (y * &target)?.sqr()?.sum_all();
        let (gf, gp) = (loss(&fused)?.backward()?, loss(&plain)?.backward()?);
        for (v, what) in [(&x, "x"), (&a, "A"), (&b, "B")] {
            let (p, q) = (gf.get(v.as_tensor()).unwrap(), gp.get(v.as_tensor()).unwrap());
            let diff = (p - q)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let scale = q.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-4 * scale.max(1.0), "gradient of {what} differs by {diff}");
        }
        Ok(())
    }
}
