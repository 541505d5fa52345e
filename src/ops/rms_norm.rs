//! RMSNorm over the last dimension, `y = w · x / √(mean(x²) + eps)`, forward and backward.
//!
//! Any leading dimensions (`[.., d]`, weight `[d]`). Statistics are f32 whatever the storage dtype; the
//! normalised value is rounded to the storage dtype before the weight multiplies it, as transformers'
//! `LlamaRMSNorm` does (`weight * hidden.to(input_dtype)`), so bf16 results match it bit for bit up to
//! the order of the sum.
//!
//! Backward, with `r = 1/√(mean(x²) + eps)`, `g = w ⊙ dy`, `n = d`:
//! `dx = r·g − x · r³/n · Σ(g ⊙ x)` (one fused kernel; the forward's `r` is recomputed, not stored) and
//! `dw = Σ_rows dy ⊙ x·r` (composed from candle ops, only when the weight is being trained: the base
//! model's norms are frozen in LoRA training).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D};
use rayon::prelude::*;

use super::{contiguous, cpu_output, rows_per_task, Elem};

/// RMSNorm of `x: [.., d]` with `weight: [d]` (same dtype as `x`). Non-contiguous inputs are copied.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let _profile = super::profile::span("rms_norm", super::profile::Phase::Forward);
    let d = x.dim(D::Minus1)?;
    if weight.dims() != [d] {
        candle_core::bail!("rms_norm: weight shape {:?} for input {:?}", weight.dims(), x.dims());
    }
    if weight.dtype() != x.dtype() {
        candle_core::bail!("rms_norm: weight is {:?} but input is {:?}", weight.dtype(), x.dtype());
    }
    x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })
}

/// The same function composed from differentiable candle ops (the slow reference).
pub fn reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let inv_rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let normed = x32.broadcast_mul(&inv_rms)?.to_dtype(dtype)?;
    normed.broadcast_mul(weight)
}

struct RmsNorm {
    eps: f32,
}

struct RmsNormBackward {
    eps: f32,
}

/// Σx² with eight independent accumulators (vectorises; also a little more accurate than one).
#[inline]
fn sum_sq<T: Elem>(x: &[T]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for k in 0..8 {
            let v = c[k].to_f32();
            acc[k] += v * v;
        }
    }
    tail.iter().fold(acc.iter().sum(), |s, v| s + v.to_f32() * v.to_f32())
}

/// (Σx², Σ w·dy·x) in one pass.
#[inline]
fn sums_bwd<T: Elem>(x: &[T], w: &[T], dy: &[T]) -> (f32, f32) {
    let (mut ss, mut gx) = ([0f32; 8], [0f32; 8]);
    let n8 = x.len() / 8 * 8;
    for i in (0..n8).step_by(8) {
        for k in 0..8 {
            let v = x[i + k].to_f32();
            ss[k] += v * v;
            gx[k] += w[i + k].to_f32() * dy[i + k].to_f32() * v;
        }
    }
    let (mut ss, mut gx) = (ss.iter().sum::<f32>(), gx.iter().sum::<f32>());
    for i in n8..x.len() {
        let v = x[i].to_f32();
        ss += v * v;
        gx += w[i].to_f32() * dy[i].to_f32() * v;
    }
    (ss, gx)
}

