//! Bad input gets one clear line naming the file and the problem, and a non-zero exit.

mod common;

use common::*;

/// The error is a single line starting with "error:" and containing every `needles`.
fn assert_one_line_error(args: &[&str], env: &[(&str, &str)], needles: &[&str]) {
    let (code, _, stderr) = candor(args, env);
    assert_ne!(code, 0, "expected failure for {args:?}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in: {stderr}");
    }
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr}");
}

#[test]
fn missing_model_path() {
    assert_one_line_error(&["info", "no/such/dir/model"], &[], &["no/such/dir/model", "no such file"]);
}

#[test]
fn unsupported_architecture() {
    let dir = scratch("gpt2");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt2", "n_embd": 768}"#).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"").unwrap();
    let d = dir.to_str().unwrap();
    assert_one_line_error(
        &["info", d],
        &[],
        &["config.json", "unsupported model_type \"gpt2\"", "llama, qwen2, qwen3"],
    );
}

#[test]
fn weights_disagree_with_config() {
    let dir = scratch("shapes");
    copy_tiny("llama", &dir);
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 96", "\"intermediate_size\": 100");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    assert_one_line_error(
        &["info", dir.to_str().unwrap()],
        &[],
        &["model.layers.0.mlp.gate_proj.weight", "[96, 64]", "[100, 64]"],
    );
}

#[test]
fn missing_weights_file() {
    let dir = scratch("noweights");
    copy_tiny("qwen2", &dir);
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_one_line_error(&["info", dir.to_str().unwrap()], &[], &["no model.safetensors"]);
}

#[test]
fn gguf_with_unknown_tensor_type() {
    // A minimal GGUF v3: one metadata key, one tensor whose ggml type id (99) does not exist.
    let mut b: Vec<u8> = Vec::new();
    let s = |b: &mut Vec<u8>, x: &str| {
        b.extend((x.len() as u64).to_le_bytes());
        b.extend(x.as_bytes());
    };
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // metadata
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes()); // string
    s(&mut b, "llama");
    s(&mut b, "token_embd.weight");
    b.extend(1u32.to_le_bytes());
    b.extend(32u64.to_le_bytes());
    b.extend(99u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    while !b.len().is_multiple_of(32) {
        b.push(0);
    }
    b.extend([0u8; 128]);
    let dir = scratch("gguf");
    let path = dir.join("broken.gguf");
    std::fs::write(&path, b).unwrap();
    assert_one_line_error(&["info", path.to_str().unwrap()], &[], &["broken.gguf"]);
}

#[test]
fn generate_without_tokenizer_or_template() {
    let dir = scratch("notok");
    copy_tiny("llama", &dir);
    let d = dir.to_str().unwrap();
    assert_one_line_error(&["generate", d, "--prompt", "hi"], &[], &["no tokenizer", "tokenizer.json"]);

    // A tokenizer.json without any chat template.
    let vocab: std::collections::HashMap<String, u32> = (0..293u32).map(|i| (format!("w{i}"), i)).collect();
    let model = tokenizers::models::wordlevel::WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("w0".into())
        .build()
        .unwrap();
    let tok = tokenizers::Tokenizer::new(model);
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    assert_one_line_error(&["generate", d, "--prompt", "hi"], &[], &["no chat template"]);
}

#[test]
fn cuda_device_in_cpu_build() {
    if cfg!(feature = "cuda") {
        return;
    }
    let model = fixtures().join("tiny-llama");
    assert_one_line_error(&["info", model.to_str().unwrap(), "--device", "cuda"], &[], &["--features cuda"]);
}

#[test]
fn blas_library_that_does_not_open() {
    let model = fixtures().join("tiny-llama");
    assert_one_line_error(
        &["info", model.to_str().unwrap()],
        &[("CANDOR_BLAS", "/no/such/libopenblas.so")],
        &["CANDOR_BLAS=/no/such/libopenblas.so", "No such file", "`off`"],
    );
    // a library without cblas_sgemm is refused too
    assert_one_line_error(
        &["info", model.to_str().unwrap()],
        &[("CANDOR_BLAS", "libc.so.6")],
        &["CANDOR_BLAS=libc.so.6", "has no cblas_sgemm"],
    );
    // checked at start-up, also by commands that multiply nothing
    assert_one_line_error(
        &["judge", "answers.jsonl"],
        &[("CANDOR_BLAS", "/no/such/libopenblas.so")],
        &["CANDOR_BLAS=/no/such/libopenblas.so"],
    );
}

#[test]
fn hub_id_offline_and_not_cached() {
    let home = scratch("hf-empty");
    assert_one_line_error(
        &["info", "nobody/not-a-model"],
        &[("HF_HOME", home.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
        &["nobody/not-a-model", "config.json", "HF_HUB_OFFLINE"],
    );
}

#[test]
fn hub_id_served_from_the_cache_offline() {
    // The standard cache layout: models--org--name/refs/main → snapshots/<commit>/files.
    let home = scratch("hf-cache");
    let repo = home.join("hub/models--candor-test--tiny-qwen3");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    copy_tiny("qwen3", &repo.join("snapshots").join(commit));
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let (code, stdout, stderr) = candor(
        &["info", "candor-test/tiny-qwen3"],
        &[("HF_HOME", home.to_str().unwrap()), ("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("qwen3") && stdout.contains("q/k RMSNorm"), "{stdout}");
}
