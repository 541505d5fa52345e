//! Wider vectors for the CPU ops' row and elementwise loops, chosen at run time.
//!
//! The release binary targets baseline x86-64 (SSE2, four floats a vector), so it runs on any machine.
//! [`vectorised`] runs a closure compiled a second and third time with AVX-512 or AVX2 + FMA enabled
//! (sixteen or eight floats), picking the widest the CPU has; the loops inside need no intrinsics.
//! Reductions still need care: the compiler keeps a float fold serial (reordering it changes the
//! rounding), so [`max`] and [`exp_sum`] keep sixteen independent lanes, which it maps to registers.
//! Setting `CANDOR_NO_SIMD` keeps the baseline copy (for comparing the two).

use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Level {
    Avx512,
    Avx2,
    Baseline,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::env::var_os("CANDOR_NO_SIMD").is_some() {
                return Level::Baseline;
            }
            if has_avx512() {
                return Level::Avx512;
            }
            if has_avx2() {
                return Level::Avx2;
            }
        }
        Level::Baseline
    })
}

/// Every feature the AVX-512 copy is compiled with (below).
#[cfg(target_arch = "x86_64")]
fn has_avx512() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512dq")
        && is_x86_feature_detected!("avx512vl")
        && has_avx2()
}

/// Every feature the AVX2 copy is compiled with (below).
#[cfg(target_arch = "x86_64")]
fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("bmi2")
}

/// `f()`, compiled with the widest vector extension this CPU has. Pass a closure marked
/// `#[inline(always)]`, and mark the helpers it calls the same way, so that its body is compiled inside
/// the feature-enabled copy rather than called from it.
#[inline(always)]
pub(crate) fn vectorised<R>(f: impl FnOnce() -> R) -> R {
    at_level(level(), f)
}

/// `f()` compiled for `level`, which the caller has checked the CPU supports.
#[inline(always)]
fn at_level<R>(level: Level, f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")]
        fn avx512<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        #[target_feature(enable = "avx2,fma,bmi2")]
        fn avx2<R>(f: impl FnOnce() -> R) -> R {
            f()
        }
        match level {
            // SAFETY: `level()` (or the test naming the level) checked that the CPU has these features.
            Level::Avx512 => return unsafe { avx512(f) },
            Level::Avx2 => return unsafe { avx2(f) },
            Level::Baseline => {}
        }
    }
    f()
}

const LANES: usize = 16;

/// The largest element (−∞ for an empty slice). NaNs are skipped, as by `f32::max`.
#[inline(always)]
pub(crate) fn max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = xs.chunks_exact(LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = if x > *a { x } else { *a };
        }
    }
    tail.iter().fold(acc.iter().copied().fold(f32::NEG_INFINITY, f32::max), |m, &x| m.max(x))
}

/// Replaces each `x` with `e^(x − shift)` and returns their sum, accumulated in f64 (a 49152-token
/// vocabulary row sums well in f64; the lanes keep it vectorised).
#[inline(always)]
pub(crate) fn exp_sum(xs: &mut [f32], shift: f32) -> f64 {
    let mut acc = [0f64; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for (a, x) in acc.iter_mut().zip(c) {
            *x = super::exp_f32(*x - shift);
            *a += *x as f64;
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = super::exp_f32(*x - shift);
        sum += *x as f64;
    }
    sum
}

/// In place: `xs ← softmax(xs)`. Masked scores (biased by `f32::MIN`) come out exactly 0 when the row
/// has an unmasked one.
#[inline(always)]
pub(crate) fn softmax(xs: &mut [f32]) {
    let m = max(xs);
    let inv = (1.0 / exp_sum(xs, m)) as f32;
    xs.iter_mut().for_each(|x| *x *= inv);
}

/// `Σ aᵢ·bᵢ` over the shorter of the two, in sixteen f32 lanes.
#[inline(always)]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; LANES];
    for (ca, cb) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for ((s, &x), &y) in acc.iter_mut().zip(ca).zip(cb) {
            *s += x * y;
        }
    }
    let done = n - n % LANES;
    a[done..].iter().zip(&b[done..]).fold(acc.iter().sum(), |s, (x, y)| s + x * y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 % 1013) as f32 - 500.0) / 37.0).collect()
    }

    /// Every level this CPU can run, the baseline included.
    fn levels() -> Vec<Level> {
        let mut levels = vec![Level::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if has_avx2() {
                levels.push(Level::Avx2);
            }
            if has_avx512() {
                levels.push(Level::Avx512);
            }
        }
        levels
    }

    #[test]
    fn row_primitives_match_plain_folds_at_every_tail_length_and_level() {
        for (level, n) in
            levels().into_iter().flat_map(|l| [0, 1, 15, 16, 17, 33, 100, 49_153].map(|n| (l, n)))
        {
            let xs = data(n);
            let ys: Vec<f32> = data(n + 3)[3..].to_vec();
            at_level(
                level,
                #[inline(always)]
                || {
                    assert_eq!(max(&xs), xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
                    let want: f64 = xs.iter().zip(&ys).map(|(&x, &y)| x as f64 * y as f64).sum();
                    assert!(
                        (dot(&xs, &ys) as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "dot, n = {n}, {level:?}"
                    );
                    let mut e = xs.clone();
                    let s = exp_sum(&mut e, 2.0);
                    let want: f64 = xs.iter().map(|&x| ((x - 2.0) as f64).exp()).sum();
                    assert!((s - want).abs() <= 1e-6 * want, "exp_sum, n = {n}, {level:?}: {s} vs {want}");
                    for (&x, &y) in xs.iter().zip(&e) {
                        assert_eq!(y, super::super::exp_f32(x - 2.0));
                    }
                    let mut p = xs.clone();
                    softmax(&mut p);
                    if n > 0 {
                        let total: f64 = p.iter().map(|&x| x as f64).sum();
                        assert!((total - 1.0).abs() < 1e-5, "softmax sums to {total}, n = {n}");
                    }
                },
            );
        }
    }

    #[test]
    fn max_skips_nans_and_masked_scores_get_zero_probability() {
        let mut xs = vec![f32::MIN; 40];
        xs[3] = f32::NAN;
        xs[21] = 1.5;
        for level in levels() {
            assert_eq!(at_level(level, || max(&xs)), 1.5);
            let mut p = xs.clone();
            p[3] = 0.5;
            at_level(level, || softmax(&mut p));
            assert!(p.iter().enumerate().all(|(i, &p)| (p == 0.0) == (i != 3 && i != 21)), "{level:?}");
        }
    }
}
