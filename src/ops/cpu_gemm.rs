//! A bounds-checked f32 matrix product over strided views of slices, for the CPU sides of the fused ops.
//!
//! candle's CPU matmul (the same `gemm` crate underneath) always writes a fresh output and wants
//! contiguous operands. The fused ops need more: accumulate into an existing buffer (`dst += β·A·B`,
//! so a LoRA update lands in the frozen output without a temporary), and read heads straight out of
//! `[batch, seq, heads, dim]` storage by their strides (no transpose copies).
//!
//! Large products on all threads go to OpenBLAS where the system has it (`openblas`); the rest, and
//! everything where it is absent or `CANDOR_BLAS=off`, to the `gemm` crate.

/// A `rows × cols` matrix inside a slice: element `(i, j)` is `data[offset + i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct View<'a> {
    pub data: &'a [f32],
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub rs: usize,
    pub cs: usize,
}

impl<'a> View<'a> {
    /// Row-major rows of `cols` elements, `rs` apart, from `offset`.
    pub fn strided(data: &'a [f32], offset: usize, rows: usize, cols: usize, rs: usize) -> Self {
        View { data, offset, rows, cols, rs, cs: 1 }
    }

    /// A contiguous row-major `rows × cols` matrix filling `data`.
    pub fn matrix(data: &'a [f32], rows: usize, cols: usize) -> Self {
        View::strided(data, 0, rows, cols, cols)
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        View { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs, ..self }
    }

    /// Rows `first..first + count`.
    pub fn row_range(self, first: usize, count: usize) -> Self {
        View { offset: self.offset + first * self.rs, rows: count, ..self }
    }

    /// Columns `first..first + count`.
    pub fn col_range(self, first: usize, count: usize) -> Self {
        View { offset: self.offset + first * self.cs, cols: count, ..self }
    }

    fn check(&self, what: &str) {
        if self.rows == 0 || self.cols == 0 {
            return;
        }
        let last = self.offset + (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
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

/// `beta · lhs · rhs`, not yet written anywhere.
#[derive(Clone, Copy)]
pub(crate) struct Product<'a> {
    lhs: View<'a>,
    rhs: View<'a>,
    beta: f32,
    threads: Threads,
}

/// `lhs · rhs` on all threads; panics if the inner dimensions differ.
pub(crate) fn product<'a>(lhs: View<'a>, rhs: View<'a>) -> Product<'a> {
    assert_eq!(lhs.cols, rhs.rows, "cpu_gemm: [{}×{}]·[{}×{}]", lhs.rows, lhs.cols, rhs.rows, rhs.cols);
    Product { lhs, rhs, beta: 1.0, threads: Threads::All }
}

impl Product<'_> {
    pub fn scaled(self, beta: f32) -> Self {
        Product { beta, ..self }
    }

    /// On the calling thread only (inside a parallel task).
    pub fn one_thread(self) -> Self {
        Product { threads: Threads::One, ..self }
    }

    /// `dst = product`, `dst` row-major from `offset` with row stride `rs`.
    pub fn write(self, dst: &mut [f32], offset: usize, rs: usize) {
        self.run(dst, offset, rs, false)
    }

    /// `dst += product`.
    pub fn add_to(self, dst: &mut [f32], offset: usize, rs: usize) {
        self.run(dst, offset, rs, true)
    }

    /// The product as a new row-major `rows × cols` buffer, from [`super::cpu_output`] (`gemm` reads
    /// its destination even when told to overwrite it, so the buffer is initialised first).
    pub fn to_vec(self) -> Vec<f32> {
        let (m, n) = (self.lhs.rows, self.rhs.cols);
        let mut out = super::cpu_output::<f32>(m * n);
        self.write(&mut out, 0, n);
        out
    }

    /// Panics (never reads or writes out of bounds) if a view does not fit its slice.
    fn run(self, dst: &mut [f32], offset: usize, rs: usize, accumulate: bool) {
        let (m, n, k) = (self.lhs.rows, self.rhs.cols, self.lhs.cols);
        if m == 0 || n == 0 {
            return;
        }
        let last = offset + (m - 1) * rs + n - 1;
        assert!(last < dst.len(), "cpu_gemm: dst view reaches {last}, slice has {}", dst.len());
        assert!(rs >= n || m == 1, "cpu_gemm: dst rows overlap");
        if k == 0 {
            if !accumulate {
                (0..m).for_each(|i| dst[offset + i * rs..][..n].fill(0.0));
            }
            return;
        }
        self.lhs.check("lhs");
        self.rhs.check("rhs");
        if self.threads == Threads::All && m.min(n).min(k) >= super::openblas::MIN_DIM {
            if let Some(blas) = super::openblas::active() {
                if blas.accepts(&self.lhs, &self.rhs, rs) {
                    self.on_blas(blas, dst, offset, rs, accumulate);
                    return;
                }
            }
        }
        let parallelism = match self.threads {
            Threads::All => gemm::Parallelism::Rayon(0),
            Threads::One => gemm::Parallelism::None,
        };
        let (lhs, rhs) = (self.lhs, self.rhs);
        // SAFETY: every element the product touches is inside its slice (checked above); dst is
        // borrowed mutably, so it does not alias lhs or rhs, and its rows do not overlap.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr().add(offset),
                1,
                rs as isize,
                accumulate,
                lhs.data.as_ptr().add(lhs.offset),
                lhs.cs as isize,
                lhs.rs as isize,
                rhs.data.as_ptr().add(rhs.offset),
                rhs.cs as isize,
                rhs.rs as isize,
                1.0,
                self.beta,
                false,
                false,
                false,
                parallelism,
            )
        }
    }
}

