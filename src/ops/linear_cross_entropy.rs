//! LM head + cross-entropy, chunked over rows, never materialising the full `[rows × vocab]` logits.
//!
//! Forward and backward happen together: for each chunk of rows we compute the logits, the loss, and
//! the gradient with respect to the hidden states, `dh = (softmax − onehot) · W`, then drop the chunk.
//! Only `dh` (`[rows × hidden]`) survives. It is attached to the graph with a linear surrogate,
//! `loss + Σ(h·dh) − stop_grad(Σ(h·dh))`, whose value is exactly `loss` and whose gradient with respect
//! to `h` is exactly `dh` (times the upstream gradient). The head weight is frozen and gets nothing.
//!
//! It runs on any device through candle's tensor ops; a fused CUDA kernel can replace the chunk loop.

use candle_core::{DType, Result, Tensor, D};

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
    let need_grad = h.track_op();
    let h_const = h.detach();
    let chunk = (CHUNK_ELEMS / vocab).clamp(1, rows.max(1));
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
    let surrogate = (h * &dh)?.to_dtype(DType::F32)?.sum_all()?;
    &loss + (&surrogate - surrogate.detach())?
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
            let ours = linear_cross_entropy_sum(h.as_tensor(), &w, &labels)?;
            let theirs = reference(h.as_tensor(), &w, &labels)?;
            let (a, b) = (ours.to_scalar::<f32>()?, theirs.to_scalar::<f32>()?);
            assert!((a - b).abs() / b.abs() < 1e-5, "loss {a} vs {b}");
            let ga = ours.backward()?.get(h.as_tensor()).unwrap().clone();
            let gb = theirs.backward()?.get(h.as_tensor()).unwrap().clone();
            let err = (ga - &gb)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            let scale = gb.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(err / scale < 1e-5, "gradient relative error {}", err / scale);
        }
        Ok(())
    }

    #[test]
    fn no_graph_input_gives_plain_value() -> Result<()> {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 1.0, (3, 4), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (9, 4), &dev)?;
        let labels = Tensor::new(&[1u32, 8, 0], &dev)?;
        let a = linear_cross_entropy_sum(&h, &w, &labels)?.to_scalar::<f32>()?;
        let b = reference(&h, &w, &labels)?.to_scalar::<f32>()?;
        assert!((a - b).abs() < 1e-5 * b.abs());
        Ok(())
    }
}
