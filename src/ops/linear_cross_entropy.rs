//! LM head + cross-entropy, chunked over rows, never materialising the full `[rows × vocab]` logits.
//!
//! Forward and backward happen together: for each chunk of rows we compute the logits, the loss, and
//! the gradient with respect to the hidden states, `dh = (softmax − onehot) · W`, then drop the chunk.
//! Only `dh` (`[rows × hidden]`) survives. It is attached to the graph with a linear surrogate,
//! `loss + Σ(h·dh) − stop_grad(Σ(h·dh))`, whose value is exactly `loss` and whose gradient with respect
//! to `h` is exactly `dh` (times the upstream gradient). The head weight is frozen and gets nothing.
//!
//! On the CPU (f32) each chunk is one matrix product into a reused buffer, one parallel pass per row
//! (max, exponentials, log-sum-exp, loss, then `softmax − onehot` in place) and one product for `dh`.
//! In bf16 with AMX ([`amx`]) both products take the bf16 operands as they are (f32 sums; the softmax
//! gradient rounded to bf16 for the second), a block of [`CPU_WIDE_ROWS`] vocabulary rows at a time.
//! Otherwise in bf16 or f16 the same loop runs in f32: `h` widened, the weight widened one block at a
//! time for each product, so no vocabulary-sized f32 copy of it exists, and `dh` rounded once.
//! Other devices ([`chunked`]) take the logits from a product in the model dtype (cuBLAS on
//! a GPU, as transformers does), then two row ops that are CUDA kernels (`kernels/cross_entropy.cu`)
//! with CPU versions: [`RowXent`] reads each row once (online max and sum) for its log-sum-exp and
//! loss, and [`SoftmaxGrad`] overwrites the logits in place with `softmax − onehot`, which the second
//! product turns into `dh`. Per chunk that is one read and one write of the logits beyond the products,
//! against about eight full passes in f32 for the same steps composed from candle ops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu_gemm::{product, View};
use super::{amx, contiguous, cpu_output, exp_f32, simd, Elem};

/// Logit elements per chunk on the CPU (24 MB in f32, under glibc's largest mmap threshold, so the
/// buffer is heap memory rather than fresh zeroed pages), unless that is fewer than [`CPU_MIN_CHUNK_ROWS`].
const CPU_CHUNK_ELEMS: usize = 6 << 20;

/// The fewest rows per chunk on the CPU. Each chunk streams the whole head weight through `gemm` twice,
/// and with few rows the products are bound by that: measured here (`gemm` f32, 2 threads), a
/// 2048 × 128k head ran 41 GFLOP/s at 49 rows (the elements rule above), 77 at 128 and 96 at 256; on a
/// Llama-3.2-1B-shaped step that made the head about half the step. 256 rows cost a 131 MB buffer for a
/// 128k vocabulary (50 MB for SmolLM2's 49k, where 256 rows also ran 10–20% faster than 128).
const CPU_MIN_CHUNK_ROWS: usize = 256;

/// Vocabulary rows of a bf16/f16 head weight per product on the CPU: widened to f32 at a time (9.4 MB
/// at hidden 576, 34 MB at 2048), or on AMX the inner dimension of the `dh` product.
const CPU_WIDE_ROWS: usize = 4096;

/// Logit elements per chunk elsewhere (128 MB in bf16): about 500 rows of a 128k vocabulary, enough
/// for cuBLAS to run the products at full speed, small next to a GPU's memory.
const DEVICE_CHUNK_ELEMS: usize = 64 << 20;