impl Product<'_> {
    /// The product on OpenBLAS (which [`super::openblas`] keeps on one thread), split into one block
    /// per rayon thread along the longer side of `dst`: rows of `lhs` or columns of `rhs`.
    ///
    /// With OpenBLAS running its own threads beside rayon's, its idle worker spun in `sched_yield`
    /// through the rayon work after each product, taking time slices from rayon's threads: 16% of a
    /// SmolLM2 training step's CPU samples (`perf`) went to yielding. Split here, a step took 4.53 s
    /// against 4.96 s (medians of steps alternated in one process, 1.10×). Each block packs its own
    /// copy of the operand the blocks share, which on the decoder's products cost nothing measurable
    /// against OpenBLAS's own split (1024×2048×8192 alone: within the noise).
    fn on_blas(
        self,
        blas: &super::openblas::Blas,
        dst: &mut [f32],
        offset: usize,
        rs: usize,
        accumulate: bool,
    ) {
        let (m, n) = (self.lhs.rows, self.rhs.cols);
        let by_rows = m >= n;
        let parts = rayon::current_num_threads().clamp(1, if by_rows { m } else { n });
        let dst = DstPtr(dst.as_mut_ptr());
        let block = |p: usize| {
            let long = if by_rows { m } else { n };
            let (a, b) = (long * p / parts, long * (p + 1) / parts);
            let (lhs, rhs, at) = if by_rows {
                (self.lhs.row_range(a, b - a), self.rhs, offset + a * rs)
            } else {
                (self.lhs, self.rhs.col_range(a, b - a), offset + a)
            };
            // SAFETY: `run` bounds-checked the views and the m × n block of dst; the blocks of
            // different parts are disjoint rows or columns of it, and dst, borrowed mutably, does not
            // alias lhs or rhs. `accepts` approved these strides, which a sub-view keeps.
            unsafe { blas.product(&lhs, &rhs, self.beta, dst.at(at), rs, accumulate) };
        };
        if parts == 1 {
            block(0);
        } else {
            use rayon::prelude::*;
            (0..parts).into_par_iter().for_each(block);
        }
    }
}

/// A destination shared by parallel tasks that write disjoint parts of it ([`Product::on_blas`]'s
/// blocks, the AMX products' blocks).
#[derive(Clone, Copy)]
pub(crate) struct DstPtr(pub *mut f32);

// SAFETY: each task writes only its own part (see `on_blas` and `amx::Amx::run`).
unsafe impl Send for DstPtr {}
unsafe impl Sync for DstPtr {}

