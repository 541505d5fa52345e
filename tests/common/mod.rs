//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use candor::model::lora::{load_peft_weights, LoraConfig};
use candor::model::{load_model, LoadOptions, LoadedModel, TokenBatch};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// A tiny reference model with its PEFT adapter loaded.
pub fn tiny_with_adapter(family: &str) -> LoadedModel {
    let dir = fixtures().join(format!("tiny-{family}"));
    let opts = LoadOptions { tokenizer: false, ..LoadOptions::cpu() };
    let mut loaded = load_model(dir.to_str().unwrap(), &opts).unwrap();
    let adapter = dir.join("adapter");
    let cfg = LoraConfig::from_peft_file(&adapter.join("adapter_config.json")).unwrap();
    loaded.model.add_lora(&cfg, 0).unwrap();
    load_peft_weights(&adapter.join("adapter_model.safetensors"), loaded.model.linears()).unwrap();
    loaded
}

pub fn golden(family: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(format!("tiny-{family}/golden.safetensors")), &Device::Cpu).unwrap()
}

fn rows<T: Copy>(t: &Tensor, f: impl Fn(i64) -> T) -> Vec<Vec<T>> {
    t.to_vec2::<i64>().unwrap().into_iter().map(|r| r.into_iter().map(&f).collect()).collect()
}

/// The golden batch (HF convention: unshifted labels) as our batch.
pub fn golden_batch(g: &HashMap<String, Tensor>) -> TokenBatch {
    let mut b = TokenBatch::from_hf(
        rows(&g["input_ids"], |x| x as u32),
        rows(&g["attention_mask"], |x| x as u8),
        rows(&g["labels"], |x| x),
    )
    .unwrap();
    b.position_ids = g["position_ids"].flatten_all().unwrap().to_vec1::<i64>().unwrap().iter().map(|&x| x as u32).collect();
    b
}

/// max |a − b| / max |b|: the error relative to the tensor's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-12)
}
