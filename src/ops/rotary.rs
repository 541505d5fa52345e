//! Rotary position embedding in the Hugging Face half-rotation layout (`rotate_half`), forward and
//! backward, with a position id per token.
//!
//! `x: [batch, seq, heads, head_dim]` (the layout the q/k projections produce, so no transpose copy is
//! needed first), `positions: [batch, seq]` u32 (packed rows restart their positions), and a
//! [`RotaryTable`] of `cos`/`sin` `[len, head_dim/2]` in f32, computed once per forward pass. With
//! `x = [x1, x2]` split at `half`:
//! `y1 = x1·cos − x2·sin`, `y2 = x2·cos + x1·sin`. The map is a rotation, so the backward is the inverse
//! rotation of the upstream gradient (the same kernel with `sin` negated). Angles and products are f32;
//! the result is rounded once to the storage dtype.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType, D,
};
use rayon::prelude::*;

use super::{contiguous, cpu_output, rows_per_task, Elem};

/// `cos` and `sin` of `position × inv_freq` for positions `0..len`: both `[len, head_dim/2]`, f32.
#[derive(Debug, Clone)]
pub struct RotaryTable {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RotaryTable {
    /// `inv_freq: [head_dim/2]` (any float dtype, any device; the table lives on its device).
    pub fn new(inv_freq: &Tensor, len: usize) -> Result<Self> {
        let inv_freq = inv_freq.to_dtype(DType::F32)?;
        let positions = Tensor::arange(0u32, len as u32, inv_freq.device())?.to_dtype(DType::F32)?;
        let freqs = positions.unsqueeze(1)?.broadcast_mul(&inv_freq.unsqueeze(0)?)?;
        Ok(RotaryTable { cos: freqs.cos()?, sin: freqs.sin()? })
    }

    /// How many positions the table covers.
    pub fn len(&self) -> usize {
        self.cos.dims()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn device(&self) -> &Device {
        self.cos.device()
    }
}

/// Rotates `x: [batch, seq, heads, head_dim]` by each token's position (`positions: [batch, seq]`,
/// u32, each below `table.len()`). Non-contiguous `x` is copied first.
pub fn rope(x: &Tensor, table: &RotaryTable, positions: &Tensor) -> Result<Tensor> {
    let _profile = super::profile::span("rope", super::profile::Phase::Forward);
    let (b, t, _, d) = x.dims4()?;
    x.contiguous()?.apply_op1(Rotary::new(table, positions, (b, t, d))?)
}

/// The same rotation composed from differentiable candle ops (the slow reference), computed in f32.
pub fn reference(x: &Tensor, table: &RotaryTable, positions: &Tensor) -> Result<Tensor> {
    let (b, t, _, d) = x.dims4()?;
    let half = d / 2;
    let flat = positions.flatten_all()?;
    let cos = table.cos.index_select(&flat, 0)?.reshape((b, t, 1, half))?;
    let sin = table.sin.index_select(&flat, 0)?.reshape((b, t, 1, half))?;
    let x32 = x.to_dtype(DType::F32)?;
    let x1 = x32.narrow(D::Minus1, 0, half)?;
    let x2 = x32.narrow(D::Minus1, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Tensor::cat(&[r1, r2], D::Minus1)?.to_dtype(x.dtype())
}

/// The rotation as an op on `[b, t, heads, head_dim]` storage (also the epilogue of
/// [`super::lora_linear`]'s q and k projections, which call its `cpu_fwd`/`cuda_fwd` on their output).
pub(crate) struct Rotary {
    cos: Tensor,
    sin: Tensor,
    positions: Tensor,
    /// Rotate by −angle (the backward).
    inverse: bool,
}

impl Rotary {
    /// The rotation of `[b, t, .., d]` inputs by `positions` (`[b, t]` u32), checked against the
    /// table.
    pub(crate) fn new(
        table: &RotaryTable,
        positions: &Tensor,
        (b, t, d): (usize, usize, usize),
    ) -> Result<Self> {
        if d % 2 != 0 || table.cos.dims() != [table.len(), d / 2] || table.sin.dims() != table.cos.dims() {
            candle_core::bail!("rope: head_dim {d} and table {:?} do not fit", table.cos.dims());
        }
        if positions.dims() != [b, t] || positions.dtype() != DType::U32 {
            candle_core::bail!(
                "rope: positions {:?} {:?}, expected [{b}, {t}] u32",
                positions.dims(),
                positions.dtype()
            );
        }
        Ok(Rotary {
            cos: table.cos.contiguous()?,
            sin: table.sin.contiguous()?,
            positions: positions.contiguous()?,
            inverse: false,
        })
    }

    /// The inverse rotation (the backward): the same table, `sin` negated.
    pub(crate) fn inverse(&self) -> Self {
        Rotary {
            cos: self.cos.clone(),
            sin: self.sin.clone(),
            positions: self.positions.clone(),
            inverse: !self.inverse,
        }
    }
}

/// (tokens, heads, head_dim) of `x: [b, t, h, d]`.
fn dims(l: &Layout) -> Result<(usize, usize, usize)> {
    let (b, t, h, d) = l.shape().dims4()?;
    Ok((b * t, h, d))
}

#[allow(clippy::too_many_arguments)]
fn rotate_cpu<T: Elem>(
    x: &[T],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    heads: usize,
    d: usize,
    inverse: bool,
    y: &mut [T],
) -> Result<()> {
    let half = d / 2;
    let table_len = cos.len() / half.max(1);
    if let Some(bad) = positions.iter().find(|&&p| p as usize >= table_len) {
        candle_core::bail!("rope: position {bad} is outside the rotary table ({table_len} positions)");
    }
    let sign = if inverse { -1.0f32 } else { 1.0 };
    let row = heads * d;
    x.par_chunks(row)
        .zip(y.par_chunks_mut(row))
        .zip(positions.par_iter())
        .with_min_len(rows_per_task(row))
        .for_each(|((xr, yr), &p)| {
            let p = p as usize;
            let c = &cos[p * half..(p + 1) * half];
            let s = &sin[p * half..(p + 1) * half];
            for (xh, yh) in xr.chunks_exact(d).zip(yr.chunks_exact_mut(d)) {
                let (x1, x2) = xh.split_at(half);
                let (y1, y2) = yh.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (x1[i].to_f32(), x2[i].to_f32());
                    let (ci, si) = (c[i], sign * s[i]);
                    y1[i] = T::from_f32(a * ci - b * si);
                    y2[i] = T::from_f32(b * ci + a * si);
                }
            }
        });
    Ok(())
}

fn cpu_slice<'a, T: WithDType>(s: &'a Storage, l: &Layout, what: &str) -> Result<&'a [T]> {
    match s {
        Storage::Cpu(c) => contiguous(T::cpu_storage_as_slice(c)?, l, "rope", what),
        _ => candle_core::bail!("rope: {what} is not on the cpu"),
    }
}

