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

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};

use super::cpu_f32;
use super::cpu_gemm::{product, View};
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

const OP: &str = "lora_linear";

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else { candle_core::bail!("{OP}: {what} is not f32") };
    super::contiguous(data, l, OP, what)
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
        let (r, in_f) = al.shape().dims2()?;
        let out_f = bl.shape().dims2()?.0;
        let x = f32_slice(xs, xl, "x")?;
        let rows = x.len() / in_f;
        let (x, a, b) = (View::matrix(x, rows, in_f), f32_slice(a_s, al, "A")?, f32_slice(b_s, bl, "B")?);
        let (ws, wl) = self.weight.storage_and_layout();
        let w = View::matrix(cpu_f32(&ws, wl, OP, "weight")?, out_f, in_f);
        let mut y = super::cpu_output::<f32>(rows * out_f);
        // y = x·Wᵀ (+ bias) + s·(xd·Aᵀ)·Bᵀ
        match &self.bias {
            Some(bias) => {
                let (bs, bl) = bias.storage_and_layout();
                let bias = cpu_f32(&bs, bl, OP, "bias")?;
                y.chunks_exact_mut(out_f).for_each(|row| row.copy_from_slice(bias));
                product(x, w.t()).add_to(&mut y, 0, out_f);
            }
            None => product(x, w.t()).write(&mut y, 0, out_f),
        }
        let xd = self.dropped(x.data);
        let t = rank_product(View::matrix(&xd, rows, in_f), View::matrix(a, r, in_f));
        product(View::matrix(&t, rows, r), View::matrix(b, out_f, r).t())
            .scaled(self.scale)
            .add_to(&mut y, 0, out_f);
        let mut dims = xl.shape().dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x_t: &Tensor,
        a_t: &Tensor,
        b_t: &Tensor,
        _y: &Tensor,
        dy_t: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
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
        let mut u = vec![0f32; rows * r];
        product(dy, b).write(&mut u, 0, r);
        let u = View::matrix(&u, rows, r);
        // dx = dy·W + s · mask ⊙ (u·A); layer 0's q, k and v read the frozen embeddings, and nothing
        // upstream wants their dx
        let dx = x_t.track_op().then(|| {
            let mut dx = vec![0f32; rows * in_f];
            product(dy, w).write(&mut dx, 0, in_f);
            match &self.mask {
                None => product(u, a).scaled(s).add_to(&mut dx, 0, in_f),
                Some(m) => {
                    let mut v = vec![0f32; rows * in_f];
                    product(u, a).write(&mut v, 0, in_f);
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
        let mut da = vec![0f32; r * in_f];
        product(u.t(), xd).scaled(s).write(&mut da, 0, in_f);
        // dB = s·dyᵀ·(xd·Aᵀ): [out, r]
        let t = rank_product(xd, a);
        let mut db = vec![0f32; out_f * r];
        product(dy.t(), View::matrix(&t, rows, r)).scaled(s).write(&mut db, 0, r);

        let device = x_t.device();
        let dx = dx.map(|dx| Tensor::from_vec(dx, x_t.shape(), device)).transpose()?;
        Ok((
            dx,
            Some(Tensor::from_vec(da, (r, in_f), device)?),
            Some(Tensor::from_vec(db, (out_f, r), device)?),
        ))
    }
}

/// `xd·Aᵀ`: `[rows, r]`, the rank-r intermediate (recomputed in the backward rather than kept).
fn rank_product(xd: View, a: View) -> Vec<f32> {
    let mut t = vec![0f32; xd.rows * a.rows];
    product(xd, a.t()).write(&mut t, 0, a.rows);
    t
}
