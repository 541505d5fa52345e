//! Merging LoRA into the base (`W + scale·B·A`, computed in f32) and writing a Hugging Face model
//! directory that vLLM, TGI and transformers load as is: safetensors (sharded with an index when large),
//! `config.json`, tokenizer files with the chat template, `generation_config.json` with the stop ids.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::error::{CandorError, Result};
use crate::model::{LoadedModel, LoraLinear, ModelSource};

/// Shards above this size are split (transformers' default `max_shard_size` is 5 GB).
pub const MAX_SHARD_BYTES: usize = 5_000_000_000;

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// One tensor of the merged model, made only when its shard is written, so the export holds at most
/// one shard of merged weights beside the loaded model.
enum Part<'a> {
    Plain(&'a Tensor),
    /// A projection: `W + scale·B·A` in f32.
    Merged(&'a LoraLinear),
}

impl Part<'_> {
    fn elem_count(&self) -> usize {
        match self {
            Part::Plain(t) => t.elem_count(),
            Part::Merged(lin) => lin.weight.elem_count(),
        }
    }

    /// The tensor in `dtype`, on the CPU (rounded once, from f32).
    fn make(&self, dtype: DType) -> Result<Tensor> {
        let f32 = match self {
            Part::Plain(t) => t.to_dtype(DType::F32)?,
            Part::Merged(lin) => lin.merged_weight_f32()?,
        };
        Ok(f32.to_dtype(dtype)?.to_device(&Device::Cpu)?)
    }
}

/// Every tensor of the merged model, by Hugging Face name, in the order they are written.
fn merged_parts(loaded: &LoadedModel) -> Vec<(String, Part<'_>)> {
    let m = &loaded.model;
    let mut out = vec![("model.embed_tokens.weight".to_string(), Part::Plain(&m.embed_tokens))];
    for (i, layer) in m.layers.iter().enumerate() {
        let p = format!("model.layers.{i}");
        out.push((format!("{p}.input_layernorm.weight"), Part::Plain(&layer.input_layernorm)));
        out.push((
            format!("{p}.post_attention_layernorm.weight"),
            Part::Plain(&layer.post_attention_layernorm),
        ));
        if let Some(w) = &layer.self_attn.q_norm {
            out.push((format!("{p}.self_attn.q_norm.weight"), Part::Plain(w)));
        }
        if let Some(w) = &layer.self_attn.k_norm {
            out.push((format!("{p}.self_attn.k_norm.weight"), Part::Plain(w)));
        }
    }
    for lin in m.linears() {
        out.push((format!("{}.weight", lin.name), Part::Merged(lin)));
        if let Some(b) = &lin.bias {
            out.push((format!("{}.bias", lin.name), Part::Plain(b)));
        }
    }
    out.push(("model.norm.weight".to_string(), Part::Plain(&m.norm)));
    if let Some(head) = &m.lm_head {
        out.push(("lm_head.weight".to_string(), Part::Plain(head)));
    }
    out
}

/// Writes safetensors files (one, or shards with `model.safetensors.index.json`), making each shard's
/// tensors just before it is written and dropping them after.
fn write_weights(
    dir: &Path,
    parts: Vec<(String, Part<'_>)>,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<usize> {
    let bytes = |p: &Part| p.elem_count() * dtype.size_in_bytes();
    let total: usize = parts.iter().map(|(_, p)| bytes(p)).sum();
    let mut shards: Vec<Vec<(String, Part)>> = vec![vec![]];
    let mut current = 0;
    for (name, p) in parts {
        if current > 0 && current + bytes(&p) > max_shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        current += bytes(&p);
        shards.last_mut().expect("one shard").push((name, p));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.into_iter().enumerate() {
        let file = if n == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let mut map = HashMap::new();
        for (name, p) in shard {
            weight_map.insert(name.clone(), Value::String(file.clone()));
            map.insert(name, p.make(dtype)?);
        }
        let path = dir.join(&file);
        candle_core::safetensors::save(&map, &path).map_err(|e| CandorError::file(&path, e))?;
    }
    if n > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        write_json(&dir.join("model.safetensors.index.json"), &index)?;
    }
    Ok(n)
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v).expect("json"))
        .map_err(|e| CandorError::file(path, e))
}

pub struct ExportReport {
    pub shards: usize,
    /// The base was a GGUF file: the export is a float model built from its dequantized weights.
    pub from_gguf: bool,
}

/// Writes the merged model into `out` (which must not exist or be empty), via a temporary directory.
pub fn export_merged(loaded: &LoadedModel, out: &Path, dtype: DType) -> Result<ExportReport> {
    export_merged_sharded(loaded, out, dtype, MAX_SHARD_BYTES)
}

