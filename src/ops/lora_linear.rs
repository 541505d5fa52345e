//! A LoRA layer in one op: `y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ`, backward `dx`, `dA`, `dB`.
//!
//! Composed from candle ops, every projection leaves five full-width tensors in the autograd graph
//! (the frozen output, the dropped-out input, the rank-r product, its B product and the sum), all kept
//! until the step ends. This op records only its input and its output, plus on the CPU path the rank-r
//! intermediate (`r` floats per row, `r/in` of the input's size, which spares the backward a `2·r·in`
//! FLOPs-per-row product); the dropout mask lives as bits inside the op,
//! the LoRA update is accumulated into the frozen product's buffer, and the frozen weight never gets a
//! gradient. When the input needs no gradient (layer 0's q, k and v read the frozen embeddings) the
//! `dy·W` product is skipped.
//!
//! On the CPU in f32 (the CPU build's dtype) both directions are our own loops over `gemm`. Elsewhere
//! (CUDA, bf16) the same op runs the same math through candle's backend: cuBLAS products on the
//! storages in the forward, candle tensor ops in the backward; the graph keeps the same three tensors,
//! and a dropout mask is kept as one byte per element on the device. [`LoraWeights::reference`] is the composed
//! version the tests compare both paths against.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::cpu_gemm::{product, View};
pub use super::dropout::DropoutMask;
use super::frozen_linear::cpu_linear;
use super::{cpu_f32, cpu_storage, f32_slice};

/// Whether [`LoraWeights::forward`] runs the CPU path for these operands (CPU, all f32).
pub fn supported(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32)
}

/// One LoRA layer's operands: the frozen `weight: [out, in]` and `bias: [out]`, the trainable
/// `a: [r, in]` and `b: [out, r]` (f32), and the scale `s`.
#[derive(Clone, Copy)]
pub struct LoraWeights<'a> {
    pub weight: &'a Tensor,
    pub bias: Option<&'a Tensor>,
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
}

impl LoraWeights<'_> {
    /// The layer on `x: [.., in]` as one op: the CPU f32 path where [`supported`], else the
    /// device-agnostic path. `mask` covers `x`'s elements.
    pub fn forward(&self, x: &Tensor, mask: Option<DropoutMask>) -> Result<Tensor> {
        self.apply(x, mask, !supported(x, self.weight, self.bias))
    }

    /// The op's device-agnostic path (candle backend products), which CUDA and bf16 run, forced on any
    /// device: for the tests, which check it on the CPU.
    pub fn forward_generic(&self, x: &Tensor, mask: Option<DropoutMask>) -> Result<Tensor> {
        self.apply(x, mask, true)
    }

    fn check(&self, x: &Tensor, mask: Option<&DropoutMask>) -> Result<()> {
        let (out_f, in_f) = self.weight.dims2()?;
        let (r, a_in) = self.a.dims2()?;
        if x.dim(candle_core::D::Minus1)? != in_f || a_in != in_f || self.b.dims() != [out_f, r] {
            candle_core::bail!(
                "{OP}: x {:?}, weight {:?}, A {:?}, B {:?} do not fit",
                x.dims(),
                self.weight.dims(),
                self.a.dims(),
                self.b.dims()
            );
        }
        if let Some(bias) = self.bias.filter(|b| b.dims() != [out_f]) {
            candle_core::bail!("{OP}: bias shape {:?}, expected [{out_f}]", bias.dims());
        }
        if self.a.dtype() != DType::F32 || self.b.dtype() != DType::F32 {
            candle_core::bail!(
                "{OP}: A and B must be f32, got {:?} and {:?}",
                self.a.dtype(),
                self.b.dtype()
            );
        }
        if mask.is_some_and(|m| m.len() < x.elem_count()) {
            candle_core::bail!("{OP}: dropout mask shorter than the input");
        }
        Ok(())
    }

    fn apply(&self, x: &Tensor, mask: Option<DropoutMask>, generic: bool) -> Result<Tensor> {
        self.check(x, mask.as_ref())?;
        let in_f = self.weight.dim(1)?;
        let rows = x.elem_count() / in_f;
        // the generic path keeps the mask on the device as one byte per element
        let mask_bytes = match (&mask, generic) {
            (Some(m), true) => {
                let v: Vec<u8> = (0..rows * in_f).map(|i| (m.factor(i) != 0.0) as u8).collect();
                Some(Tensor::from_vec(v, (rows, in_f), x.device())?)
            }
            _ => None,
        };
        let op = LoraLinear {
            weight: self.weight.contiguous()?,
            bias: self.bias.map(Tensor::contiguous).transpose()?,
            scale: self.scale as f32,
            mask,
            mask_bytes,
            generic,
            rank_out: (!generic && [x, self.a, self.b].iter().any(|t| t.track_op()))
                .then(|| std::sync::Mutex::new(None)),
        };
        x.contiguous()?.apply_op3(&self.a.contiguous()?, &self.b.contiguous()?, op)
    }

    /// The same layer from plain candle ops, differentiable in x, A and B (W and the bias are
    /// constants).
    pub fn reference(&self, x: &Tensor, mask: Option<&DropoutMask>) -> Result<Tensor> {
        let y = super::frozen_linear(x, self.weight, self.bias)?;
        let in_f = self.weight.dim(1)?;
        let mut h = x.reshape((x.elem_count() / in_f, in_f))?.to_dtype(DType::F32)?;
        if let Some(m) = mask {
            h = if h.device().is_cpu() {
                h.contiguous()?.apply_op1(m.clone())?
            } else {
                h.mul(&m.to_tensor(h.shape(), h.device())?)?
            };
        }
        // scale the rank-r intermediate, not the full-width output
        let delta = h.matmul(&self.a.t()?)?.affine(self.scale, 0.0)?.matmul(&self.b.t()?)?;
        let delta = delta.to_dtype(y.dtype())?.reshape(y.shape())?;
        y + delta
    }
}

