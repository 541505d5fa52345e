//! AdamW against torch.optim.AdamW (tests/fixtures/adamw.safetensors from scripts/make_golden.py), and
//! its state surviving a save/restore.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{Device, Var};
use candor::train::optim::{collect_grads, global_grad_norm, AdamW, AdamWConfig};

fn golden() -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(common::fixtures().join("adamw.safetensors"), &Device::Cpu).unwrap()
}

fn grads_for(
    step: usize,
    params: &[(String, Var)],
    g: &std::collections::HashMap<String, candle_core::Tensor>,
) -> GradStore {
    // a GradStore holding the golden gradients: the backward of Σ(p·g) is g
    let mut total: Option<candle_core::Tensor> = None;
    for (i, (_, p)) in params.iter().enumerate() {
        let term = (p.as_tensor() * &g[&format!("grad{step}.p{i}")]).unwrap().sum_all().unwrap();
        total = Some(match total {
            None => term,
            Some(t) => (t + term).unwrap(),
        });
    }
    total.unwrap().backward().unwrap()
}

const CFG: AdamWConfig = AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
const LRS: [f64; 3] = [1e-2, 5e-3, 2e-3];

fn params(g: &std::collections::HashMap<String, candle_core::Tensor>) -> Vec<(String, Var)> {
    (0..2).map(|i| (format!("p{i}"), Var::from_tensor(&g[&format!("init.p{i}")]).unwrap())).collect()
}

#[test]
fn adamw_matches_torch() {
    let g = golden();
    let params = params(&g);
    let mut opt = AdamW::new(params.clone(), CFG).unwrap();
    for (step, lr) in LRS.iter().enumerate() {
        let grads = collect_grads(&grads_for(step, &params, &g), &params).unwrap();
        assert!(global_grad_norm(&grads).unwrap() > 0.0);
        opt.apply(&grads, *lr).unwrap();
        for (i, (_, p)) in params.iter().enumerate() {
            let err = common::rel_err(p.as_tensor(), &g[&format!("after{step}.p{i}")]);
            assert!(err < 1e-6, "step {step} p{i}: relative error {err}");
        }
    }
}

#[test]
fn adamw_state_round_trips() {
    let g = golden();
    let straight = params(&g);
    let mut opt = AdamW::new(straight.clone(), CFG).unwrap();
    for (step, lr) in LRS.iter().enumerate() {
        opt.apply(&collect_grads(&grads_for(step, &straight, &g), &straight).unwrap(), *lr).unwrap();
    }
    // two steps, save, rebuild from the saved values, third step
    let resumed = params(&g);
    let mut first = AdamW::new(resumed.clone(), CFG).unwrap();
    for (step, lr) in LRS.iter().enumerate().take(2) {
        first.apply(&collect_grads(&grads_for(step, &resumed, &g), &resumed).unwrap(), *lr).unwrap();
    }
    let (state, step_count) = (first.state_tensors(), first.step);
    let fresh: Vec<(String, Var)> =
        resumed.iter().map(|(n, v)| (n.clone(), Var::from_tensor(v.as_tensor()).unwrap())).collect();
    let mut second = AdamW::new(fresh.clone(), CFG).unwrap();
    second.load_state(state, step_count).unwrap();
    second.apply(&collect_grads(&grads_for(2, &fresh, &g), &fresh).unwrap(), LRS[2]).unwrap();
    for ((_, a), (_, b)) in straight.iter().zip(&fresh) {
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

#[test]
fn a_scaled_update_is_the_update_of_the_scaled_gradients() {
    // gradient clipping's factor is folded into the update (AdamW::apply_scaled): bit for bit what
    // multiplying every gradient first and applying the plain update gives
    let g = golden();
    // (each call makes its own copies of the initial values)
    let (folded, scaled) = (params(&g), params(&g));
    let mut a = AdamW::new(folded.clone(), CFG).unwrap();
    let mut b = AdamW::new(scaled.clone(), CFG).unwrap();
    for (step, lr) in LRS.iter().enumerate() {
        let factor = [0.37, 1.0, 0.05][step];
        let grads = collect_grads(&grads_for(step, &folded, &g), &folded).unwrap();
        a.apply_scaled(&grads, *lr, factor).unwrap();
        let grads: Vec<_> = collect_grads(&grads_for(step, &scaled, &g), &scaled)
            .unwrap()
            .iter()
            .map(|t| (t * factor).unwrap())
            .collect();
        b.apply(&grads, *lr).unwrap();
    }
    let bits = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for ((_, x), (_, y)) in folded.iter().zip(&scaled) {
        assert_eq!(bits(x.as_tensor()), bits(y.as_tensor()));
    }
    // the moments too: AdamW's step is nearly invariant to the gradients' scale, they are not
    let (sa, sb) = (a.state_tensors(), b.state_tensors());
    assert_eq!(sa.len(), 4);
    for (name, t) in &sa {
        assert_eq!(bits(t), bits(&sb[name]), "{name}");
    }
}
