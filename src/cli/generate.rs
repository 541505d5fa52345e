use std::io::Write;

use crate::data::template::Message;
use crate::eval::generate::{generate, SamplingOptions};
use crate::model::load_model;

use super::ModelArgs;

#[derive(Debug, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user message.
    #[arg(long)]
    pub prompt: String,
    /// An optional system message.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors) to apply.
    #[arg(long)]
    pub adapter: Option<std::path::PathBuf>,
    /// Print the token ids instead of text (for tests and debugging).
    #[arg(long)]
    pub ids: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let opts = args.model.load_options()?;
    let mut loaded = load_model(&args.model.model, &opts)?;
    if let Some(dir) = &args.adapter {
        let cfg = crate::model::lora::LoraConfig::from_peft_file(&dir.join("adapter_config.json"))?;
        loaded.model.add_lora(&cfg, 0)?;
        crate::model::lora::load_peft_weights(
            &dir.join("adapter_model.safetensors"),
            loaded.model.linears(),
        )?;
    }
    let tok = loaded.tokenizer()?;
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(Message::new("system", s));
    }
    messages.push(Message::new("user", &args.prompt));
    let (_, prompt_ids) = tok.encode_chat(&messages, &serde_json::Value::Null)?;
    let sampling = SamplingOptions {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut out = std::io::stdout().lock();
    // Stream text: decode the whole answer so far and print what is new (multi-byte safe).
    let mut so_far: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let gen = generate(&loaded.model, &prompt_ids, &tok.stop_ids, &sampling, |id| {
        if args.ids {
            write!(out, "{id} ")?;
        } else {
            so_far.push(id);
            let text = tok.decode(&so_far, true)?;
            if text.len() > printed && text.is_char_boundary(printed) && !text.ends_with('\u{fffd}') {
                write!(out, "{}", &text[printed..])?;
                printed = text.len();
            }
        }
        out.flush()?;
        Ok(())
    })?;
    writeln!(out)?;
    eprintln!(
        "[{} prompt tokens, {} new tokens, prefill {:.2} s, {:.1} tokens/s{}]",
        gen.prompt_tokens,
        gen.tokens.len(),
        gen.prefill_s,
        gen.tokens_per_s(),
        if gen.stopped { "" } else { ", stopped at --max-new-tokens" }
    );
    Ok(())
}
