//! Jinja chat templates rendered as transformers' `apply_chat_template` renders them.
//!
//! transformers uses a sandboxed Jinja2 environment with `trim_blocks` and `lstrip_blocks`, the loop
//! controls extension, `raise_exception`, `strftime_now` and a `tojson` filter; templates also call
//! Python string methods (`.strip()`, `.split()`, `.startswith()`), which minijinja-contrib's pycompat
//! provides.

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

use crate::error::{CandorError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
    /// Reasoning trace, for templates that understand it (Qwen3).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub reasoning_content: Option<String>,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Message { role: role.into(), content: content.into(), reasoning_content: None }
    }
}

pub struct ChatTemplate {
    env: Environment<'static>,
    /// Where the template came from (for `candor info` and error messages).
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
    /// The template's source text.
    pub text: String,
    /// The template reads `reasoning_content` from messages (Qwen3-style thinking models).
    pub supports_reasoning_content: bool,
}

impl ChatTemplate {
    pub fn new(
        template: &str,
        source: &str,
        bos_token: Option<&str>,
        eos_token: Option<&str>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |fmt: String| chrono::Local::now().format(&fmt).to_string());
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| CandorError::msg(format!("{source}: chat template does not parse: {e}")))?;
        Ok(ChatTemplate {
            env,
            source: source.to_string(),
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
            supports_reasoning_content: template.contains("reasoning_content"),
            text: template.to_string(),
        })
    }

    /// Renders a conversation. `extra` holds template switches such as `enable_thinking`.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
        extra: &serde_json::Value,
    ) -> Result<String> {
        let tmpl = self.env.get_template("chat").expect("template added in new()");
        let mut ctx = serde_json::json!({
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        });
        if let (Some(obj), Some(more)) = (ctx.as_object_mut(), extra.as_object()) {
            for (k, v) in more {
                obj.insert(k.clone(), v.clone());
            }
        }
        tmpl.render(Value::from_serialize(&ctx))
            .map_err(|e| CandorError::msg(format!("{}: chat template failed: {e}", self.source)))
    }
}

impl ChatTemplate {
    /// Renders a whole conversation and finds the text the model should learn: for each assistant
    /// message, everything the template writes for it after the generation prompt, up to and including
    /// its end-of-turn token(s), without trailing whitespace. Found by rendering prefixes, so it works
    /// with any template (no `{% generation %}` markers needed).
    pub fn render_with_assistant_spans(
        &self,
        messages: &[Message],
        extra: &serde_json::Value,
    ) -> Result<(String, Vec<std::ops::Range<usize>>)> {
        let full = self.render(messages, false, extra)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true, extra)?;
            let upto = self.render(&messages[..=i], false, extra)?;
            if !upto.starts_with(&before) || !full.starts_with(&upto) {
                return Err(CandorError::msg(format!(
                    "{}: the chat template renders assistant message {i} differently inside the whole conversation, so its tokens cannot be located",
                    self.source
                )));
            }
            let end = upto.trim_end().len().max(before.len());
            if end > before.len() {
                spans.push(before.len()..end);
            }
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chatml_renders_like_transformers() {
        let t = ChatTemplate::new(CHATML, "test", None, Some("<|im_end|>")).unwrap();
        let out = t.render(&[Message::new("user", "Hi")], true, &serde_json::Value::Null).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn assistant_spans_cover_content_and_end_of_turn() {
        let t = ChatTemplate::new(CHATML, "test", None, Some("<|im_end|>")).unwrap();
        let msgs = [
            Message::new("user", "Hi"),
            Message::new("assistant", "Hello!"),
            Message::new("user", "Bye"),
            Message::new("assistant", "Ciao"),
        ];
        let (full, spans) = t.render_with_assistant_spans(&msgs, &serde_json::Value::Null).unwrap();
        let texts: Vec<&str> = spans.iter().map(|r| &full[r.clone()]).collect();
        assert_eq!(texts, ["Hello!<|im_end|>", "Ciao<|im_end|>"]);
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let src = "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}{{ messages[0].content.strip() }}|{{ messages[0].content.split(' ')|length }}";
        let t = ChatTemplate::new(src, "test", None, None).unwrap();
        assert_eq!(
            t.render(&[Message::new("user", "  a b  ")], false, &serde_json::Value::Null).unwrap(),
            "a b|6"
        );
        let err = t.render(&[Message::new("system", "x")], false, &serde_json::Value::Null).unwrap_err();
        assert!(err.to_string().contains("first must be user"), "{err}");
    }
}