/// Σ over rows of `logsumexp(h·Wᵀ) − (h·Wᵀ)[label]`. `h: [rows, hidden]`, `weight: [vocab, hidden]`,
/// `labels: [rows]` (u32, all in range; on the CPU one outside is an error, in the CUDA kernel a NaN
/// loss). Returns an f32 scalar.
pub fn linear_cross_entropy_sum(h: &Tensor, weight: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let _profile = super::profile::span("lm_head_loss", super::profile::Phase::Forward);
    let (rows, hidden) = h.dims2()?;
    let (vocab, w_hidden) = weight.dims2()?;
    if hidden != w_hidden || labels.dims() != [rows] {
        candle_core::bail!(
            "linear_cross_entropy: h {:?}, weight {:?}, labels {:?} do not fit",
            h.dims(),
            weight.dims(),
            labels.dims()
        );
    }
    let cpu = h.device().is_cpu()
        && matches!(h.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && weight.dtype() == h.dtype();
    if cpu {
        let chunk = (CPU_CHUNK_ELEMS / vocab).max(CPU_MIN_CHUNK_ROWS).min(rows.max(1));
        let (loss, dh) = cpu_loss_and_grad(&h.detach(), weight, labels, chunk, h.track_op())?;
        let loss = Tensor::new(loss as f32, h.device())?;
        return match dh {
            None => Ok(loss),
            Some(dh) => attach_grad(h, loss, &super::cpu_tensor_of(dh, (rows, hidden), h.dtype())?),
        };
    }
    chunked(h, weight, labels, (DEVICE_CHUNK_ELEMS / vocab).clamp(1, rows.max(1)))
}

/// The chunk loop on any device and dtype, `chunk` rows at a time: the products through candle (cuBLAS
/// on a GPU), the row work through [`RowXent`] and [`SoftmaxGrad`].
pub fn chunked(h: &Tensor, weight: &Tensor, labels: &Tensor, chunk: usize) -> Result<Tensor> {
    let rows = h.dim(0)?;
    let need_grad = h.track_op();
    let h_const = h.detach();
    let labels = labels.to_dtype(DType::U32)?;
    let mut loss = Tensor::zeros((), DType::F32, h.device())?;
    let mut dh_chunks = Vec::new();
    for start in (0..rows).step_by(chunk.max(1)) {
        let len = chunk.min(rows - start);
        let lc = labels.narrow(0, start, len)?;
        // a fresh tensor outside the graph, so overwriting it below is safe
        let logits = h_const.narrow(0, start, len)?.matmul(&weight.t()?)?.contiguous()?;
        let stats = logits.apply_op2_no_bwd(&lc, &RowXent)?;
        loss = (loss + stats.get(1)?.sum_all()?)?;
        if need_grad {
            logits.inplace_op3(&stats.get(0)?, &lc, &SoftmaxGrad)?;
            dh_chunks.push(logits.matmul(weight)?);
        }
    }
    if !need_grad {
        return Ok(loss);
    }
    let dh = Tensor::cat(&dh_chunks, 0)?.to_dtype(h.dtype())?;
    attach_grad(h, loss, &dh)
}

/// `loss` with `h`'s gradient set to `dh`: `loss + Σ(h·dh) − stop_grad(Σ(h·dh))`.
fn attach_grad(h: &Tensor, loss: Tensor, dh: &Tensor) -> Result<Tensor> {
    let surrogate = (h * dh)?.to_dtype(DType::F32)?.sum_all()?;
    &loss + (&surrogate - surrogate.detach())?
}

/// The CPU chunk loop: the summed loss (accumulated in f64) and, when asked, `dh`.
fn cpu_loss_and_grad(
    h: &Tensor,
    weight: &Tensor,
    labels: &Tensor,
    chunk: usize,
    need_grad: bool,
) -> Result<(f64, Option<Vec<f32>>)> {
    const OP: &str = "linear_cross_entropy";
    let (rows, hidden) = h.dims2()?;
    let vocab = weight.dim(0)?;
    let labels = labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    let (h, weight) = (h.contiguous()?, weight.contiguous()?);
    let (hs, hl) = h.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let products =
        HeadProducts::new(super::cpu_storage(&hs, OP)?, hl, super::cpu_storage(&ws, OP)?, wl, rows)?;
    let block = products.block(vocab);
    let blocks = (0..vocab).step_by(block).map(|v0| (v0, block.min(vocab - v0)));
    let mut logits = super::cpu_output::<f32>(chunk.min(rows) * vocab);
    let mut dh = if need_grad { super::cpu_output::<f32>(rows * hidden) } else { Vec::new() };
    let mut loss = 0f64;
    for start in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - start);
        let lg = &mut logits[..len * vocab];
        for (v0, n) in blocks.clone() {
            products.logits(start, len, v0, n, lg)?;
        }
        loss += lg
            .par_chunks_mut(vocab)
            .zip(&labels[start..start + len])
            .map(|(row, &label)| softmax_row_loss(row, label as usize, need_grad))
            .sum::<f64>();
        if need_grad {
            for (v0, n) in blocks.clone() {
                products.add_dh(start, len, v0, n, lg, &mut dh)?;
            }
        }
    }
    Ok((loss, need_grad.then_some(dh)))
}

