//! The patched `Tensor::backward` (vendor/candle-core: the first gradient reaching a tensor is stored
//! instead of added into zeros) against gradients worked out by hand: fan-in, a strided first
//! gradient, broadcasts, and one upstream gradient handed to two inputs. Also the patched bf16
//! conversions of candle's AVX2 loops (`bf16-avx.patch`) against `half`'s, value by value.

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

/// candle's bf16 `add` and `mul` (AVX2 loops over 32 values, then a scalar tail) round every result to
/// nearest even exactly as `bf16::from_f32` does, and keep NaN and infinities: ties both ways, values
/// that round up into the next binade or to infinity, subnormals, signed zeros, on lengths that leave
/// tails.
#[test]
fn bf16_adds_and_products_round_like_half() {
    use half::bf16;
    let specials = [
        0.0f32,
        -0.0,
        1.0,
        -1.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MAX,
        f32::MIN_POSITIVE,
        1e-40,
        -3e-39,
        65504.0,
        3.0e38,
    ];
    // values whose sums land on ties: 1 + 2^-8 is halfway between two bf16 neighbours of 1
    let mut a: Vec<f32> = specials.to_vec();
    let mut b: Vec<f32> = specials.iter().rev().copied().collect();
    for i in 0..1000u32 {
        let x = f32::from_bits(0x3f80_0000 + (i * 0x1_0000)); // exact bf16 values above 1
        a.push(x);
        b.push(f32::from_bits(0x3b80_0000 + (i % 7) * 0x8000)); // 2^-8 and neighbours, half-ulp steps
        a.push(-x * 1.7);
        b.push(x * 0.33);
    }
    for len in [a.len(), 95, 33, 7] {
        let (x, y) = (&a[..len], &b[..len]);
        let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let y16: Vec<bf16> = y.iter().map(|&v| bf16::from_f32(v)).collect();
        let tx = Tensor::from_slice(&x16, len, &Device::Cpu).unwrap();
        let ty = Tensor::from_slice(&y16, len, &Device::Cpu).unwrap();
        for (name, got, f) in [
            ("add", (&tx + &ty).unwrap(), (|p, q| p + q) as fn(f32, f32) -> f32),
            ("mul", (&tx * &ty).unwrap(), |p, q| p * q),
        ] {
            let got: Vec<bf16> = got.to_vec1().unwrap();
            for i in 0..len {
                let want = bf16::from_f32(f(x16[i].to_f32(), y16[i].to_f32()));
                let ok = if want.is_nan() { got[i].is_nan() } else { got[i].to_bits() == want.to_bits() };
                assert!(
                    ok,
                    "{name} {i}: {} and {} gave {} (bits {:#06x}), want {} ({:#06x})",
                    x16[i],
                    y16[i],
                    got[i],
                    got[i].to_bits(),
                    want,
                    want.to_bits()
                );
            }
        }
    }
}
