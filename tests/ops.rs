//! Every fused op against the same computation composed from plain candle ops: forward values and
//! gradients (candle backprop of `Σ out ⊙ R` for a random `R`), on fresh random inputs of awkward sizes
//! (odd lengths and head counts, leading dims 1 and > 1, non-contiguous inputs), in f32, bf16 and f16;
//! finite differences for RMSNorm and SwiGLU; frozen linear and linear cross-entropy likewise. Outputs
//! are poisoned with NaN first, so an element an op forgets to write fails the comparison.
//!
//! Inputs come from a seed printed in every failure message; `CANDOR_TEST_SEED=N` replays one.

mod common;

use candle_core::{DType, Device, Tensor, Var, D};
use candor::ops::{self, RotaryTable};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn seed() -> u64 {
    std::env::var("CANDOR_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random)
}

struct Inputs {
    rng: ChaCha8Rng,
    seed: u64,
}

impl Inputs {
    fn new() -> Self {
        ops::set_poison_outputs(true);
        let seed = seed();
        Inputs { rng: ChaCha8Rng::seed_from_u64(seed), seed }
    }

    /// Uniform in [-scale, scale), f32 on the CPU.
    fn tensor(&mut self, dims: &[usize], scale: f32) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    fn var(&mut self, dims: &[usize], scale: f32) -> Var {
        Var::from_tensor(&self.tensor(dims, scale)).unwrap()
    }
}

/// max |a − b| and max |a − b| / max |b| (error relative to the tensor's scale), in f32.
fn errors(a: &Tensor, b: &Tensor) -> (f32, f32) {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    assert_eq!(a.dims(), b.dims());
    let max = |t: Tensor| t.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let diff = max((&a - &b).unwrap());
    let nan = a.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().any(|v| !v.is_finite());
    let diff = if nan { f32::INFINITY } else { diff };
    (diff, diff / max(b).max(1e-12))
}

fn assert_close(what: &str, seed: u64, ours: &Tensor, theirs: &Tensor, tol: f32) {
    let (abs, rel) = errors(ours, theirs);
    assert!(
        rel <= tol,
        "{what}: max abs error {abs:.3e}, relative {rel:.3e} > {tol:.0e} (CANDOR_TEST_SEED={seed})"
    );
}

/// Tolerance for comparing an op in `dtype` with the f32 reference.
fn tol(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 1e-2,
    }
}

/// Compares `ours(inputs in dtype)` with `reference(inputs in f32)`: the value, then the gradient of
/// `Σ out ⊙ R` with respect to every input. `inputs` are f32 variables (their values are rounded to
/// `dtype` first, so both sides see the same numbers); `view` turns each variable into the op's argument
/// (e.g. a transpose, for non-contiguous inputs).
fn check<F, G>(
    what: &str,
    rng: &mut Inputs,
    inputs: &[Var],
    dtype: DType,
    view: &dyn Fn(usize, &Tensor) -> Tensor,
    ours: F,
    reference: G,
) where
    F: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    G: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
{
    // inputs are O(1): an absolute error of 1e-7 is rounding even where the result nearly cancels to
    // zero (one element of a saturated sigmoid's gradient)
    check_to(what, rng, inputs, dtype, view, ours, reference, (tol(dtype), 1e-7))
}

