//! Scaled dot-product attention with grouped KV heads and an additive bias, as one op.
//!
//! Composed from candle ops, attention leaves in the graph a scaled copy of q, contiguous copies of K
//! and V, the scores, the biased scores, the probabilities and a transposed copy of the output: five
//! `[heads × t × keys]`-sized or `[t × hidden]`-sized tensors per layer, kept until the step ends. This
//! op keeps nothing but its inputs and output. The probabilities are recomputed in the backward (as
//! FlashAttention does), heads are read from `[batch, seq, heads, dim]` storage through their strides,
//! and the output is written straight into the `[batch, seq, heads · dim]` layout the output projection
//! reads.
//!
//! CPU (f32; bf16 and f16 storage widened to f32 in the op, the results rounded once): each (row, KV
//! head) pair is one task with its own scratch for one block of query rows' scores. CUDA in bf16 or
//! f16 with head dimension 64 or 128 (with `--features cuda`): the flash kernels of
//! `kernels/flash_attention.cu` (`flash_attention.rs`), where scores never reach global memory. Other
//! devices and dtypes run [`reference`] (candle ops: cuBLAS products and candle's softmax kernel on the
//! GPU) inside a recomputing op: the forward runs without a graph and the backward runs it again with
//! one, so the graph keeps the same four tensors as the fused op, and the scores exist for one layer at
//! a time, and there for a few batch rows at a time (128 MB of f32 scores). Without it, a 1B model at
//! 8 × 1024 tokens would keep about 1 GB of f32 scores and probabilities per layer.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, Var, D};
use rayon::prelude::*;

use half::bf16;

use super::amx::{self, Amx, Lhs, Rhs, Rows};
use super::cpu_gemm::{product, View};
use super::{cpu_f32, cpu_f32_elems, cpu_storage, cpu_storage_of, cpu_tensor_of, f32_elems, simd};

/// `softmax(q·kᵀ/√d + bias)·v` for `q: [b, heads, t, d]`, `k, v: [b, kv_heads, keys, d]` (any strides;
/// query head `h` reads KV head `h / (heads / kv_heads)`, as Hugging Face's `repeat_kv`), `bias`
/// `[b, 1, t, keys]` (f32; added to the scores). Returns `[b, t, heads · d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let _profile = super::profile::span("attention", super::profile::Phase::Forward);
    let (b, nh, t, d) = q.dims4()?;
    let (kb, nkv, tk, kd) = k.dims4()?;
    if kb != b || kd != d || v.dims() != k.dims() || nkv == 0 || nh % nkv != 0 {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit (heads must be a multiple of KV heads)",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    if let Some(bias) = bias {
        if bias.dims() != [b, 1, t, tk] || bias.dtype() != DType::F32 {
            candle_core::bail!(
                "attention: bias {:?} {:?}, expected f32 [{b}, 1, {t}, {tk}]",
                bias.dims(),
                bias.dtype()
            );
        }
    }
    #[cfg(feature = "cuda")]
    if super::flash_attention::applies(q, k, v) {
        return super::flash_attention::attention(q, k, v, bias);
    }
    // on the CPU in any float dtype: bf16 and f16 are widened to f32 inside the op
    let fused = q.device().is_cpu()
        && matches!(q.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && [k, v].iter().all(|x| x.dtype() == q.dtype());
    if !fused {
        return recomputed(q, k, v, bias);
    }
    let op = Attention { bias: bias.map(Tensor::contiguous).transpose()?, scale: 1.0 / (d as f32).sqrt() };
    let out = last_dim_contiguous(q)?.apply_op3(&last_dim_contiguous(k)?, &last_dim_contiguous(v)?, op)?;
    out.reshape((b, t, nh * d))
}

/// The composed version: `[b, heads, t, d]`. The query heads that share a KV head are stacked along the
/// sequence axis, so K and V are not copied per query head.
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let (nkv, tk) = (k.dim(1)?, k.dim(2)?);
    let rep = nh / nkv;
    // scale q (t·d values) rather than the scores (t·tk values)
    let qg = q.affine(1.0 / (d as f64).sqrt(), 0.0)?.reshape((b, nkv, rep * t, d))?;
    let scores = qg.matmul(&k.transpose(2, 3)?.contiguous()?)?;
    let mut scores = scores.to_dtype(DType::F32)?.reshape((b, nh, t, tk))?;
    if let Some(bias) = bias {
        scores = scores.broadcast_add(bias)?;
    }
    let probs = candle_nn::ops::softmax(&scores, D::Minus1)?.to_dtype(q.dtype())?;
    let out = probs.reshape((b, nkv, rep * t, tk))?.matmul(&v.contiguous()?)?;
    out.reshape((b, nh, t, d))
}