/// [`export_merged`] with a chosen shard size.
pub fn export_merged_sharded(
    loaded: &LoadedModel,
    out: &Path,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<ExportReport> {
    let (staging, report) = stage_merged(Staging::new(out)?, loaded, dtype, max_shard_bytes)?;
    staging.commit()?;
    Ok(report)
}

/// Writes the merged model into `staging`, to be checked before it is committed.
pub fn stage_merged(
    staging: Staging,
    loaded: &LoadedModel,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<(Staging, ExportReport)> {
    let report = write_merged_into(loaded, staging.path(), dtype, max_shard_bytes)?;
    Ok((staging, report))
}

/// An output directory being written: a temporary sibling of `out` that [`Staging::commit`] renames
/// into place. Dropped uncommitted (an error, a failed verify, a panic) it is removed, so `out` never
/// holds a partial or unverified export, and what was there before stays.
pub struct Staging {
    tmp: PathBuf,
    out: PathBuf,
    committed: bool,
}

impl Staging {
    /// `out` must not exist or be empty.
    pub fn new(out: &Path) -> Result<Staging> {
        if out.exists() && std::fs::read_dir(out).map(|mut d| d.next().is_some()).unwrap_or(true) {
            return Err(CandorError::file(out, "already exists and is not empty (--overwrite replaces it)"));
        }
        Staging::replacing(out)
    }

    /// Like [`Staging::new`], but a directory already at `out` is allowed: it is left as it is until the
    /// commit replaces it.
    pub fn replacing(out: &Path) -> Result<Staging> {
        if out.exists() && !out.is_dir() {
            return Err(CandorError::file(out, "exists and is not a directory"));
        }
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(parent)
            .map_err(|e| CandorError::file(parent, format!("cannot create: {e}")))?;
        let name =
            out.file_name().ok_or_else(|| CandorError::file(out, "not a directory name"))?.to_string_lossy();
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|e| CandorError::file(&tmp, format!("cannot create: {e}")))?;
        Ok(Staging { tmp, out: out.to_path_buf(), committed: false })
    }

    /// Where the files are written until the commit.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Moves the directory into place at `out`; what was there is moved aside first and removed after.
    pub fn commit(mut self) -> Result<()> {
        let old = PathBuf::from(format!("{}.old", self.tmp.display()));
        let _ = std::fs::remove_dir_all(&old);
        if self.out.exists() {
            std::fs::rename(&self.out, &old).map_err(|e| CandorError::file(&self.out, e))?;
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.out) {
            // put the earlier directory back
            let _ = std::fs::rename(&old, &self.out);
            return Err(CandorError::file(&self.out, e));
        }
        self.committed = true;
        let _ = std::fs::remove_dir_all(&old);
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn write_merged_into(
    loaded: &LoadedModel,
    dir: &Path,
    dtype: DType,
    max_shard_bytes: usize,
) -> Result<ExportReport> {
    let m = &loaded.model;
    let shards = write_weights(dir, merged_parts(loaded), dtype, max_shard_bytes)?;
    let from_gguf = matches!(loaded.source, ModelSource::Gguf(_));

    // config.json: the source's own, with the dtype updated; or one built from the GGUF metadata.
    let src_config = loaded.weights_path.join("config.json");
    let mut config = if src_config.is_file() {
        let text = std::fs::read_to_string(&src_config).map_err(|e| CandorError::file(&src_config, e))?;
        serde_json::from_str::<Value>(&text).map_err(|e| CandorError::file(&src_config, e))?
    } else {
        m.config.to_hf_json(dtype_name(dtype))
    };
    config["torch_dtype"] = json!(dtype_name(dtype));
    if config.get("dtype").is_some() {
        config["dtype"] = json!(dtype_name(dtype));
    }
    write_json(&dir.join("config.json"), &config)?;

    let tok = loaded.tokenizer.as_ref();
    let stop_ids: Vec<u32> =
        tok.map(|t| t.stop_ids.clone()).unwrap_or_else(|| m.config.eos_token_ids.clone());
    write_json(
        &dir.join("generation_config.json"),
        &json!({"bos_token_id": m.config.bos_token_id, "eos_token_id": stop_ids, "do_sample": false}),
    )?;

    // Tokenizer files: copied from a Hugging Face directory, or written from the GGUF metadata.
    if src_config.is_file() {
        for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
        {
            let src = loaded.weights_path.join(f);
            if src.is_file() {
                std::fs::copy(&src, dir.join(f)).map_err(|e| CandorError::file(&src, e))?;
            }
        }
    } else if let Some(t) = tok {
        let path = dir.join("tokenizer.json");
        t.tokenizer.save(&path, false).map_err(|e| CandorError::file(&path, e))?;
        let mut tc =
            json!({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": false});
        if let Some(tmpl) = &t.template {
            tc["bos_token"] = json!(tmpl.bos_token);
            tc["eos_token"] = json!(tmpl.eos_token);
            tc["pad_token"] = json!(tmpl.eos_token);
            std::fs::write(dir.join("chat_template.jinja"), &tmpl.text)
                .map_err(|e| CandorError::file(dir, e))?;
        }
        write_json(&dir.join("tokenizer_config.json"), &tc)?;
    }
    Ok(ExportReport { shards, from_gguf })
}

/// Writes only the adapter (PEFT format) through `staging`.
pub fn export_adapter(loaded: &LoadedModel, staging: Staging, base_model: &str) -> Result<()> {
    let lora =
        loaded.model.lora.clone().ok_or_else(|| CandorError::msg("the model carries no LoRA adapter"))?;
    crate::model::lora::save_peft_adapter(staging.path(), loaded.model.linears(), &lora, Some(base_model))?;
    staging.commit()
}