/// [`check`] with an explicit relative tolerance, and an absolute error below which any result passes
/// (for outputs that are a difference of much larger terms).
#[allow(clippy::too_many_arguments)]
fn check_to<F, G>(
    what: &str,
    rng: &mut Inputs,
    inputs: &[Var],
    dtype: DType,
    view: &dyn Fn(usize, &Tensor) -> Tensor,
    ours: F,
    reference: G,
    (tol, abs_tol): (f32, f32),
) where
    F: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
    G: Fn(&[Tensor]) -> candle_core::Result<Tensor>,
{
    let seed = rng.seed;
    // round the values to dtype once, so both sides start from identical inputs
    let low: Vec<Var> =
        inputs.iter().map(|v| Var::from_tensor(&v.as_tensor().to_dtype(dtype).unwrap()).unwrap()).collect();
    let inputs: Vec<Var> =
        low.iter().map(|v| Var::from_tensor(&v.as_tensor().to_dtype(DType::F32).unwrap()).unwrap()).collect();
    let args_low: Vec<Tensor> = low.iter().enumerate().map(|(i, v)| view(i, v.as_tensor())).collect();
    let args_f32: Vec<Tensor> = inputs.iter().enumerate().map(|(i, v)| view(i, v.as_tensor())).collect();
    let out = ours(&args_low).unwrap();
    let out_ref = reference(&args_f32).unwrap();
    assert_eq!(out.dtype(), dtype, "{what}: output dtype");
    let close = |what: String, ours: &Tensor, theirs: &Tensor| {
        let (abs, rel) = errors(ours, theirs);
        // f16 keeps values below 6e-5 as subnormals 6e-8 apart: a tensor whose largest value is that
        // small (one element, a saturated sigmoid's gradient) cannot be closer than a few such steps
        let floor = if dtype == DType::F16 { abs_tol.max(2.4e-7) } else { abs_tol };
        assert!(
            rel <= tol || abs <= floor,
            "{what}: max abs error {abs:.3e}, relative {rel:.3e} > {tol:.0e} (CANDOR_TEST_SEED={seed})"
        );
    };
    close(format!("{what} {dtype:?} forward"), &out, &out_ref);

    let r = rng.tensor(out.dims(), 1.0).to_dtype(dtype).unwrap();
    let loss =
        (out.to_dtype(DType::F32).unwrap() * r.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap();
    let loss_ref = (out_ref * r.to_dtype(DType::F32).unwrap()).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let grads_ref = loss_ref.backward().unwrap();
    for (i, (v, v_ref)) in low.iter().zip(&inputs).enumerate() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{what}: no gradient for input {i}"));
        let g_ref = grads_ref.get(v_ref.as_tensor()).unwrap();
        assert_eq!(g.dtype(), dtype);
        close(format!("{what} {dtype:?} gradient of input {i}"), g, g_ref);
    }
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

fn plain(_: usize, t: &Tensor) -> Tensor {
    t.clone()
}

#[test]
fn rms_norm_matches_composed_reference() {
    let mut rng = Inputs::new();
    for dims in [vec![1, 3], vec![1, 7, 33], vec![3, 5, 64], vec![2, 3, 5, 17], vec![5, 1000]] {
        for dtype in DTYPES {
            let d = *dims.last().unwrap();
            let x = rng.var(&dims, 2.0);
            // the weight is a variable here, so its gradient is checked too
            let w = Var::from_tensor(&(rng.tensor(&[d], 0.5) + 1.0).unwrap()).unwrap();
            check(
                &format!("rms_norm {dims:?}"),
                &mut rng,
                &[x, w],
                dtype,
                &plain,
                |a| ops::rms_norm(&a[0], &a[1], 1e-6),
                |a| ops::rms_norm::reference(&a[0], &a[1], 1e-6),
            );
        }
    }
}

#[test]
fn rms_norm_non_contiguous_input_and_frozen_weight() {
    let mut rng = Inputs::new();
    // x is the transpose of a variable: [9, 13] viewed as [13, 9]
    let xt = rng.var(&[9, 13], 1.0);
    let w = rng.tensor(&[9], 1.0);
    let transposed = |i: usize, t: &Tensor| if i == 0 { t.t().unwrap() } else { t.clone() };
    let wv = Var::from_tensor(&w).unwrap();
    check(
        "rms_norm transposed input",
        &mut rng,
        &[xt.clone(), wv],
        DType::F32,
        &transposed,
        |a| ops::rms_norm(&a[0], &a[1], 1e-5),
        |a| ops::rms_norm::reference(&a[0], &a[1], 1e-5),
    );
    // a plain tensor weight gets no gradient and is not even asked for
    let y = ops::rms_norm(&xt.as_tensor().t().unwrap(), &w, 1e-5).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(xt.as_tensor()).is_some());
    assert!(grads.get(&w).is_none());
    // mismatched weight: an error, not a panic
    assert!(ops::rms_norm(&rng.tensor(&[2, 5], 1.0), &rng.tensor(&[4], 1.0), 1e-5).is_err());
}

/// Positions of `rows` packed rows of `t` tokens: each row holds documents that restart at 0.
fn packed_positions(rng: &mut Inputs, rows: usize, t: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(rows * t);
    for _ in 0..rows {
        let mut p = 0;
        for _ in 0..t {
            out.push(p);
            p = if rng.rng.random_range(0..5) == 0 { 0 } else { p + 1 };
        }
    }
    out
}

fn table(rng: &mut Inputs, half: usize, len: usize) -> RotaryTable {
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 10000f32.powf(-(i as f32) / half as f32) * rng.rng.random_range(0.5..1.5))
        .collect();
    RotaryTable::new(&Tensor::new(inv_freq, &Device::Cpu).unwrap(), len).unwrap()
}

#[test]
fn rope_matches_composed_reference() {
    let mut rng = Inputs::new();
    for (b, t, h, d) in [(1, 7, 3, 8), (3, 5, 5, 34), (2, 9, 1, 2), (1, 1, 1, 64), (2, 33, 7, 128)] {
        let positions = packed_positions(&mut rng, b, t);
        let len = *positions.iter().max().unwrap() as usize + 1 + rng.rng.random_range(0..3);
        let tab = table(&mut rng, d / 2, len);
        let pos = Tensor::from_vec(positions, (b, t), &Device::Cpu).unwrap();
        for dtype in DTYPES {
            let x = rng.var(&[b, t, h, d], 3.0);
            check(
                &format!("rope [{b}, {t}, {h}, {d}]"),
                &mut rng,
                &[x],
                dtype,
                &plain,
                |a| ops::rope(&a[0], &tab, &pos),
                |a| ops::rotary::reference(&a[0], &tab, &pos),
            );
        }
    }
}

#[test]
fn rope_non_contiguous_input_and_bad_positions() {
    let mut rng = Inputs::new();
    let (b, t, h, d) = (2, 6, 3, 10);
    let positions = packed_positions(&mut rng, b, t);
    let tab = table(&mut rng, d / 2, 16);
    let pos = Tensor::from_vec(positions, (b, t), &Device::Cpu).unwrap();
    // stored as [b, h, t, d], viewed as [b, t, h, d] (what attention's transposes produce)
    let x = rng.var(&[b, h, t, d], 1.0);
    check(
        "rope transposed input",
        &mut rng,
        &[x],
        DType::F32,
        &|_, t: &Tensor| t.transpose(1, 2).unwrap(),
        |a| ops::rope(&a[0], &tab, &pos),
        |a| ops::rotary::reference(&a[0], &tab, &pos),
    );
    // a position beyond the table is an error naming it
    let far = Tensor::from_vec(vec![0u32, 16], (1, 2), &Device::Cpu).unwrap();
    let err = ops::rope(&rng.tensor(&[1, 2, 1, d], 1.0), &tab, &far).unwrap_err().to_string();
    assert!(err.contains("position 16"), "{err}");
    // odd head_dim and wrong position shapes are errors
    assert!(ops::rope(&rng.tensor(&[1, 2, 1, 9], 1.0), &tab, &far).is_err());
    assert!(ops::rope(&rng.tensor(&[1, 3, 1, d], 1.0), &tab, &far).is_err());
}