/// Score elements (`heads × t × keys`) one pass of [`reference`] may hold: it materialises a few f32
/// tensors of that size (scores, biased scores, probabilities, and their gradients in the backward), so
/// [`recomputed`] sends the batch through it a few rows at a time, 128 MB per such tensor. A 1B model at
/// 8 × 1024 tokens would otherwise hold about 1 GB per tensor; one row at a time its products are still
/// 32 heads of 1024 × 1024.
const CHUNK_SCORES: usize = 1 << 25;

/// [`reference`] as one recomputing op (what non-CPU devices and bf16 run): `[b, t, heads · d]`.
pub fn recomputed(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    recomputed_in_chunks(q, k, v, bias, CHUNK_SCORES)
}

/// [`recomputed`] with batch rows grouped so that a group has at most `max_scores` score elements
/// (at least one row per group). Public for the tests, which make the groups small.
pub fn recomputed_in_chunks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: Option<&Tensor>,
    max_scores: usize,
) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    if b == 0 {
        // no chunk to concatenate
        return Tensor::zeros((0, t, nh * d), q.dtype(), q.device());
    }
    let rows = (max_scores / (nh * t * k.dim(2)?).max(1)).clamp(1, b);
    let chunks = chunked(b, rows, |at, n| {
        let part = |x: &Tensor| x.detach().narrow(0, at, n);
        let bias = bias.map(|x| x.narrow(0, at, n)).transpose()?;
        reference(&part(q)?, &part(k)?, &part(v)?, bias.as_ref())?.transpose(1, 2)?.contiguous()
    })?;
    let out = Tensor::cat(&chunks, 0)?;
    if ![q, k, v].iter().any(|x| x.track_op()) {
        // nothing to differentiate (generation): no op (and with one pass, no copy)
        return out.reshape((b, t, nh * d));
    }
    let op = Recompute { out: std::sync::Mutex::new(Some(out)), bias: bias.cloned(), rows };
    q.apply_op3(k, v, op)?.reshape((b, t, nh * d))
}

/// `f(first_row, rows)` over `b` rows in groups of `rows` (the last group may be smaller).
fn chunked<R>(b: usize, rows: usize, mut f: impl FnMut(usize, usize) -> Result<R>) -> Result<Vec<R>> {
    (0..b).step_by(rows.max(1)).map(|at| f(at, rows.min(b - at))).collect()
}

/// Hands over an output computed without a graph; its backward recomputes it with one, `rows` batch
/// rows at a time.
struct Recompute {
    /// `[b, t, heads, d]`, taken by the forward (so the graph does not keep a second copy).
    out: std::sync::Mutex<Option<Tensor>>,
    bias: Option<Tensor>,
    rows: usize,
}

impl Recompute {
    fn take<S>(&self, of: fn(&Storage) -> Result<&S>) -> Result<(S, Shape)>
    where
        S: candle_core::backend::BackendStorage,
    {
        let out = self.out.lock().unwrap().take();
        let Some(out) = out else { candle_core::bail!("{OP}: recomputing op applied twice") };
        let (s, l) = out.storage_and_layout();
        Ok((of(&s)?.try_clone(l)?, out.shape().clone()))
    }
}

impl CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "candor-attention-recompute"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.take(|s| cpu_storage(s, OP))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.take(|s| super::cuda_storage(s, OP))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _profile = super::profile::span("attention", super::profile::Phase::Backward);
        let grads = chunked(q.dim(0)?, self.rows, |at, n| {
            let var = |x: &Tensor| Var::from_tensor(&x.detach().narrow(0, at, n)?);
            let (q, k, v) = (var(q)?, var(k)?, var(v)?);
            let bias = self.bias.as_ref().map(|x| x.narrow(0, at, n)).transpose()?;
            let out = reference(&q, &k, &v, bias.as_ref())?.transpose(1, 2)?;
            let d_out = d_out.detach().narrow(0, at, n)?.to_dtype(DType::F32)?;
            let grads = (out.to_dtype(DType::F32)? * d_out)?.sum_all()?.backward()?;
            // a gradient the graph never reached is zero
            let grad = |x: &Var| grads.get(x).cloned().map_or_else(|| x.zeros_like(), Ok);
            Ok([grad(&q)?, grad(&k)?, grad(&v)?])
        })?;
        let cat = |i: usize| Tensor::cat(&grads.iter().map(|g| g[i].clone()).collect::<Vec<_>>(), 0);
        Ok((Some(cat(0)?), Some(cat(1)?), Some(cat(2)?)))
    }
}

