//! The decoder and LoRA against PyTorch + transformers + peft (golden files from scripts/make_golden.py):
//! logits and loss within 1e-4 relative, LoRA gradients within 1e-3 relative, for Llama (GQA, llama3
//! RoPE scaling, untied head), Qwen2 (q/k/v bias, tied) and Qwen3 (q/k norm, head_dim ≠ hidden/heads).

mod common;

use candle_core::IndexOp;
use common::*;

fn check_family(family: &str) {
    let loaded = tiny_with_adapter(family);
    let model = &loaded.model;
    let g = golden(family);
    let batch = golden_batch(&g);

    let hidden = model.hidden_states(&batch, None, true).unwrap();
    let logits = model.logits(&hidden).unwrap();
    let golden_logits = &g["logits"];
    // padded query positions are garbage in both implementations; compare the real ones
    for row in 0..batch.batch {
        let valid = batch.attention_mask[row * batch.seq_len..(row + 1) * batch.seq_len]
            .iter()
            .filter(|&&m| m == 1)
            .count();
        let ours = logits.i((row, ..valid)).unwrap();
        let theirs = golden_logits.i((row, ..valid)).unwrap();
        let err = rel_err(&ours, &theirs);
        assert!(err < 1e-4, "{family}: logits row {row} relative error {err}");
    }

    let (loss_sum, n) = model.loss_sum(&hidden, &batch.targets).unwrap();
    assert_eq!(n, batch.num_target_tokens());
    let loss = (loss_sum / n as f64).unwrap();
    let golden_loss = g["loss"].reshape(()).unwrap();
    let err = rel_err(&loss, &golden_loss);
    assert!(
        err < 1e-4,
        "{family}: loss {} vs {}, relative error {err}",
        loss.to_scalar::<f32>().unwrap(),
        golden_loss.to_scalar::<f32>().unwrap()
    );

    let grads = loss.backward().unwrap();
    let vars = model.lora_vars();
    assert_eq!(vars.len(), 2 * 7 * model.config.num_hidden_layers);
    for (name, var) in &vars {
        let ours = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{family}: no gradient for {name}"));
        let theirs = &g[&format!("grad.{name}")];
        let err = rel_err(ours, theirs);
        assert!(err < 1e-3, "{family}: gradient of {name} relative error {err}");
    }
    // Frozen weights: no gradient tensor was created for any of them.
    for lin in model.linears() {
        assert!(grads.get(&lin.weight).is_none(), "{family}: frozen {} got a weight gradient", lin.name);
    }
    assert!(grads.get(&model.embed_tokens).is_none());
}

#[test]
fn llama_matches_pytorch() {
    check_family("llama");
}

#[test]
fn qwen2_matches_pytorch() {
    check_family("qwen2");
}

#[test]
fn qwen3_matches_pytorch() {
    check_family("qwen3");
}

#[test]
fn padding_does_not_change_real_positions() {
    // Row 1 of the golden batch alone, unpadded, gives the same logits as inside the padded batch.
    let loaded = tiny_with_adapter("llama");
    let g = golden("llama");
    let batch = golden_batch(&g);
    let t = batch.seq_len;
    let valid = batch.attention_mask[t..].iter().filter(|&&m| m == 1).count();
    let alone = candor::model::TokenBatch::single(&batch.input_ids[t..t + valid]);
    let a = loaded.model.logits(&loaded.model.hidden_states(&alone, None, false).unwrap()).unwrap();
    let b = loaded.model.logits(&loaded.model.hidden_states(&batch, None, false).unwrap()).unwrap();
    let err = rel_err(&a.i(0).unwrap(), &b.i((1, ..valid)).unwrap());
    assert!(err < 1e-5, "relative error {err}");
}