/// The CPU loop's two products for a chunk of rows and a block of vocabulary rows: bf16 on AMX where
/// `h` and the weight are both bf16 and the CPU has it (the softmax gradient rounded to bf16 for `dh`,
/// as a bf16 model's logits are); otherwise f32 on `cpu_gemm`, a bf16/f16 weight widened one block at a
/// time (a block is the whole vocabulary when the weight is f32).
enum HeadProducts<'a> {
    Amx { amx: &'static amx::Amx, h: amx::Rows<'a>, w: amx::Rows<'a> },
    F32 { h: std::borrow::Cow<'a, [f32]>, w: &'a CpuStorage, wl: &'a Layout },
}

impl<'a> HeadProducts<'a> {
    fn new(
        hs: &'a CpuStorage,
        hl: &'a Layout,
        ws: &'a CpuStorage,
        wl: &'a Layout,
        rows: usize,
    ) -> Result<Self> {
        const OP: &str = "linear_cross_entropy";
        let (vocab, hidden) = wl.shape().dims2()?;
        if let (Some(amx), CpuStorage::BF16(hd), CpuStorage::BF16(wd)) = (amx::get(), hs, ws) {
            let h = amx::Rows::matrix(contiguous(hd, hl, OP, "h")?, rows, hidden);
            let w = amx::Rows::matrix(contiguous(wd, wl, OP, "weight")?, vocab, hidden);
            return Ok(HeadProducts::Amx { amx, h, w });
        }
        Ok(HeadProducts::F32 { h: super::f32_elems(hs, Some(hl), OP, "h")?, w: ws, wl })
    }

    /// Vocabulary rows per block: the whole vocabulary for an f32 weight (borrowed, nothing to widen).
    fn block(&self, vocab: usize) -> usize {
        match self {
            HeadProducts::F32 { w: CpuStorage::F32(_), .. } => vocab.max(1),
            _ => CPU_WIDE_ROWS,
        }
    }

    /// The weight's rows `v0..v0 + n` as f32: borrowed in f32, widened otherwise.
    fn wide_rows(w: &'a CpuStorage, wl: &Layout, v0: usize, n: usize) -> Result<std::borrow::Cow<'a, [f32]>> {
        let hidden = wl.shape().dims2()?.1;
        let l = Layout::contiguous_with_offset((n, hidden), wl.start_offset() + v0 * hidden);
        super::f32_elems(w, Some(&l), "linear_cross_entropy", "weight")
    }

    /// `lg[.., v0..v0 + n] = h[start..start + len] · W[v0..v0 + n]ᵀ` (`lg`: `len` rows of the vocabulary).
    fn logits(&self, start: usize, len: usize, v0: usize, n: usize, lg: &mut [f32]) -> Result<()> {
        let vocab = lg.len() / len;
        match self {
            HeadProducts::Amx { amx, h, w } => {
                let rhs = amx::Rhs::Transposed(w.row_range(v0, n));
                amx.product(amx::Lhs::Bf16(h.row_range(start, len)), rhs, lg, v0, vocab, false);
            }
            HeadProducts::F32 { h, w, wl } => {
                let hidden = wl.shape().dims2()?.1;
                let h = View::matrix(h, h.len() / hidden, hidden);
                let w = Self::wide_rows(w, wl, v0, n)?;
                product(h.row_range(start, len), View::matrix(&w, n, hidden).t()).write(lg, v0, vocab);
            }
        }
        Ok(())
    }

    /// `dh[start..start + len] (+)= lg[.., v0..v0 + n] · W[v0..v0 + n]` (written for the first block).
    fn add_dh(
        &self,
        start: usize,
        len: usize,
        v0: usize,
        n: usize,
        lg: &[f32],
        dh: &mut [f32],
    ) -> Result<()> {
        let vocab = lg.len() / len;
        let p = View::strided(lg, v0, len, n, vocab);
        match self {
            HeadProducts::Amx { amx, w, .. } => {
                let hidden = w.cols;
                let rhs = amx::Rhs::Plain(w.row_range(v0, n));
                amx.product(amx::Lhs::F32(p), rhs, dh, start * hidden, hidden, v0 != 0);
            }
            HeadProducts::F32 { w, wl, .. } => {
                let hidden = wl.shape().dims2()?.1;
                let w = Self::wide_rows(w, wl, v0, n)?;
                let prod = product(p, View::matrix(&w, n, hidden));
                if v0 == 0 {
                    prod.write(dh, start * hidden, hidden);
                } else {
                    prod.add_to(dh, start * hidden, hidden);
                }
            }
        }
        Ok(())
    }
}

/// One row of logits: returns `logsumexp − logit[label]`, and with `grad` leaves `softmax − onehot`
/// in the row.
fn softmax_row_loss(row: &mut [f32], label: usize, grad: bool) -> f64 {
    simd::vectorised(
        #[inline(always)]
        || {
            let max = simd::max(row);
            let picked = row[label];
            let sum = simd::exp_sum(row, max);
            if grad {
                let inv = (1.0 / sum) as f32;
                row.iter_mut().for_each(|x| *x *= inv);
                row[label] -= 1.0;
            }
            sum.ln() + max as f64 - picked as f64
        },
    )
}

/// Per row of a chunk of logits `[rows, vocab]` and its labels `[rows]` (u32): a `[2, rows]` f32 tensor,
/// row 0 the log-sum-exp, row 1 the loss `lse − logit[label]`. No backward (the loop computes it).
pub struct RowXent;

/// Overwrites logits `[rows, vocab]` in place with `softmax − onehot(label)`, given each row's
/// log-sum-exp (f32) and label (u32): the gradient of the summed loss with respect to the logits.
pub struct SoftmaxGrad;

const XENT: &str = "linear_cross_entropy";

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    match s {
        CpuStorage::U32(d) => contiguous(d, l, XENT, what),
        other => candle_core::bail!("{XENT}: {what} is {:?}, expected u32", other.dtype()),
    }
}

fn check_rows(logits: &Layout, labels: &Layout) -> Result<(usize, usize)> {
    let (rows, vocab) = logits.shape().dims2()?;
    if labels.dims() != [rows] || vocab == 0 {
        candle_core::bail!("{XENT}: logits {:?} and labels {:?} do not fit", logits.dims(), labels.dims());
    }
    Ok((rows, vocab))
}

fn row_xent_cpu<T: Elem>(logits: &[T], labels: &[u32], vocab: usize) -> Result<Vec<f32>> {
    let rows = labels.len();
    if let Some((r, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= vocab) {
        candle_core::bail!("{XENT}: label {l} of row {r} is outside the vocabulary ({vocab})");
    }
    let stats: Vec<(f32, f32)> = logits
        .par_chunks(vocab)
        .zip(labels)
        .map(|(row, &label)| {
            // f32::max skips a NaN, which then makes the sum NaN
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x.to_f32()));
            let sum: f64 = row.iter().map(|&x| exp_f32(x.to_f32() - max) as f64).sum();
            let lse = sum.ln() + max as f64;
            (lse as f32, (lse - row[label as usize].to_f32() as f64) as f32)
        })
        .collect();
    let mut out = cpu_output::<f32>(2 * rows);
    for (r, (lse, loss)) in stats.into_iter().enumerate() {
        out[r] = lse;
        out[rows + r] = loss;
    }
    Ok(out)
}

