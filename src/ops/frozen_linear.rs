//! Frozen linear: `y = x · Wᵀ (+ b)` whose backward returns only the input gradient.
//!
//! candle's matmul backward computes a weight-sized gradient for both operands and keeps it in the
//! gradient store until the step ends. For frozen base weights that is wasted FLOPs and memory (for
//! a 1B model, a second copy of the model per step). This op records only `x` in the graph.
//!
//! Forward runs on any backend through `BackendStorage::matmul`, so the CPU and CUDA builds share it;
//! f32 on the CPU goes through [`cpu_gemm`](super::cpu_gemm) instead, in both directions, so large
//! products reach OpenBLAS where the system has it.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::cpu_gemm::{product, View};
use super::{cpu_f32, f32_slice};

struct FrozenLinear {
    weight: Tensor,
    bias: Option<Tensor>,
}

/// `x [.., in] → [.., out]` with `weight [out, in]` and `bias [out]`, neither receiving a gradient.
pub fn frozen_linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let _profile = super::profile::span("frozen_linear", super::profile::Phase::Forward);
    let (out_features, in_features) = weight.dims2()?;
    let x_in = x.dim(candle_core::D::Minus1)?;
    if x_in != in_features {
        candle_core::bail!(
            "frozen_linear: input has {x_in} features, weight [{out_features}, {in_features}]"
        );
    }
    if let Some(b) = bias {
        if b.dims() != [out_features] {
            candle_core::bail!("frozen_linear: bias shape {:?}, expected [{out_features}]", b.dims());
        }
    }
    let x = x.contiguous()?;
    x.apply_op1(FrozenLinear {
        weight: weight.contiguous()?,
        bias: bias.map(|b| b.contiguous()).transpose()?,
    })
}

const OP: &str = "frozen_linear";

/// `x·Wᵀ (+ bias)` in f32 on the CPU: `x [rows, in]`, `W [out, in]`, a new `[rows, out]` buffer.
pub(crate) fn cpu_linear(x: View, w: View, bias: Option<&[f32]>) -> Vec<f32> {
    let (rows, out_f) = (x.rows, w.rows);
    match bias {
        Some(bias) => {
            let mut y = super::cpu_output::<f32>(rows * out_f);
            y.chunks_exact_mut(out_f).for_each(|row| row.copy_from_slice(bias));
            product(x, w.t()).add_to(&mut y, 0, out_f);
            y
        }
        None => product(x, w.t()).to_vec(),
    }
}

fn out_shape(x_layout: &Layout, out_features: usize) -> Shape {
    let mut dims = x_layout.shape().dims().to_vec();
    *dims.last_mut().unwrap() = out_features;
    Shape::from(dims)
}

fn forward_storage<S: BackendStorage>(
    x: &S,
    x_layout: &Layout,
    w: &S,
    w_layout: &Layout,
    bias: Option<(&S, &Layout)>,
) -> Result<(S, Shape)> {
    let (out_features, in_features) = w_layout.shape().dims2()?;
    let rows = x_layout.shape().elem_count() / in_features;
    let x2 = Layout::contiguous_with_offset((rows, in_features), x_layout.start_offset());
    let wt = w_layout.transpose(0, 1)?;
    let mut y = x.matmul(w, (1, rows, out_features, in_features), &x2, &wt)?;
    if let Some((b, b_layout)) = bias {
        let y_layout = Layout::contiguous((rows, out_features));
        let b_bcast = b_layout.broadcast_as((rows, out_features))?;
        y = y.binary_impl::<candle_core::op::Add>(b, &y_layout, &b_bcast)?;
    }
    Ok((y, out_shape(x_layout, out_features)))
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, x_layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (w, w_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w else {
            candle_core::bail!("frozen_linear: weight not on cpu")
        };
        if let (CpuStorage::F32(_), CpuStorage::F32(_)) = (x, w) {
            let (out_f, in_f) = w_layout.shape().dims2()?;
            let x = f32_slice(x, x_layout, OP, "x")?;
            let x = View::matrix(x, x.len() / in_f, in_f);
            let w = View::matrix(f32_slice(w, w_layout, OP, "weight")?, out_f, in_f);
            let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
            let bias = bias.as_ref().map(|(bs, bl)| cpu_f32(bs, bl, OP, "bias")).transpose()?;
            return Ok((CpuStorage::F32(cpu_linear(x, w, bias)), out_shape(x_layout, out_f)));
        }
        match &self.bias {
            None => forward_storage(x, x_layout, w, w_layout, None),
            Some(b) => {
                let (bs, bl) = b.storage_and_layout();
                let candle_core::Storage::Cpu(bs) = &*bs else {
                    candle_core::bail!("frozen_linear: bias not on cpu")
                };
                forward_storage(x, x_layout, w, w_layout, Some((bs, bl)))
            }
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (w, w_layout) = self.weight.storage_and_layout();
        let candle_core::Storage::Cuda(w) = &*w else {
            candle_core::bail!("frozen_linear: weight not on cuda")
        };
        match &self.bias {
            None => forward_storage(x, x_layout, w, w_layout, None),
            Some(b) => {
                let (bs, bl) = b.storage_and_layout();
                let candle_core::Storage::Cuda(bs) = &*bs else {
                    candle_core::bail!("frozen_linear: bias not on cuda")
                };
                forward_storage(x, x_layout, w, w_layout, Some((bs, bl)))
            }
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad_y: &Tensor) -> Result<Option<Tensor>> {
        let _profile = super::profile::span("frozen_linear", super::profile::Phase::Backward);
        // dx = dy · W ; W is a constant here, so no weight gradient exists anywhere.
        let out_features = self.weight.dim(0)?;
        let in_features = self.weight.dim(1)?;
        let mut dims = grad_y.dims().to_vec();
        let rows = grad_y.elem_count() / out_features;
        let dy = grad_y.reshape((rows, out_features))?;
        let dx = match (dy.device(), dy.dtype(), self.weight.dtype()) {
            (candle_core::Device::Cpu, candle_core::DType::F32, candle_core::DType::F32) => {
                let dy = dy.contiguous()?;
                let (dys, dyl) = dy.storage_and_layout();
                let (ws, wl) = self.weight.storage_and_layout();
                let dy = View::matrix(cpu_f32(&dys, dyl, OP, "dy")?, rows, out_features);
                let w = View::matrix(cpu_f32(&ws, wl, OP, "weight")?, out_features, in_features);
                Tensor::from_vec(product(dy, w).to_vec(), (rows, in_features), grad_y.device())?
            }
            _ => dy.matmul(&self.weight)?,
        };
        *dims.last_mut().unwrap() = in_features;
        Ok(Some(dx.reshape(dims)?))
    }
}
