//! Frozen linear: `y = x · Wᵀ (+ b)` whose backward returns only the input gradient.
//!
//! candle's matmul backward computes a weight-sized gradient for both operands and keeps it in the
//! gradient store until the step ends. For frozen base weights that is wasted FLOPs and memory (for
//! a 1B model, a second copy of the model per step). This op records only `x` in the graph.
//!
//! On CUDA the forward runs through `BackendStorage::matmul`; on the CPU both directions go through
//! [`cpu_frozen_product`] in every float dtype: bf16 on AMX where the CPU has it, otherwise f32 through
//! [`cpu_gemm`](super::cpu_gemm), so large products reach OpenBLAS where the system has it.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::amx::{Lhs, Rhs, Rows};
use super::cpu_gemm::{product, View};
use super::{contiguous, cpu_f32_elems, cpu_storage, f32_elems};

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

/// Which product of a frozen weight `W [out, in]` [`cpu_frozen_product`] computes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    /// `x · Wᵀ`, `x [rows, in]` (the forward).
    Forward,
    /// `dy · W`, `dy [rows, out]` (the input gradient).
    InputGrad,
}

/// `(rows, k, n)` of the product `side` names: `x [rows, k]` times the weight as used, `[k, n]`.
fn product_dims(xl: &Layout, weight: &Tensor, side: Side) -> Result<(usize, usize, usize)> {
    let (out_f, in_f) = weight.dims2()?;
    let (k, n) = match side {
        Side::Forward => (in_f, out_f),
        Side::InputGrad => (out_f, in_f),
    };
    Ok((xl.shape().elem_count() / k.max(1), k, n))
}

/// `f(amx, x, W or Wᵀ)` where `x` and the weight are both bf16 and the CPU has AMX; `None` otherwise.
fn on_amx<R>(
    x: &CpuStorage,
    xl: &Layout,
    weight: &Tensor,
    side: Side,
    f: impl FnOnce(&super::amx::Amx, Lhs, Rhs) -> R,
) -> Result<Option<R>> {
    let (ws, wl) = weight.storage_and_layout();
    let (Some(amx), CpuStorage::BF16(xd), CpuStorage::BF16(wd)) =
        (super::amx::get(), x, cpu_storage(&ws, OP)?)
    else {
        return Ok(None);
    };
    let (rows, k, _) = product_dims(xl, weight, side)?;
    let (out_f, in_f) = wl.shape().dims2()?;
    let lhs = Lhs::Bf16(Rows::matrix(contiguous(xd, xl, OP, "x")?, rows, k));
    let w = Rows::matrix(contiguous(wd, wl, OP, "weight")?, out_f, in_f);
    Ok(Some(f(amx, lhs, if side == Side::Forward { Rhs::Transposed(w) } else { Rhs::Plain(w) })))
}

/// `dst (+)= x·Wᵀ` or `x·W` (by `side`) on the CPU, `x` contiguous, `dst` a row-major `[rows, n]`
/// buffer: on AMX where `x` and `W` are both bf16 and the CPU has it ([`super::amx`]: bf16 products,
/// f32 sums); otherwise in f32 through [`cpu_gemm`](super::cpu_gemm), from `x32` (`x` already widened,
/// where the caller has it) or `x` widened here, and `W` widened per call.
pub(crate) fn cpu_frozen_product(
    x: &CpuStorage,
    xl: &Layout,
    x32: Option<&[f32]>,
    weight: &Tensor,
    side: Side,
    dst: &mut [f32],
    accumulate: bool,
) -> Result<()> {
    let (rows, k, n) = product_dims(xl, weight, side)?;
    if dst.len() != rows * n {
        candle_core::bail!("{OP}: output of {} values for [{rows}, {n}]", dst.len());
    }
    let on = on_amx(x, xl, weight, side, |amx, lhs, rhs| amx.product(lhs, rhs, dst, 0, n, accumulate))?;
    if on.is_some() {
        return Ok(());
    }
    let x32 = match x32 {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => f32_elems(x, Some(xl), OP, "x")?,
    };
    let (ws, wl) = weight.storage_and_layout();
    let w = f32_elems(cpu_storage(&ws, OP)?, Some(wl), OP, "weight")?;
    let (out_f, in_f) = wl.shape().dims2()?;
    let w = View::matrix(&w, out_f, in_f);
    let p = product(View::matrix(&x32, rows, k), if side == Side::Forward { w.t() } else { w });
    if accumulate {
        p.add_to(dst, 0, n)
    } else {
        p.write(dst, 0, n)
    }
    Ok(())
}

/// [`cpu_frozen_product`] into a new `[rows, n]` buffer: on AMX written without being filled first
/// (a fill was one more pass over every projection's output), otherwise a zeroed buffer written.
pub(crate) fn cpu_frozen_output(
    x: &CpuStorage,
    xl: &Layout,
    x32: Option<&[f32]>,
    weight: &Tensor,
    side: Side,
) -> Result<Vec<f32>> {
    if let Some(y) = on_amx(x, xl, weight, side, |amx, lhs, rhs| amx.product_new(lhs, rhs))? {
        return Ok(y);
    }
    let (rows, _, n) = product_dims(xl, weight, side)?;
    let mut y = super::cpu_output::<f32>(rows * n);
    cpu_frozen_product(x, xl, x32, weight, side, &mut y, false)?;
    Ok(y)
}

/// A new `[rows, out]` f32 buffer holding the bias in every row (zeros without one).
pub(crate) fn cpu_bias_rows(bias: Option<&Tensor>, rows: usize, out_f: usize) -> Result<Vec<f32>> {
    let mut y = super::cpu_output::<f32>(rows * out_f);
    if let Some(b) = bias {
        let (bs, bl) = b.storage_and_layout();
        let b = cpu_f32_elems(&bs, Some(bl), OP, "bias")?;
        y.chunks_exact_mut(out_f).for_each(|row| row.copy_from_slice(&b));
    }
    Ok(y)
}

fn out_shape(x_layout: &Layout, out_features: usize) -> Shape {
    let mut dims = x_layout.shape().dims().to_vec();
    *dims.last_mut().unwrap() = out_features;
    Shape::from(dims)
}

#[cfg(feature = "cuda")]
fn forward_storage<S: candle_core::backend::BackendStorage>(
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
        let (out_f, in_f) = self.weight.dims2()?;
        let rows = x_layout.shape().elem_count() / in_f;
        let y = match &self.bias {
            None => cpu_frozen_output(x, x_layout, None, &self.weight, Side::Forward)?,
            Some(b) => {
                let mut y = cpu_bias_rows(Some(b), rows, out_f)?;
                cpu_frozen_product(x, x_layout, None, &self.weight, Side::Forward, &mut y, true)?;
                y
            }
        };
        Ok((
            super::cpu_storage_of(y, candle_core::backend::BackendStorage::dtype(x))?,
            out_shape(x_layout, out_f),
        ))
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
        let dx = if dy.device().is_cpu() {
            let dy = dy.contiguous()?;
            let (dys, dyl) = dy.storage_and_layout();
            let dx = cpu_frozen_output(cpu_storage(&dys, OP)?, dyl, None, &self.weight, Side::InputGrad)?;
            super::cpu_tensor_of(dx, (rows, in_features), grad_y.dtype())?
        } else {
            dy.matmul(&self.weight)?
        };
        *dims.last_mut().unwrap() = in_features;
        Ok(Some(dx.reshape(dims)?))
    }
}