fn softmax_grad_cpu<T: Elem>(logits: &mut [T], lse: &[f32], labels: &[u32], vocab: usize) {
    logits.par_chunks_mut(vocab).zip(lse).zip(labels).for_each(|((row, &lse), &label)| {
        for (j, x) in row.iter_mut().enumerate() {
            let p = exp_f32(x.to_f32() - lse);
            *x = T::from_f32(if j == label as usize { p - 1.0 } else { p });
        }
    });
}

impl CustomOp2 for RowXent {
    fn name(&self) -> &'static str {
        "candor-row-xent"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ls: &CpuStorage,
        ll: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, vocab) = check_rows(l, ll)?;
        let labels = u32_slice(ls, ll, "labels")?;
        let out = with_float_type!(s.dtype(), XENT, T => {
            row_xent_cpu(contiguous(T::cpu_storage_as_slice(s)?, l, XENT, "logits")?, labels, vocab)?
        });
        Ok((CpuStorage::F32(out), Shape::from((2, rows))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ls: &candle_core::CudaStorage,
        ll: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (rows, vocab) = check_rows(l, ll)?;
        let out = with_float_type!(s.dtype(), XENT, T => gpu::row_xent::<T>((s, l), (ls, ll), rows, vocab)?);
        Ok((out, Shape::from((2, rows))))
    }
}

