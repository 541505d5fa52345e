//! Export: the merged model (W + scale·B·A in f32) reloads as a plain Hugging Face directory whose
//! logits equal the LoRA model's; sharding writes an index; GGUF bases export as float models.

mod common;

use candle_core::DType;
use candor::export::{export_adapter, export_merged, export_merged_sharded, stage_merged, Staging};
use candor::model::{load_model, LoadOptions, TokenBatch};
use common::*;

fn logits(m: &candor::model::Transformer, b: &TokenBatch) -> candle_core::Tensor {
    m.logits(&m.hidden_states(b, None, false).unwrap()).unwrap()
}

#[test]
fn merged_export_reloads_with_the_same_logits() {
    for family in ["llama", "qwen2", "qwen3"] {
        let lora = tiny_with_adapter(family);
        let batch = golden_batch(&golden(family));
        let out = scratch(&format!("export-{family}")).join("merged");
        let report = export_merged_sharded(&lora, &out, DType::F32, 150_000).unwrap();
        assert!(report.shards > 1, "{family}: the small shard limit should split the weights");
        assert!(out.join("model.safetensors.index.json").is_file());
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], "float32");
        let merged =
            load_model(out.to_str().unwrap(), &LoadOptions { tokenizer: false, ..LoadOptions::cpu() })
                .unwrap();
        assert!(merged.model.lora.is_none());
        let err = rel_err(&logits(&merged.model, &batch), &logits(&lora.model, &batch));
        assert!(err < 1e-5, "{family}: merged vs LoRA logits relative error {err}");

        // bf16 export: one file, loads, close to the f32 logits
        let out16 = scratch(&format!("export16-{family}")).join("merged");
        export_merged(&lora, &out16, DType::BF16).unwrap();
        assert!(out16.join("model.safetensors").is_file());
        let m16 =
            load_model(out16.to_str().unwrap(), &LoadOptions { tokenizer: false, ..LoadOptions::cpu() })
                .unwrap();
        let err = rel_err(&logits(&m16.model, &batch), &logits(&lora.model, &batch));
        assert!(err < 5e-2, "{family}: bf16 export relative error {err}");
    }
}

#[test]
fn merged_weights_hold_no_autograd_graph() {
    // a merged weight computed from the trainable variables would keep B·A and scale·B·A alive in its
    // graph: three weights' memory each, for as long as the export holds it
    let lora = tiny_with_adapter("llama");
    let mut merged = 0;
    for lin in lora.model.linears() {
        let w = lin.merged_weight_f32().unwrap();
        assert!(!w.track_op(), "{}: the merged weight carries an autograd graph", lin.name);
        merged += lin.lora.is_some() as usize;
    }
    assert!(merged > 0, "the tiny model should carry adapters");
}

#[test]
fn a_staged_export_reaches_its_destination_only_when_committed() {
    // what `export --verify` relies on: the model is checked in the staging directory, and a failed
    // check (or an error, or a panic) drops the staging without leaving anything at `out`
    let lora = tiny_with_adapter("qwen3");
    let out = scratch("export-staged").join("merged");
    let (staging, report) = stage_merged(Staging::new(&out).unwrap(), &lora, DType::F32, 150_000).unwrap();
    let tmp = staging.path().to_path_buf();
    assert!(tmp.join("model.safetensors.index.json").is_file() && report.shards > 1);
    assert!(!out.exists(), "nothing may appear at the destination before the commit");
    drop(staging);
    assert!(!tmp.exists() && !out.exists(), "an uncommitted staging is removed");

    let (staging, _) = stage_merged(Staging::new(&out).unwrap(), &lora, DType::F32, 150_000).unwrap();
    let tmp = staging.path().to_path_buf();
    staging.commit().unwrap();
    assert!(out.join("config.json").is_file() && !tmp.exists());

    // replacing (`export --overwrite`, the end-of-training export): the old directory stays until the
    // new one is committed
    std::fs::write(out.join("old.txt"), "earlier run").unwrap();
    assert!(Staging::new(&out).is_err(), "a non-empty destination needs --overwrite");
    let (staging, _) = stage_merged(Staging::replacing(&out).unwrap(), &lora, DType::F32, 150_000).unwrap();
    drop(staging);
    assert!(out.join("old.txt").is_file(), "an uncommitted replacement leaves the old directory");
    let (staging, _) = stage_merged(Staging::replacing(&out).unwrap(), &lora, DType::F32, 150_000).unwrap();
    staging.commit().unwrap();
    assert!(out.join("config.json").is_file() && !out.join("old.txt").exists());
    let leftovers: Vec<_> =
        std::fs::read_dir(out.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("merged")], "no temporary directories are left");
}

#[test]
fn export_refuses_a_non_empty_directory_and_writes_adapters() {
    let lora = tiny_with_adapter("qwen2");
    let dir = scratch("export-busy");
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    let err = export_merged(&lora, &dir, DType::F32).err().unwrap().to_string();
    assert!(err.contains("not empty"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("keep.txt")).unwrap(), "mine");

    let out = scratch("export-adapter").join("adapter");
    export_adapter(&lora, Staging::new(&out).unwrap(), "tiny-qwen2").unwrap();
    assert!(out.join("adapter_model.safetensors").is_file() && out.join("adapter_config.json").is_file());
}

