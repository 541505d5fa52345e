//! AdamW's update of one parameter, in place, in two elementwise passes: the moments `[m; v]` (one
//! `[2, ..]` f32 tensor per parameter) from the gradient, then the parameter from the moments.
//!
//! Composed from candle ops the same update is about fifteen kernels per parameter, each allocating
//! its output, plus a copy into the variable (`Var::set`); on a GPU with a few hundred LoRA tensors that
//! is thousands of launches per optimizer step. Here it is two launches and no allocation. Each
//! operation is rounded on its own, in the order the composed ops round them ([`reference`]), so the
//! result is bit for bit the composed one on the CPU and on the GPU (`kernels/adamw.cu` uses
//! `__fmul_rn` and friends: no fused multiply-adds).

use candle_core::{CpuStorage, DType, InplaceOp2, Layout, Result, Tensor};
use rayon::prelude::*;

const OP: &str = "adamw";

/// The update's constants at step `t` (from 1), as f32: what candle's `Tensor * f64` and `Tensor / f64`
/// hand their kernels (`affine`, with the reciprocal for a division).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scalars {
    b1: f32,
    /// 1 − β1
    c1: f32,
    b2: f32,
    /// 1 − β2
    c2: f32,
    /// 1 / √(1 − β2^t)
    inv_b2: f32,
    eps: f32,
    /// lr / (1 − β1^t)
    step: f32,
    /// 1 − lr · weight_decay
    decay: f32,
    /// what the gradient is multiplied by first (gradient clipping's factor; 1 for none)
    grad_scale: f32,
}

impl Scalars {
    pub fn new(lr: f64, beta1: f64, beta2: f64, eps: f64, weight_decay: f64, t: i32) -> Scalars {
        let bias1 = 1.0 - beta1.powi(t);
        let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        Scalars {
            b1: beta1 as f32,
            c1: (1.0 - beta1) as f32,
            b2: beta2 as f32,
            c2: (1.0 - beta2) as f32,
            inv_b2: (1.0 / bias2_sqrt) as f32,
            eps: eps as f32,
            step: (lr / bias1) as f32,
            decay: (1.0 - lr * weight_decay) as f32,
            grad_scale: 1.0,
        }
    }

    /// The gradient multiplied by `factor` first, as `grad * factor` rounds it (the clipping factor,
    /// folded in here rather than run as one more op per tensor).
    pub fn with_grad_scale(self, factor: f64) -> Scalars {
        Scalars { grad_scale: factor as f32, ..self }
    }
}

/// Updates `param` (f32, contiguous) and its moments `mv` (f32, contiguous, `[2, ..param's shape]`: m
/// then v) in place from `grad` (f32, the parameter's shape; multiplied by the scalars' gradient scale).
pub fn adamw_step(param: &Tensor, mv: &Tensor, grad: &Tensor, s: &Scalars) -> Result<()> {
    if grad.dims() != param.dims() || mv.dims() != moments_shape(param.dims()).as_slice() {
        candle_core::bail!(
            "{OP}: parameter {:?}, gradient {:?} and moments {:?} do not fit",
            param.dims(),
            grad.dims(),
            mv.dims()
        );
    }
    if [param, mv, grad].iter().any(|x| x.dtype() != DType::F32) {
        candle_core::bail!("{OP}: parameters, gradients and moments must be f32");
    }
    if !param.is_contiguous() || !mv.is_contiguous() {
        candle_core::bail!("{OP}: the parameter and its moments must be contiguous");
    }
    mv.inplace_op2(&grad.contiguous()?, &Moments(*s))?;
    param.inplace_op2(mv, &Update(*s))
}

/// `[2, ..dims]`: the shape of the moments of a parameter of shape `dims`.
pub fn moments_shape(dims: &[usize]) -> Vec<usize> {
    let mut shape = vec![2];
    shape.extend_from_slice(dims);
    shape
}

/// The same update composed from candle ops, as the optimizer ran it before (the tests' reference):
/// the new parameter, m and v.
#[allow(clippy::too_many_arguments)]
pub fn reference(
    param: &Tensor,
    m: &Tensor,
    v: &Tensor,
    grad: &Tensor,
    lr: f64,
    (beta1, beta2, eps): (f64, f64, f64),
    weight_decay: f64,
    t: i32,
) -> Result<(Tensor, Tensor, Tensor)> {
    let bias1 = 1.0 - beta1.powi(t);
    let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
    let m = ((m * beta1)? + (grad * (1.0 - beta1))?)?;
    let v = ((v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
    let denom = ((v.sqrt()? / bias2_sqrt)? + eps)?;
    let update = (m.div(&denom)? * (lr / bias1))?;
    let decayed = (param * (1.0 - lr * weight_decay))?;
    Ok(((decayed - update)?, m, v))
}

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

fn moments_cpu(mv: &mut [f32], g: &[f32], s: &Scalars) {
    let (m, v) = mv.split_at_mut(g.len());
    m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)).zip(g.par_chunks(CHUNK)).for_each(|((m, v), g)| {
        for ((m, v), &g) in m.iter_mut().zip(v.iter_mut()).zip(g) {
            let g = g * s.grad_scale;
            *m = *m * s.b1 + g * s.c1;
            *v = *v * s.b2 + (g * g) * s.c2;
        }
    });
}

