//! The `model` judge: a local chat model, loaded through candor, asked our judge prompt; its verdict is
//! read from `[[ ]]`. Unreadable verdicts stay unreadable (counted and reported, never guessed).

use super::generate::{generate_batch, SamplingOptions};
use super::judge::{judge_messages, parse_verdict, Judge, Judgement};
use crate::data::template::Message;
use crate::error::{CandorError, Result};
use crate::model::{load_model, LoadOptions, LoadedModel};

pub struct ModelJudge {
    loaded: LoadedModel,
    name: String,
    max_new_tokens: usize,
    batch_size: usize,
}

impl ModelJudge {
    pub fn load(spec: &str, opts: &LoadOptions, max_new_tokens: usize, batch_size: usize) -> Result<Self> {
        let loaded = load_model(spec, opts)?;
        // fail now, not after an hour of generation, when it cannot chat
        loaded.tokenizer()?.template().map_err(|e| {
            CandorError::msg(format!("judge model: {}", crate::error::one_line(&e.to_string())))
        })?;
        Ok(ModelJudge {
            loaded,
            name: format!("model:{spec}"),
            max_new_tokens,
            batch_size: batch_size.max(1),
        })
    }
}

impl Judge for ModelJudge {
    fn name(&self) -> &str {
        &self.name
    }

    fn judge(&self, items: &[(String, String)]) -> anyhow::Result<Vec<Judgement>> {
        let tok = self.loaded.tokenizer()?;
        let mut prompts = Vec::with_capacity(items.len());
        for (prompt, response) in items {
            let messages: Vec<Message> = judge_messages(prompt, response)
                .iter()
                .map(|(role, text)| Message::new(role, text))
                .collect();
            prompts.push(tok.encode_chat(&messages, &serde_json::Value::Null)?.1);
        }
        let opts = SamplingOptions { max_new_tokens: self.max_new_tokens, ..Default::default() };
        let mut out = Vec::with_capacity(items.len());
        for chunk in prompts.chunks(self.batch_size) {
            for g in generate_batch(&self.loaded.model, chunk, &tok.stop_ids, &opts, |_, _| Ok(()))? {
                let text = tok.decode(&g.tokens, true)?;
                let verdict = parse_verdict(&text);
                let rationale = if verdict.is_some() {
                    text.trim().to_string()
                } else {
                    format!("unparsable judge answer: {}", text.trim().chars().take(300).collect::<String>())
                };
                out.push(Judgement { verdict, rationale });
            }
        }
        Ok(out)
    }
}
