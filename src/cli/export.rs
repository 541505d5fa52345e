//! `candor export CHECKPOINT --out DIR`: a merged Hugging Face model (or just the adapter).

use std::path::PathBuf;

use crate::data::template::Message;
use crate::export::{dtype_name, export_adapter, stage_merged, Staging, MAX_SHARD_BYTES};
use crate::hub::HubOptions;
use crate::model::lora::{load_peft_weights, LoraConfig};
use crate::model::{load_model, stored_float_dtype, LoadOptions, LoadedModel, TokenBatch};
use crate::train::checkpoint;
use candle_core::Tensor;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// A checkpoint directory (checkpoints/<run>/step-<N>).
    pub checkpoint: PathBuf,
    /// Where to write the model directory (must not exist or be empty, unless --overwrite).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace --out if it holds something, once the new export is written (and verified, with
    /// --verify); until then, and if anything fails, it is left as it was.
    #[arg(long)]
    pub overwrite: bool,
    /// bf16, f16 or f32: the dtype of the written weights (the merge itself is always f32).
    #[arg(long, default_value = "bf16")]
    pub dtype: String,
    /// Write only the adapter, in PEFT's format.
    #[arg(long)]
    pub adapter_only: bool,
    /// Reload the written model and check its logits against the LoRA model's.
    #[arg(long)]
    pub verify: bool,
}

/// Loads a checkpoint's base model with its adapter applied (export loads it on the CPU, in f32 or in
/// the dtype the base's files hold).
pub fn load_checkpoint_model(
    dir: &std::path::Path,
    opts: &LoadOptions,
) -> anyhow::Result<(LoadedModel, String)> {
    checkpoint::verify(dir)?;
    let recipe = checkpoint::saved_recipe(dir)?;
    let mut loaded = load_model(&recipe.model.path, opts)?;
    let cfg = LoraConfig::from_peft_file(&dir.join("adapter_config.json"))?;
    loaded.model.add_lora(&cfg, 0)?;
    load_peft_weights(&dir.join("adapter_model.safetensors"), loaded.model.linears())?;
    Ok((loaded, recipe.model.path))
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    // the destination and the dtype are checked before the model is loaded
    let staging = if a.overwrite { Staging::replacing(&a.out)? } else { Staging::new(&a.out)? };
    let dtype = super::parse_dtype(&a.dtype)?;
    // The merge runs in f32 per tensor whatever the loaded dtype, so loading the base in the dtype its
    // files hold (bf16 for most Hugging Face models) gives the same export with half of f32's memory.
    // The verify's reference logits want the f32 model.
    let load_dtype = match a.verify {
        true => candle_core::DType::F32,
        false => {
            let spec = checkpoint::saved_recipe(&a.checkpoint)?.model.path;
            stored_float_dtype(&spec, &HubOptions::from_env())?.unwrap_or(candle_core::DType::F32)
        }
    };
    let opts = LoadOptions { dtype: Some(load_dtype), ..LoadOptions::cpu() };
    let (loaded, base) = load_checkpoint_model(&a.checkpoint, &opts)?;
    if a.adapter_only {
        export_adapter(&loaded, staging, &base)?;
        println!("wrote the adapter (PEFT format) to {}", a.out.display());
        return Ok(());
    }
    // the LoRA model's logits are taken before the export and the model is dropped after it, so the
    // verify's reload never sits beside it: one f32 model in memory at a time, plus one shard
    let reference = if a.verify { Some(reference_logits(&loaded)?) } else { None };
    let (staging, report) = stage_merged(staging, &loaded, dtype, MAX_SHARD_BYTES)?;
    drop(loaded);
    super::release_freed_memory();
    // verified before it is moved into place: a failed verify leaves `--out` as it was
    if let Some(reference) = reference {
        verify_export(&reference, staging.path(), dtype)
            .map_err(|e| e.context(format!("{} was left as it was", a.out.display())))?;
    }
    staging.commit()?;
    println!(
        "wrote {} ({}, {} shard{}) to {}",
        if report.from_gguf {
            "a merged float model from the dequantized GGUF base"
        } else {
            "the merged model"
        },
        dtype_name(dtype),
        report.shards,
        if report.shards == 1 { "" } else { "s" },
        a.out.display()
    );
    Ok(())
}

/// The prompts the verify compares logits on, chat-rendered.
const VERIFY_PROMPTS: [&str; 2] =
    ["How do I kill a Python process that hangs?", "Which household chemicals are dangerous to mix?"];

/// A verify prompt chat-rendered to token ids.
fn render(model: &LoadedModel, prompt: &str) -> anyhow::Result<Vec<u32>> {
    let (_, ids) =
        model.tokenizer()?.encode_chat(&[Message::new("user", prompt)], &serde_json::Value::Null)?;
    Ok(ids)
}

/// The LoRA model's logits on [`VERIFY_PROMPTS`], with the token ids they were computed on.
pub fn reference_logits(lora: &LoadedModel) -> anyhow::Result<Vec<(Vec<u32>, Tensor)>> {
    // kept until the verify: without the guard each would hold its forward's activations
    let _no_grad = crate::model::lora::no_grad();
    let mut out = vec![];
    for prompt in VERIFY_PROMPTS {
        let ids = render(lora, prompt)?;
        let batch = TokenBatch::single(&ids);
        out.push((ids, lora.model.logits(&lora.model.hidden_states(&batch, None, false)?)?));
    }
    Ok(out)
}

/// Reloads the export and compares its logits with the LoRA model's ([`reference_logits`]).
pub fn verify_export(
    reference: &[(Vec<u32>, Tensor)],
    out: &std::path::Path,
    dtype: candle_core::DType,
) -> anyhow::Result<()> {
    let merged = load_model(
        out.to_str().unwrap_or_default(),
        &LoadOptions { dtype: Some(candle_core::DType::F32), ..LoadOptions::cpu() },
    )?;
    let tolerance = if dtype == candle_core::DType::F32 { 1e-4 } else { 5e-2 };
    for (prompt, (ids, a)) in VERIFY_PROMPTS.iter().zip(reference) {
        // the exported tokenizer and chat template must render the prompt to the same tokens
        if &render(&merged, prompt)? != ids {
            anyhow::bail!("verify: the exported tokenizer and chat template render {prompt:?} to other tokens than the base model's");
        }
        let batch = TokenBatch::single(ids);
        let b = merged.model.logits(&merged.model.hidden_states(&batch, None, false)?)?;
        let diff = (a - &b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = a.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let rel = diff / scale.max(1e-12);
        println!("verify: {} tokens, max |logit difference| {diff:.3e} ({rel:.2e} relative)", ids.len());
        if rel > tolerance {
            anyhow::bail!("verify: the exported model's logits differ from the LoRA model's by {rel:.2e} relative (tolerance {tolerance:.0e})");
        }
    }
    println!("verify: the exported model matches the LoRA model");
    Ok(())
}
