//! LoRA behaviour a user relies on: step 0 equals the base model, every adapter tensor trains, frozen
//! weights stay out of the gradient, adapters round-trip through PEFT's file format, bf16 bases keep
//! f32 adapters.

mod common;

use candle_core::{DType, Tensor};
use candor::model::lora::{load_peft_weights, save_peft_adapter, LoraConfig};
use candor::model::{load_model, LoadOptions, TokenBatch};
use common::*;

fn tiny(family: &str, dtype: Option<DType>) -> candor::model::LoadedModel {
    let dir = fixtures().join(format!("tiny-{family}"));
    let opts = LoadOptions { tokenizer: false, dtype, ..LoadOptions::cpu() };
    load_model(dir.to_str().unwrap(), &opts).unwrap()
}

fn logits(m: &candor::model::Transformer, batch: &TokenBatch) -> Tensor {
    m.logits(&m.hidden_states(batch, None, false).unwrap()).unwrap()
}

#[test]
fn fresh_adapter_leaves_the_model_unchanged() {
    let g = golden("qwen2");
    let batch = golden_batch(&g);
    let mut loaded = tiny("qwen2", None);
    let before = logits(&loaded.model, &batch);
    let cfg = LoraConfig { r: 8, alpha: 16.0, ..LoraConfig::default() };
    loaded.model.add_lora(&cfg, 42).unwrap();
    let after = logits(&loaded.model, &batch);
    assert_eq!(before.to_vec3::<f32>().unwrap(), after.to_vec3::<f32>().unwrap());
    for (name, var) in loaded.model.lora_vars() {
        let max =
            var.as_tensor().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        if name.contains("lora_A") {
            // Kaiming-uniform: U(±1/√in)
            let bound = 1.0 / (var.dims()[1] as f32).sqrt();
            assert!(max > 0.5 * bound && max <= bound, "{name}: max |A| {max}, bound {bound}");
        } else {
            assert_eq!(max, 0.0, "{name} must start at zero");
        }
    }
    assert_eq!(loaded.model.lora_vars().len(), 2 * 7 * 2);
}

#[test]
fn every_lora_tensor_gets_a_finite_nonzero_gradient() {
    for family in ["llama", "qwen2", "qwen3"] {
        let loaded = tiny_with_adapter(family);
        let batch = golden_batch(&golden(family));
        let hidden = loaded.model.hidden_states(&batch, None, true).unwrap();
        let (loss, _) = loaded.model.loss_sum(&hidden, &batch.targets).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in loaded.model.lora_vars() {
            let g: Vec<f32> = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(g.iter().all(|x| x.is_finite()), "{family} {name}: non-finite gradient");
            assert!(g.iter().any(|&x| x != 0.0), "{family} {name}: zero gradient");
        }
        for lin in loaded.model.linears() {
            assert!(grads.get(&lin.weight).is_none(), "{family}: frozen {} has a gradient", lin.name);
            if let Some(b) = &lin.bias {
                assert!(grads.get(b).is_none(), "{family}: frozen bias of {} has a gradient", lin.name);
            }
        }
    }
}

#[test]
fn targets_and_scaling() {
    let mut loaded = tiny("llama", None);
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        use_rslora: true,
        target_modules: vec!["q_proj".into(), "v_proj".into()],
        ..LoraConfig::default()
    };
    loaded.model.add_lora(&cfg, 0).unwrap();
    let names: Vec<String> = loaded.model.lora_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2 * 2 * 2);
    assert!(names.iter().all(|n| n.contains("q_proj") || n.contains("v_proj")));
    let q = &loaded.model.layers[0].self_attn.q_proj;
    assert_eq!(q.lora.as_ref().unwrap().scale, 4.0); // rsLoRA: alpha / √r
    let bad = LoraConfig { target_modules: vec!["qkv".into()], ..LoraConfig::default() };
    let err = loaded.model.add_lora(&bad, 0).unwrap_err().to_string();
    assert!(err.contains("unknown module \"qkv\""), "{err}");
}