/// The op itself; built by [`LoraWeights::forward`].
struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    mask: Option<DropoutMask>,
    /// The mask as 0/1 bytes `[rows, in]` on the op's device (generic path only).
    mask_bytes: Option<Tensor>,
    /// Run the device-agnostic path (always off the CPU, and for bf16/f16).
    generic: bool,
    /// `xd·Aᵀ` from the CPU forward, taken by the backward; kept only when something needs a gradient.
    rank_out: Option<std::sync::Mutex<Option<Vec<f32>>>>,
}

const OP: &str = "lora_linear";

impl LoraLinear {
    /// `dropout(x)`, borrowed when there is no mask.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(m) => std::borrow::Cow::Owned(m.apply(x)),
            None => std::borrow::Cow::Borrowed(x),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "candor-lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        a_s: &CpuStorage,
        al: &Layout,
        b_s: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.generic {
            return self.generic_fwd(xs, xl, a_s, al, b_s, bl, |s| cpu_storage(s, OP));
        }
        let (r, in_f) = al.shape().dims2()?;
        let out_f = bl.shape().dims2()?.0;
        let x = f32_slice(xs, xl, OP, "x")?;
        let rows = x.len() / in_f;
        let (x, a, b) =
            (View::matrix(x, rows, in_f), f32_slice(a_s, al, OP, "A")?, f32_slice(b_s, bl, OP, "B")?);
        let (ws, wl) = self.weight.storage_and_layout();
        let w = View::matrix(cpu_f32(&ws, wl, OP, "weight")?, out_f, in_f);
        // y = x·Wᵀ (+ bias) + s·(xd·Aᵀ)·Bᵀ
        let bias = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = bias.as_ref().map(|(bs, bl)| cpu_f32(bs, bl, OP, "bias")).transpose()?;
        let mut y = cpu_linear(x, w, bias);
        let xd = self.dropped(x.data);
        let t = rank_product(View::matrix(&xd, rows, in_f), View::matrix(a, r, in_f));
        product(View::matrix(&t, rows, r), View::matrix(b, out_f, r).t())
            .scaled(self.scale)
            .add_to(&mut y, 0, out_f);
        if let Some(keep) = &self.rank_out {
            *keep.lock().unwrap() = Some(t);
        }
        let mut dims = xl.shape().dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        a_s: &candle_core::CudaStorage,
        al: &Layout,
        b_s: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.generic_fwd(xs, xl, a_s, al, b_s, bl, |s| super::cuda_storage(s, OP))
    }

    fn bwd(
        &self,
        x_t: &Tensor,
        a_t: &Tensor,
        b_t: &Tensor,
        _y: &Tensor,
        dy_t: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if self.generic || !x_t.device().is_cpu() {
            return self.generic_bwd(x_t, a_t, b_t, dy_t);
        }
        let (r, in_f) = a_t.dims2()?;
        let out_f = b_t.dim(0)?;
        let rows = x_t.elem_count() / in_f;
        let s = self.scale;
        let dy_t = dy_t.contiguous()?;
        let (xs, xl) = x_t.storage_and_layout();
        let (a_s, al) = a_t.storage_and_layout();
        let (b_s, bl) = b_t.storage_and_layout();
        let (dys, dyl) = dy_t.storage_and_layout();
        let (ws, wl) = self.weight.storage_and_layout();
        let x = cpu_f32(&xs, xl, OP, "x")?;
        let a = View::matrix(cpu_f32(&a_s, al, OP, "A")?, r, in_f);
        let b = View::matrix(cpu_f32(&b_s, bl, OP, "B")?, out_f, r);
        let dy = View::matrix(cpu_f32(&dys, dyl, OP, "dy")?, rows, out_f);
        let w = View::matrix(cpu_f32(&ws, wl, OP, "weight")?, out_f, in_f);

        // u = dy·B: [rows, r]
        let u = product(dy, b).to_vec();
        let u = View::matrix(&u, rows, r);
        // dx = dy·W + s · mask ⊙ (u·A); layer 0's q, k and v read the frozen embeddings, and nothing
        // upstream wants their dx
        let dx = x_t.track_op().then(|| {
            let mut dx = product(dy, w).to_vec();
            match &self.mask {
                None => product(u, a).scaled(s).add_to(&mut dx, 0, in_f),
                Some(m) => {
                    let v = product(u, a).to_vec();
                    for (i, (d, v)) in dx.iter_mut().zip(&v).enumerate() {
                        *d += s * (m.factor(i) * v);
                    }
                }
            }
            dx
        });
        let xd = self.dropped(x);
        let xd = View::matrix(&xd, rows, in_f);
        // dA = s·uᵀ·xd: [r, in]
        let da = product(u.t(), xd).scaled(s).to_vec();
        // dB = s·dyᵀ·(xd·Aᵀ): [out, r], with xd·Aᵀ from the forward (recomputed if a second backward
        // through the same graph finds it taken)
        let kept = self.rank_out.as_ref().and_then(|k| k.lock().unwrap().take());
        let t = kept.unwrap_or_else(|| rank_product(xd, a));
        let db = product(dy.t(), View::matrix(&t, rows, r)).scaled(s).to_vec();

        let device = x_t.device();
        let dx = dx.map(|dx| Tensor::from_vec(dx, x_t.shape(), device)).transpose()?;
        Ok((
            dx,
            Some(Tensor::from_vec(da, (r, in_f), device)?),
            Some(Tensor::from_vec(db, (out_f, r), device)?),
        ))
    }
}

