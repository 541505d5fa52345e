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
    candle_core::safetensors::load(fixtures().join(format!("tiny-{family}/golden.safetensors")), &Device::Cpu)
        .unwrap()
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
    b.position_ids = g["position_ids"]
        .flatten_all()
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .iter()
        .map(|&x| x as u32)
        .collect();
    b
}

/// max |a − b| / max |b|: the error relative to the tensor's scale.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff =
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale.max(1e-12)
}

/// Runs the candor binary; returns (exit code, stdout, stderr).
pub fn candor(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_candor"));
    cmd.args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A scratch directory under the target dir, emptied first.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("candor-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Copies a tiny fixture model's top-level files into `dst`.
pub fn copy_tiny(family: &str, dst: &std::path::Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "model.safetensors", "generation_config.json"] {
        std::fs::copy(fixtures().join(format!("tiny-{family}/{f}")), dst.join(f)).unwrap();
    }
}