#[test]
fn adapter_round_trips_through_peft_files() {
    let loaded = tiny_with_adapter("qwen3");
    let dir = scratch("adapter-roundtrip");
    let cfg = loaded.model.lora.clone().unwrap();
    save_peft_adapter(&dir, loaded.model.linears(), &cfg, Some("tiny-qwen3")).unwrap();

    let reread = LoraConfig::from_peft_file(&dir.join("adapter_config.json")).unwrap();
    assert_eq!(reread.r, cfg.r);
    assert_eq!(reread.alpha, cfg.alpha);
    assert_eq!(reread.resolved_targets().unwrap(), cfg.resolved_targets().unwrap());

    let mut fresh = tiny("qwen3", None);
    fresh.model.add_lora(&reread, 99).unwrap();
    load_peft_weights(&dir.join("adapter_model.safetensors"), fresh.model.linears()).unwrap();
    for ((n1, a), (n2, b)) in loaded.model.lora_vars().iter().zip(fresh.model.lora_vars().iter()) {
        assert_eq!(n1, n2);
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
    // A mismatched rank is refused with the tensor's name.
    let mut wrong = tiny("qwen3", None);
    wrong.model.add_lora(&LoraConfig { r: 2, ..reread.clone() }, 0).unwrap();
    let err = load_peft_weights(&dir.join("adapter_model.safetensors"), wrong.model.linears())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("lora_A") && err.contains("shape"),
        "{err}"
    );
}

#[test]
fn bf16_base_keeps_f32_adapters_and_trains() {
    let g = golden("llama");
    let batch = golden_batch(&g);
    let f32_model = tiny_with_adapter("llama");
    let mut bf16 = tiny("llama", Some(DType::BF16));
    let cfg = f32_model.model.lora.clone().unwrap();
    bf16.model.add_lora(&cfg, 0).unwrap();
    load_peft_weights(&fixtures().join("tiny-llama/adapter/adapter_model.safetensors"), bf16.model.linears())
        .unwrap();
    assert_eq!(bf16.model.dtype(), DType::BF16);
    assert!(bf16.model.lora_vars().iter().all(|(_, v)| v.dtype() == DType::F32));
    let hidden = bf16.model.hidden_states(&batch, None, true).unwrap();
    let (loss, n) = bf16.model.loss_sum(&hidden, &batch.targets).unwrap();
    let loss = (loss / n as f64).unwrap();
    let reference = g["loss"].reshape(()).unwrap();
    assert!(rel_err(&loss, &reference) < 2e-2, "bf16 loss {loss} vs {reference}");
    let grads = loss.backward().unwrap();
    for (name, var) in bf16.model.lora_vars() {
        let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("no gradient for {name}"));
        assert_eq!(grad.dtype(), DType::F32);
    }
}

#[test]
fn lora_dropout_is_seeded_and_only_in_training() {
    let batch = golden_batch(&golden("llama"));
    let run = |seed: u64| {
        let mut m = tiny_with_adapter("llama");
        let cfg = LoraConfig { dropout: 0.5, ..m.model.lora.clone().unwrap() };
        m.model.add_lora(&cfg, seed).unwrap();
        load_peft_weights(
            &fixtures().join("tiny-llama/adapter/adapter_model.safetensors"),
            m.model.linears(),
        )
        .unwrap();
        let train: Vec<f32> = m
            .model
            .logits(&m.model.hidden_states(&batch, None, true).unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let eval: Vec<f32> = logits(&m.model, &batch).flatten_all().unwrap().to_vec1().unwrap();
        (train, eval)
    };
    let (t1, e1) = run(1);
    let (t1b, _) = run(1);
    let (t2, e2) = run(2);
    assert_eq!(t1, t1b, "same seed, same dropout masks");
    assert_ne!(t1, t2, "different seeds, different masks");
    assert_eq!(e1, e2, "no dropout at inference");
    assert_ne!(t1, e1);
}

#[test]
fn no_grad_builds_no_graph_and_changes_no_value() {
    let loaded = tiny_with_adapter("llama");
    let m = &loaded.model;
    let batch = TokenBatch::single(&[5, 17, 42, 99, 3]);
    let tracked = m.hidden_states(&batch, None, false).unwrap();
    let untracked = {
        let _g = candor::model::lora::no_grad();
        m.hidden_states(&batch, None, false).unwrap()
    };
    assert_eq!(rel_err(&untracked, &tracked), 0.0);
    let vars = m.lora_vars();
    let grads = untracked.sum_all().unwrap().backward().unwrap();
    assert!(
        vars.iter().all(|(_, v)| grads.get(v.as_tensor()).is_none()),
        "no_grad output reached a LoRA var"
    );
    // the guard is gone: gradients flow again
    let again = m.hidden_states(&batch, None, false).unwrap();
    let grads = again.sum_all().unwrap().backward().unwrap();
    assert!(vars.iter().all(|(_, v)| grads.get(v.as_tensor()).is_some()));
}