pub(crate) fn last_dim_contiguous(x: &Tensor) -> Result<Tensor> {
    if x.stride().last() == Some(&1) {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

struct Attention {
    bias: Option<Tensor>,
    scale: f32,
}

/// A `[b, heads, len, d]` tensor's storage: head `h` of row `n` is the `len × d` matrix at
/// `offset + n·s0 + h·s1` with row stride `s2`.
#[derive(Clone, Copy)]
struct Heads<'a, T> {
    data: &'a [T],
    offset: usize,
    s0: usize,
    s1: usize,
    s2: usize,
    len: usize,
    d: usize,
}

impl<'a, T> Heads<'a, T> {
    /// `data`: the whole storage ([`f32_elems`] without a layout, or bf16 as stored), read through `l`'s
    /// strides.
    fn new(data: &'a [T], l: &Layout, what: &str) -> Result<Self> {
        let (st, dims) = (l.stride(), l.dims());
        if st.len() != 4 || st[3] != 1 {
            candle_core::bail!("{OP}: {what} needs a contiguous last dimension (layout {l:?})");
        }
        Ok(Heads {
            data,
            offset: l.start_offset(),
            s0: st[0],
            s1: st[1],
            s2: st[2],
            len: dims[2],
            d: dims[3],
        })
    }

    fn at(&self, n: usize, h: usize) -> usize {
        self.offset + n * self.s0 + h * self.s1
    }
}

impl<'a> Heads<'a, f32> {
    fn head(&self, n: usize, h: usize) -> Mat<'a> {
        Mat::F32(View::strided(self.data, self.at(n, h), self.len, self.d, self.s2))
    }
}

impl<'a> Heads<'a, bf16> {
    fn head(&self, n: usize, h: usize) -> Mat<'a> {
        Mat::Bf16(Rows { data: self.data, offset: self.at(n, h), rows: self.len, cols: self.d, rs: self.s2 })
    }
}

/// A matrix operand of the products: f32 (the `cpu_gemm` path) or bf16 as stored (AMX).
#[derive(Clone, Copy)]
enum Mat<'a> {
    F32(View<'a>),
    Bf16(Rows<'a>),
}

impl<'a> Mat<'a> {
    fn row_range(self, first: usize, count: usize) -> Self {
        match self {
            Mat::F32(v) => Mat::F32(v.row_range(first, count)),
            Mat::Bf16(r) => Mat::Bf16(r.row_range(first, count)),
        }
    }
}

/// The heads of q, k and v: widened to f32, or bf16 as stored where AMX multiplies them.
#[derive(Clone, Copy)]
enum Qkv<'a> {
    F32([Heads<'a, f32>; 3]),
    Amx(&'static Amx, [Heads<'a, bf16>; 3]),
}

impl<'a> Qkv<'a> {
    /// `which`: 0 q, 1 k, 2 v.
    fn head(&self, which: usize, n: usize, h: usize) -> Mat<'a> {
        match self {
            Qkv::F32(x) => x[which].head(n, h),
            Qkv::Amx(_, x) => x[which].head(n, h),
        }
    }

    /// `dst (+)= lhs · rhs` (`rhs_t`: `lhs · rhsᵀ`) on the calling thread: on AMX, `lhs` bf16 or f32
    /// (rounded to bf16) and `rhs` bf16; else both f32 through `cpu_gemm`.
    #[allow(clippy::too_many_arguments)]
    fn mm(
        &self,
        lhs: Mat,
        rhs: Mat,
        rhs_t: bool,
        dst: &mut [f32],
        offset: usize,
        rs: usize,
        accumulate: bool,
    ) {
        match (self, lhs, rhs) {
            (Qkv::Amx(amx, _), lhs, Mat::Bf16(r)) => {
                let lhs = match lhs {
                    Mat::F32(v) => Lhs::F32(v),
                    Mat::Bf16(r) => Lhs::Bf16(r),
                };
                let rhs = if rhs_t { Rhs::Transposed(r) } else { Rhs::Plain(r) };
                amx.product_here(lhs, rhs, dst, offset, rs, accumulate);
            }
            (Qkv::F32(_), Mat::F32(a), Mat::F32(b)) => {
                let p = product(a, if rhs_t { b.t() } else { b }).one_thread();
                if accumulate {
                    p.add_to(dst, offset, rs)
                } else {
                    p.write(dst, offset, rs)
                }
            }
            _ => unreachable!("attention: operands of one path"),
        }
    }
}

