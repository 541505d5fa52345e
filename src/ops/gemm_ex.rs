//! Mixed-precision matrix products with cuBLAS's `cublasGemmEx` contract, for the LoRA layer's
//! half-precision path (`lora_linear`).
//!
//! candle's matmul always writes a fresh output in its inputs' dtype. The LoRA path wants more: bf16
//! or f16 operands with an f32 result (the rank-r intermediates and the LoRA gradients), and a bf16
//! result accumulated into an existing buffer (`y += s·t·Bᵀ` into the frozen product, `dx += s·u·A`),
//! with no full-width temporary. On CUDA that is one `cublasGemmEx` call (f32 accumulation). On the
//! CPU the same column-major call is emulated by a plain loop (f32 accumulation, one rounding to the
//! output dtype), so the tests run the path's exact call sequence, leading dimensions and transposes
//! included, without a GPU. The emulation is for the tests, not for speed: the CPU's own LoRA path is
//! `lora_linear`'s f32 loops.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Result};

/// One `GemmEx` call, column-major as cuBLAS reads it: `C[m×n] = α·op(A)·op(B) + β·C`, where `op(A)` is
/// `m×k` (A stored `m×k` with `lda ≥ m`, or `k×m` with `lda ≥ k` when `transa`), likewise `op(B)` is
/// `k×n`, and C is `m×n` with `ldc ≥ m`. With `β = 0`, C is not read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Gemm {
    pub transa: bool,
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// Row-major, contiguous operands: `C[m×n] = α·op(A)·op(B) + β·C` with A stored `[m×k]` (or `[k×m]`
    /// read transposed when `ta`), B stored `[k×n]` (or `[n×k]` when `tb`). A row-major matrix is the
    /// column-major transpose, so cuBLAS computes `Cᵀ = op(B)ᵀ·op(A)ᵀ`: the operands swap places (the
    /// call's first operand is B).
    pub fn row_major((m, n, k): (usize, usize, usize), ta: bool, tb: bool, alpha: f32, beta: f32) -> Gemm {
        Gemm {
            transa: tb,
            transb: ta,
            m: n,
            n: m,
            k,
            lda: if tb { k } else { n },
            ldb: if ta { m } else { k },
            ldc: n,
            alpha,
            beta,
        }
    }

    /// The last element (from the operand's offset) each operand reaches, for the bounds checks.
    fn extents(&self) -> [usize; 3] {
        let last = |rows: usize, cols: usize, ld: usize| (rows - 1) + (cols - 1) * ld;
        let (ar, ac) = if self.transa { (self.k, self.m) } else { (self.m, self.k) };
        let (br, bc) = if self.transb { (self.n, self.k) } else { (self.k, self.n) };
        [last(ar, ac, self.lda), last(br, bc, self.ldb), last(self.m, self.n, self.ldc)]
    }

    /// Errors (never a wrong or out-of-bounds product) for shapes, leading dimensions, dtypes and
    /// buffer lengths a `GemmEx` call would not take.
    fn check(
        &self,
        (a_len, b_len, c_len): (usize, usize, usize),
        offsets: [usize; 3],
        dtypes: [DType; 3],
    ) -> Result<()> {
        let [at, bt, ct] = dtypes;
        let float = |d: DType| matches!(d, DType::BF16 | DType::F16 | DType::F32);
        if at != bt || !float(at) || !(ct == at || ct == DType::F32) {
            candle_core::bail!(
                "gemm_ex: operand dtypes {at:?}·{bt:?} -> {ct:?} (A and B alike; C the same or f32)"
            );
        }
        if self.m == 0 || self.n == 0 || self.k == 0 {
            candle_core::bail!("gemm_ex: empty product {}×{}×{}", self.m, self.n, self.k);
        }
        let rows_a = if self.transa { self.k } else { self.m };
        let rows_b = if self.transb { self.n } else { self.k };
        if self.lda < rows_a || self.ldb < rows_b || self.ldc < self.m {
            candle_core::bail!("gemm_ex: leading dimensions too small in {self:?}");
        }
        if [self.m, self.n, self.k, self.lda, self.ldb, self.ldc].iter().any(|&d| i32::try_from(d).is_err()) {
            candle_core::bail!("gemm_ex: a size in {self:?} does not fit cuBLAS's int");
        }
        for ((what, len), (off, last)) in [("A", a_len), ("B", b_len), ("C", c_len)]
            .into_iter()
            .zip(offsets.into_iter().zip(self.extents()))
        {
            if off + last >= len {
                candle_core::bail!("gemm_ex: {what} reaches element {} of {len}", off + last);
            }
        }
        Ok(())
    }
}

