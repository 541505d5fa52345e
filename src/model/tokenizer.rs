//! A tokenizer with what chat needs: the chat template, BOS/EOS strings, and the ids that end a turn.

use tokenizers::Tokenizer;

use crate::data::template::{ChatTemplate, Message};
use crate::error::{CandorError, Result};

pub struct ChatTokenizer {
    pub tokenizer: Tokenizer,
    /// `None` when the model has no chat template (a base model).
    pub template: Option<ChatTemplate>,
    /// Where the tokenizer came from (`tokenizer.json`, GGUF metadata).
    pub tokenizer_source: String,
    /// Ids that end generation: EOS and end-of-turn tokens.
    pub stop_ids: Vec<u32>,
    /// Where the model came from, for error messages.
    pub model_source: String,
}

impl ChatTokenizer {
    pub fn template(&self) -> Result<&ChatTemplate> {
        self.template.as_ref().ok_or_else(|| {
            CandorError::msg(format!(
                "{}: the tokenizer has no chat template (tokenizer_config.json \"chat_template\", chat_template.jinja or GGUF tokenizer.chat_template)",
                self.model_source
            ))
        })
    }

    /// Token ids of already-rendered text; special tokens in the text are parsed as special tokens and
    /// nothing is added (the template already wrote any BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| CandorError::msg(format!("{}: tokenizing failed: {e}", self.tokenizer_source)))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| CandorError::msg(format!("{}: decoding failed: {e}", self.tokenizer_source)))
    }

    /// Renders a conversation with the generation prompt and tokenizes it.
    pub fn encode_chat(&self, messages: &[Message], extra: &serde_json::Value) -> Result<(String, Vec<u32>)> {
        let text = self.template()?.render(messages, true, extra)?;
        let ids = self.encode(&text)?;
        Ok((text, ids))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }
}

/// Token strings that end an assistant turn in the families we support.
pub const END_OF_TURN_TOKENS: &[&str] = &["<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "</s>"];

/// The stop ids: the given EOS ids plus whichever end-of-turn tokens this vocabulary has.
pub fn stop_ids(tokenizer: &Tokenizer, eos_ids: &[u32], eos_token: Option<&str>) -> Vec<u32> {
    let mut ids: Vec<u32> = eos_ids.to_vec();
    for t in END_OF_TURN_TOKENS.iter().copied().chain(eos_token) {
        if let Some(id) = tokenizer.token_to_id(t) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}