fn forward_cpu<T: Elem>(x: &[T], w: &[T], eps: f32, y: &mut [T]) {
    let d = w.len();
    x.par_chunks(d).zip(y.par_chunks_mut(d)).with_min_len(rows_per_task(d)).for_each(|(xr, yr)| {
        let r = 1.0 / (sum_sq(xr) / d as f32 + eps).sqrt();
        for ((yo, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
            let normed = T::from_f32(xv.to_f32() * r).to_f32();
            *yo = T::from_f32(normed * wv.to_f32());
        }
    });
}

fn backward_cpu<T: Elem>(x: &[T], w: &[T], dy: &[T], eps: f32, dx: &mut [T]) {
    let d = w.len();
    let n = d as f32;
    x.par_chunks(d).zip(dy.par_chunks(d)).zip(dx.par_chunks_mut(d)).with_min_len(rows_per_task(d)).for_each(
        |((xr, dyr), dxr)| {
            let (ss, gx) = sums_bwd(xr, w, dyr);
            let r = 1.0 / (ss / n + eps).sqrt();
            let c = gx * r * r * r / n;
            for i in 0..d {
                dxr[i] = T::from_f32(r * w[i].to_f32() * dyr[i].to_f32() - c * xr[i].to_f32());
            }
        },
    );
}

fn check_shapes(x: &Layout, w: &Layout, op: &str) -> Result<(usize, usize)> {
    let d = w.shape().elem_count();
    let n = x.shape().elem_count();
    if x.dims().last() != Some(&d) || w.dims().len() != 1 {
        candle_core::bail!("{op}: input {:?} and weight {:?} do not fit", x.dims(), w.dims());
    }
    Ok((n / d.max(1), d))
}

impl RmsNorm {
    fn cpu<T: Elem + WithDType>(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<CpuStorage> {
        check_shapes(xl, wl, "rms_norm")?;
        let x = contiguous(T::cpu_storage_as_slice(x)?, xl, "rms_norm", "input")?;
        let w = contiguous(T::cpu_storage_as_slice(w)?, wl, "rms_norm", "weight")?;
        let mut y = cpu_output::<T>(x.len());
        forward_cpu(x, w, self.eps, &mut y);
        Ok(T::to_cpu_storage_owned(y))
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "candor-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = with_float_type!(x.dtype(), "rms_norm", T => self.cpu::<T>(x, xl, w, wl)?);
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = with_float_type!(x.dtype(), "rms_norm", T => gpu::forward::<T>(x, xl, w, wl, self.eps)?);
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _profile = super::profile::span("rms_norm", super::profile::Phase::Backward);
        let dy = dy.contiguous()?;
        let dx = if x.track_op() {
            Some(x.apply_op3_no_bwd(w, &dy, &RmsNormBackward { eps: self.eps })?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let d = w.dim(0)?;
            let x32 = x.to_dtype(DType::F32)?;
            let inv_rms = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps as f64)?.sqrt()?.recip()?;
            let xhat = x32.broadcast_mul(&inv_rms)?;
            let dw = (dy.to_dtype(DType::F32)? * xhat)?.reshape(((), d))?.sum(0)?;
            Some(dw.to_dtype(w.dtype())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl RmsNormBackward {
    fn cpu<T: Elem + WithDType>(
        &self,
        (x, xl): (&CpuStorage, &Layout),
        (w, wl): (&CpuStorage, &Layout),
        (dy, dyl): (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        check_shapes(xl, wl, "rms_norm backward")?;
        if dyl.shape() != xl.shape() {
            candle_core::bail!("rms_norm backward: gradient {:?} for input {:?}", dyl.dims(), xl.dims());
        }
        let x = contiguous(T::cpu_storage_as_slice(x)?, xl, "rms_norm backward", "input")?;
        let w = contiguous(T::cpu_storage_as_slice(w)?, wl, "rms_norm backward", "weight")?;
        let dy = contiguous(T::cpu_storage_as_slice(dy)?, dyl, "rms_norm backward", "gradient")?;
        let mut dx = cpu_output::<T>(x.len());
        backward_cpu(x, w, dy, self.eps, &mut dx);
        Ok(T::to_cpu_storage_owned(dx))
    }
}

impl CustomOp3 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "candor-rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        w: &CpuStorage,
        wl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = ((x, xl), (w, wl), (dy, dyl));
        let out =
            with_float_type!(x.dtype(), "rms_norm backward", T => self.cpu::<T>(args.0, args.1, args.2)?);
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        w: &candle_core::CudaStorage,
        wl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let args = ((x, xl), (w, wl), (dy, dyl));
        let out = with_float_type!(x.dtype(), "rms_norm backward", T =>
            gpu::backward::<T>(args.0, args.1, args.2, self.eps)?);
        Ok((out, xl.shape().clone()))
    }
}

/// Launches `kernels/rms_norm.cu`: one warp per row, f32 accumulation.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, WithDType};

    use crate::ops::cuda::{func, output, u32_arg, view, warp_per_row, RMS_NORM_PTX};

    const MODULE: &str = "candor_rms_norm";
    const OP: &str = "rms_norm";

    pub fn forward<T: CudaDType + DeviceRepr + WithDType>(
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
        eps: f32,
    ) -> Result<CudaStorage> {
        let (rows, d) = super::check_shapes(xl, wl, "rms_norm")?;
        let dev = &x.device;
        let (xv, wv) = (view::<T>(x, xl, OP, "input")?, view::<T>(w, wl, OP, "weight")?);
        let mut y = output::<T>(dev, rows * d)?;
        let f = func(dev, MODULE, RMS_NORM_PTX, "rms_norm_fwd", T::DTYPE)?;
        let stream = dev.cuda_stream();
        {
            let mut b = stream.launch_builder(&f);
            let (rows_u, d_u) = (u32_arg(OP, "rows", rows)?, u32_arg(OP, "width", d)?);
            b.arg(&xv).arg(&wv).arg(&mut y).arg(&rows_u).arg(&d_u).arg(&eps);
            // SAFETY: argument list matches `rms_norm_fwd_*` in kernels/rms_norm.cu.
            unsafe { b.launch(warp_per_row(rows)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    pub fn backward<T: CudaDType + DeviceRepr + WithDType>(
        (x, xl): (&CudaStorage, &Layout),
        (w, wl): (&CudaStorage, &Layout),
        (dy, dyl): (&CudaStorage, &Layout),
        eps: f32,
    ) -> Result<CudaStorage> {
        let (rows, d) = super::check_shapes(xl, wl, "rms_norm backward")?;
        if dyl.shape() != xl.shape() {
            candle_core::bail!("rms_norm backward: gradient {:?} for input {:?}", dyl.dims(), xl.dims());
        }
        let dev = &x.device;
        let (xv, wv, dyv) = (
            view::<T>(x, xl, OP, "input")?,
            view::<T>(w, wl, OP, "weight")?,
            view::<T>(dy, dyl, OP, "gradient")?,
        );
        let mut dx = output::<T>(dev, rows * d)?;
        let f = func(dev, MODULE, RMS_NORM_PTX, "rms_norm_bwd", T::DTYPE)?;
        let stream = dev.cuda_stream();
        {
            let mut b = stream.launch_builder(&f);
            let (rows_u, d_u) = (u32_arg(OP, "rows", rows)?, u32_arg(OP, "width", d)?);
            b.arg(&xv).arg(&wv).arg(&dyv).arg(&mut dx).arg(&rows_u).arg(&d_u).arg(&eps);
            // SAFETY: argument list matches `rms_norm_bwd_*` in kernels/rms_norm.cu.
            unsafe { b.launch(warp_per_row(rows)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(dx, dev.clone()))
    }
}