/// A backend that runs [`Gemm`] calls on its storages (element offsets into each).
pub(crate) trait GemmEx: BackendStorage + Sized {
    /// A buffer of `len` elements on this storage's device for a product with `β = 0` to fill:
    /// uninitialised on CUDA, NaN when outputs are poisoned (`super::set_poison_outputs`).
    fn output(&self, len: usize, dtype: DType) -> Result<Self>;

    fn gemm_ex(
        c: &mut Self,
        c_off: usize,
        a: &Self,
        a_off: usize,
        b: &Self,
        b_off: usize,
        g: &Gemm,
    ) -> Result<()>;
}

/// Row-major `c = α·op(a)·op(b) + β·c` on contiguous matrices from the given element offsets (see
/// [`Gemm::row_major`]): `(storage, offset)` for C, `(storage, offset, transposed)` for A and B.
pub(crate) fn row_major<S: GemmEx>(
    (c, c_off): (&mut S, usize),
    (a, a_off, ta): (&S, usize, bool),
    (b, b_off, tb): (&S, usize, bool),
    mnk: (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Result<()> {
    S::gemm_ex(c, c_off, b, b_off, a, a_off, &Gemm::row_major(mnk, ta, tb, alpha, beta))
}

fn cpu_len(s: &CpuStorage) -> Result<usize> {
    Ok(match s {
        CpuStorage::F32(v) => v.len(),
        CpuStorage::BF16(v) => v.len(),
        CpuStorage::F16(v) => v.len(),
        other => candle_core::bail!("gemm_ex: unsupported dtype {:?}", other.dtype()),
    })
}

/// Element `i` of a float storage as f32.
fn cpu_get(s: &CpuStorage, i: usize) -> f32 {
    match s {
        CpuStorage::F32(v) => v[i],
        CpuStorage::BF16(v) => v[i].to_f32(),
        CpuStorage::F16(v) => v[i].to_f32(),
        _ => unreachable!("checked by cpu_len"),
    }
}

impl GemmEx for CpuStorage {
    fn output(&self, len: usize, dtype: DType) -> Result<Self> {
        use candle_core::WithDType;
        with_float_type!(dtype, "gemm_ex", T => Ok(T::to_cpu_storage_owned(super::cpu_output::<T>(len))))
    }

    /// The emulation: f32 accumulation over `k`, then `α·sum + β·c` in f32, rounded once (to nearest
    /// even) to C's dtype, as cuBLAS's `CUBLAS_COMPUTE_32F` does up to summation order.
    fn gemm_ex(
        c: &mut Self,
        c_off: usize,
        a: &Self,
        a_off: usize,
        b: &Self,
        b_off: usize,
        g: &Gemm,
    ) -> Result<()> {
        let lens = (cpu_len(a)?, cpu_len(b)?, cpu_len(c)?);
        g.check(lens, [a_off, b_off, c_off], [a.dtype(), b.dtype(), c.dtype()])?;
        let op_a =
            |i: usize, l: usize| cpu_get(a, a_off + if g.transa { l + i * g.lda } else { i + l * g.lda });
        let op_b =
            |l: usize, j: usize| cpu_get(b, b_off + if g.transb { j + l * g.ldb } else { l + j * g.ldb });
        for j in 0..g.n {
            for i in 0..g.m {
                let sum: f32 = (0..g.k).map(|l| op_a(i, l) * op_b(l, j)).sum();
                let at = c_off + i + j * g.ldc;
                let old = if g.beta == 0.0 { 0.0 } else { g.beta * cpu_get(c, at) };
                let v = g.alpha * sum + old;
                match c {
                    CpuStorage::F32(d) => d[at] = v,
                    CpuStorage::BF16(d) => d[at] = half::bf16::from_f32(v),
                    CpuStorage::F16(d) => d[at] = half::f16::from_f32(v),
                    _ => unreachable!("checked by cpu_len"),
                }
            }
        }
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl GemmEx for candle_core::CudaStorage {
    fn output(&self, len: usize, dtype: DType) -> Result<Self> {
        let dev = &self.device;
        with_float_type!(dtype, "gemm_ex", T => Ok(Self::wrap_cuda_slice(super::cuda::output::<T>(dev, len)?, dev.clone())))
    }

    fn gemm_ex(
        c: &mut Self,
        c_off: usize,
        a: &Self,
        a_off: usize,
        b: &Self,
        b_off: usize,
        g: &Gemm,
    ) -> Result<()> {
        use candle_core::cuda_backend::cudarc::cublas::{result, sys};
        use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
        use candle_core::cuda_backend::{CudaStorageSlice as S, WrapErr};

        let len = |s: &Self| -> Result<usize> {
            Ok(match &s.slice {
                S::F32(v) => v.len(),
                S::BF16(v) => v.len(),
                S::F16(v) => v.len(),
                _ => candle_core::bail!("gemm_ex: unsupported dtype {:?}", s.dtype()),
            })
        };
        g.check((len(a)?, len(b)?, len(c)?), [a_off, b_off, c_off], [a.dtype(), b.dtype(), c.dtype()])?;
        let ty = |d: DType| match d {
            DType::BF16 => sys::cudaDataType_t::CUDA_R_16BF,
            DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
            _ => sys::cudaDataType_t::CUDA_R_32F,
        };
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (a_ty, c_ty) = (ty(a.dtype()), ty(c.dtype()));
        let blas = c.device.cublas_handle();
        let stream = c.device.cuda_stream();
        // byte addresses of each operand's first element (the guards order the stream's accesses)
        macro_rules! read_ptr {
            ($s:expr, $off:expr) => {
                match &$s.slice {
                    S::F32(v) => (v.device_ptr(&stream), $off * 4),
                    S::BF16(v) => (v.device_ptr(&stream), $off * 2),
                    S::F16(v) => (v.device_ptr(&stream), $off * 2),
                    _ => unreachable!("checked above"),
                }
            };
        }
        let ((a_ptr, _ra), a_byte) = read_ptr!(a, a_off);
        let ((b_ptr, _rb), b_byte) = read_ptr!(b, b_off);
        let ((c_ptr, _rc), c_byte) = match &mut c.slice {
            S::F32(v) => (v.device_ptr_mut(&stream), c_off * 4),
            S::BF16(v) => (v.device_ptr_mut(&stream), c_off * 2),
            S::F16(v) => (v.device_ptr_mut(&stream), c_off * 2),
            _ => unreachable!("checked above"),
        };
        let (alpha, beta) = (g.alpha, g.beta);
        // SAFETY: `check` bounds every operand inside its buffer; C is borrowed mutably, so it is
        // neither A nor B; the handle is candle's, bound to the stream the pointers were recorded on.
        unsafe {
            result::gemm_ex(
                *blas.handle(),
                op(g.transa),
                op(g.transb),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                (&alpha) as *const f32 as *const _,
                (a_ptr + a_byte as u64) as *const _,
                a_ty,
                g.lda as i32,
                (b_ptr + b_byte as u64) as *const _,
                a_ty,
                g.ldb as i32,
                (&beta) as *const f32 as *const _,
                (c_ptr + c_byte as u64) as *mut _,
                c_ty,
                g.ldc as i32,
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .w()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 37 + seed * 11) % 101) as f32 - 50.0) / 25.0).collect()
    }

    /// Row-major `[rows×cols]` element of a stored matrix, read transposed or not.
    fn at(v: &[f32], cols: usize, i: usize, j: usize, t: bool, rows_stored_cols: usize) -> f32 {
        if t {
            v[j * rows_stored_cols + i]
        } else {
            v[i * cols + j]
        }
    }

    #[test]
    fn row_major_products_match_a_naive_loop_in_every_transpose() {
        let (m, n, k) = (5, 7, 3);
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            // values bf16 holds exactly, so every operand dtype starts from the same numbers
            let exact =
                |v: Vec<f32>| -> Vec<f32> { v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect() };
            let (a, b) = (exact(data(m * k, 1)), exact(data(k * n, 2)));
            let store = |v: &[f32], d: DType| match d {
                DType::F32 => CpuStorage::F32(v.to_vec()),
                _ => CpuStorage::BF16(v.iter().map(|&x| bf16::from_f32(x)).collect()),
            };
            for (operands, out) in
                [(DType::F32, DType::F32), (DType::BF16, DType::F32), (DType::BF16, DType::BF16)]
            {
                let c0 = exact(data(m * n, 3));
                let mut c = store(&c0, out);
                let (sa, sb) = (store(&a, operands), store(&b, operands));
                row_major((&mut c, 0), (&sa, 0, ta), (&sb, 0, tb), (m, n, k), 0.5, 1.0).unwrap();
                for i in 0..m {
                    for j in 0..n {
                        // A stored [m×k] or [k×m]; B stored [k×n] or [n×k]
                        let want: f32 = (0..k).map(|l| at(&a, k, i, l, ta, m) * at(&b, n, l, j, tb, k)).sum();
                        let want = 0.5 * want + c0[i * n + j];
                        let got = cpu_get(&c, i * n + j);
                        // one rounding to the output dtype
                        let tol = if out == DType::F32 { 1e-5 } else { 4e-3 * want.abs().max(1e-3) };
                        assert!(
                            (got - want).abs() <= tol,
                            "{ta} {tb} {operands:?}->{out:?} ({i},{j}): {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn beta_zero_never_reads_c_and_offsets_and_leading_dimensions_are_honoured() {
        // C full of NaN: with β = 0 it must not leak into the result
        let mut c = CpuStorage::F32(vec![f32::NAN; 20]);
        let a = CpuStorage::BF16(data(12, 4).into_iter().map(bf16::from_f32).collect());
        let b = CpuStorage::BF16(data(12, 5).into_iter().map(bf16::from_f32).collect());
        // 2×2 product from offset 1 of A (lda 3) and offset 2 of B (ldb 4), into C at offset 5, ldc 3
        let g = Gemm {
            transa: false,
            transb: false,
            m: 2,
            n: 2,
            k: 3,
            lda: 3,
            ldb: 4,
            ldc: 3,
            alpha: 1.0,
            beta: 0.0,
        };
        CpuStorage::gemm_ex(&mut c, 5, &a, 1, &b, 2, &g).unwrap();
        let CpuStorage::F32(cv) = &c else { unreachable!() };
        for i in 0..2 {
            for j in 0..2 {
                let want: f32 = (0..3).map(|l| cpu_get(&a, 1 + i + l * 3) * cpu_get(&b, 2 + l + j * 4)).sum();
                assert!((cv[5 + i + j * 3] - want).abs() < 1e-5);
            }
            // the gap row of C's leading dimension is untouched
            assert!(cv[5 + 2 + i * 3].is_nan() || i == 1);
        }
        assert!(cv[..5].iter().all(|v| v.is_nan()));
    }

    #[test]
    fn bad_calls_are_errors() {
        let f = |n: usize| CpuStorage::F32(vec![0.0; n]);
        let h = |n: usize| CpuStorage::BF16(vec![bf16::ZERO; n]);
        let g = Gemm::row_major((2, 3, 4), false, false, 1.0, 0.0);
        // A [2×4] = 8 elements, B [4×3] = 12, C [2×3] = 6
        assert!(row_major((&mut f(6), 0), (&f(8), 0, false), (&f(12), 0, false), (2, 3, 4), 1.0, 0.0).is_ok());
        assert!(
            row_major((&mut f(5), 0), (&f(8), 0, false), (&f(12), 0, false), (2, 3, 4), 1.0, 0.0).is_err()
        );
        assert!(
            row_major((&mut f(6), 0), (&f(7), 0, false), (&f(12), 0, false), (2, 3, 4), 1.0, 0.0).is_err()
        );
        // mixed operand dtypes; a bf16 product into f16
        assert!(CpuStorage::gemm_ex(&mut f(6), 0, &h(12), 0, &f(8), 0, &g).is_err());
        let f16 = CpuStorage::F16(vec![half::f16::ZERO; 6]);
        assert!(CpuStorage::gemm_ex(&mut f16.clone(), 0, &h(12), 0, &h(8), 0, &g).is_err());
        let short_ld = Gemm { lda: 2, ..g };
        assert!(CpuStorage::gemm_ex(&mut f(6), 0, &f(12), 0, &f(8), 0, &short_ld).is_err());
    }
}
