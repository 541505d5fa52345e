//! A bounds-checked f32 matrix product over strided views of slices, for the CPU sides of the fused ops.
//!
//! candle's CPU matmul (the same `gemm` crate underneath) always writes a fresh output and wants
//! contiguous operands. The fused ops need more: accumulate into an existing buffer (`dst += β·A·B`,
//! so a LoRA update lands in the frozen output without a temporary), and read heads straight out of
//! `[batch, seq, heads, dim]` storage by their strides (no transpose copies).

/// A matrix inside a slice: element `(i, j)` is `data[offset + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// A row-major `[rows, cols]` matrix starting at `offset` with row stride `rs`.
    pub fn rows(data: &'a [f32], offset: usize, rs: usize) -> Self {
        View { data, offset, rs, cs: 1 }
    }

    /// The transpose of [`View::rows`]: element `(i, j)` is row `j`, column `i` of the stored matrix.
    pub fn rows_t(data: &'a [f32], offset: usize, rs: usize) -> Self {
        View { data, offset, rs: 1, cs: rs }
    }

    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = self.offset + (rows - 1) * self.rs + (cols - 1) * self.cs;
        assert!(
            last < self.data.len(),
            "cpu_gemm: {what} view reaches {last}, slice has {}",
            self.data.len()
        );
    }
}

/// Whether a product runs on rayon's threads (large products) or on the calling thread (inside tasks
/// that are already parallel).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Threads {
    All,
    One,
}

/// `dst[m×n] = (accumulate ? dst : 0) + beta · lhs[m×k] · rhs[k×n]`, with `dst` row-major from `dst_offset`
/// with row stride `dst_rs`. Panics (never reads or writes out of bounds) if a view does not fit its slice.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_offset: usize,
    dst_rs: usize,
    accumulate: bool,
    lhs: View,
    rhs: View,
    beta: f32,
    threads: Threads,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                dst[dst_offset + i * dst_rs..][..n].fill(0.0);
            }
        }
        return;
    }
    let last = dst_offset + (m - 1) * dst_rs + n - 1;
    assert!(last < dst.len(), "cpu_gemm: dst view reaches {last}, slice has {}", dst.len());
    assert!(dst_rs >= n || m == 1, "cpu_gemm: dst rows overlap");
    lhs.check(m, k, "lhs");
    rhs.check(k, n, "rhs");
    let parallelism = match threads {
        Threads::All => gemm::Parallelism::Rayon(0),
        Threads::One => gemm::Parallelism::None,
    };
    // SAFETY: every element the product touches is inside its slice (checked above); dst is borrowed
    // mutably, so it does not alias lhs or rhs, and its rows do not overlap.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr().add(dst_offset),
            1,
            dst_rs as isize,
            accumulate,
            lhs.data.as_ptr().add(lhs.offset),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr().add(rhs.offset),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: &View, b: &View) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|l| a.data[a.offset + i * a.rs + l * a.cs] * b.data[b.offset + l * b.rs + j * b.cs])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_and_accumulating_products_match_a_naive_loop() {
        let data: Vec<f32> = (0..400).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let (m, n, k) = (5, 7, 3);
        let a = View { data: &data, offset: 3, rs: 11, cs: 2 };
        let b = View::rows_t(&data, 100, 9);
        let want = naive(m, n, k, &a, &b);
        for threads in [Threads::One, Threads::All] {
            let mut dst = vec![1f32; 2 + m * 10];
            gemm(m, n, k, &mut dst, 2, 10, true, a, b, 0.5, threads);
            for i in 0..m {
                for j in 0..n {
                    let got = dst[2 + i * 10 + j];
                    assert!((got - (1.0 + 0.5 * want[i * n + j])).abs() < 1e-5);
                }
                // the padding between rows is untouched
                assert!(dst[2 + i * 10 + n..2 + i * 10 + 10].iter().all(|&v| v == 1.0));
            }
            gemm(m, n, k, &mut dst, 2, 10, false, a, b, 1.0, threads);
            assert!((dst[2] - want[0]).abs() < 1e-5);
        }
    }

    #[test]
    #[should_panic(expected = "rhs view")]
    fn a_view_past_its_slice_panics_before_touching_memory() {
        let data = vec![0f32; 10];
        let mut dst = vec![0f32; 4];
        gemm(
            2,
            2,
            2,
            &mut dst,
            0,
            2,
            false,
            View::rows(&data, 0, 2),
            View::rows(&data, 8, 2),
            1.0,
            Threads::One,
        );
    }
}