fn update_cpu(p: &mut [f32], mv: &[f32], s: &Scalars) {
    let (m, v) = mv.split_at(p.len());
    p.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).zip(v.par_chunks(CHUNK)).for_each(|((p, m), v)| {
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            let denom = v.sqrt() * s.inv_b2 + s.eps;
            *p = *p * s.decay - (m / denom) * s.step;
        }
    });
}

/// [`super::f32_slice`], mutably: the f32 elements a contiguous layout covers.
fn f32_slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout, what: &str) -> Result<&'a mut [f32]> {
    let (CpuStorage::F32(v), Some((a, b))) = (s, l.contiguous_offsets()) else {
        candle_core::bail!("{OP}: {what} must be contiguous f32")
    };
    Ok(&mut v[a..b])
}

/// `[m; v]` from the gradient, in place.
struct Moments(Scalars);

/// The parameter from `[m; v]`, in place.
struct Update(Scalars);

impl InplaceOp2 for Moments {
    fn name(&self) -> &'static str {
        "candor-adamw-moments"
    }

    fn cpu_fwd(&self, mv: &mut CpuStorage, ml: &Layout, g: &CpuStorage, gl: &Layout) -> Result<()> {
        let g = super::f32_slice(g, gl, OP, "the gradient")?;
        moments_cpu(f32_slice_mut(mv, ml, "the moments")?, g, &self.0);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        mv: &mut candle_core::CudaStorage,
        ml: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> Result<()> {
        let s = &self.0;
        gpu::launch("adamw_moments", (mv, ml), (g, gl), &[s.grad_scale, s.b1, s.c1, s.b2, s.c2])
    }
}

impl InplaceOp2 for Update {
    fn name(&self) -> &'static str {
        "candor-adamw-update"
    }

    fn cpu_fwd(&self, p: &mut CpuStorage, pl: &Layout, mv: &CpuStorage, ml: &Layout) -> Result<()> {
        let mv = super::f32_slice(mv, ml, OP, "the moments")?;
        update_cpu(f32_slice_mut(p, pl, "the parameter")?, mv, &self.0);
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        p: &mut candle_core::CudaStorage,
        pl: &Layout,
        mv: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> Result<()> {
        let s = &self.0;
        gpu::launch("adamw_update", (p, pl), (mv, ml), &[s.inv_b2, s.eps, s.step, s.decay])
    }
}

/// Launches `kernels/adamw.cu`: elementwise, grid-stride, in place.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{CudaStorage, Layout, Result};

    use super::OP;
    use crate::ops::cuda::{elementwise, view, ADAMW_PTX};

    /// `kernel(dst, src, n, scalars..)` where `dst` (updated in place) is `[2, n]` for the moments and
    /// `[n]` for the parameter, and `src` the other way round.
    pub fn launch(
        kernel: &str,
        (dst, dl): (&mut CudaStorage, &Layout),
        (src, sl): (&CudaStorage, &Layout),
        scalars: &[f32],
    ) -> Result<()> {
        // the parameter's elements: the smaller side (the other is its [2, n] moments)
        let n = dl.shape().elem_count().min(sl.shape().elem_count()) as u64;
        let Some((a, b)) = dl.contiguous_offsets() else {
            candle_core::bail!("{OP}: {kernel}: not contiguous")
        };
        let dev = dst.device.clone();
        let src = view::<f32>(src, sl, OP, "input")?;
        let mut dst = dst.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
        let f = dev.get_or_load_custom_func(kernel, "candor_adamw", ADAMW_PTX)?.into_cuda_function();
        let stream = dev.cuda_stream();
        let mut args = stream.launch_builder(&f);
        args.arg(&mut dst).arg(&src).arg(&n);
        for s in scalars {
            args.arg(s);
        }
        // SAFETY: argument lists match `adamw_moments(mv, g, n, scale, b1, c1, b2, c2)` and
        // `adamw_update(p, mv, n, inv_b2, eps, step, decay)` in kernels/adamw.cu.
        unsafe { args.launch(elementwise(n as usize)) }.w()?;
        Ok(())
    }
}
