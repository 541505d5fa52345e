//! Real chat templates (SmolLM2, Qwen2.5, Qwen3, Llama 3.2) render character for character as
//! transformers renders them (tests/fixtures/templates/golden.json, from scripts/make_golden.py).

mod common;

use candor::data::template::{ChatTemplate, Message};
use serde_json::Value;

#[test]
fn real_templates_render_like_transformers() {
    let dir = common::fixtures().join("templates");
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for case in &cases {
        let name = case["template"].as_str().unwrap();
        seen.insert(name.to_string());
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        let vars = &case["vars"];
        let template =
            ChatTemplate::new(&text, name, vars["bos_token"].as_str(), vars["eos_token"].as_str()).unwrap();
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let rendered =
            template.render(&messages, case["add_generation_prompt"].as_bool().unwrap(), vars).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{name} with {messages:?}");
    }
    for required in ["smollm2.jinja", "qwen2.5-instruct.jinja", "qwen3.jinja", "llama3.2-instruct.jinja"] {
        assert!(seen.contains(required), "no golden rendering for {required}");
    }
}

#[test]
fn assistant_spans_with_real_templates() {
    // Every template's trained text for the last assistant message is its content + end of turn.
    let dir = common::fixtures().join("templates");
    for (name, eot) in [
        ("smollm2.jinja", "<|im_end|>"),
        ("qwen2.5-instruct.jinja", "<|im_end|>"),
        ("qwen3.jinja", "<|im_end|>"),
        ("llama3.2-instruct.jinja", "<|eot_id|>"),
    ] {
        let text = std::fs::read_to_string(dir.join(name)).unwrap();
        let t = ChatTemplate::new(&text, name, Some("<|begin_of_text|>"), Some(eot)).unwrap();
        let msgs = [
            Message::new("user", "How do I kill a zombie process?"),
            Message::new("assistant", "Reap it: kill its parent."),
        ];
        let vars = serde_json::json!({"date_string": "26 Jul 2024"});
        let (full, spans) = t.render_with_assistant_spans(&msgs, &vars).unwrap();
        let last = &full[spans.last().unwrap().clone()];
        assert!(last.ends_with(&format!("Reap it: kill its parent.{eot}")), "{name}: {last:?}");
        assert!(!last.contains("How do I kill"), "{name}: {last:?}");
    }
}
