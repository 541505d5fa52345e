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
//! What follows the projection in the decoder runs inside the op too ([`Epilogue`]): the residual add of
//! the output and down projections, the rotary embedding of q and k (models without q/k norms). As
//! separate ops they would keep the projection's own output in the graph beside theirs: a SmolLM2 step
//! at 4 × 256 tokens peaked at 2.02 GB with both separate, 1.88 GB with the residual inside, 1.79 GB
//! with both.
//!
//! Three paths, one graph footprint (x, A, B, and the residual where there is one):
//! - CPU: both directions are our own f32 loops over `gemm`/OpenBLAS; bf16 and f16 operands (the
//!   input, the frozen weight, the upstream gradient) are widened to f32 per call and the results
//!   rounded once, 3× faster than the generic path's bf16 products on a SmolLM2 step. In bf16 the
//!   frozen weight's products run on AMX where the CPU has it ([`super::amx`], through
//!   [`cpu_frozen_product`]), and without dropout the rank-r products read `x` and `dy` as stored
//!   ([`super::thin`], AVX-512), so nothing is widened but the f32 outputs rounded once.
//! - CUDA in bf16/f16: the half-precision path ([`Half`]): the LoRA branch's products take bf16/f16
//!   operands with f32 accumulation (cuBLAS `GemmEx`, [`super::gemm_ex`]), write f32 gradients, and
//!   accumulate the update straight into the frozen product's buffer, so no full-width f32 temporary
//!   exists. `CANDOR_LORA=composed` turns it off.
//! - Otherwise (CUDA in f32) the generic path runs the same math
//!   through candle's backend: cuBLAS products on the storages in the forward, candle tensor ops in the
//!   backward, the LoRA branch in f32; a dropout mask is kept as one byte per element on the device.
//!
//! [`LoraWeights::reference`] is the composed version the tests compare every path against; the half
//! path runs on the CPU too (forced, with `gemm_ex`'s emulation of cuBLAS), so its exact call sequence
//! is tested without a GPU.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use half::bf16;

use super::cpu_gemm::{product, View};
pub use super::dropout::DropoutMask;
use super::frozen_linear::{cpu_bias_rows, cpu_frozen_output, cpu_frozen_product, Side};
use super::gemm_ex::{row_major, GemmEx};
use super::rotary::{Rotary, RotaryTable};
use super::thin;
use super::{cpu_f32, cpu_f32_elems, cpu_storage, cpu_storage_of, f32_elems, f32_slice};

/// Whether [`LoraWeights::forward`] runs the CPU path for these operands: on the CPU, the input, the
/// frozen weight and the bias all f32, all bf16 or all f16 (the last two widened to f32 per call).
pub fn supported(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && weight.dtype() == x.dtype()
        && bias.is_none_or(|b| b.dtype() == x.dtype())
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

/// What the op does with the layer's output `y` before returning it, in place of a separate op that
/// would keep `y` in the graph until the step ends beside its own result.
#[derive(Clone, Copy)]
pub enum Epilogue<'a> {
    /// `y` itself.
    None,
    /// `residual + y` (the output and down projections and their residual connection; `[.., out]`,
    /// `x`'s dtype). The residual gets `dy` as its gradient.
    Residual(&'a Tensor),
    /// `rope(y)` with `y` viewed as `[b, t, out / head_dim, head_dim]` (the q and k projections of a
    /// model without q/k norms; `x` is `[b, t, in]`, `positions` `[b, t]`, as [`super::rope`] takes
    /// them). The backward rotates `dy` back first.
    Rotate { table: &'a RotaryTable, positions: &'a Tensor, head_dim: usize },
}

impl Epilogue<'_> {
    /// The epilogue applied to `y` by separate ops, with `rope` for the rotation (the fused
    /// [`super::rope`] or its composed reference).
    pub fn composed(
        self,
        y: &Tensor,
        rope: fn(&Tensor, &RotaryTable, &Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        match self {
            Epilogue::None => Ok(y.clone()),
            Epilogue::Residual(res) => res + y,
            Epilogue::Rotate { table, positions, head_dim } => {
                let (b, t, out) = y.dims3()?;
                let y4 = y.reshape((b, t, out / head_dim, head_dim))?;
                rope(&y4, table, positions)?.reshape((b, t, out))
            }
        }
    }
}

/// Which code runs the op.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Path {
    /// Our f32 loops over `cpu_gemm` (CPU; bf16 and f16 operands widened to f32 per call, the output
    /// rounded once).
    Cpu,
    /// candle backend products, the LoRA part in f32 (any device and dtype).
    Generic,
    /// bf16/f16 products with f32 accumulation through [`super::gemm_ex`] (CUDA's default for bf16 and
    /// f16).
    Half,
}