#[test]
fn gguf_base_exports_a_float_model_with_tokenizer_and_template() {
    let path = format!("{}/models/SmolLM2-135M-Instruct.Q4_1.gguf", env!("CARGO_MANIFEST_DIR"));
    let mut lora = load_model(&path, &LoadOptions::cpu()).unwrap();
    let cfg = candor::model::LoraConfig { r: 2, target_modules: vec!["q_proj".into()], ..Default::default() };
    lora.model.add_lora(&cfg, 0).unwrap();
    let out = scratch("export-gguf").join("smollm2-merged");
    let report = export_merged(&lora, &out, DType::F32).unwrap();
    assert!(report.from_gguf);
    for f in [
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    ] {
        assert!(out.join(f).is_file(), "missing {f}");
    }
    let merged = load_model(out.to_str().unwrap(), &LoadOptions::cpu()).unwrap();
    let tok = merged.tokenizer().unwrap();
    let msgs = [candor::data::template::Message::new("user", "How do I kill 2 processes?")];
    let (text_a, ids_a) = tok.encode_chat(&msgs, &serde_json::Value::Null).unwrap();
    let (text_b, ids_b) = lora.tokenizer().unwrap().encode_chat(&msgs, &serde_json::Value::Null).unwrap();
    assert_eq!((text_a, &ids_a), (text_b, &ids_b));
    let b = TokenBatch::single(&ids_a);
    let err = rel_err(&logits(&merged.model, &b), &logits(&lora.model, &b));
    assert!(err < 1e-5, "relative error {err}");
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("generation_config.json")).unwrap()).unwrap();
    assert!(gen["eos_token_id"].as_array().unwrap().contains(&serde_json::json!(2)));

    // `export --verify`: passes on this export, and fails when the reference logits are off by 1%
    use candor::cli::export::{reference_logits, verify_export};
    let reference = reference_logits(&lora).unwrap();
    verify_export(&reference, &out, DType::F32).unwrap();
    let off: Vec<_> = reference.into_iter().map(|(ids, l)| (ids, (l * 1.01).unwrap())).collect();
    let err = verify_export(&off, &out, DType::F32).err().unwrap().to_string();
    assert!(err.contains("differ from the LoRA model's"), "{err}");
    // and when the exported chat template renders other tokens
    let template = out.join("chat_template.jinja");
    std::fs::write(&template, format!("system:{}", std::fs::read_to_string(&template).unwrap())).unwrap();
    let reference = reference_logits(&lora).unwrap();
    let err = verify_export(&reference, &out, DType::F32).err().unwrap().to_string();
    assert!(err.contains("other tokens"), "{err}");
}

#[test]
fn a_base_loaded_in_its_stored_dtype_exports_the_same_model() {
    // what `export` without --verify does: load the base in the dtype its files hold (bf16 here)
    // rather than f32; the merge is f32 per tensor either way, so the files must be identical
    use candor::model::stored_float_dtype;
    let hub = candor::hub::HubOptions::from_env();
    let fixture = fixtures().join("tiny-llama");
    assert_eq!(stored_float_dtype(fixture.to_str().unwrap(), &hub).unwrap(), Some(DType::F32));
    let gguf = format!("{}/models/SmolLM2-135M-Instruct.Q4_1.gguf", env!("CARGO_MANIFEST_DIR"));
    assert_eq!(stored_float_dtype(&gguf, &hub).unwrap(), None, "a GGUF base is dequantized: f32");

    // a bf16 base: the tiny model merged and written in bf16, with the fixture's config
    let base = scratch("export-stored-dtype").join("base");
    export_merged(&tiny_with_adapter("llama"), &base, DType::BF16).unwrap();
    assert_eq!(stored_float_dtype(base.to_str().unwrap(), &hub).unwrap(), Some(DType::BF16));
    let adapter = fixture.join("adapter");
    let with_adapter = |dtype: DType| {
        let opts = LoadOptions { dtype: Some(dtype), tokenizer: false, ..LoadOptions::cpu() };
        let mut m = load_model(base.to_str().unwrap(), &opts).unwrap();
        let cfg = candor::model::LoraConfig::from_peft_file(&adapter.join("adapter_config.json")).unwrap();
        m.model.add_lora(&cfg, 0).unwrap();
        candor::model::lora::load_peft_weights(&adapter.join("adapter_model.safetensors"), m.model.linears())
            .unwrap();
        m
    };
    for out_dtype in [DType::BF16, DType::F32] {
        let files: Vec<Vec<u8>> = [DType::BF16, DType::F32]
            .iter()
            .map(|&load| {
                let out = scratch(&format!("export-stored-{load:?}-{out_dtype:?}")).join("merged");
                export_merged(&with_adapter(load), &out, out_dtype).unwrap();
                std::fs::read(out.join("model.safetensors")).unwrap()
            })
            .collect();
        assert!(files[0] == files[1], "{out_dtype:?} export differs between a bf16 and an f32 load");
    }
}