impl candle_core::InplaceOp3 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "candor-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s: &mut CpuStorage,
        l: &Layout,
        lse: &CpuStorage,
        lse_l: &Layout,
        labels: &CpuStorage,
        labels_l: &Layout,
    ) -> Result<()> {
        let (_, vocab) = check_rows(l, labels_l)?;
        let lse = super::f32_slice(lse, lse_l, XENT, "log-sum-exp")?;
        let labels = u32_slice(labels, labels_l, "labels")?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("{XENT}: logits must be contiguous");
        };
        match s {
            CpuStorage::F32(d) => softmax_grad_cpu(&mut d[a..b], lse, labels, vocab),
            CpuStorage::BF16(d) => softmax_grad_cpu(&mut d[a..b], lse, labels, vocab),
            CpuStorage::F16(d) => softmax_grad_cpu(&mut d[a..b], lse, labels, vocab),
            other => candle_core::bail!("{XENT}: unsupported dtype {:?}", other.dtype()),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &mut candle_core::CudaStorage,
        l: &Layout,
        lse: &candle_core::CudaStorage,
        lse_l: &Layout,
        labels: &candle_core::CudaStorage,
        labels_l: &Layout,
    ) -> Result<()> {
        let (rows, vocab) = check_rows(l, labels_l)?;
        with_float_type!(s.dtype(), XENT, T => gpu::softmax_grad::<T>((s, l), (lse, lse_l), (labels, labels_l), rows, vocab))
    }
}

/// Launches `kernels/cross_entropy.cu`.
#[cfg(feature = "cuda")]
mod gpu {
    use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{CudaStorage, Layout, Result, WithDType};

    use super::XENT;
    use crate::ops::cuda::{elementwise, func, output, view, CROSS_ENTROPY_PTX};

    const MODULE: &str = "candor_cross_entropy";

    fn dims(rows: usize, vocab: usize) -> Result<(u32, u32)> {
        match (u32::try_from(rows), u32::try_from(vocab)) {
            (Ok(r), Ok(v)) => Ok((r, v)),
            _ => candle_core::bail!(
                "linear_cross_entropy: {rows} x {vocab} logits are too large for the kernel"
            ),
        }
    }