impl LoraLinear {
    /// The forward on any backend's storages: `y = x·Wᵀ (+ bias) + (s·(xd·Aᵀ)·Bᵀ)` with the LoRA part
    /// in f32 and rounded once to `x`'s dtype, as [`LoraWeights::reference`] computes it.
    #[allow(clippy::too_many_arguments)]
    fn generic_fwd<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        a: &S,
        al: &Layout,
        b: &S,
        bl: &Layout,
        of: fn(&Storage) -> Result<&S>,
    ) -> Result<(S, Shape)> {
        use candle_core::op::{Add, Mul};
        let (r, in_f) = al.shape().dims2()?;
        let out_f = bl.shape().dims2()?.0;
        let rows = xl.shape().elem_count() / in_f;
        let (lx, ly, lt) = (
            Layout::contiguous((rows, in_f)),
            Layout::contiguous((rows, out_f)),
            Layout::contiguous((rows, r)),
        );
        let x2 = Layout::contiguous_with_offset((rows, in_f), xl.start_offset());
        let (ws, wl) = self.weight.storage_and_layout();
        let mut y = x.matmul(of(&ws)?, (1, rows, out_f, in_f), &x2, &wl.transpose(0, 1)?)?;
        if let Some(bias) = &self.bias {
            let (bs, bias_l) = bias.storage_and_layout();
            y = y.binary_impl::<Add>(of(&bs)?, &ly, &bias_l.broadcast_as((rows, out_f))?)?;
        }
        let mut xd = x.to_dtype(&x2, DType::F32)?;
        if let (Some(bytes), Some(mask)) = (&self.mask_bytes, &self.mask) {
            let (ms, ml) = bytes.storage_and_layout();
            let factor = of(&ms)?.to_dtype(ml, DType::F32)?.affine(&lx, mask.scale as f64, 0.0)?;
            xd = xd.binary_impl::<Mul>(&factor, &lx, &lx)?;
        }
        let t = xd.matmul(a, (1, rows, r, in_f), &lx, &al.transpose(0, 1)?)?.affine(
            &lt,
            self.scale as f64,
            0.0,
        )?;
        let mut delta = t.matmul(b, (1, rows, out_f, r), &lt, &bl.transpose(0, 1)?)?;
        if delta.dtype() != y.dtype() {
            delta = delta.to_dtype(&ly, y.dtype())?;
        }
        let y = y.binary_impl::<Add>(&delta, &ly, &ly)?;
        let mut dims = xl.shape().dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((y, Shape::from(dims)))
    }

    /// The backward from candle tensor ops (any device, any dtype of `x`).
    fn generic_bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out_f, in_f) = self.weight.dims2()?;
        let rows = x.elem_count() / in_f;
        let s = self.scale as f64;
        let (a, b) = (a.detach(), b.detach());
        let dy = dy.detach().reshape((rows, out_f))?;
        let dy32 = dy.to_dtype(DType::F32)?;
        let factor = match (&self.mask_bytes, &self.mask) {
            (Some(bytes), Some(mask)) => Some(bytes.to_dtype(DType::F32)?.affine(mask.scale as f64, 0.0)?),
            _ => None,
        };
        let mut xd = x.detach().reshape((rows, in_f))?.to_dtype(DType::F32)?;
        if let Some(f) = &factor {
            xd = (xd * f)?;
        }
        // u = dy·B ; dA = s·uᵀ·xd ; dB = s·dyᵀ·(xd·Aᵀ)
        let u = dy32.matmul(&b)?;
        let da = u.t()?.matmul(&xd)?.affine(s, 0.0)?;
        let db = dy32.t()?.matmul(&xd.matmul(&a.t()?)?)?.affine(s, 0.0)?;
        let dx = if x.track_op() {
            let mut dxd = u.matmul(&a)?.affine(s, 0.0)?;
            if let Some(f) = &factor {
                dxd = (dxd * f)?;
            }
            let dx = (dy.matmul(&self.weight)? + dxd.to_dtype(x.dtype())?)?;
            Some(dx.reshape(x.shape())?)
        } else {
            None
        };
        Ok((dx, Some(da), Some(db)))
    }
}

/// `xd·Aᵀ`: `[rows, r]`, the rank-r intermediate.
fn rank_product(xd: View, a: View) -> Vec<f32> {
    product(xd, a.t()).to_vec()
}