impl Rotary {
    fn cpu<T: Elem + WithDType>(&self, x: &CpuStorage, xl: &Layout) -> Result<CpuStorage> {
        let (tokens, heads, d) = dims(xl)?;
        let x = contiguous(T::cpu_storage_as_slice(x)?, xl, "rope", "input")?;
        let (cs, cl) = self.cos.storage_and_layout();
        let (ss, sl) = self.sin.storage_and_layout();
        let (ps, pl) = self.positions.storage_and_layout();
        let cos = cpu_slice::<f32>(&cs, cl, "cos table")?;
        let sin = cpu_slice::<f32>(&ss, sl, "sin table")?;
        let positions = cpu_slice::<u32>(&ps, pl, "positions")?;
        debug_assert_eq!(positions.len(), tokens);
        let mut y = cpu_output::<T>(x.len());
        rotate_cpu(x, cos, sin, positions, heads, d, self.inverse, &mut y)?;
        Ok(T::to_cpu_storage_owned(y))
    }
}

impl CustomOp1 for Rotary {
    fn name(&self) -> &'static str {
        if self.inverse {
            "candor-rope-backward"
        } else {
            "candor-rope"
        }
    }

    fn cpu_fwd(&self, x: &CpuStorage, xl: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = with_float_type!(x.dtype(), "rope", T => self.cpu::<T>(x, xl)?);
        Ok((out, xl.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = with_float_type!(x.dtype(), "rope", T => gpu::rotate::<T>(self, x, xl)?);
        Ok((out, xl.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let _profile = super::profile::span("rope", super::profile::Phase::Backward);
        Ok(Some(dy.contiguous()?.apply_op1_no_bwd(&self.inverse())?))
    }
}

/// Launches `kernels/rotary.cu`: one thread per (token, head, pair).
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, WithDType};

    use crate::ops::cuda::{elementwise, func, output, u32_arg, view, ROTARY_PTX};
    use crate::ops::cuda_storage;

    pub fn rotate<T: CudaDType + DeviceRepr + WithDType>(
        op: &super::Rotary,
        x: &CudaStorage,
        xl: &Layout,
    ) -> Result<CudaStorage> {
        let (tokens, heads, d) = super::dims(xl)?;
        let half = d / 2;
        let dev = &x.device;
        let xv = view::<T>(x, xl, "rope", "input")?;
        let (cs, cl) = op.cos.storage_and_layout();
        let (ss, sl) = op.sin.storage_and_layout();
        let (ps, pl) = op.positions.storage_and_layout();
        let cos = view::<f32>(cuda_storage(&cs, "rope")?, cl, "rope", "cos table")?;
        let sin = view::<f32>(cuda_storage(&ss, "rope")?, sl, "rope", "sin table")?;
        let positions = view::<u32>(cuda_storage(&ps, "rope")?, pl, "rope", "positions")?;
        let table_len = u32_arg("rope", "table length", cl.shape().elem_count() / half.max(1))?;
        let mut y = output::<T>(dev, tokens * heads * d)?;
        let f = func(dev, "candor_rotary", ROTARY_PTX, "rope", T::DTYPE)?;
        let stream = dev.cuda_stream();
        {
            let n_pairs = (tokens * heads * half) as u64;
            let (heads_u, half_u) = (u32_arg("rope", "heads", heads)?, u32_arg("rope", "half width", half)?);
            let sign: f32 = if op.inverse { -1.0 } else { 1.0 };
            let mut b = stream.launch_builder(&f);
            b.arg(&xv).arg(&cos).arg(&sin).arg(&positions).arg(&mut y);
            b.arg(&n_pairs).arg(&heads_u).arg(&half_u).arg(&table_len).arg(&sign);
            // SAFETY: argument list matches `rope_*` in kernels/rotary.cu.
            unsafe { b.launch(elementwise(tokens * heads * half)) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }
}