impl DstPtr {
    /// # Safety
    /// `offset` is inside the destination slice.
    pub unsafe fn at(self, offset: usize) -> *mut f32 {
        self.0.add(offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &View, b: &View) -> Vec<f32> {
        let mut out = vec![0f32; a.rows * b.cols];
        for i in 0..a.rows {
            for j in 0..b.cols {
                out[i * b.cols + j] = (0..a.cols)
                    .map(|l| a.data[a.offset + i * a.rs + l * a.cs] * b.data[b.offset + l * b.rs + j * b.cs])
                    .sum();
            }
        }
        out
    }

    #[test]
    fn strided_and_accumulating_products_match_a_naive_loop() {
        let data: Vec<f32> = (0..400).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        let (m, n) = (5, 7);
        let a = View { data: &data, offset: 3, rows: m, cols: 3, rs: 11, cs: 2 };
        let b = View::strided(&data, 100, n, 3, 9).t();
        let want = naive(&a, &b);
        for one in [true, false] {
            let p = if one { product(a, b).one_thread() } else { product(a, b) };
            let mut dst = vec![1f32; 2 + m * 10];
            p.scaled(0.5).add_to(&mut dst, 2, 10);
            for i in 0..m {
                for j in 0..n {
                    let got = dst[2 + i * 10 + j];
                    assert!((got - (1.0 + 0.5 * want[i * n + j])).abs() < 1e-5);
                }
                // the padding between rows is untouched
                assert!(dst[2 + i * 10 + n..2 + i * 10 + 10].iter().all(|&v| v == 1.0));
            }
            p.write(&mut dst, 2, 10);
            assert!((dst[2] - want[0]).abs() < 1e-5);
        }
        // sub-blocks: rows 1..3 of a times the first 4 columns of b
        let mut dst = vec![0f32; 8];
        product(a.row_range(1, 2), b.col_range(0, 4)).write(&mut dst, 0, 4);
        for i in 0..2 {
            for j in 0..4 {
                assert!((dst[i * 4 + j] - want[(i + 1) * n + j]).abs() < 1e-5);
            }
        }
    }

    /// OpenBLAS must be there (CI installs it) unless the run opted out with `CANDOR_BLAS=off`.
    fn blas() -> Option<&'static super::super::openblas::Blas> {
        match super::super::openblas::get() {
            Ok(Some(b)) => Some(b),
            Ok(None) if std::env::var("CANDOR_BLAS").as_deref() == Ok("off") => None,
            Ok(None) => {
                panic!("no libopenblas.so.0: install it (Debian: libopenblas0) or set CANDOR_BLAS=off")
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn openblas_products_match_gemm_and_a_naive_loop_in_every_layout() {
        let Some(blas) = blas() else { return };
        let data: Vec<f32> = (0..90_000).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        // taller than wide (split by rows over the threads) and wider than tall (by columns); thin ones
        // as the rank-r LoRA products are
        for (m, k, n) in [(67, 70, 65), (65, 70, 131), (67, 70, 9), (9, 70, 131)] {
            assert!(m.min(n).min(k) >= crate::ops::openblas::MIN_DIM);
            let ld = n + 5;
            // lhs as stored (rows 75 apart) or as a transpose; rhs likewise
            let lhs = [View::strided(&data, 5, m, k, 75), View::strided(&data, 9, k, m, 71).t()];
            let rhs = [View::strided(&data, 20_001, k, n, 136), View::strided(&data, 40_003, n, k, 80).t()];
            for (a, b) in lhs.iter().flat_map(|a| rhs.iter().map(move |b| (*a, *b))) {
                assert!(blas.accepts(&a, &b, ld));
                let want = naive(&a, &b);
                for accumulate in [false, true] {
                    // 0: one OpenBLAS call; 1: `product` on all threads (OpenBLAS in blocks); 2: gemm
                    let run = |how: usize| {
                        let mut dst = vec![1f32; 3 + m * ld];
                        let p = product(a, b).scaled(0.5);
                        let p = if how == 2 { p.one_thread() } else { p };
                        if how == 0 {
                            // SAFETY: the views and the destination block are inside their slices.
                            unsafe { blas.product(&a, &b, 0.5, dst.as_mut_ptr().add(3), ld, accumulate) };
                        } else if accumulate {
                            p.add_to(&mut dst, 3, ld);
                        } else {
                            p.write(&mut dst, 3, ld);
                        }
                        dst
                    };
                    let runs = [run(0), run(1), run(2)];
                    for got in &runs {
                        for i in 0..m {
                            for j in 0..n {
                                let expect = 0.5 * want[i * n + j] + if accumulate { 1.0 } else { 0.0 };
                                let g = got[3 + i * ld + j];
                                assert!((g - expect).abs() < 1e-4, "{m}x{n} {i},{j}: {g} {expect}");
                            }
                            assert!(
                                got[3 + i * ld + n..][..5].iter().all(|&v| v == 1.0),
                                "row padding written"
                            );
                        }
                        assert_eq!(got[..3], [1.0; 3]);
                    }
                }
            }
        }
        // a layout CBLAS cannot take (neither stride 1) is declined, leaving the work to gemm
        let odd = View { data: &data, offset: 0, rows: 64, cols: 64, rs: 130, cs: 2 };
        let mut dst = vec![7f32; 64 * 64];
        assert!(!blas.accepts(&odd, &odd, 64));
        unsafe { blas.product(&odd, &odd, 1.0, dst.as_mut_ptr(), 64, false) };
        assert!(dst.iter().all(|&v| v == 7.0));
        product(odd, odd).write(&mut dst, 0, 64);
        assert!((dst[64 * 5 + 7] - naive(&odd, &odd)[64 * 5 + 7]).abs() < 1e-3);
    }

    #[test]
    #[should_panic(expected = "rhs view")]
    fn a_view_past_its_slice_panics_before_touching_memory() {
        let data = vec![0f32; 10];
        let mut dst = vec![0f32; 4];
        product(View::matrix(&data[..4], 2, 2), View::strided(&data, 8, 2, 2, 2)).write(&mut dst, 0, 2);
    }

    #[test]
    #[should_panic(expected = "cpu_gemm: [2×3]·[2×2]")]
    fn mismatched_inner_dimensions_panic() {
        let data = [0f32; 10];
        product(View::matrix(&data[..6], 2, 3), View::matrix(&data[..4], 2, 2));
    }
}
