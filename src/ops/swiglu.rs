//! SwiGLU, `y = silu(gate) · up`, forward and backward, elementwise over any shape.
//!
//! As in transformers (`act_fn(gate_proj(x)) * up_proj(x)`), `silu(gate)` is rounded to the storage
//! dtype before it multiplies `up`; both are computed in f32. Backward, with `σ = sigmoid(gate)`:
//! `d_up = dy · silu(gate)`, `d_gate = dy · up · σ · (1 + gate · (1 − σ))`, both from one kernel that
//! writes them into one `[2, ..]` buffer (the two gradients are views into it).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{contiguous, cpu_output, Elem};

/// `silu(gate) * up` for two tensors of the same shape and dtype. Non-contiguous inputs are copied.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let _profile = super::profile::span("swiglu", super::profile::Phase::Forward);
    if gate.dims() != up.dims() || gate.dtype() != up.dtype() {
        candle_core::bail!(
            "swiglu: gate {:?} {:?} and up {:?} {:?} differ",
            gate.dims(),
            gate.dtype(),
            up.dims(),
            up.dtype()
        );
    }
    gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)
}

/// The same function composed from differentiable candle ops (the slow reference).
pub fn reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

struct SwiGlu;

struct SwiGluBackward;

/// Elements per rayon task.
const CHUNK: usize = 16 * 1024;

#[inline(always)]
fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + super::exp_f32(-g))
}

fn forward_cpu<T: Elem>(gate: &[T], up: &[T], y: &mut [T]) {
    y.par_chunks_mut(CHUNK).zip(gate.par_chunks(CHUNK)).zip(up.par_chunks(CHUNK)).for_each(|((y, g), u)| {
        super::simd::vectorised(
            #[inline(always)]
            || {
                for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
                    let g = g.to_f32();
                    let silu = T::from_f32(g * sigmoid(g)).to_f32();
                    *y = T::from_f32(silu * u.to_f32());
                }
            },
        )
    });
}

/// `out[..n]` = d_gate, `out[n..]` = d_up.
fn backward_cpu<T: Elem>(gate: &[T], up: &[T], dy: &[T], out: &mut [T]) {
    let (d_gate, d_up) = out.split_at_mut(gate.len());
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)).zip(dy.par_chunks(CHUNK)))
        .for_each(|((dg, du), ((g, u), dy))| {
            super::simd::vectorised(
                #[inline(always)]
                || {
                    // equal lengths up front, so the loop has no bounds checks and vectorises
                    let n = dg.len();
                    let (g, u, dy, du) = (&g[..n], &u[..n], &dy[..n], &mut du[..n]);
                    for i in 0..n {
                        let (g, u, dy) = (g[i].to_f32(), u[i].to_f32(), dy[i].to_f32());
                        let s = sigmoid(g);
                        du[i] = T::from_f32(dy * g * s);
                        dg[i] = T::from_f32(dy * u * s * (1.0 + g * (1.0 - s)));
                    }
                },
            )
        });
}

fn same_shape(a: &Layout, b: &Layout, op: &str) -> Result<()> {
    if a.shape() != b.shape() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    Ok(())
}