const OP: &str = "attention";

/// The shapes of one call.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    nh: usize,
    nkv: usize,
    t: usize,
    tk: usize,
    d: usize,
}

impl Dims {
    fn of(ql: &Layout, kl: &Layout) -> Result<Dims> {
        let (b, nh, t, d) = ql.shape().dims4()?;
        let (_, nkv, tk, _) = kl.shape().dims4()?;
        Ok(Dims { b, nh, nkv, t, tk, d })
    }

    fn rep(&self) -> usize {
        self.nh / self.nkv
    }
}

/// Query rows per block. A block computes scores only up to the last key any of its rows may see, so
/// under a causal mask about 40% of the score and value products (and their exponentials) are skipped.
const BLOCK: usize = 64;

/// A masked score: the bias is `f32::MIN` (or −∞) there, so its probability is exactly zero whenever
/// its row has any visible key.
fn masked(bias: f32) -> bool {
    bias <= f32::MIN
}

/// One call's inputs on the CPU.
struct Ctx<'a> {
    dims: Dims,
    qkv: Qkv<'a>,
    bias: Option<&'a [f32]>,
    scale: f32,
    /// Per batch row and block of query rows: how many leading keys the block's rows can see.
    extents: Vec<usize>,
}

impl<'a> Ctx<'a> {
    fn new(dims: Dims, qkv: Qkv<'a>, bias: Option<&'a [f32]>, scale: f32) -> Self {
        let Dims { b, t, tk, .. } = dims;
        let blocks = t.div_ceil(BLOCK);
        let mut extents = vec![tk; b * blocks];
        if let Some(bias) = bias {
            for n in 0..b {
                for blk in 0..blocks {
                    let mut ext = 0;
                    for i in blk * BLOCK..t.min((blk + 1) * BLOCK) {
                        let row = &bias[(n * t + i) * tk..][..tk];
                        // a row that sees nothing gets a uniform softmax over every key, as composed
                        ext = ext.max(row.iter().rposition(|&x| !masked(x)).map_or(tk, |p| p + 1));
                    }
                    extents[n * blocks + blk] = ext;
                }
            }
        }
        Ctx { dims, qkv, bias, scale, extents }
    }

