//! A LoRA layer in one op: `y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ`, backward `dx`, `dA`, `dB`.
//!
//! Composed from candle ops, every projection leaves five full-width tensors in the autograd graph
//! (the frozen output, the dropped-out input, the rank-r product, its B product and the sum), all kept
//! until the step ends. This op records only its input and its output: the rank-r intermediate is
//! recomputed in the backward (`2·r·in` FLOPs per row), the dropout mask lives as bits inside the op,
//! the LoRA update is accumulated into the frozen product's buffer, and the frozen weight never gets a
//! gradient. When the input needs no gradient (layer 0's q, k and v read the frozen embeddings) the
//! `dy·W` product is skipped.
//!
//! CPU, f32 (the CPU build's dtype). Other devices and dtypes use [`reference`], the same computation
//! from candle ops, which the tests compare this op against.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::cpu_gemm::{gemm, Threads, View};
pub use super::dropout::DropoutMask;

/// Whether [`lora_linear`] runs fused for these operands (CPU, all f32).
pub fn supported(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.device().is_cpu()
        && x.dtype() == DType::F32
        && weight.dtype() == DType::F32
        && bias.is_none_or(|b| b.dtype() == DType::F32)
}

/// The LoRA layer: fused when [`supported`], else [`reference`]. `x: [.., in]`, `weight: [out, in]`,
/// `bias: [out]`, `a: [r, in]`, `b: [out, r]` (f32), `mask` over `x`'s elements.
#[allow(clippy::too_many_arguments)]
pub fn lora_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<DropoutMask>,
) -> Result<Tensor> {
    let (out_f, in_f) = weight.dims2()?;
    let (r, a_in) = a.dims2()?;
    if x.dim(candle_core::D::Minus1)? != in_f || a_in != in_f || b.dims() != [out_f, r] {
        candle_core::bail!(
            "lora_linear: x {:?}, weight {:?}, A {:?}, B {:?} do not fit",
            x.dims(),
            weight.dims(),
            a.dims(),
            b.dims()
        );
    }
    if bias.is_some_and(|b| b.dims() != [out_f]) {
        candle_core::bail!("lora_linear: bias shape {:?}, expected [{out_f}]", bias.unwrap().dims());
    }
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        candle_core::bail!("lora_linear: A and B must be f32, got {:?} and {:?}", a.dtype(), b.dtype());
    }
    if let Some(m) = &mask {
        if m.len() < x.elem_count() {
            candle_core::bail!("lora_linear: dropout mask shorter than the input");
        }
    }
    if !supported(x, weight, bias) {
        return reference(x, weight, bias, a, b, scale, mask.as_ref());
    }
    let op = LoraLinear {
        weight: weight.contiguous()?,
        bias: bias.map(Tensor::contiguous).transpose()?,
        scale: scale as f32,
        mask,
    };
    x.contiguous()?.apply_op3(&a.contiguous()?, &b.contiguous()?, op)
}

/// The same layer from plain candle ops, differentiable in x, A and B (W and the bias are constants).
pub fn reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&DropoutMask>,
) -> Result<Tensor> {
    let y = super::frozen_linear(x, weight, bias)?;
    let in_f = weight.dim(1)?;
    let mut h = x.reshape((x.elem_count() / in_f, in_f))?.to_dtype(DType::F32)?;
    if let Some(m) = mask {
        h = if h.device().is_cpu() {
            h.contiguous()?.apply_op1(m.clone())?
        } else {
            h.mul(&m.to_tensor(h.shape(), h.device())?)?
        };
    }
    // scale the rank-r intermediate, not the full-width output
    let delta = h.matmul(&a.t()?)?.affine(scale, 0.0)?.matmul(&b.t()?)?;
    let delta = delta.to_dtype(y.dtype())?.reshape(y.shape())?;
    y + delta
}

struct LoraLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    mask: Option<DropoutMask>,
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("lora_linear: {what} is not f32") };
    super::contiguous(data, l, "lora_linear", what)
}

/// Runs `f` on the f32 data of a CPU tensor.
fn with_f32<R>(t: &Tensor, what: &str, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else { candle_core::bail!("lora_linear: {what} is not on the CPU") };
    f(f32_slice(s, l, what)?)
}

impl LoraLinear {
    /// `dropout(x)`, borrowed when there is no mask.
    fn dropped<'a>(&self, x: &'a [f32]) -> std::borrow::Cow<'a, [f32]> {
        match &self.mask {
            Some(m) => std::borrow::Cow::Owned(m.apply(x)),
            None => std::borrow::Cow::Borrowed(x),
        }
    }
}