#[test]
fn rope_backward_is_the_inverse_rotation() {
    // rotating and then applying the backward to the output gives back the input (the map is orthogonal)
    let mut rng = Inputs::new();
    let (b, t, h, d) = (2, 5, 3, 16);
    let tab = table(&mut rng, d / 2, t);
    let pos =
        Tensor::from_vec((0..(b * t) as u32).map(|i| i % t as u32).collect::<Vec<_>>(), (b, t), &Device::Cpu)
            .unwrap();
    let x = rng.var(&[b, t, h, d], 1.0);
    let y = ops::rope(x.as_tensor(), &tab, &pos).unwrap();
    // d(Σ y ⊙ y)/dx = 2 Rᵀ y = 2 x
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let back = (g.get(x.as_tensor()).unwrap() * 0.5).unwrap();
    assert_close("rope inverse", rng.seed, &back, x.as_tensor(), 1e-6);
}

#[test]
fn swiglu_matches_composed_reference() {
    let mut rng = Inputs::new();
    for dims in [vec![1, 1], vec![3, 7, 129], vec![2, 5, 3, 11], vec![40_003]] {
        for dtype in DTYPES {
            // ±12 reaches both tails of the sigmoid
            let gate = rng.var(&dims, 12.0);
            let up = rng.var(&dims, 2.0);
            check(
                &format!("swiglu {dims:?}"),
                &mut rng,
                &[gate, up],
                dtype,
                &plain,
                |a| ops::swiglu(&a[0], &a[1]),
                |a| ops::swiglu::reference(&a[0], &a[1]),
            );
        }
    }
}

