//! The patched `Tensor::backward` (vendor/candle-core: the first gradient reaching a tensor is stored
//! instead of added into zeros) against gradients worked out by hand: fan-in, a strided first
//! gradient, broadcasts, and one upstream gradient handed to two inputs.

use candle_core::{Device, Tensor, Var};

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "element {i}: got {g}, want {w}");
    }
}

fn var(data: &[f32], shape: (usize, usize)) -> Var {
    Var::from_tensor(&Tensor::from_slice(data, shape, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn a_tensor_read_three_times_sums_its_three_gradients() {
    let xs = [0.5f32, -1.0, 2.0, 3.0, -0.25, 1.5];
    let x = var(&xs, (2, 3));
    // d/dx of sum(2x + x² + exp(x)) = 2 + 2x + exp(x)
    let loss = ((x.affine(2.0, 0.0).unwrap() + x.sqr().unwrap()).unwrap() + x.exp().unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(&x).unwrap();
    let want: Vec<f32> = xs.iter().map(|&v| 2.0 + 2.0 * v + v.exp()).collect();
    close(&values(g), &want);
}

#[test]
fn a_strided_first_gradient_is_stored_contiguous() {
    let x = var(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3));
    let w = Tensor::from_slice(&[1.0f32, -1.0, 0.5, 2.0], (2, 2), &Device::Cpu).unwrap();
    // loss = sum(xᵀ·w): dx[i][j] = Σ_k w[i][k]
    let loss = x.t().unwrap().matmul(&w).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let g = grads.get(&x).unwrap();
    assert!(g.is_contiguous(), "gradient layout {:?}", g.layout());
    assert_eq!(g.dims(), &[2, 3]);
    close(&values(g), &[0.0, 0.0, 0.0, 2.5, 2.5, 2.5]);
}

#[test]
fn broadcast_and_shared_upstream_gradients() {
    let a = var(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], (2, 3));
    let b = var(&[10.0, 20.0, 30.0], (1, 3));
    let c = var(&[0.5; 6], (2, 3));
    // s = a + b (b broadcast over rows); loss = sum(s ⊙ c) + sum(s)
    let s = a.broadcast_add(&b).unwrap();
    let loss = ((&s * c.as_tensor()).unwrap().sum_all().unwrap() + s.sum_all().unwrap()).unwrap();
    let grads = loss.backward().unwrap();
    // ds = c + 1 = 1.5 everywhere; both addends of s receive it
    close(&values(grads.get(&a).unwrap()), &[1.5; 6]);
    close(&values(grads.get(&b).unwrap()), &[3.0; 3]);
    close(&values(grads.get(&c).unwrap()), &values(&s));
}