    /// `(first row, rows, visible keys)` for each block of query rows of batch row `n`.
    fn blocks(&self, n: usize) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let t = self.dims.t;
        let blocks = t.div_ceil(BLOCK);
        (0..blocks).map(move |blk| (blk * BLOCK, BLOCK.min(t - blk * BLOCK), self.extents[n * blocks + blk]))
    }

    /// Softmax probabilities of rows `i0..i0 + rows` of query head `h` in row `n` over the keys
    /// `0..ext` into `p`: `[rows, ext]`.
    fn probs(&self, n: usize, h: usize, (i0, rows, ext): (usize, usize, usize), p: &mut [f32]) {
        let Dims { t, tk, .. } = self.dims;
        let (q, k) = (self.qkv.head(0, n, h), self.qkv.head(1, n, h / self.dims.rep()));
        self.qkv.mm(q.row_range(i0, rows), k.row_range(0, ext), true, p, 0, ext, false);
        let scale = self.scale;
        simd::vectorised(
            #[inline(always)]
            || {
                for (i, row) in (i0..).zip(p[..rows * ext].chunks_exact_mut(ext)) {
                    match self.bias {
                        Some(bias) => {
                            let brow = &bias[(n * t + i) * tk..][..ext];
                            row.iter_mut().zip(brow).for_each(|(s, b)| *s = *s * scale + b);
                        }
                        None => row.iter_mut().for_each(|s| *s *= scale),
                    }
                    // masked scores (bias f32::MIN) come out as exactly 0
                    simd::softmax(row);
                }
            },
        );
    }

    /// Scratch for one block's `[rows, ext]` probabilities (or their gradient). Each block's are used
    /// as soon as they are made, so the scratch is a block's, not a head's `t × keys` (at 1024 tokens
    /// 4 MB per task, more than a core's L2, read back from memory by the next product). SmolLM2 at
    /// 1 × 4096 tokens: attention 23.9 s a step instead of 31.5, peak RSS 6.06 GB instead of 6.23;
    /// Llama-3.2-1B's shape at 1024: 2.63-2.66 s instead of 2.73-2.84 (`bench train-step --profile`).
    fn block_scratch(&self) -> Vec<f32> {
        vec![0f32; BLOCK.min(self.dims.t) * self.dims.tk]
    }

    /// Query heads per task (consecutive heads of one KV head): all of a KV head's, which read its K
    /// and V once and sum their gradients in place, when the `b · kv_heads` tasks spread evenly over the
    /// threads; else one. With one batch row and SmolLM2's 3 KV heads, 3 tasks on 2 threads left a
    /// thread idle for a third of the attention: a task per query head made a 1 × 4096-token step
    /// 1.21× faster, and a 4 × 256 one's attention (12 tasks either way) 5% slower.
    fn heads_per_task(&self) -> usize {
        let tasks = self.dims.b * self.dims.nkv;
        let threads = rayon::current_num_threads().max(1);
        if tasks.div_ceil(threads) * threads * 10 <= tasks * 11 {
            self.dims.rep()
        } else {
            1
        }
    }

    /// The `[count, t, d]` outputs of query heads `h0..h0 + count` of row `n` (one KV head's).
    fn forward_task(&self, n: usize, h0: usize, count: usize) -> Vec<f32> {
        let Dims { t, d, .. } = self.dims;
        let v = self.qkv.head(2, n, h0 / self.dims.rep());
        let mut p = self.block_scratch();
        let mut o = vec![0f32; count * t * d];
        for j in 0..count {
            for (i0, rows, ext) in self.blocks(n) {
                self.probs(n, h0 + j, (i0, rows, ext), &mut p);
                let p_block = Mat::F32(View::matrix(&p[..rows * ext], rows, ext));
                self.qkv.mm(p_block, v.row_range(0, ext), false, &mut o, (j * t + i0) * d, d, false);
            }
        }
        o
    }

    /// `(dq [count, t, d], dk [tk, d], dv [tk, d])` of query heads `h0..h0 + count` of row `n` (dk and
    /// dv: these heads' share of their KV head's gradients), given the output `o` and its gradient `go`
    /// (both `[b, t, heads, d]`, f32), and `go_mat`, the gradient as the products read it (f32 or bf16).
    fn backward_task(
        &self,
        n: usize,
        h0: usize,
        count: usize,
        o: &[f32],
        go: &[f32],
        go_mat: &Heads4,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Dims { t, tk, d, nh, .. } = self.dims;
        let row_stride = nh * d;
        let g = h0 / self.dims.rep();
        let (k, v) = (self.qkv.head(1, n, g), self.qkv.head(2, n, g));
        let (mut p, mut dp) = (self.block_scratch(), self.block_scratch());
        let mut dq = vec![0f32; count * t * d];
        let mut dk = vec![0f32; tk * d];
        let mut dv = vec![0f32; tk * d];
        let scale = self.scale;
        for j in 0..count {
            let h = h0 + j;
            let head = n * t * row_stride + h * d;
            let (q, go_h) = (self.qkv.head(0, n, h), go_mat.head(n, h));
            for (i0, rows, ext) in self.blocks(n) {
                self.probs(n, h, (i0, rows, ext), &mut p);
                let go_b = go_h.row_range(i0, rows);
                let p_b = View::matrix(&p[..rows * ext], rows, ext);
                // dV += Pᵀ·dO ; dP = dO·Vᵀ
                self.qkv.mm(Mat::F32(p_b.t()), go_b, false, &mut dv, 0, d, true);
                self.qkv.mm(go_b, v.row_range(0, ext), true, &mut dp, 0, ext, false);
                // dS = scale · P ⊙ (dP − rowsum(dO ⊙ O)), the scale of both products below
                simd::vectorised(
                    #[inline(always)]
                    || {
                        let rows =
                            p[..rows * ext].chunks_exact(ext).zip(dp[..rows * ext].chunks_exact_mut(ext));
                        for (i, (pr, dr)) in (i0..).zip(rows) {
                            let at = head + i * row_stride;
                            let delta = simd::dot(&go[at..at + d], &o[at..at + d]);
                            dr.iter_mut().zip(pr).for_each(|(ds, &pv)| *ds = scale * (pv * (*ds - delta)));
                        }
                    },
                );
                // dQ = dS·K ; dK += dSᵀ·Q
                let ds = View::matrix(&dp[..rows * ext], rows, ext);
                let dq_at = (j * t + i0) * d;
                self.qkv.mm(Mat::F32(ds), k.row_range(0, ext), false, &mut dq, dq_at, d, false);
                self.qkv.mm(Mat::F32(ds.t()), q.row_range(i0, rows), false, &mut dk, 0, d, true);
            }
        }
        (dq, dk, dv)
    }
}