#[test]
fn swiglu_non_contiguous_and_one_sided() {
    let mut rng = Inputs::new();
    let gate = rng.var(&[7, 5], 4.0);
    let up = rng.var(&[5, 7], 2.0);
    check(
        "swiglu transposed gate",
        &mut rng,
        &[gate, up],
        DType::F32,
        &|i, t: &Tensor| if i == 0 { t.t().unwrap() } else { t.clone() },
        |a| ops::swiglu(&a[0], &a[1]),
        |a| ops::swiglu::reference(&a[0], &a[1]),
    );
    // only `up` is a variable: it alone gets a gradient
    let g = rng.tensor(&[3, 4], 2.0);
    let u = rng.var(&[3, 4], 2.0);
    let grads = ops::swiglu(&g, u.as_tensor()).unwrap().sum_all().unwrap().backward().unwrap();
    let expected =
        ops::swiglu::reference(&g, &Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    assert_close("swiglu d_up", rng.seed, grads.get(u.as_tensor()).unwrap(), &expected, 1e-6);
    assert!(grads.get(&g).is_none());
    assert!(ops::swiglu(&g, &rng.tensor(&[4, 3], 1.0)).is_err());
}

/// Central differences of `loss(x) = Σ f(x) ⊙ R` (summed in f64) at `samples` entries of `x`, against
/// the op's backward.
fn finite_differences(
    what: &str,
    rng: &mut Inputs,
    x: &Tensor,
    f: &dyn Fn(&Tensor) -> Tensor,
    step: f64,
    samples: usize,
) {
    let r = rng.tensor(f(x).dims(), 1.0).to_dtype(DType::F64).unwrap();
    let loss = |x: &Tensor| {
        (f(x).to_dtype(DType::F64).unwrap() * &r).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
    };
    let var = Var::from_tensor(x).unwrap();
    let analytic = {
        let out = f(var.as_tensor());
        let l = (out.to_dtype(DType::F64).unwrap() * &r).unwrap().sum_all().unwrap();
        l.backward().unwrap().get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let scale = analytic.iter().fold(0f32, |m, v| m.max(v.abs())) as f64;
    let values = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for _ in 0..samples {
        let i = rng.rng.random_range(0..values.len());
        let at = |delta: f64| {
            let mut v = values.clone();
            v[i] = (v[i] as f64 + delta) as f32;
            loss(&Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap())
        };
        let numeric = (at(step) - at(-step)) / (2.0 * step);
        let err = (numeric - analytic[i] as f64).abs() / scale;
        assert!(
            err < 2e-3,
            "{what}: d/dx[{i}] analytic {} numeric {numeric} (error {err:.2e} of scale {scale:.3}, CANDOR_TEST_SEED={})",
            analytic[i],
            rng.seed
        );
    }
}

#[test]
fn rms_norm_and_swiglu_gradients_match_finite_differences() {
    let mut rng = Inputs::new();
    let x = rng.tensor(&[3, 13], 1.5);
    let w = (rng.tensor(&[13], 0.5) + 1.0).unwrap();
    finite_differences("rms_norm", &mut rng, &x, &|x| ops::rms_norm(x, &w, 1e-6).unwrap(), 1e-2, 30);
    let up = rng.tensor(&[3, 13], 2.0);
    let gate = rng.tensor(&[3, 13], 4.0);
    finite_differences("swiglu gate", &mut rng, &gate, &|g| ops::swiglu(g, &up).unwrap(), 1e-2, 30);
    let positions = Tensor::new(&[[0u32, 1, 2], [0, 0, 1]], &Device::Cpu).unwrap();
    let tab = table(&mut rng, 4, 3);
    let q = rng.tensor(&[2, 3, 2, 8], 1.0);
    finite_differences("rope", &mut rng, &q, &|q| ops::rope(q, &tab, &positions).unwrap(), 1e-2, 30);
}

#[test]
fn frozen_linear_matches_matmul_and_gives_the_weight_nothing() {
    let mut rng = Inputs::new();
    // the last shape is large enough (every side >= 64) for OpenBLAS where the system has it
    let shapes = [
        (vec![1, 5], 3, false),
        (vec![2, 7, 9], 11, true),
        (vec![3, 1, 2, 17], 1, true),
        (vec![2, 40, 96], 72, true),
    ];
    for (dims, out, bias) in shapes {
        let inp = *dims.last().unwrap();
        let x = rng.var(&dims, 1.0);
        // even as a variable, the weight gets no gradient from frozen_linear
        let w = rng.var(&[out, inp], 1.0);
        let b = rng.tensor(&[out], 1.0);
        let b = bias.then_some(&b);
        let y = ops::frozen_linear(x.as_tensor(), w.as_tensor(), b).unwrap();
        let x_ref = Var::from_tensor(x.as_tensor()).unwrap();
        let mut y_ref = x_ref.as_tensor().broadcast_matmul(&w.as_tensor().t().unwrap()).unwrap();
        if let Some(b) = b {
            y_ref = y_ref.broadcast_add(b).unwrap();
        }
        assert_close("frozen_linear forward", rng.seed, &y, &y_ref, 1e-5);
        let r = rng.tensor(y.dims(), 1.0);
        let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ref = (&y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            "frozen_linear dx",
            rng.seed,
            g.get(x.as_tensor()).unwrap(),
            g_ref.get(x_ref.as_tensor()).unwrap(),
            1e-5,
        );
        assert!(g.get(w.as_tensor()).is_none(), "frozen weight got a gradient");
    }
    // a non-contiguous input works (it is copied)
    let xt = rng.var(&[6, 4], 1.0);
    let w = rng.tensor(&[5, 6], 1.0);
    let y = ops::frozen_linear(&xt.as_tensor().t().unwrap(), &w, None).unwrap();
    let y_ref = xt.as_tensor().t().unwrap().matmul(&w.t().unwrap()).unwrap();
    assert_close("frozen_linear transposed input", rng.seed, &y, &y_ref, 1e-5);
    // rows from the middle of a larger tensor (a storage offset)
    let big = rng.tensor(&[100, 70], 1.0);
    let w = rng.tensor(&[66, 70], 1.0);
    let x = big.narrow(0, 30, 65).unwrap();
    let y = ops::frozen_linear(&x, &w, None).unwrap();
    assert_close("frozen_linear offset input", rng.seed, &y, &x.matmul(&w.t().unwrap()).unwrap(), 1e-5);
    assert!(ops::frozen_linear(&xt.as_tensor().t().unwrap(), &rng.tensor(&[5, 7], 1.0), None).is_err());
}

#[test]
fn linear_cross_entropy_matches_composed_loss() {
    let mut rng = Inputs::new();
    for (rows, hidden, vocab) in [(1, 3, 2), (13, 9, 101), (5, 16, 50_021)] {
        let h = rng.var(&[rows, hidden], 1.0);
        let w = rng.tensor(&[vocab, hidden], 0.5);
        let labels: Vec<u32> = (0..rows).map(|_| rng.rng.random_range(0..vocab as u32)).collect();
        let labels = Tensor::new(labels, &Device::Cpu).unwrap();
        let loss = ops::linear_cross_entropy_sum(h.as_tensor(), &w, &labels).unwrap();
        let h_ref = Var::from_tensor(h.as_tensor()).unwrap();
        let logits = h_ref.as_tensor().matmul(&w.t().unwrap()).unwrap();
        let lse = logits.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
        let picked = logits.gather(&labels.unsqueeze(1).unwrap(), 1).unwrap();
        let loss_ref = (lse - picked).unwrap().sum_all().unwrap();
        assert_close("linear_cross_entropy loss", rng.seed, &loss, &loss_ref, 1e-5);
        let g = loss.backward().unwrap();
        let g_ref = loss_ref.backward().unwrap();
        assert_close(
            "linear_cross_entropy dh",
            rng.seed,
            g.get(h.as_tensor()).unwrap(),
            g_ref.get(h_ref.as_tensor()).unwrap(),
            1e-4,
        );
        // in bf16 and f16 (the weight widened to f32 a block of rows at a time: 50,021 rows are 13
        // blocks, the last partial), against the f32 loss of the same rounded values
        for dtype in [DType::BF16, DType::F16] {
            let h_low = Var::from_tensor(&h.as_tensor().to_dtype(dtype).unwrap()).unwrap();
            let w_low = w.to_dtype(dtype).unwrap();
            let loss = ops::linear_cross_entropy_sum(h_low.as_tensor(), &w_low, &labels).unwrap();
            let h32 = Var::from_tensor(&h_low.as_tensor().to_dtype(DType::F32).unwrap()).unwrap();
            let logits = h32.as_tensor().matmul(&w_low.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            let lse = logits.exp().unwrap().sum_keepdim(D::Minus1).unwrap().log().unwrap();
            let picked = logits.gather(&labels.unsqueeze(1).unwrap(), 1).unwrap();
            let loss_ref = (lse - picked).unwrap().sum_all().unwrap();
            assert_close(&format!("linear_cross_entropy {dtype:?} loss"), rng.seed, &loss, &loss_ref, 1e-5);
            let g = loss.backward().unwrap();
            let dh = g.get(h_low.as_tensor()).unwrap();
            assert_eq!(dh.dtype(), dtype);
            let dh_ref = loss_ref.backward().unwrap();
            let what = format!("linear_cross_entropy {dtype:?} dh");
            assert_close(&what, rng.seed, dh, dh_ref.get(h32.as_tensor()).unwrap(), 1e-2);
        }
    }
}

#[test]
fn selftest_passes_on_cpu() {
    let (code, out, err) = common::candor(&["selftest", "--device", "cpu"], &[]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("rms_norm") && out.contains("swiglu") && out.contains("rope"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn selftest_on_cuda_without_the_feature_is_one_clear_error() {
    let (code, _, err) = common::candor(&["selftest", "--device", "cuda"], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("--features cuda"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn bit_mask_dropout_equals_the_composed_mask_exactly() {
    use rand::{Rng, SeedableRng};
    let dev = candle_core::Device::Cpu;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (37, 129), &dev).unwrap()).unwrap();
    let w = Tensor::randn(0f32, 1.0, (37, 129), &dev).unwrap();
    let keep = 0.9;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let fused =
        candor::ops::dropout::dropout_cpu(&x, (1.0 / keep) as f32, || rng.random::<f64>() < keep).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 })
        .collect();
    let composed = (x.as_tensor() * Tensor::from_vec(mask, x.shape(), &dev).unwrap()).unwrap();
    let bits = |t: &Tensor| -> Vec<u32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
    };
    assert!(bits(&fused) == bits(&composed), "dropout values differ from the composed mask");
    // dropped elements are +0 or -0 (x · 0 keeps x's sign)
    let zeros = bits(&fused).iter().filter(|&&b| f32::from_bits(b) == 0.0).count();
    assert!(zeros > 200 && zeros < 800, "about 10% dropped: {zeros} of {}", x.elem_count());
    let g_fused = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let g_comp = (composed * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let (a, b) = (g_fused.get(x.as_tensor()).unwrap(), g_comp.get(x.as_tensor()).unwrap());
    assert!(bits(a) == bits(b), "dropout gradients differ from the composed mask's");
}

#[test]
fn lora_linear_matches_the_composed_layer() {
    use candor::ops::lora_linear::{DropoutMask, Epilogue, LoraWeights};
    let mut rng = Inputs::new();
    // what the op does with its output: nothing, adds a residual, or rotates heads of this width
    #[derive(Clone, Copy)]
    enum Then {
        Nothing,
        Residual,
        Rotate(usize),
    }
    // (x dims, out, r, bias, dropout, then)
    for (dims, out, r, bias, dropout, then) in [
        (vec![1, 5], 3, 1, false, false, Then::Nothing),
        (vec![2, 7, 9], 11, 4, true, false, Then::Residual),
        (vec![3, 13, 17], 6, 3, false, true, Then::Rotate(2)),
        (vec![1, 33, 40], 24, 16, true, true, Then::Residual),
        (vec![2, 19, 40], 23, 16, false, false, Then::Nothing),
        (vec![3, 11, 20], 20, 5, false, true, Then::Residual),
        (vec![2, 19, 40], 24, 8, true, false, Then::Rotate(8)),
        // r = 32 without dropout: in bf16 the rank-r products read x and dy as stored (`thin`)
        (vec![2, 40, 64], 48, 32, true, false, Then::Residual),
        // the selftest's shape, whose bf16/f16 rows run the half path on a GPU at the same tolerance
        (vec![2, 37, 96], 80, 8, false, false, Then::Nothing),
    ] {
        let inp = *dims.last().unwrap();
        let x = rng.var(&dims, 1.0);
        let a = rng.var(&[r, inp], 0.5);
        let b = rng.var(&[out, r], 0.5);
        let w = rng.tensor(&[out, inp], 0.5);
        let bias_t = rng.tensor(&[out], 1.0);
        let bias = bias.then_some(&bias_t);
        let n: usize = dims.iter().product();
        let mask = dropout.then(|| DropoutMask::draw(n, 1.25, || rng.rng.random::<f64>() < 0.8));
        let what = format!(
            "lora_linear {dims:?}→{out} r={r} bias={} dropout={dropout} then {}",
            bias.is_some(),
            match then {
                Then::Nothing => "nothing".into(),
                Then::Residual => "a residual".into(),
                Then::Rotate(d) => format!("rotate heads of {d}"),
            }
        );
        let mut inputs = vec![x, a, b];
        if let Then::Residual = then {
            let mut out_dims = dims.clone();
            *out_dims.last_mut().unwrap() = out;
            inputs.push(rng.var(&out_dims, 1.0));
        }
        // positions [b, t] of packed rows and a table covering them, for the rotations
        let (rows, t) = (dims[0], dims[dims.len() - 2]);
        let positions = packed_positions(&mut rng, rows, t);
        let half = if let Then::Rotate(d) = then { d / 2 } else { 1 };
        let tab = table(&mut rng, half, *positions.iter().max().unwrap() as usize + 1);
        let pos = Tensor::from_vec(positions, (rows, t), &Device::Cpu).unwrap();
        fn epilogue<'a>(then: Then, t: &'a [Tensor], tab: &'a RotaryTable, pos: &'a Tensor) -> Epilogue<'a> {
            match then {
                Then::Nothing => Epilogue::None,
                Then::Residual => Epilogue::Residual(&t[3]),
                Then::Rotate(d) => Epilogue::Rotate { table: tab, positions: pos, head_dim: d },
            }
        }
        check(
            &what,
            &mut rng,
            &inputs,
            DType::F32,
            &plain,
            |t| {
                LoraWeights { weight: &w, bias, a: &t[1], b: &t[2], scale: 1.5 }.forward_then(
                    &t[0],
                    epilogue(then, t, &tab, &pos),
                    mask.clone(),
                )
            },
            |t| {
                LoraWeights { weight: &w, bias, a: &t[1], b: &t[2], scale: 1.5 }.reference_then(
                    &t[0],
                    epilogue(then, t, &tab, &pos),
                    mask.as_ref(),
                )
            },
        );
        // what CUDA runs: the device-agnostic path in f32 and with a bf16 base, and the half-precision
        // path in bf16 and f16 (its products through the CPU emulation of cuBLAS's GemmEx); A and B stay
        // f32 as in the model (low precision only with enough outputs: of three, all can be small, and
        // then bf16's rounding of x·Wᵀ is a sizeable part of the largest)
        let mut runs = vec![("generic", DType::F32)];
        if out >= 6 {
            runs.extend([("generic", DType::BF16), ("half", DType::BF16), ("half", DType::F16)]);
            // and the CPU path on bf16/f16 operands (widened to f32 inside)
            runs.extend([("cpu", DType::BF16), ("cpu", DType::F16)]);
        }
        for (path, dtype) in runs {
            let w_low = w.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            let bias_low = bias.map(|b| b.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap());
            check(
                &format!("{what} {path}"),
                &mut rng,
                &inputs,
                dtype,
                &plain,
                |t| {
                    let (w, bias) =
                        (w_low.to_dtype(dtype)?, bias_low.as_ref().map(|b| b.to_dtype(dtype)).transpose()?);
                    let (a, b) = (t[1].to_dtype(DType::F32)?, t[2].to_dtype(DType::F32)?);
                    let weights = LoraWeights { weight: &w, bias: bias.as_ref(), a: &a, b: &b, scale: 1.5 };
                    match path {
                        "half" => weights.forward_half(&t[0], epilogue(then, t, &tab, &pos), mask.clone()),
                        "cpu" => weights.forward_then(&t[0], epilogue(then, t, &tab, &pos), mask.clone()),
                        _ => weights.forward_generic(&t[0], epilogue(then, t, &tab, &pos), mask.clone()),
                    }
                },
                |t| {
                    let weights = LoraWeights {
                        weight: &w_low,
                        bias: bias_low.as_ref(),
                        a: &t[1],
                        b: &t[2],
                        scale: 1.5,
                    };
                    weights.reference_then(&t[0], epilogue(then, t, &tab, &pos), mask.as_ref())
                },
            );
        }
    }
    // an input that needs no gradient (layer 0 reads the frozen embeddings) still trains A and B
    let x = rng.tensor(&[4, 6], 1.0);
    let (a, b) = (rng.var(&[2, 6], 0.5), rng.var(&[5, 2], 0.5));
    let w = rng.tensor(&[5, 6], 0.5);
    let weights = LoraWeights { weight: &w, bias: None, a: a.as_tensor(), b: b.as_tensor(), scale: 2.0 };
    let y = weights.forward(&x, None).unwrap();
    let y_ref = weights.reference(&x, None).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    let g_ref = y_ref.sum_all().unwrap().backward().unwrap();
    for v in [&a, &b] {
        assert_close("lora_linear frozen input", rng.seed, g.get(v).unwrap(), g_ref.get(v).unwrap(), 1e-5);
    }
    // a second backward through the same graph: the first took the forward's kept x·Aᵀ, this one
    // recomputes it
    let g2 = y.sum_all().unwrap().backward().unwrap();
    for v in [&a, &b] {
        assert_close("lora_linear second backward", rng.seed, g2.get(v).unwrap(), g.get(v).unwrap(), 1e-6);
    }
    // the same on the half-precision path, in bf16: A and B get f32 gradients, x none. A, B and x hold
    // bf16 values, so the reference differs only by the path's rounding of x·Aᵀ and dy·B
    let bf16_var =
        |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap());
    let (ar, br) = (bf16_var(a.as_tensor()).unwrap(), bf16_var(b.as_tensor()).unwrap());
    let x16 = rng.tensor(&[40, 6], 1.0).to_dtype(DType::BF16).unwrap();
    let w16 = w.to_dtype(DType::BF16).unwrap();
    let rounded = LoraWeights { a: ar.as_tensor(), b: br.as_tensor(), ..weights };
    let half = LoraWeights { weight: &w16, ..rounded };
    // a random output gradient: with all ones, dB's rows would all be one near-cancelling column sum
    let dy = rng.tensor(&[40, 5], 1.0).to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    let sum =
        |y: Tensor| (y.to_dtype(DType::F32).unwrap() * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    let g = sum(half.forward_half(&x16, Epilogue::None, None).unwrap());
    let g_ref = sum(rounded.reference(&x16.to_dtype(DType::F32).unwrap(), None).unwrap());
    for v in [&ar, &br] {
        let got = g.get(v).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        assert_close("lora_linear half frozen input", rng.seed, got, g_ref.get(v).unwrap(), 1e-2);
    }
    // an input that starts inside its storage (a contiguous view at an offset) reads from there, in the
    // forward and in both backward ops
    let big = Var::from_tensor(&rng.tensor(&[7, 6], 1.0).to_dtype(DType::BF16).unwrap()).unwrap();
    let view = big.as_tensor().narrow(0, 3, 4).unwrap();
    let copy = Var::from_tensor(&view.copy().unwrap()).unwrap();
    let run = |x: &Tensor| {
        let y = half.forward_half(x, Epilogue::None, None).unwrap();
        let g = y.to_dtype(DType::F32).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
        (y, g)
    };
    let ((y_view, g_view), (y_copy, g_copy)) = (run(&view), run(copy.as_tensor()));
    assert_close("lora_linear half offset input", rng.seed, &y_view, &y_copy, 0.0);
    for v in [&ar, &br] {
        assert_close(
            "lora_linear half offset input grads",
            rng.seed,
            g_view.get(v).unwrap(),
            g_copy.get(v).unwrap(),
            0.0,
        );
    }
    let dx_view = g_view.get(big.as_tensor()).unwrap().narrow(0, 3, 4).unwrap();
    assert_close(
        "lora_linear half offset dx",
        rng.seed,
        &dx_view,
        g_copy.get(copy.as_tensor()).unwrap(),
        0.0,
    );
    // it takes only bf16/f16 inputs
    assert!(weights.forward_half(&x, Epilogue::None, None).is_err(), "f32 input on the half path");
    // operands that do not fit are an error, on both paths
    let swapped = LoraWeights { a: b.as_tensor(), b: a.as_tensor(), ..weights };
    assert!(swapped.forward(&x, None).is_err() && swapped.forward_generic(&x, Epilogue::None, None).is_err());
    let a16 = a.as_tensor().to_dtype(DType::BF16).unwrap();
    assert!(LoraWeights { a: &a16, ..weights }.forward(&x, None).is_err(), "A must be f32");
    let (long_x, short) = (rng.tensor(&[20, 6], 1.0), DropoutMask::draw(10, 1.25, || true));
    assert!(weights.forward(&long_x, Some(short)).is_err(), "mask shorter than the input");
    // a residual of another shape or dtype is an error
    for res in [rng.tensor(&[4, 6], 1.0), rng.tensor(&[4, 5], 1.0).to_dtype(DType::BF16).unwrap()] {
        assert!(
            weights.forward_then(&x, Epilogue::Residual(&res), None).is_err(),
            "residual {:?}",
            res.dims()
        );
    }
    // so is a rotation of outputs that are not whole heads, of a table for another head width, or by
    // positions of another shape
    let x3 = x.reshape((1, 4, 6)).unwrap();
    let pos = Tensor::from_vec(vec![0u32, 1, 2, 3], (1, 4), &Device::Cpu).unwrap();
    let (tab2, tab4) = (table(&mut rng, 1, 4), table(&mut rng, 2, 4));
    for (tab, pos, d) in [(&tab2, &pos, 2), (&tab4, &pos, 2), (&tab2, &pos.reshape((4, 1)).unwrap(), 2)] {
        let then = Epilogue::Rotate { table: tab, positions: pos, head_dim: d };
        let w6 = rng.tensor(&[6, 6], 0.5);
        let b6 = rng.var(&[6, 2], 0.5);
        let six = LoraWeights { weight: &w6, b: b6.as_tensor(), ..weights };
        assert!(
            six.forward_then(&x3, then, None).is_ok() == (std::ptr::eq(tab, &tab2) && pos.dims() == [1, 4])
        );
    }
    let five = Epilogue::Rotate { table: &tab4, positions: &pos, head_dim: 4 };
    assert!(weights.forward_then(&x3, five, None).is_err(), "5 outputs are not heads of 4");
}

/// `[b, 1, t, keys]` additive bias: causal over the last `t` keys (earlier keys are a cache), with
/// padding on the left of some rows, so some query rows see no key at all.
fn causal_padded_bias(rng: &mut Inputs, b: usize, t: usize, keys: usize) -> Tensor {
    let past = keys - t;
    let mut bias = vec![0f32; b * t * keys];
    for row in 0..b {
        let pad = rng.rng.random_range(0..=t.min(3));
        for q in 0..t {
            for k in 0..keys {
                let allowed = k < past || (k - past <= q && k - past >= pad);
                if !allowed {
                    bias[(row * t + q) * keys + k] = f32::MIN;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, t, keys), &Device::Cpu).unwrap()
}

#[test]
fn attention_matches_the_composed_reference() {
    use candor::ops::attention;
    let mut rng = Inputs::new();
    // (b, heads, kv heads, t, keys, d, bias)
    for (b, nh, nkv, t, keys, d, bias) in [
        (1, 1, 1, 1, 2, 4, false),
        (2, 6, 2, 7, 7, 8, true),
        (3, 4, 1, 5, 9, 16, true),
        (1, 3, 3, 13, 13, 5, false),
        (2, 9, 3, 33, 33, 64, true),
        // several blocks of 64 query rows, each computing only the keys its rows can see
        (2, 2, 1, 130, 130, 8, true),
        (1, 6, 2, 97, 97, 16, true),
        // on 2 threads, 3 KV-head tasks would not spread evenly: a task per query head, whose K and V
        // gradients are summed across tasks (on 1 or 3 threads, a task per KV head)
        (1, 6, 3, 70, 70, 8, true),
        (1, 2, 2, 70, 75, 4, true),
        (1, 1, 1, 65, 65, 3, false),
    ] {
        let bias = bias.then(|| causal_padded_bias(&mut rng, b, t, keys));
        for transposed in [false, true] {
            // as the decoder passes them: views of [b, len, heads, d] storage, or contiguous
            let shapes = if transposed {
                [vec![b, t, nh, d], vec![b, keys, nkv, d], vec![b, keys, nkv, d]]
            } else {
                [vec![b, nh, t, d], vec![b, nkv, keys, d], vec![b, nkv, keys, d]]
            };
            let inputs: Vec<Var> = shapes.iter().map(|s| rng.var(s, 1.0)).collect();
            let view = |_: usize, x: &Tensor| if transposed { x.transpose(1, 2).unwrap() } else { x.clone() };
            let what =
                format!("attention b={b} heads={nh}/{nkv} t={t} keys={keys} d={d} transposed={transposed}");
            let reference = |x: &[Tensor]| {
                attention::reference(&x[0], &x[1], &x[2], bias.as_ref())?.transpose(1, 2)?.reshape((
                    b,
                    t,
                    nh * d,
                ))
            };
            // the softmax backward subtracts nearly equal terms (dP − rowsum(dO ⊙ O)): both sides round
            // differently at the 1e-6 level relative to the largest gradient
            let fused = |x: &[Tensor]| attention::attention(&x[0], &x[1], &x[2], bias.as_ref());
            // with two keys q's gradient can nearly cancel: its terms are O(1), so 1e-6 absolute is
            // rounding, whatever the (small) result
            check_to(&what, &mut rng, &inputs, DType::F32, &view, fused, reference, (1e-4, 1e-6));
            // the fused op on bf16/f16 storage (widened to f32 inside, each result rounded once)
            if keys >= 5 {
                for dtype in [DType::BF16, DType::F16] {
                    let what = format!("{what} fused");
                    check_to(&what, &mut rng, &inputs, dtype, &view, fused, reference, (1e-2, 1e-6));
                }
            }
            // what other devices and bf16 run: the composed version inside a recomputing op
            // (bf16 only with enough keys: with two, q's gradient can cancel to ~0 and bf16 rounding is
            // all that is left of it)
            let dtypes: &[DType] = if keys >= 5 { &[DType::F32, DType::BF16] } else { &[DType::F32] };
            for &dtype in dtypes {
                let recomputed = |x: &[Tensor]| attention::recomputed(&x[0], &x[1], &x[2], bias.as_ref());
                // in bf16 the composed path rounds the probabilities before the value product
                let tol = if dtype == DType::F32 { 1e-4 } else { 3e-2 };
                check_to(
                    &format!("{what} recomputed"),
                    &mut rng,
                    &inputs,
                    dtype,
                    &view,
                    recomputed,
                    reference,
                    (tol, 1e-6),
                );
                // batch rows in groups (as a large batch goes on the GPU): of two rows (3 = 2 + 1),
                // else of one
                let group = if b == 3 { 2 } else { 1 };
                let grouped = |x: &[Tensor]| {
                    attention::recomputed_in_chunks(&x[0], &x[1], &x[2], bias.as_ref(), group * nh * t * keys)
                };
                check_to(
                    &format!("{what} recomputed in groups of {group}"),
                    &mut rng,
                    &inputs,
                    dtype,
                    &view,
                    grouped,
                    reference,
                    (tol, 1e-6),
                );
            }
        }
    }
    let q = rng.tensor(&[1, 3, 2, 4], 1.0);
    let k = rng.tensor(&[1, 2, 2, 4], 1.0);
    assert!(attention::attention(&q, &k, &k, None).is_err(), "3 heads over 2 KV heads");
    let empty = rng.tensor(&[0, 2, 3, 4], 1.0);
    let out = attention::recomputed(&empty, &empty, &empty, None).unwrap();
    assert_eq!(out.dims(), &[0, 3, 8], "a batch of no rows");
    let bad_bias = rng.tensor(&[1, 1, 2, 3], 1.0);
    let k = rng.tensor(&[1, 1, 2, 4], 1.0);
    assert!(attention::attention(&q, &k, &k, Some(&bad_bias)).is_err());
}

#[test]
fn adamw_step_is_the_composed_update_bit_for_bit() {
    use candor::ops::adamw::{adamw_step, reference, Scalars};
    let mut rng = Inputs::new();
    let bits = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // odd sizes, one above the rayon chunk (16k elements); weight decay on and off
    for (dims, wd) in [(vec![7usize, 13], 0.1), (vec![1, 3], 0.0), (vec![5, 3301], 0.01)] {
        let p = rng.var(&dims, 1.0);
        let want_p = p.as_tensor().copy().unwrap();
        let mv = Tensor::zeros([&[2][..], &dims].concat(), DType::F32, &Device::Cpu).unwrap();
        let (mut want_p, mut want_m, mut want_v) =
            (want_p, mv.get(0).unwrap().copy().unwrap(), mv.get(1).unwrap().copy().unwrap());
        for t in 1..=4 {
            let lr = 1e-3 * t as f64;
            // the gradient as a transposed view on some steps: the op takes any layout
            let g = if t % 2 == 0 {
                rng.tensor(&[dims[1], dims[0]], 1.0).t().unwrap()
            } else {
                rng.tensor(&dims, 1.0)
            };
            // step 3 is clipped: the trainer's factor, folded into the update, as `g * factor` before it
            let clip = if t == 3 { 0.37 } else { 1.0 };
            let (rp, rm, rv) =
                reference(&want_p, &want_m, &want_v, &(&g * clip).unwrap(), lr, (0.9, 0.999, 1e-8), wd, t)
                    .unwrap();
            (want_p, want_m, want_v) = (rp, rm, rv);
            let s = Scalars::new(lr, 0.9, 0.999, 1e-8, wd, t).with_grad_scale(clip);
            adamw_step(p.as_tensor(), &mv, &g, &s).unwrap();
            let what = format!("{dims:?} step {t} (CANDOR_TEST_SEED={})", rng.seed);
            assert_eq!(bits(p.as_tensor()), bits(&want_p), "parameter {what}");
            assert_eq!(bits(&mv.get(0).unwrap()), bits(&want_m), "m {what}");
            assert_eq!(bits(&mv.get(1).unwrap()), bits(&want_v), "v {what}");
        }
    }
    // shapes that do not fit, and a non-f32 gradient: errors
    let p = rng.var(&[3, 4], 1.0);
    let s = Scalars::new(1e-3, 0.9, 0.999, 1e-8, 0.0, 1);
    let mv = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(adamw_step(p.as_tensor(), &mv, &rng.tensor(&[4, 3], 1.0), &s).is_err());
    assert!(adamw_step(p.as_tensor(), &mv.narrow(0, 0, 1).unwrap(), &rng.tensor(&[3, 4], 1.0), &s).is_err());
    let g16 = rng.tensor(&[3, 4], 1.0).to_dtype(DType::BF16).unwrap();
    assert!(adamw_step(p.as_tensor(), &mv, &g16, &s).is_err());
}