/// Whether CUDA runs [`Path::Half`] for bf16/f16 layers: yes unless `CANDOR_LORA` is
/// `composed` (the switch for A/B measurements, as `CANDOR_ATTENTION`).
fn half_on_cuda() -> bool {
    static COMPOSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    !*COMPOSED.get_or_init(|| std::env::var("CANDOR_LORA").is_ok_and(|v| v == "composed"))
}

impl LoraWeights<'_> {
    /// The layer on `x: [.., in]` as one op: the CPU f32 path where [`supported`]; on CUDA in bf16/f16
    /// the half-precision path; else the device-agnostic path. `mask` covers `x`'s elements.
    pub fn forward(&self, x: &Tensor, mask: Option<DropoutMask>) -> Result<Tensor> {
        self.forward_then(x, Epilogue::None, mask)
    }

    /// `then(layer(x))` as one op (see [`Epilogue`]): the layer's own output exists only inside it.
    pub fn forward_then(&self, x: &Tensor, then: Epilogue, mask: Option<DropoutMask>) -> Result<Tensor> {
        let _profile = super::profile::span("lora_linear", super::profile::Phase::Forward);
        let path = if supported(x, self.weight, self.bias) {
            Path::Cpu
        } else if x.device().is_cuda() && half_path_applies(x) && half_on_cuda() {
            Path::Half
        } else {
            Path::Generic
        };
        self.apply(x, then, mask, path)
    }

    /// The op's device-agnostic path (candle backend products), which CUDA runs in f32, forced on any
    /// device: for the tests, which check it on the CPU.
    pub fn forward_generic(&self, x: &Tensor, then: Epilogue, mask: Option<DropoutMask>) -> Result<Tensor> {
        self.apply(x, then, mask, Path::Generic)
    }

    /// The op's half-precision path (CUDA's for bf16/f16), forced on any device: on the CPU its products
    /// run [`super::gemm_ex`]'s emulation of cuBLAS, for the tests. An error for an f32 `x`.
    pub fn forward_half(&self, x: &Tensor, then: Epilogue, mask: Option<DropoutMask>) -> Result<Tensor> {
        if !half_path_applies(x) {
            candle_core::bail!("{OP}: the half-precision path takes a bf16 or f16 input");
        }
        self.apply(x, then, mask, Path::Half)
    }

    /// Checks the operands; with [`Epilogue::Rotate`], the rotation (and its head width).
    fn check(
        &self,
        x: &Tensor,
        then: Epilogue,
        mask: Option<&DropoutMask>,
    ) -> Result<Option<(Rotary, usize)>> {
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
        match then {
            Epilogue::None => Ok(None),
            Epilogue::Residual(res) => {
                let mut out = x.dims().to_vec();
                *out.last_mut().unwrap() = out_f;
                if res.dims() != out || res.dtype() != x.dtype() {
                    candle_core::bail!(
                        "{OP}: residual {:?} {:?}, expected {out:?} {:?}",
                        res.dims(),
                        res.dtype(),
                        x.dtype()
                    );
                }
                Ok(None)
            }
            Epilogue::Rotate { table, positions, head_dim } => {
                let (b, t, _) = x.dims3()?;
                if head_dim == 0 || out_f % head_dim != 0 {
                    candle_core::bail!("{OP}: {out_f} outputs are not heads of {head_dim} to rotate");
                }
                Ok(Some((Rotary::new(table, positions, (b, t, head_dim))?, head_dim)))
            }
        }
    }

    fn apply(&self, x: &Tensor, then: Epilogue, mask: Option<DropoutMask>, path: Path) -> Result<Tensor> {
        let rotation = self.check(x, then, mask.as_ref())?;
        let residual = match then {
            Epilogue::Residual(res) => Some(res),
            _ => None,
        };
        let (out_f, in_f) = self.weight.dims2()?;
        let rows = x.elem_count() / in_f;
        // the generic and half paths keep the mask on the device as one byte per element
        let mask_bytes = match (&mask, path) {
            (Some(m), Path::Generic | Path::Half) => {
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
            path,
            half: (path == Path::Half)
                .then(|| -> Result<HalfWeights> {
                    let round = |t: &Tensor| t.detach().to_dtype(x.dtype());
                    Ok(HalfWeights { a: round(self.a)?.contiguous()?, b: round(self.b)?.contiguous()? })
                })
                .transpose()?,
            rank_out: (path == Path::Cpu && [x, self.a, self.b].iter().any(|t| t.track_op()))
                .then(|| std::sync::Mutex::new(None)),
            dims: (self.a.dim(0)?, in_f, out_f),
            residual: residual.is_some(),
            rotation,
        };
        match residual {
            None => x.contiguous()?.apply_op3(&self.a.contiguous()?, &self.b.contiguous()?, op),
            // an op takes three tensors: A and B travel as one (the concatenation's backward splits
            // their gradient), the residual third
            Some(res) => {
                let ab = Tensor::cat(&[self.a.flatten_all()?, self.b.flatten_all()?], 0)?;
                x.contiguous()?.apply_op3(&ab, &res.contiguous()?, op)
            }
        }
    }

    /// [`LoraWeights::reference`] followed by the epilogue, as the decoder composed them.
    pub fn reference_then(&self, x: &Tensor, then: Epilogue, mask: Option<&DropoutMask>) -> Result<Tensor> {
        then.composed(&self.reference(x, mask)?, super::rotary::reference)
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
    /// The mask as 0/1 bytes `[rows, in]` on the op's device (generic and half paths).
    mask_bytes: Option<Tensor>,
    path: Path,
    /// A and B in the input's dtype ([`Path::Half`] only).
    half: Option<HalfWeights>,
    /// `xd·Aᵀ` from the CPU forward, taken by the backward; kept only when something needs a gradient.
    rank_out: Option<std::sync::Mutex<Option<Vec<f32>>>>,
    /// `(r, in, out)`.
    dims: (usize, usize, usize),
    /// Whether the op's arguments are `(x, [A | B], residual)` ([`Epilogue::Residual`]) rather than
    /// `(x, A, B)`.
    residual: bool,
    /// [`Epilogue::Rotate`]'s rotation and head width.
    rotation: Option<(Rotary, usize)>,
}

const OP: &str = "lora_linear";

impl LoraLinear {
    /// A, B and the residual from the op's second and third arguments, given as storages with their
    /// layouts: `(A, B, None)` or, with a residual, `([A | B], residual)` split into `(A, B, residual)`.
    #[allow(clippy::type_complexity)]
    fn operands<'s, S>(
        &self,
        (s2, l2): (&'s S, &Layout),
        (s3, l3): (&'s S, &Layout),
    ) -> ((&'s S, Layout), (&'s S, Layout), Option<(&'s S, Layout)>) {
        let (r, in_f, out_f) = self.dims;
        if !self.residual {
            return ((s2, l2.clone()), (s3, l3.clone()), None);
        }
        let at = l2.start_offset();
        (
            (s2, Layout::contiguous_with_offset((r, in_f), at)),
            (s2, Layout::contiguous_with_offset((out_f, r), at + r * in_f)),
            // as `[rows, out]`, the layout the paths give their output (the op takes it contiguous)
            Some((
                s3,
                Layout::contiguous_with_offset((l3.shape().elem_count() / out_f, out_f), l3.start_offset()),
            )),
        )
    }

    /// A and B as tensors from the op's second and third arguments (see [`LoraLinear::operands`]).
    fn lora_args(&self, t2: &Tensor, t3: &Tensor) -> Result<(Tensor, Tensor)> {
        let (r, in_f, out_f) = self.dims;
        if !self.residual {
            return Ok((t2.clone(), t3.clone()));
        }
        Ok((
            t2.narrow(0, 0, r * in_f)?.reshape((r, in_f))?,
            t2.narrow(0, r * in_f, out_f * r)?.reshape((out_f, r))?,
        ))
    }

    /// The backward's gradients in the op's argument order: `(dx, dA, dB)`, or with a residual
    /// `(dx, [dA | dB], dy)`.
    #[allow(clippy::type_complexity)]
    fn arg_grads(
        &self,
        (dx, da, db): (Option<Tensor>, Option<Tensor>, Option<Tensor>),
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !self.residual {
            return Ok((dx, da, db));
        }
        let ab = match (da, db) {
            (Some(da), Some(db)) => Some(Tensor::cat(&[da.flatten_all()?, db.flatten_all()?], 0)?),
            _ => None,
        };
        Ok((dx, ab, Some(dy.clone())))
    }

    /// `dropout(x)`, borrowed when there is no mask.
    /// `x`'s bf16 elements (contiguous) when the rank-r products read it as stored ([`thin`]): `x`
    /// bf16, no dropout (a dropped-out `x` is scaled, no longer the stored values), a rank and CPU
    /// the kernels take.
    fn thin<'a>(&self, xs: &'a CpuStorage, xl: &Layout) -> Result<Option<&'a [bf16]>> {
        match (xs, &self.mask) {
            (CpuStorage::BF16(x), None) if thin::applies(self.dims.0) => {
                Ok(Some(super::contiguous(x, xl, OP, "x")?))
            }
            _ => Ok(None),
        }
    }

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
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ((a_s, al), (b_s, bl), res) = self.operands((s2, l2), (s3, l3));
        let of: fn(&Storage) -> Result<&CpuStorage> = |s| cpu_storage(s, OP);
        let (y, shape) = match self.path {
            Path::Generic => self.generic_fwd(xs, xl, (a_s, &al), (b_s, &bl), res, of)?,
            Path::Half => self.half_fwd(xs, xl, res, of)?,
            Path::Cpu => self.cpu_path_fwd(xs, xl, (a_s, &al), (b_s, &bl), res)?,
        };
        match &self.rotation {
            None => Ok((y, shape)),
            Some((rot, d)) => Ok((rot.cpu_fwd(&y, &heads_layout(&shape, *d))?.0, shape)),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let ((a_s, al), (b_s, bl), res) = self.operands((s2, l2), (s3, l3));
        let of: fn(&Storage) -> Result<&candle_core::CudaStorage> = |s| super::cuda_storage(s, OP);
        let (y, shape) = match self.path {
            Path::Half => self.half_fwd(xs, xl, res, of)?,
            _ => self.generic_fwd(xs, xl, (a_s, &al), (b_s, &bl), res, of)?,
        };
        match &self.rotation {
            None => Ok((y, shape)),
            Some((rot, d)) => Ok((rot.cuda_fwd(&y, &heads_layout(&shape, *d))?.0, shape)),
        }
    }

    fn bwd(
        &self,
        x_t: &Tensor,
        t2: &Tensor,
        t3: &Tensor,
        _y: &Tensor,
        dy_t: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _profile = super::profile::span("lora_linear", super::profile::Phase::Backward);
        let (a_t, b_t) = self.lora_args(t2, t3)?;
        // the gradient of the layer's output: dy rotated back through the epilogue's rotation
        let dy_t = match &self.rotation {
            None => dy_t.clone(),
            Some((rot, d)) => {
                let heads = heads_layout(dy_t.shape(), *d);
                let turned = dy_t.contiguous()?.reshape(heads.shape())?.apply_op1_no_bwd(&rot.inverse())?;
                turned.reshape(dy_t.shape())?
            }
        };
        let grads = match self.path {
            Path::Half => self.half_bwd(x_t, &dy_t)?,
            Path::Generic => self.generic_bwd(x_t, &a_t, &b_t, &dy_t)?,
            Path::Cpu => self.cpu_bwd(x_t, &a_t, &b_t, &dy_t)?,
        };
        self.arg_grads(grads, &dy_t)
    }
}

/// `[1, rows, heads, head_dim]` for an output of `shape` (`[.., heads · head_dim]`): the layout the
/// rotation reads.
fn heads_layout(shape: &Shape, head_dim: usize) -> Layout {
    let dims = shape.dims();
    let width = dims.last().copied().unwrap_or(0);
    Layout::contiguous((1, shape.elem_count() / width.max(1), width / head_dim, head_dim))
}

impl LoraLinear {
    /// [`Path::Cpu`]'s forward.
    fn cpu_path_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        (a_s, al): (&CpuStorage, &Layout),
        (b_s, bl): (&CpuStorage, &Layout),
        res: Option<(&CpuStorage, Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (r, in_f, out_f) = self.dims;
        let rows = xl.shape().elem_count() / in_f;
        let (a, b) = (f32_slice(a_s, al, OP, "A")?, f32_slice(b_s, bl, OP, "B")?);
        // x widened to f32 for the rank-r product, unless that reads it as stored
        let thin = self.thin(xs, xl)?;
        let x = match thin {
            Some(_) => std::borrow::Cow::Borrowed(&[][..]),
            None => f32_elems(xs, Some(xl), OP, "x")?,
        };
        // y = (residual +) x·Wᵀ (+ bias) + s·(xd·Aᵀ)·Bᵀ
        let accumulate = res.is_some() || self.bias.is_some();
        let mut y = match res {
            None if self.bias.is_none() => {
                let x32 = thin.is_none().then_some(&x[..]);
                cpu_frozen_output(xs, xl, x32, &self.weight, Side::Forward)?
            }
            None => cpu_bias_rows(self.bias.as_ref(), rows, out_f)?,
            Some((rs, rl)) => {
                let mut y = f32_elems(rs, Some(&rl), OP, "residual")?.into_owned();
                if let Some(bias) = &self.bias {
                    let (bs, bl) = bias.storage_and_layout();
                    let bias = cpu_f32_elems(&bs, Some(bl), OP, "bias")?;
                    y.chunks_exact_mut(out_f)
                        .for_each(|row| row.iter_mut().zip(bias.iter()).for_each(|(y, b)| *y += b));
                }
                y
            }
        };
        if accumulate {
            let x32 = thin.is_none().then_some(&x[..]);
            cpu_frozen_product(xs, xl, x32, &self.weight, Side::Forward, &mut y, true)?;
        }
        let t = match thin {
            Some(x) => thin::rows_times(x, &transposed(a, r, in_f), rows, in_f, r),
            None => rank_product(View::matrix(&self.dropped(&x), rows, in_f), View::matrix(a, r, in_f)),
        };
        product(View::matrix(&t, rows, r), View::matrix(b, out_f, r).t())
            .scaled(self.scale)
            .add_to(&mut y, 0, out_f);
        if let Some(keep) = &self.rank_out {
            *keep.lock().unwrap() = Some(t);
        }
        let mut dims = xl.shape().dims().to_vec();
        *dims.last_mut().unwrap() = out_f;
        Ok((cpu_storage_of(y, xs.dtype())?, Shape::from(dims)))
    }

    /// [`Path::Cpu`]'s backward: `(dx, dA, dB)`.
    fn cpu_bwd(
        &self,
        x_t: &Tensor,
        a_t: &Tensor,
        b_t: &Tensor,
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
        let (xs, dys) = (cpu_storage(&xs, OP)?, cpu_storage(&dys, OP)?);
        let a = View::matrix(cpu_f32(&a_s, al, OP, "A")?, r, in_f);
        let b = View::matrix(cpu_f32(&b_s, bl, OP, "B")?, out_f, r);
        // x and dy as stored where the rank-r products read them so ([`thin`]), else widened
        let thin = match (self.thin(xs, xl)?, dys) {
            (Some(x), CpuStorage::BF16(dy)) => Some((x, super::contiguous(dy, dyl, OP, "dy")?)),
            _ => None,
        };
        let (x, dy) = match thin {
            Some(_) => (std::borrow::Cow::Borrowed(&[][..]), std::borrow::Cow::Borrowed(&[][..])),
            None => (f32_elems(xs, Some(xl), OP, "x")?, f32_elems(dys, Some(dyl), OP, "dy")?),
        };
        let dy = View::matrix(&dy, rows, out_f);

        // u = dy·B: [rows, r]
        let u = match thin {
            Some((_, dy16)) => thin::rows_times(dy16, b.data, rows, out_f, r),
            None => product(dy, b).to_vec(),
        };
        let u = View::matrix(&u, rows, r);
        // dx = dy·W + s · mask ⊙ (u·A); layer 0's q, k and v read the frozen embeddings, and nothing
        // upstream wants their dx
        let dx = x_t.track_op().then(|| -> Result<Vec<f32>> {
            let dy32 = thin.is_none().then_some(dy.data);
            let mut dx = cpu_frozen_output(dys, dyl, dy32, &self.weight, Side::InputGrad)?;
            match &self.mask {
                None => product(u, a).scaled(s).add_to(&mut dx, 0, in_f),
                Some(m) => {
                    let v = product(u, a).to_vec();
                    for (i, (d, v)) in dx.iter_mut().zip(&v).enumerate() {
                        *d += s * (m.factor(i) * v);
                    }
                }
            }
            Ok(dx)
        });
        // dA = s·uᵀ·xd: [r, in]; dB = s·dyᵀ·(xd·Aᵀ): [out, r], with xd·Aᵀ from the forward
        // (recomputed if a second backward through the same graph finds it taken)
        let kept = self.rank_out.as_ref().and_then(|k| k.lock().unwrap().take());
        let (da, db) = match thin {
            Some((x16, dy16)) => {
                let mut da = thin::rows_transposed_times(x16, u.data, rows, in_f, r);
                da.iter_mut().for_each(|v| *v *= s);
                let t = kept
                    .unwrap_or_else(|| thin::rows_times(x16, &transposed(a.data, r, in_f), rows, in_f, r));
                let dbt = thin::rows_transposed_times(dy16, &t, rows, out_f, r);
                let db = transposed(&dbt, r, out_f).into_iter().map(|v| s * v).collect();
                (da, db)
            }
            None => {
                let xd = self.dropped(&x);
                let xd = View::matrix(&xd, rows, in_f);
                let da = product(u.t(), xd).scaled(s).to_vec();
                let t = kept.unwrap_or_else(|| rank_product(xd, a));
                let db = product(dy.t(), View::matrix(&t, rows, r)).scaled(s).to_vec();
                (da, db)
            }
        };

        let device = x_t.device();
        let dx = dx.transpose()?.map(|dx| super::cpu_tensor_of(dx, x_t.shape(), x_t.dtype())).transpose()?;
        Ok((
            dx,
            Some(Tensor::from_vec(da, (r, in_f), device)?),
            Some(Tensor::from_vec(db, (out_f, r), device)?),
        ))
    }

    /// The forward on any backend's storages: `y = x·Wᵀ (+ bias) + (s·(xd·Aᵀ)·Bᵀ)` with the LoRA part
    /// in f32 and rounded once to `x`'s dtype, as [`LoraWeights::reference`] computes it.
    fn generic_fwd<S: BackendStorage>(
        &self,
        x: &S,
        xl: &Layout,
        (a, al): (&S, &Layout),
        (b, bl): (&S, &Layout),
        residual: Option<(&S, Layout)>,
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
        let mut y = y.binary_impl::<Add>(&delta, &ly, &ly)?;
        if let Some((res, rl)) = residual {
            y = res.binary_impl::<Add>(&y, &rl, &ly)?;
        }
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

/// Whether [`Path::Half`] takes this input: bf16 or f16.
fn half_path_applies(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
}

/// A and B rounded to the input's dtype `h` (`[r, in]` and `[out, r]`, `r·(in + out)` elements), once
/// per forward, for [`Path::Half`]'s products in both directions.
struct HalfWeights {
    a: Tensor,
    b: Tensor,
}

/// The half-precision path, shared by the forward and the two backward ops. Every LoRA product takes
/// operands in `h` (bf16 or f16) with f32 accumulation:
///
/// - forward: `t = x·A_hᵀ` (`[rows, r]` in `h`), then `y += s·t·B_hᵀ` straight into the frozen product's
///   buffer;
/// - backward: `u = dy·B_h` (`[rows, r]` in `h`), `dx = dy·W + s·u·A_h` (accumulated into `dy·W`'s
///   buffer), `dA = s·uᵀ·x` and `dB = s·dyᵀ·t` (f32 results; `t` recomputed).
///
/// With dropout, `x` is replaced by `x ⊙ m` (the 0/1 mask in `h`, exact) and the mask's `1/(1 − p)` joins
/// the f32 `α` of the products that read it, rather than being rounded to `h`; `dx`'s LoRA part becomes
/// `(s·u·A_h) ⊙ m`, a `rows × in` temporary in `h`. The masked input exists for one product at a time.
///
/// So no full-width f32 tensor exists. The generic path makes an f32 copy of `x` for the rank-r product
/// and its gradient, the f32 product `t·Bᵀ` (`rows × out`) and its rounded copy before adding it, in
/// both directions: on a 1B model about 1.5 MB of memory traffic per token and layer, against about
/// 0.4 MB here. What this gives up is precision inside the LoRA branch: `t`, `u`, A and B are rounded to
/// `h` (relative 2⁻⁹ in bf16) before their products, as PyTorch autocast's LoRA does; the gradients are
/// accumulated and returned in f32.
struct Half<'a, S> {
    h: DType,
    rows: usize,
    in_f: usize,
    out_f: usize,
    r: usize,
    a: &'a S,
    b: &'a S,
    scale: f32,
    /// The dropout mask as 0/1 bytes `[rows, in]` and its `1/(1 − p)`.
    mask: Option<(&'a S, f32)>,
    of: fn(&Storage) -> Result<&S>,
    weight: &'a Tensor,
}

impl<'a, S: GemmEx> Half<'a, S> {
    /// Runs `f` on the path for `rows` rows with the rounded weights `w` and the dropout mask's bytes
    /// and scale.
    fn with<R>(
        rows: usize,
        w: &HalfWeights,
        (scale, mask): (f32, Option<(&Tensor, f32)>),
        weight: &'a Tensor,
        of: fn(&Storage) -> Result<&S>,
        f: impl FnOnce(&Half<'_, S>) -> Result<R>,
    ) -> Result<R> {
        let (r, in_f) = w.a.dims2()?;
        let out_f = w.b.dim(0)?;
        let (a, _) = w.a.storage_and_layout();
        let (b, _) = w.b.storage_and_layout();
        let m = mask.map(|(bytes, _)| bytes.storage_and_layout());
        let mask = match (&m, mask) {
            (Some((ms, _)), Some((_, keep))) => Some((of(ms)?, keep)),
            _ => None,
        };
        let half =
            Half { h: w.a.dtype(), rows, in_f, out_f, r, a: of(&a)?, b: of(&b)?, scale, mask, of, weight };
        f(&half)
    }

    /// With dropout, `x ⊙ m` for `x` at `x_off` (a new buffer); see [`Half::branch_input`].
    fn masked(&self, x: &S, x_off: usize) -> Result<Option<S>> {
        use candle_core::op::Mul;
        let Some((bytes, _)) = self.mask else { return Ok(None) };
        let lx = Layout::contiguous((self.rows, self.in_f));
        let m = bytes.to_dtype(&lx, self.h)?;
        let x2 = Layout::contiguous_with_offset((self.rows, self.in_f), x_off);
        Ok(Some(x.binary_impl::<Mul>(&m, &x2, &lx)?))
    }

    /// The LoRA branch's input as an operand with the `α` its products take: `(x ⊙ m, 0, 1/(1 − p))`
    /// with dropout (`masked` from [`Half::masked`]), else `(x, x_off, 1)`.
    fn branch_input<'x>(&self, x: &'x S, x_off: usize, masked: &'x Option<S>) -> (&'x S, usize, f32) {
        match (masked, self.mask) {
            (Some(xm), Some((_, keep))) => (xm, 0, keep),
            _ => (x, x_off, 1.0),
        }
    }

    /// `α·xd·A_hᵀ`: `[rows, r]` in `h`, for the branch's input `xd` at `xd_off` and its factor `α`
    /// (see [`Half::branch_input`]).
    fn t(&self, (xd, xd_off, alpha): (&S, usize, f32)) -> Result<S> {
        let mut t = xd.output(self.rows * self.r, self.h)?;
        row_major(
            (&mut t, 0),
            (xd, xd_off, false),
            (self.a, 0, true),
            (self.rows, self.r, self.in_f),
            alpha,
            0.0,
        )?;
        Ok(t)
    }

    /// `dy·B_h`: `[rows, r]` in `h`.
    fn u(&self, dy: &S, dy_off: usize) -> Result<S> {
        let mut u = dy.output(self.rows * self.r, self.h)?;
        row_major(
            (&mut u, 0),
            (dy, dy_off, false),
            (self.b, 0, false),
            (self.rows, self.r, self.out_f),
            1.0,
            0.0,
        )?;
        Ok(u)
    }

    /// `y = x·Wᵀ (+ bias) + s·t·B_hᵀ`.
    fn forward(&self, x: &S, xl: &Layout, bias: Option<&Tensor>) -> Result<S> {
        use candle_core::op::Add;
        let (rows, in_f, out_f) = (self.rows, self.in_f, self.out_f);
        let x_off = xl.start_offset();
        let x2 = Layout::contiguous_with_offset((rows, in_f), x_off);
        let (ws, wl) = self.weight.storage_and_layout();
        let mut y = x.matmul((self.of)(&ws)?, (1, rows, out_f, in_f), &x2, &wl.transpose(0, 1)?)?;
        if let Some(bias) = bias {
            let (bs, bias_l) = bias.storage_and_layout();
            let ly = Layout::contiguous((rows, out_f));
            y = y.binary_impl::<Add>((self.of)(&bs)?, &ly, &bias_l.broadcast_as((rows, out_f))?)?;
        }
        let masked = self.masked(x, x_off)?;
        let t = self.t(self.branch_input(x, x_off, &masked))?;
        drop(masked);
        row_major((&mut y, 0), (&t, 0, false), (self.b, 0, true), (rows, out_f, self.r), self.scale, 1.0)?;
        Ok(y)
    }

    /// `dx = dy·W + s·u·A_h` in `h` (the second term `⊙ m` with dropout).
    fn dx(&self, dy: &S, dyl: &Layout) -> Result<S> {
        use candle_core::op::{Add, Mul};
        let (rows, in_f, out_f) = (self.rows, self.in_f, self.out_f);
        let dy_off = dyl.start_offset();
        let dy2 = Layout::contiguous_with_offset((rows, out_f), dy_off);
        let (ws, wl) = self.weight.storage_and_layout();
        let mut dx = dy.matmul((self.of)(&ws)?, (1, rows, in_f, out_f), &dy2, wl)?;
        let u = self.u(dy, dy_off)?;
        let Some((bytes, keep)) = self.mask else {
            row_major(
                (&mut dx, 0),
                (&u, 0, false),
                (self.a, 0, false),
                (rows, in_f, self.r),
                self.scale,
                1.0,
            )?;
            return Ok(dx);
        };
        let lx = Layout::contiguous((rows, in_f));
        let mut v = dy.output(rows * in_f, self.h)?;
        row_major(
            (&mut v, 0),
            (&u, 0, false),
            (self.a, 0, false),
            (rows, in_f, self.r),
            self.scale * keep,
            0.0,
        )?;
        let v = v.binary_impl::<Mul>(&bytes.to_dtype(&lx, self.h)?, &lx, &lx)?;
        dx.binary_impl::<Add>(&v, &lx, &lx)
    }

    /// `dA = s·uᵀ·x` then `dB = s·dyᵀ·t`, in one f32 buffer of `r·in + out·r` elements.
    fn grads(&self, x: &S, xl: &Layout, dy: &S, dyl: &Layout) -> Result<S> {
        let (rows, in_f, out_f, r) = (self.rows, self.in_f, self.out_f, self.r);
        let (x_off, dy_off) = (xl.start_offset(), dyl.start_offset());
        let masked = self.masked(x, x_off)?;
        let (xd, xd_off, alpha) = self.branch_input(x, x_off, &masked);
        let (u, t) = (self.u(dy, dy_off)?, self.t((xd, xd_off, alpha))?);
        let mut g = x.output(r * in_f + out_f * r, DType::F32)?;
        row_major((&mut g, 0), (&u, 0, true), (xd, xd_off, false), (r, in_f, rows), self.scale * alpha, 0.0)?;
        row_major((&mut g, r * in_f), (dy, dy_off, true), (&t, 0, false), (out_f, r, rows), self.scale, 0.0)?;
        Ok(g)
    }
}

impl LoraLinear {
    /// The dropout mask's device bytes and `1/(1 − p)`, for [`Half`].
    fn mask_arg(&self) -> Option<(&Tensor, f32)> {
        self.mask_bytes.as_ref().zip(self.mask.as_ref().map(|m| m.scale))
    }

    /// [`Path::Half`]'s forward (see [`Half`]).
    fn half_fwd<S: GemmEx>(
        &self,
        x: &S,
        xl: &Layout,
        residual: Option<(&S, Layout)>,
        of: fn(&Storage) -> Result<&S>,
    ) -> Result<(S, Shape)> {
        let Some(w) = &self.half else { candle_core::bail!("{OP}: half path without its rounded weights") };
        let rows = xl.shape().elem_count() / w.a.dim(1)?;
        let mut y = Half::with(rows, w, (self.scale, self.mask_arg()), &self.weight, of, |h| {
            h.forward(x, xl, self.bias.as_ref())
        })?;
        if let Some((res, rl)) = residual {
            let ly = Layout::contiguous((rows, w.b.dim(0)?));
            y = res.binary_impl::<candle_core::op::Add>(&y, &rl, &ly)?;
        }
        let mut dims = xl.shape().dims().to_vec();
        *dims.last_mut().unwrap() = w.b.dim(0)?;
        Ok((y, Shape::from(dims)))
    }

    /// [`Path::Half`]'s backward: two no-backward ops, one for `dx` (when wanted), one for `dA` and `dB`
    /// together. Each computes the thin `u = dy·B_h` itself (`rows × r`, one more read of `dy`) rather
    /// than handing a buffer between ops.
    fn half_bwd(&self, x: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(w) = &self.half else { candle_core::bail!("{OP}: half path without its rounded weights") };
        let (r, in_f) = w.a.dims2()?;
        let out_f = w.b.dim(0)?;
        let dy = dy.contiguous()?;
        let op = HalfBackward { weight: &self.weight, w, scale: self.scale, mask: self.mask_arg() };
        let g = x.apply_op2_no_bwd(&dy, &HalfGrads(&op))?;
        let da = g.narrow(0, 0, r * in_f)?.reshape((r, in_f))?;
        let db = g.narrow(0, r * in_f, out_f * r)?.reshape((out_f, r))?;
        let dx =
            if x.track_op() { Some(dy.apply_op1_no_bwd(&HalfDx(&op))?.reshape(x.shape())?) } else { None };
        Ok((dx, Some(da), Some(db)))
    }
}

/// What [`Path::Half`]'s backward ops read besides their arguments.
struct HalfBackward<'a> {
    weight: &'a Tensor,
    w: &'a HalfWeights,
    scale: f32,
    mask: Option<(&'a Tensor, f32)>,
}

impl HalfBackward<'_> {
    /// Runs `f` on the path for the rows of `x_like` (`x` or `dy`, rows of `width`).
    fn run<S: GemmEx>(
        &self,
        x_like: &Layout,
        width: usize,
        of: fn(&Storage) -> Result<&S>,
        f: impl FnOnce(&Half<'_, S>) -> Result<S>,
    ) -> Result<S> {
        Half::with(x_like.shape().elem_count() / width, self.w, (self.scale, self.mask), self.weight, of, f)
    }
}

/// `dx` of [`Path::Half`], on `dy`.
struct HalfDx<'a>(&'a HalfBackward<'a>);

/// `dA` and `dB` of [`Path::Half`] in one f32 vector, on `(x, dy)`.
struct HalfGrads<'a>(&'a HalfBackward<'a>);

impl candle_core::CustomOp1 for HalfDx<'_> {
    fn name(&self) -> &'static str {
        "candor-lora-half-dx"
    }

    fn cpu_fwd(&self, dy: &CpuStorage, dyl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (out_f, in_f) = self.0.weight.dims2()?;
        let rows = dyl.shape().elem_count() / out_f;
        let dx = self.0.run(dyl, out_f, |s| cpu_storage(s, OP), |h| h.dx(dy, dyl))?;
        Ok((dx, Shape::from((rows, in_f))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (out_f, in_f) = self.0.weight.dims2()?;
        let rows = dyl.shape().elem_count() / out_f;
        let dx = self.0.run(dyl, out_f, |s| super::cuda_storage(s, OP), |h| h.dx(dy, dyl))?;
        Ok((dx, Shape::from((rows, in_f))))
    }
}

impl candle_core::CustomOp2 for HalfGrads<'_> {
    fn name(&self) -> &'static str {
        "candor-lora-half-grads"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        xl: &Layout,
        dy: &CpuStorage,
        dyl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let in_f = self.0.weight.dim(1)?;
        let g = self.0.run(xl, in_f, |s| cpu_storage(s, OP), |h| h.grads(x, xl, dy, dyl))?;
        Ok((g, Shape::from(self.0.w.a.elem_count() + self.0.w.b.elem_count())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        xl: &Layout,
        dy: &candle_core::CudaStorage,
        dyl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let in_f = self.0.weight.dim(1)?;
        let g = self.0.run(xl, in_f, |s| super::cuda_storage(s, OP), |h| h.grads(x, xl, dy, dyl))?;
        Ok((g, Shape::from(self.0.w.a.elem_count() + self.0.w.b.elem_count())))
    }
}

/// `xd·Aᵀ`: `[rows, r]`, the rank-r intermediate.
/// The transpose of a row-major `rows × cols` matrix, as a new row-major `cols × rows` one.
fn transposed(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..rows * cols).map(|e| m[(e % rows) * cols + e / rows]).collect()
}

fn rank_product(xd: View, a: View) -> Vec<f32> {
    product(xd, a.t()).to_vec()
}