/// The output's gradient `[b, t, heads, d]` as the backward's products read it.
enum Heads4<'a> {
    F32(Heads<'a, f32>),
    Bf16(Heads<'a, bf16>),
}

impl<'a> Heads4<'a> {
    fn head(&self, n: usize, h: usize) -> Mat<'a> {
        match self {
            Heads4::F32(x) => x.head(n, h),
            Heads4::Bf16(x) => x.head(n, h),
        }
    }
}

impl Attention {
    fn with_bias<R>(&self, f: impl FnOnce(Option<&[f32]>) -> Result<R>) -> Result<R> {
        match &self.bias {
            None => f(None),
            Some(bias) => {
                let (s, l) = bias.storage_and_layout();
                f(Some(cpu_f32(&s, l, OP, "bias")?))
            }
        }
    }
}

/// Copies per-task `[heads_per_task, len, d]` blocks (task `n · tasks_per_row + c`: heads
/// `c · heads_per_task ..` of row `n`) into `[b, len, heads, d]`.
fn scatter(blocks: Vec<Vec<f32>>, dims: Dims, len: usize, heads_per_task: usize, heads: usize) -> Vec<f32> {
    let d = dims.d;
    let per_row = heads / heads_per_task;
    let mut out = super::cpu_output::<f32>(dims.b * len * heads * d);
    for (task, block) in blocks.into_iter().enumerate() {
        let (n, c) = (task / per_row, task % per_row);
        for j in 0..heads_per_task {
            let h = c * heads_per_task + j;
            for i in 0..len {
                out[((n * len + i) * heads + h) * d..][..d].copy_from_slice(&block[(j * len + i) * d..][..d]);
            }
        }
    }
    out
}