impl SwiGlu {
    fn cpu<T: Elem + WithDType>(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<CpuStorage> {
        same_shape(gl, ul, "swiglu")?;
        let g = contiguous(T::cpu_storage_as_slice(g)?, gl, "swiglu", "gate")?;
        let u = contiguous(T::cpu_storage_as_slice(u)?, ul, "swiglu", "up")?;
        let mut y = cpu_output::<T>(g.len());
        forward_cpu(g, u, &mut y);
        Ok(T::to_cpu_storage_owned(y))
    }
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "candor-swiglu"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = with_float_type!(g.dtype(), "swiglu", T => self.cpu::<T>(g, gl, u, ul)?);
        Ok((out, gl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        same_shape(gl, ul, "swiglu")?;
        let args = [(g, gl), (u, ul)];
        let out = with_float_type!(g.dtype(), "swiglu", T => gpu::launch::<T>("swiglu_fwd", &args, 1)?);
        Ok((out, gl.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let _profile = super::profile::span("swiglu", super::profile::Phase::Backward);
        if !gate.track_op() && !up.track_op() {
            return Ok((None, None));
        }
        let both = gate.apply_op3_no_bwd(up, &dy.contiguous()?, &SwiGluBackward)?;
        let d_gate = if gate.track_op() { Some(both.get(0)?) } else { None };
        let d_up = if up.track_op() { Some(both.get(1)?) } else { None };
        Ok((d_gate, d_up))
    }
}

fn backward_shape(l: &Layout) -> Shape {
    let mut dims = vec![2];
    dims.extend_from_slice(l.dims());
    Shape::from(dims)
}

impl SwiGluBackward {
    fn cpu<T: Elem + WithDType>(
        &self,
        (g, gl): (&CpuStorage, &Layout),
        (u, ul): (&CpuStorage, &Layout),
        (dy, dyl): (&CpuStorage, &Layout),
    ) -> Result<CpuStorage> {
        same_shape(gl, ul, "swiglu backward")?;
        same_shape(gl, dyl, "swiglu backward")?;
        let g = contiguous(T::cpu_storage_as_slice(g)?, gl, "swiglu backward", "gate")?;
        let u = contiguous(T::cpu_storage_as_slice(u)?, ul, "swiglu backward", "up")?;
        let dy = contiguous(T::cpu_storage_as_slice(dy)?, dyl, "swiglu backward", "gradient")?;
        let mut out = cpu_output::<T>(2 * g.len());
        backward_cpu(g, u, dy, &mut out);
        Ok(T::to_cpu_storage_owned(out))
    }
}

impl CustomOp3 for SwiGluBackward {
    fn name(&self) -> &'static str {
        "candor-swiglu-backward"
    }

    fn cpu_fwd(
        &self,
        g: &CpuStorage,
        gl: &Layout,
        u: &CpuStorage,
        ul: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let args = ((g, gl), (u, ul), (dy, dyl));
        let out = with_float_type!(g.dtype(), "swiglu backward", T => self.cpu::<T>(args.0, args.1, args.2)?);
        Ok((out, backward_shape(gl)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        g: &candle_core::CudaStorage,
        gl: &Layout,
        u: &candle_core::CudaStorage,
        ul: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        same_shape(gl, ul, "swiglu backward")?;
        same_shape(gl, dyl, "swiglu backward")?;
        let args = [(g, gl), (u, ul), (dy, dyl)];
        let out =
            with_float_type!(g.dtype(), "swiglu backward", T => gpu::launch::<T>("swiglu_bwd", &args, 2)?);
        Ok((out, backward_shape(gl)))
    }
}

/// Launches `kernels/swiglu.cu`: elementwise, grid-stride.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{CudaView, DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, WithDType};

    use crate::ops::cuda::{elementwise, func, output, view, SWIGLU_PTX};

    /// `kernel(inputs.., out, n)` with an output of `outputs × n` elements.
    pub fn launch<T: CudaDType + DeviceRepr + WithDType>(
        kernel: &str,
        inputs: &[(&CudaStorage, &Layout)],
        outputs: usize,
    ) -> Result<CudaStorage> {
        let dev = &inputs[0].0.device;
        let n = inputs[0].1.shape().elem_count();
        let views = inputs
            .iter()
            .map(|(s, l)| view::<T>(s, l, kernel, "input"))
            .collect::<Result<Vec<CudaView<'_, T>>>>()?;
        let mut out = output::<T>(dev, outputs * n)?;
        let f = func(dev, "candor_swiglu", SWIGLU_PTX, kernel, T::DTYPE)?;
        let stream = dev.cuda_stream();
        {
            let n_u = n as u64;
            let mut b = stream.launch_builder(&f);
            for v in &views {
                b.arg(v);
            }
            b.arg(&mut out).arg(&n_u);
            // SAFETY: argument lists match `swiglu_fwd_*` (gate, up, y, n) and `swiglu_bwd_*`
            // (gate, up, dy, out, n) in kernels/swiglu.cu.
            unsafe { b.launch(elementwise(n)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}
