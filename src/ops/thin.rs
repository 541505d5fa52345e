//! The LoRA layer's rank-r products against bf16 rows, in AVX-512: `x·Aᵀ`, `dy·B` ([`rows_times`])
//! and `uᵀ·x`, `tᵀ·dy` ([`rows_transposed_times`]) read the layer's input `x` and output gradient `dy`
//! as stored, in bf16.
//!
//! In f32 those products went to OpenBLAS on copies of `x` and `dy` widened to f32 (two passes over
//! every activation and gradient of the step, and each product then packing its widened operand
//! again). Here each bf16 value is widened in registers as it is read: a bf16 value is exact in f32,
//! the other operand is the f32 adapter or rank-r intermediate, and the sums are f32, so the results
//! are f32 products (in another summation order). Runs where the CPU has AVX-512F and `r` is a
//! multiple of 16 up to 64 ([`applies`]).
//!
//! Measured on a SmolLM2 bf16 training step (4 × 256 tokens, r = 16), three pairs of runs against the
//! widened copies and OpenBLAS: 1.716, 1.647, 1.712 s against 1.776, 1.824, 1.781 s (about 5%), peak
//! RSS 0.99 against 1.02 GB. The kernels themselves reach about 110-120 GFLOP/s (`x·w`, which
//! transposes each 16-row block in registers) and 130-235 (`xᵀ·u`) on two cores.

use half::bf16;
use rayon::prelude::*;

/// Whether these kernels take rank `r` on this CPU.
pub(crate) fn applies(r: usize) -> bool {
    r > 0 && r.is_multiple_of(16) && r <= 64 && avx512()
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *ON.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Rows of `x` per task of [`rows_times`].
const ROWS_PER_TASK: usize = 80;

/// `x [m, k] (bf16, contiguous) · w [k, r] (f32, contiguous)` as a new `[m, r]` f32 buffer.
/// Panics unless [`applies`]`(r)` and the slices have those sizes.
pub(crate) fn rows_times(x: &[bf16], w: &[f32], m: usize, k: usize, r: usize) -> Vec<f32> {
    assert!(applies(r) && x.len() == m * k && w.len() == k * r, "thin: [{m}×{k}]·[{k}×{r}]");
    let mut out = vec![0f32; m * r];
    out.par_chunks_mut(ROWS_PER_TASK * r).enumerate().for_each(|(task, out)| {
        let rows = out.len() / r;
        let x = &x[task * ROWS_PER_TASK * k..][..rows * k];
        // SAFETY: AVX-512F is present (`applies`); the slices have the sizes the kernel reads
        #[cfg(target_arch = "x86_64")]
        unsafe {
            rows_times_avx512(x, w, out, k, r)
        }
    });
    out
}

/// 16 rows at a time: the block widened and transposed (16 × 16 tiles in registers) so that each `k`
/// is one vector over the rows, then per `k` and output column `j` one FMA with `w[k][j]` broadcast
/// (16 independent sums per vector of 16 columns); the sums transposed back into the rows of `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_times_avx512(x: &[bf16], w: &[f32], out: &mut [f32], k: usize, r: usize) {
    use std::arch::x86_64::*;
    let rows = out.len() / r;
    let kp = k.next_multiple_of(16);
    // columns[l] = x[i0..i0 + 16][l] as 16 f32 lanes
    let mut columns = vec![_mm512_setzero_ps(); kp];
    let mut i0 = 0;
    while i0 < rows {
        let n = 16.min(rows - i0);
        for l0 in (0..kp).step_by(16) {
            let width = 16.min(k - l0);
            let mask: u16 = if width == 16 { 0xffff } else { (1u16 << width) - 1 };
            let block: [__m512i; 16] = std::array::from_fn(|rr| {
                if rr < n {
                    let h = load16(mask, x.as_ptr().add((i0 + rr) * k + l0) as *const u16);
                    _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h))
                } else {
                    _mm512_setzero_si512()
                }
            });
            for (c, v) in super::amx::transpose16(block).into_iter().enumerate() {
                columns[l0 + c] = _mm512_castsi512_ps(v);
            }
        }
        for j0 in (0..r).step_by(16) {
            let mut acc = [_mm512_setzero_ps(); 16];
            for (l, xv) in columns.iter().enumerate().take(k) {
                let wl = w.as_ptr().add(l * r + j0);
                for (jj, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(*xv, _mm512_set1_ps(*wl.add(jj)), *a);
                }
            }
            // acc[jj] holds column j0 + jj over the 16 rows: back to rows
            let rows_of = super::amx::transpose16(acc.map(|a| _mm512_castps_si512(a)));
            for (rr, v) in rows_of.into_iter().enumerate().take(n) {
                _mm512_storeu_si512(out.as_mut_ptr().add((i0 + rr) * r + j0) as *mut _, v);
            }
        }
        i0 += 16;
    }
}

/// `xᵀ · u` for `x [m, k]` (bf16, contiguous) and `u [m, r]` (f32, contiguous): a new `[r, k]` buffer
/// (the transpose of the `[k, r]` product; `uᵀ·x` as stored, for dA). Panics unless
/// [`applies`]`(r)` and the slices have those sizes.
pub(crate) fn rows_transposed_times(x: &[bf16], u: &[f32], m: usize, k: usize, r: usize) -> Vec<f32> {
    assert!(applies(r) && x.len() == m * k && u.len() == m * r, "thin: [{m}×{k}]ᵀ·[{m}×{r}]");
    // tasks over blocks of 16 columns of x; each writes its 16 columns of every output row
    let blocks = k.div_ceil(16);
    let parts: Vec<(usize, Vec<f32>)> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let mut part = vec![0f32; r * 16];
            // SAFETY: AVX-512F is present (`applies`); the slices have the sizes the kernel reads
            #[cfg(target_arch = "x86_64")]
            unsafe {
                columns_times_avx512(x, u, m, k, r, 16 * b, &mut part)
            }
            (b, part)
        })
        .collect();
    let mut out = vec![0f32; r * k];
    for (b, part) in parts {
        let width = 16.min(k - 16 * b);
        for j in 0..r {
            out[j * k + 16 * b..][..width].copy_from_slice(&part[j * 16..][..width]);
        }
    }
    out
}