/// q, k and v as the products read them: bf16 as stored where the CPU has AMX and all three are bf16,
/// otherwise widened to f32 into `wide` (which the caller keeps while the heads are used).
fn qkv_heads<'a>(
    x: [(&'a CpuStorage, &Layout); 3],
    wide: &'a mut Vec<std::borrow::Cow<'a, [f32]>>,
) -> Result<Qkv<'a>> {
    const WHAT: [&str; 3] = ["q", "k", "v"];
    if let (Some(amx), [(CpuStorage::BF16(q), ql), (CpuStorage::BF16(k), kl), (CpuStorage::BF16(v), vl)]) =
        (amx::get(), x)
    {
        return Ok(Qkv::Amx(
            amx,
            [Heads::new(q, ql, "q")?, Heads::new(k, kl, "k")?, Heads::new(v, vl, "v")?],
        ));
    }
    for ((s, _), what) in x.iter().zip(WHAT) {
        wide.push(f32_elems(s, None, OP, what)?);
    }
    let wide: &'a [std::borrow::Cow<'a, [f32]>] = wide;
    let heads = |i: usize| Heads::new(&wide[i][..], x[i].1, WHAT[i]);
    Ok(Qkv::F32([heads(0)?, heads(1)?, heads(2)?]))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "candor-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(ql, kl)?;
        let Dims { b, nh, t, d, .. } = dims;
        let mut wide = Vec::new();
        let qkv = qkv_heads([(qs, ql), (ks, kl), (vs, vl)], &mut wide)?;
        let blocks = self.with_bias(|bias| {
            let ctx = Ctx::new(dims, qkv, bias, self.scale);
            let per_task = ctx.heads_per_task();
            let per_row = nh / per_task;
            let blocks = (0..b * per_row)
                .into_par_iter()
                .map(|task| ctx.forward_task(task / per_row, (task % per_row) * per_task, per_task))
                .collect();
            Ok((blocks, per_task))
        })?;
        let (blocks, per_task) = blocks;
        let out = scatter(blocks, dims, t, per_task, nh);
        let dtype = candle_core::backend::BackendStorage::dtype(qs);
        Ok((cpu_storage_of(out, dtype)?, Shape::from((b, t, nh, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _profile = super::profile::span("attention", super::profile::Phase::Backward);
        let d_out = d_out.contiguous()?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = out.storage_and_layout();
        let (gs, gl) = d_out.storage_and_layout();
        let dims = Dims::of(ql, kl)?;
        let Dims { b, nh, nkv, t, tk, d } = dims;
        let (qs, ks, vs) = (cpu_storage(&qs, OP)?, cpu_storage(&ks, OP)?, cpu_storage(&vs, OP)?);
        let mut wide = Vec::new();
        let qkv = qkv_heads([(qs, ql), (ks, kl), (vs, vl)], &mut wide)?;
        // out and d_out are [b, t, heads, d], contiguous; the products read d_out's heads through strides
        let o = cpu_f32_elems(&os, Some(ol), OP, "out")?;
        let go = cpu_f32_elems(&gs, Some(gl), OP, "grad")?;
        let (o, go) = (&o[..], &go[..]);
        fn heads<T>(data: &[T], t: usize, nh: usize, d: usize) -> Heads<'_, T> {
            Heads { data, offset: 0, s0: t * nh * d, s1: d, s2: nh * d, len: t, d }
        }
        let go_mat = match (&qkv, cpu_storage(&gs, OP)?) {
            (Qkv::Amx(..), CpuStorage::BF16(g)) => {
                Heads4::Bf16(heads(super::contiguous(g, gl, OP, "grad")?, t, nh, d))
            }
            _ => Heads4::F32(heads(go, t, nh, d)),
        };
        let (grads, per_task) = self.with_bias(|bias| {
            let ctx = Ctx::new(dims, qkv, bias, self.scale);
            let per_task = ctx.heads_per_task();
            let per_row = nh / per_task;
            let grads: Vec<_> = (0..b * per_row)
                .into_par_iter()
                .map(|task| {
                    ctx.backward_task(task / per_row, (task % per_row) * per_task, per_task, o, go, &go_mat)
                })
                .collect();
            Ok((grads, per_task))
        })?;
        // each run of rep / per_task consecutive tasks shares one KV head, whose gradients are the sum
        // of theirs
        let mut dqs = Vec::with_capacity(grads.len());
        let mut dks = Vec::with_capacity(b * nkv);
        let mut dvs = Vec::with_capacity(b * nkv);
        let mut grads = grads.into_iter();
        while let Some((dq, mut dk, mut dv)) = grads.next() {
            dqs.push(dq);
            for (dq, dk_j, dv_j) in grads.by_ref().take(dims.rep() / per_task - 1) {
                dqs.push(dq);
                dk.iter_mut().zip(&dk_j).for_each(|(a, b)| *a += b);
                dv.iter_mut().zip(&dv_j).for_each(|(a, b)| *a += b);
            }
            dks.push(dk);
            dvs.push(dv);
        }
        // gradients in [b, len, heads, d] order and the inputs' dtype, returned as [b, heads, len, d] views
        // like the inputs
        let dtype = q.dtype();
        let dq = cpu_tensor_of(scatter(dqs, dims, t, per_task, nh), (b, t, nh, d), dtype)?.transpose(1, 2)?;
        let dk = cpu_tensor_of(scatter(dks, dims, tk, 1, nkv), (b, tk, nkv, d), dtype)?.transpose(1, 2)?;
        let dv = cpu_tensor_of(scatter(dvs, dims, tk, 1, nkv), (b, tk, nkv, d), dtype)?.transpose(1, 2)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
