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
//! Other devices run the same chunk loop through candle's tensor ops.

use candle_core::{DType, Result, Tensor, D};
use rayon::prelude::*;

use super::cpu_gemm::{product, View};
use super::{cpu_f32, exp_f32};

/// Logit elements per chunk (24 MB in f32, under glibc's largest mmap threshold, so chunks reuse heap
/// memory instead of fresh zeroed pages), so a 128k-vocabulary head uses a few rows at a time.
const CHUNK_ELEMS: usize = 6 << 20;

/// Σ over rows of `logsumexp(h·Wᵀ) − (h·Wᵀ)[label]`. `h: [rows, hidden]`, `weight: [vocab, hidden]`,
/// `labels: [rows]` (u32, all in range). Returns an f32 scalar.
pub fn linear_cross_entropy_sum(h: &Tensor, weight: &Tensor, labels: &Tensor) -> Result<Tensor> {
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
    let chunk = (CHUNK_ELEMS / vocab).clamp(1, rows.max(1));
    if h.device().is_cpu() && h.dtype() == DType::F32 && weight.dtype() == DType::F32 {
        let (loss, dh) = cpu_loss_and_grad(&h.detach(), weight, labels, chunk, h.track_op())?;
        let loss = Tensor::new(loss as f32, h.device())?;
        return match dh {
            None => Ok(loss),
            Some(dh) => attach_grad(h, loss, &Tensor::from_vec(dh, (rows, hidden), h.device())?),
        };
    }
    composed(h, weight, labels, chunk)
}

/// The chunk loop from candle ops (any device and dtype; the CPU f32 path is checked against it).
pub fn composed(h: &Tensor, weight: &Tensor, labels: &Tensor, chunk: usize) -> Result<Tensor> {
    let rows = h.dim(0)?;
    let need_grad = h.track_op();
    let h_const = h.detach();
    let mut loss = Tensor::zeros((), DType::F32, h.device())?;
    let mut dh_chunks = Vec::new();
    let mut start = 0;
    while start < rows {
        let len = chunk.min(rows - start);
        let hc = h_const.narrow(0, start, len)?;
        let lc = labels.narrow(0, start, len)?;
        let logits = hc.matmul(&weight.t()?)?.to_dtype(DType::F32)?;
        let max = logits.max_keepdim(D::Minus1)?;
        let exp = logits.broadcast_sub(&max)?.exp()?;
        let sum = exp.sum_keepdim(D::Minus1)?;
        let lse = (sum.log()? + &max)?;
        let picked = logits.gather(&lc.unsqueeze(1)?, 1)?;
        loss = (loss + (lse - picked)?.sum_all()?)?;
        if need_grad {
            let probs = exp.broadcast_div(&sum)?.to_dtype(weight.dtype())?;
            let dh = (probs.matmul(weight)? - weight.index_select(&lc, 0)?)?;
            dh_chunks.push(dh);
        }
        start += len;
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
    let h = View::matrix(cpu_f32(&hs, hl, OP, "h")?, rows, hidden);
    let w = View::matrix(cpu_f32(&ws, wl, OP, "weight")?, vocab, hidden);
    let mut logits = vec![0f32; chunk.min(rows) * vocab];
    let mut dh = if need_grad { vec![0f32; rows * hidden] } else { Vec::new() };
    let mut loss = 0f64;
    for start in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - start);
        let lg = &mut logits[..len * vocab];
        product(h.row_range(start, len), w.t()).write(lg, 0, vocab);
        loss += lg
            .par_chunks_mut(vocab)
            .zip(&labels[start..start + len])
            .map(|(row, &label)| softmax_row_loss(row, label as usize, need_grad))
            .sum::<f64>();
        if need_grad {
            product(View::matrix(lg, len, vocab), w).write(&mut dh, start * hidden, hidden);
        }
    }
    Ok((loss, need_grad.then_some(dh)))
}

/// One row of logits: returns `logsumexp − logit[label]`, and with `grad` leaves `softmax − onehot`
/// in the row.
fn softmax_row_loss(row: &mut [f32], label: usize, grad: bool) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let picked = row[label];
    row.iter_mut().for_each(|x| *x = exp_f32(*x - max));
    let sum: f64 = row.iter().map(|&x| x as f64).sum();
    if grad {
        let inv = (1.0 / sum) as f32;
        row.iter_mut().for_each(|x| *x *= inv);
        row[label] -= 1.0;
    }
    sum.ln() + max as f64 - picked as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The same loss composed from plain differentiable ops (the slow reference).
    fn reference(h: &Tensor, w: &Tensor, labels: &Tensor) -> Result<Tensor> {
        let logits = h.matmul(&w.t()?)?;
        let max = logits.max_keepdim(D::Minus1)?.detach();
        let shifted = logits.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
        (lse - shifted.gather(&labels.unsqueeze(1)?, 1)?)?.sum_all()
    }

    #[test]
    fn matches_composed_reference_value_and_gradient() -> Result<()> {
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
            // the CPU path, and the candle-op chunk loop other devices run (chunks of 3 rows)
            for ours in [
                linear_cross_entropy_sum(h.as_tensor(), &w, &labels)?,
                composed(h.as_tensor(), &w, &labels, 3)?,
            ] {
                let a = ours.to_scalar::<f32>()?;
                assert!((a - b).abs() / b.abs() < 1e-5, "loss {a} vs {b}");
                let ga = ours.backward()?.get(h.as_tensor()).unwrap().clone();
                let err = (ga - &gb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                let scale = gb.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(err / scale < 1e-5, "gradient relative error {}", err / scale);
            }
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
        for ours in [linear_cross_entropy_sum(&h, &w, &labels)?, composed(&h, &w, &labels, 2)?] {
            let a = ours.to_scalar::<f32>()?;
            assert!((a - b).abs() < 1e-5 * b.abs());
        }
        Ok(())
    }
}