/// Columns `k0..k0 + 16` of `xᵀ·u` into `part [r, 16]`: per `x` row, 16 values widened in a register and
/// one FMA per output row `j` with `u[i][j]` broadcast. Columns past `k` come out zero.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn columns_times_avx512(
    x: &[bf16],
    u: &[f32],
    m: usize,
    k: usize,
    r: usize,
    k0: usize,
    part: &mut [f32],
) {
    use std::arch::x86_64::*;
    let width = 16.min(k - k0);
    let mask: __mmask16 = if width == 16 { 0xffff } else { (1u16 << width) - 1 };
    for j0 in (0..r).step_by(16) {
        let mut acc = [_mm512_setzero_ps(); 16];
        for i in 0..m {
            let src = x.as_ptr().add(i * k + k0) as *const u16;
            let h = load16(mask, src);
            let xv = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)));
            let ui = u.as_ptr().add(i * r + j0);
            for (jj, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(xv, _mm512_set1_ps(*ui.add(jj)), *a);
            }
        }
        for (jj, a) in acc.iter().enumerate() {
            _mm512_storeu_ps(part.as_mut_ptr().add((j0 + jj) * 16), *a);
        }
    }
}

/// 16 bf16 values at `src` (those `mask` selects; zeros elsewhere) as 16-bit lanes, reading no
/// memory past the selected values.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn load16(mask: u16, src: *const u16) -> std::arch::x86_64::__m256i {
    use std::arch::x86_64::*;
    if mask == 0xffff {
        return _mm256_loadu_si256(src as *const __m256i);
    }
    let mut lanes = [0u16; 16];
    for (e, lane) in lanes.iter_mut().enumerate() {
        if mask >> e & 1 == 1 {
            *lane = *src.add(e);
        }
    }
    _mm256_loadu_si256(lanes.as_ptr() as *const __m256i)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 37 + seed * 11) % 101) as f32 / 25.0 - 2.0).collect()
    }

    /// Milliseconds and GFLOP/s of both products on SmolLM2's shapes
    /// (`cargo test --release thin_speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn thin_speed() {
        if !applies(16) {
            return;
        }
        for (m, k) in [(1024, 576), (1024, 1536)] {
            let x: Vec<bf16> = (0..m * k).map(|i| bf16::from_f32((i % 7) as f32)).collect();
            let (w, u) = (vec![0.5f32; k * 16], vec![0.25f32; m * 16]);
            for name in ["x·w", "xᵀ·u"] {
                let mut times = Vec::new();
                for _ in 0..21 {
                    let t = std::time::Instant::now();
                    if name == "x·w" {
                        std::hint::black_box(rows_times(&x, &w, m, k, 16));
                    } else {
                        std::hint::black_box(rows_transposed_times(&x, &u, m, k, 16));
                    }
                    times.push(t.elapsed().as_secs_f64());
                }
                times.sort_by(f64::total_cmp);
                let gflops = 2.0 * (m * k * 16) as f64 / times[10] / 1e9;
                println!("{name} {m}x{k}x16: {:.3} ms ({gflops:.0} GFLOP/s)", times[10] * 1e3);
            }
        }
    }

    /// Both products against f64 sums of the same values, at f32 accuracy, on sizes with tails in
    /// every dimension (rows not a multiple of 4 or 64, columns not a multiple of 16) and r = 16, 32.
    #[test]
    fn thin_products_match_f64_sums() {
        if !applies(16) {
            eprintln!("thin tests skipped: no AVX-512F");
            return;
        }
        for (m, k, r) in [(131, 45, 16), (64, 576, 16), (7, 16, 32), (200, 33, 32)] {
            let x: Vec<bf16> = values(m * k, 1).iter().map(|&v| bf16::from_f32(v)).collect();
            let w: Vec<f32> = values(k * r, 2).iter().map(|v| v * 0.37).collect();
            let u: Vec<f32> = values(m * r, 3).iter().map(|v| v * 1.13).collect();
            let xf = |i: usize, l: usize| x[i * k + l].to_f32() as f64;
            let got = rows_times(&x, &w, m, k, r);
            for i in 0..m {
                for j in 0..r {
                    let terms = (0..k).map(|l| xf(i, l) * w[l * r + j] as f64);
                    let (want, mag): (f64, f64) = (terms.clone().sum(), terms.map(f64::abs).sum());
                    let err = (got[i * r + j] as f64 - want).abs();
                    assert!(
                        err <= 1e-6 * mag.max(1.0),
                        "x·w {m}x{k}x{r} ({i},{j}): {} vs {want}",
                        got[i * r + j]
                    );
                }
            }
            let got = rows_transposed_times(&x, &u, m, k, r);
            for j in 0..r {
                for l in 0..k {
                    let terms = (0..m).map(|i| xf(i, l) * u[i * r + j] as f64);
                    let (want, mag): (f64, f64) = (terms.clone().sum(), terms.map(f64::abs).sum());
                    let err = (got[j * k + l] as f64 - want).abs();
                    assert!(
                        err <= 1e-6 * mag.max(1.0),
                        "uᵀ·x {m}x{k}x{r} ({j},{l}): {} vs {want}",
                        got[j * k + l]
                    );
                }
            }
        }
    }
}