    pub fn row_xent<T: CudaDType + DeviceRepr + WithDType>(
        (s, l): (&CudaStorage, &Layout),
        (ls, ll): (&CudaStorage, &Layout),
        rows: usize,
        vocab: usize,
    ) -> Result<CudaStorage> {
        let dev = &s.device;
        let (logits, labels) = (view::<T>(s, l, XENT, "logits")?, view::<u32>(ls, ll, XENT, "labels")?);
        let mut out = output::<f32>(dev, 2 * rows)?;
        let f = func(dev, MODULE, CROSS_ENTROPY_PTX, "row_xent", T::DTYPE)?;
        let (rows_u, vocab_u) = dims(rows, vocab)?;
        let stream = dev.cuda_stream();
        {
            let mut b = stream.launch_builder(&f);
            b.arg(&logits).arg(&labels).arg(&mut out).arg(&rows_u).arg(&vocab_u);
            // one block of 256 threads per row; the kernel loops when rows exceed the grid
            let cfg = LaunchConfig {
                grid_dim: (rows.clamp(1, 65_535) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: argument list matches `row_xent_*` in kernels/cross_entropy.cu.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    pub fn softmax_grad<T: CudaDType + DeviceRepr + WithDType>(
        (s, l): (&mut CudaStorage, &Layout),
        (lse, lse_l): (&CudaStorage, &Layout),
        (ls, ll): (&CudaStorage, &Layout),
        rows: usize,
        vocab: usize,
    ) -> Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("linear_cross_entropy: logits must be contiguous");
        };
        let dev = s.device.clone();
        let (lse, labels) =
            (view::<f32>(lse, lse_l, XENT, "log-sum-exp")?, view::<u32>(ls, ll, XENT, "labels")?);
        let mut logits = s.as_cuda_slice_mut::<T>()?.slice_mut(a..b);
        let f = func(&dev, MODULE, CROSS_ENTROPY_PTX, "softmax_grad", T::DTYPE)?;
        let (rows_u, vocab_u) = dims(rows, vocab)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut logits).arg(&lse).arg(&labels).arg(&rows_u).arg(&vocab_u);
        // SAFETY: argument list matches `softmax_grad_*` in kernels/cross_entropy.cu.
        unsafe { b.launch(elementwise(rows * vocab)) }.w()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// The same loss composed from plain differentiable ops (the slow reference).
    fn reference(h: &Tensor, w: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let logits = h.matmul(&w.t()?)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        (lse - shifted.gather(&labels.unsqueeze(1)?, 1)?)?.sum_all()
    }

    #[test]
    fn matches_reference_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        // awkward sizes: the vocabulary is not a multiple of the chunk, rows not of anything
        for (rows, hidden, vocab) in [(7usize, 5usize, 11usize), (37, 16, 300_001)] {
            let h = Var::randn(0f32, 1.0, (rows, hidden), &dev)?;
            let w = (Tensor::randn(0f32, 1.0, (vocab, hidden), &dev)? * 0.3)?;
            let labels: Vec<u32> = (0..rows).map(|i| ((i * 7919) % vocab) as u32).collect();
            let labels = Tensor::new(labels, &dev)?;
            let theirs = reference(h.as_tensor(), &w, &labels)?;
            let b = theirs.to_scalar::<f32>()?;
            let gb = theirs.backward()?.get(h.as_tensor()).unwrap().clone();
            // the CPU path, and the chunk loop other devices run (chunks of 3 rows)
            for ours in [
                linear_cross_entropy_sum(h.as_tensor(), &w, &labels)?,
                chunked(h.as_tensor(), &w, &labels, 3)?,
            ] {
                let a = ours.to_scalar::<f32>()?;
                assert!((a - b).abs() / b.abs() < 1e-5, "loss {a} vs {b}");
                let ga = ours.backward()?.get(h.as_tensor()).unwrap().clone();
                let err = (ga - &gb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let scale = gb.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(err / scale < 1e-5, "gradient relative error {}", err / scale);
            }
            // the CPU loop over several chunks (5 rows each, the last one partial): the public path
            // above takes at least CPU_MIN_CHUNK_ROWS rows at a time, so these sizes are one chunk there
            let (loss, dh) = cpu_loss_and_grad(h.as_tensor(), &w, &labels, 5, true)?;
            assert!((loss as f32 - b).abs() / b.abs() < 1e-5, "chunked CPU loss {loss} vs {b}");
            let dh = Tensor::from_vec(dh.expect("dh was asked for"), (rows, hidden), &dev)?;
            let err = (dh - &gb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let scale = gb.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(err / scale < 1e-5, "chunked CPU gradient relative error {}", err / scale);
        }
        Ok(())
    }

    #[test]
    fn no_graph_input_gives_plain_value() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (9, 4), &dev)?;
        let labels = Tensor::new(&[1u32, 8, 0], &dev)?;
        let b = reference(&h, &w, &labels)?.to_scalar::<f32>()?;
        for ours in [linear_cross_entropy_sum(&h, &w, &labels)?, chunked(&h, &w, &labels, 2)?] {
            let a = ours.to_scalar::<f32>()?;
            assert!((a - b).abs() < 1e-5 * b.abs());
        }
        Ok(())
    }

    #[test]
    fn bf16_chunks_match_the_f32_reference_on_the_same_numbers() -> Result<()> {
        let dev = Device::Cpu;
        let (rows, hidden, vocab) = (19, 24, 5003);
        let h16 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (rows, hidden), &dev)?.to_dtype(DType::BF16)?)?;
        let w16 = (Tensor::randn(0f32, 1.0, (vocab, hidden), &dev)? * 0.5)?.to_dtype(DType::BF16)?;
        let h32 = Var::from_tensor(&h16.to_dtype(DType::F32)?)?;
        let labels: Vec<u32> = (0..rows).map(|i| ((i * 7919) % vocab) as u32).collect();
        let labels = Tensor::new(labels, &dev)?;
        let theirs = reference(h32.as_tensor(), &w16.to_dtype(DType::F32)?, &labels)?;
        let ours = chunked(h16.as_tensor(), &w16, &labels, 4)?;
        let (a, b) = (ours.to_scalar::<f32>()?, theirs.to_scalar::<f32>()?);
        // the logits are rounded to bf16 (as a bf16 model's LM head gives them)
        assert!((a - b).abs() / b.abs() < 2e-3, "loss {a} vs {b}");
        let ga = ours.backward()?.get(h16.as_tensor()).unwrap().to_dtype(DType::F32)?;
        let gb = theirs.backward()?.get(h32.as_tensor()).unwrap().clone();
        let err = (ga - &gb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = gb.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(err / scale < 1e-2, "gradient relative error {}", err / scale);
        Ok(())
    }

    #[test]
    fn a_label_outside_the_vocabulary_is_an_error_on_the_cpu() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (2, 4), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::randn(0f32, 1.0, (9, 4), &dev)?.to_dtype(DType::BF16)?;
        let err = chunked(&h, &w, &Tensor::new(&[1u32, 9], &dev)?, 2).unwrap_err().to_string();
        assert!(err.contains("label 9 of row 1 is outside the vocabulary (9)"), "{err}");
        Ok(())
    }
}