/// `t = xd·Aᵀ`: `[rows, r]`.
fn rank_product(xd: &[f32], a: &[f32], rows: usize, in_f: usize, r: usize) -> Vec<f32> {
    let mut t = vec![0f32; rows * r];
    gemm(
        rows,
        r,
        in_f,
        &mut t,
        0,
        r,
        false,
        View::rows(xd, 0, in_f),
        View::rows_t(a, 0, in_f),
        1.0,
        Threads::All,
    );
    t
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
        let (x, a, b) = (f32_slice(xs, xl, "x")?, f32_slice(a_s, al, "A")?, f32_slice(b_s, bl, "B")?);
        let (r, in_f) = al.shape().dims2()?;
        let out_f = bl.shape().dims2()?.0;
        let rows = x.len() / in_f;
        let mut y = super::cpu_output::<f32>(rows * out_f);
        let has_bias = self.bias.is_some();
        if let Some(bias) = &self.bias {
            with_f32(bias, "bias", |bias| {
                y.chunks_exact_mut(out_f).for_each(|row| row.copy_from_slice(bias));
                Ok(())
            })?;
        }
        with_f32(&self.weight, "weight", |w| {
            gemm(
                rows,
                out_f,
                in_f,
                &mut y,
                0,
                out_f,
                has_bias,
                View::rows(x, 0, in_f),
                View::rows_t(w, 0, in_f),
                1.0,
                Threads::All,
            );
            Ok(())
        })?;
        let t = rank_product(&self.dropped(x), a, rows, in_f, r);
        gemm(
            rows,
            out_f,
            r,
            &mut y,
            0,
            out_f,
            true,
            View::rows(&t, 0, r),
            View::rows_t(b, 0, r),
            self.scale,
            Threads::All,
        );
        let mut dims = xl.shape().dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (r, in_f) = a.dims2()?;
        let out_f = b.dim(0)?;
        let rows = x.elem_count() / in_f;
        let s = self.scale;
        let dy = dy.contiguous()?;
        // layer 0's q, k and v read the frozen embeddings: nothing upstream wants their dx
        let need_dx = x.track_op();
        let (dx, da, db) = with_f32(x, "x", |x| {
            with_f32(a, "A", |a| {
                with_f32(b, "B", |b| {
                    with_f32(&dy, "dy", |dy| {
                        // u = dy·B: [rows, r]
                        let mut u = vec![0f32; rows * r];
                        gemm(
                            rows,
                            r,
                            out_f,
                            &mut u,
                            0,
                            r,
                            false,
                            View::rows(dy, 0, out_f),
                            View::rows(b, 0, r),
                            1.0,
                            Threads::All,
                        );
                        let dx = if need_dx {
                            Some(self.input_grad(dy, &u, a, rows, in_f, out_f, r)?)
                        } else {
                            None
                        };
                        let xd = self.dropped(x);
                        // dA = s·uᵀ·xd: [r, in]
                        let mut da = vec![0f32; r * in_f];
                        gemm(
                            r,
                            in_f,
                            rows,
                            &mut da,
                            0,
                            in_f,
                            false,
                            View::rows_t(&u, 0, r),
                            View::rows(&xd, 0, in_f),
                            s,
                            Threads::All,
                        );
                        // dB = s·dyᵀ·(xd·Aᵀ): [out, r]
                        let t = rank_product(&xd, a, rows, in_f, r);
                        let mut db = vec![0f32; out_f * r];
                        gemm(
                            out_f,
                            r,
                            rows,
                            &mut db,
                            0,
                            r,
                            false,
                            View::rows_t(dy, 0, out_f),
                            View::rows(&t, 0, r),
                            s,
                            Threads::All,
                        );
                        Ok((dx, da, db))
                    })
                })
            })
        })?;
        let device = x.device();
        let dx = dx.map(|dx| Tensor::from_vec(dx, x.shape(), device)).transpose()?;
        Ok((
            dx,
            Some(Tensor::from_vec(da, (r, in_f), device)?),
            Some(Tensor::from_vec(db, (out_f, r), device)?),
        ))
    }
}

impl LoraLinear {
    /// `dx = dy·W + s · mask ⊙ (u·A)`.
    #[allow(clippy::too_many_arguments)]
    fn input_grad(
        &self,
        dy: &[f32],
        u: &[f32],
        a: &[f32],
        rows: usize,
        in_f: usize,
        out_f: usize,
        r: usize,
    ) -> Result<Vec<f32>> {
        let mut dx = vec![0f32; rows * in_f];
        with_f32(&self.weight, "weight", |w| {
            gemm(
                rows,
                in_f,
                out_f,
                &mut dx,
                0,
                in_f,
                false,
                View::rows(dy, 0, out_f),
                View::rows(w, 0, in_f),
                1.0,
                Threads::All,
            );
            Ok(())
        })?;
        match &self.mask {
            None => gemm(
                rows,
                in_f,
                r,
                &mut dx,
                0,
                in_f,
                true,
                View::rows(u, 0, r),
                View::rows(a, 0, in_f),
                self.scale,
                Threads::All,
            ),
            Some(m) => {
                let mut v = vec![0f32; rows * in_f];
                gemm(
                    rows,
                    in_f,
                    r,
                    &mut v,
                    0,
                    in_f,
                    false,
                    View::rows(u, 0, r),
                    View::rows(a, 0, in_f),
                    1.0,
                    Threads::All,
                );
                for (i, (d, v)) in dx.iter_mut().zip(&v).enumerate() {
                    *d += self.scale * (m.factor(i) * v);
                }
            }
        }
        Ok(dx)
    }
}
