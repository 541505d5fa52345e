//! Finding and loading a model: a local Hugging Face directory, a hub id, or a GGUF file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::config::ModelConfig;
use super::gguf;
use super::tokenizer::{stop_ids, ChatTokenizer};
use super::transformer::{Transformer, WeightMap};
use crate::data::template::ChatTemplate;
use crate::error::{CandorError, Result};
use crate::hub::{looks_like_repo_id, HubOptions, HubRepo};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    Dir(PathBuf),
    Gguf(PathBuf),
    Hub(String),
}

impl ModelSource {
    /// A local directory or `.gguf` file if one exists at `spec`, else a hub id.
    pub fn resolve(spec: &str) -> Result<Self> {
        let path = Path::new(spec);
        if path.is_file() {
            return if path.extension().is_some_and(|e| e == "gguf") {
                Ok(ModelSource::Gguf(path.to_path_buf()))
            } else {
                Err(CandorError::file(path, "not a model: expected a directory or a .gguf file"))
            };
        }
        if path.is_dir() {
            if path.join("config.json").is_file() {
                return Ok(ModelSource::Dir(path.to_path_buf()));
            }
            let ggufs: Vec<PathBuf> = std::fs::read_dir(path)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
                .collect();
            return match ggufs.as_slice() {
                [one] => Ok(ModelSource::Gguf(one.clone())),
                [] => Err(CandorError::file(path, "no config.json and no .gguf file in this directory")),
                _ => Err(CandorError::file(path, "several .gguf files here: name the one to use")),
            };
        }
        if looks_like_repo_id(spec) {
            return Ok(ModelSource::Hub(spec.to_string()));
        }
        Err(CandorError::file(
            path,
            "no such file or directory (nor a hub id like Qwen/Qwen2.5-0.5B-Instruct)",
        ))
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::Dir(p) => write!(f, "{}", p.display()),
            ModelSource::Gguf(p) => write!(f, "{} (GGUF)", p.display()),
            ModelSource::Hub(id) => write!(f, "{id} (hub)"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the frozen base; `None`: f32 on CPU, bf16 on CUDA.
    pub dtype: Option<DType>,
    /// Also load the tokenizer and chat template (needed for generation and data, not for parity tests).
    pub tokenizer: bool,
    pub hub: HubOptions,
}

impl LoadOptions {
    pub fn cpu() -> Self {
        LoadOptions { device: Device::Cpu, dtype: None, tokenizer: true, hub: HubOptions::from_env() }
    }

    pub fn resolved_dtype(&self) -> DType {
        self.dtype.unwrap_or(if self.device.is_cuda() { DType::BF16 } else { DType::F32 })
    }
}

pub struct LoadedModel {
    pub model: Transformer,
    pub tokenizer: Option<ChatTokenizer>,
    pub source: ModelSource,
    /// Where the weights were read from (a directory or a file), for export.
    pub weights_path: PathBuf,
}

impl LoadedModel {
    pub fn tokenizer(&self) -> Result<&ChatTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            CandorError::msg(format!("{}: no tokenizer (the directory has no tokenizer.json)", self.source))
        })
    }
}

pub fn load_model(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    let source = ModelSource::resolve(spec)?;
    match &source {
        ModelSource::Dir(dir) => load_dir(dir, source.clone(), opts),
        ModelSource::Hub(id) => {
            let dir = fetch_hub_model(id, &opts.hub)?;
            load_dir(&dir, source.clone(), opts)
        }
        ModelSource::Gguf(path) => gguf::load_gguf(path, opts),
    }
}

/// Only the tokenizer and chat template of a model (no weights are read).
pub fn load_tokenizer(spec: &str, hub: &HubOptions) -> Result<ChatTokenizer> {
    let source = ModelSource::resolve(spec)?;
    let dir = match &source {
        ModelSource::Gguf(path) => return gguf::load_gguf_tokenizer(path),
        ModelSource::Dir(dir) => dir.clone(),
        ModelSource::Hub(id) => {
            let repo = HubRepo::model(id, hub.clone());
            let config = repo.get("config.json")?;
            repo.get("tokenizer.json")?;
            for optional in ["tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
                repo.get_optional(optional);
            }
            config.parent().expect("a file in a snapshot").to_path_buf()
        }
    };
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    load_dir_tokenizer(&dir, &config, &source)?
        .ok_or_else(|| CandorError::file(dir.join("tokenizer.json"), "missing (the model needs a tokenizer)"))
}

/// Makes sure every file a model needs is in the hub cache; returns the snapshot directory.
pub fn fetch_hub_model(id: &str, hub: &HubOptions) -> Result<PathBuf> {
    let repo = HubRepo::model(id, hub.clone());
    let config = repo.get("config.json")?;
    for optional in
        ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]
    {
        repo.get_optional(optional);
    }
    match repo.get_optional("model.safetensors.index.json") {
        Some(index) => {
            for shard in shard_files(&index)? {
                repo.get(&shard)?;
            }
        }
        None => {
            repo.get("model.safetensors")?;
        }
    }
    Ok(config.parent().expect("a file in a snapshot").to_path_buf())
}

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| CandorError::file(path, e))?;
    serde_json::from_str(&text).map_err(|e| CandorError::file(path, format!("invalid JSON: {e}")))
}

fn shard_files(index: &Path) -> Result<Vec<String>> {
    let v = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| CandorError::file(index, "missing object \"weight_map\""))?;
    let mut files: Vec<String> = map.values().filter_map(Value::as_str).map(str::to_string).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// The safetensors files of a Hugging Face model directory.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        Ok(shard_files(&index)?.into_iter().map(|f| dir.join(f)).collect())
    } else if dir.join("model.safetensors").is_file() {
        Ok(vec![dir.join("model.safetensors")])
    } else {
        Err(CandorError::file(dir, "no model.safetensors or model.safetensors.index.json"))
    }
}

/// The one float dtype (f32, bf16 or f16) a model's safetensors hold all their float tensors in, read
/// from the file headers; `None` for a GGUF file (dequantized on load) or mixed dtypes. Loading in this
/// dtype converts nothing.
pub fn stored_float_dtype(spec: &str, hub: &HubOptions) -> Result<Option<DType>> {
    let dir = match ModelSource::resolve(spec)? {
        ModelSource::Gguf(_) => return Ok(None),
        ModelSource::Dir(dir) => dir,
        ModelSource::Hub(id) => fetch_hub_model(&id, hub)?,
    };
    let mut found = None;
    for file in weight_files(&dir)? {
        // SAFETY: the file is only read, for its header, while this function runs
        let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file) }
            .map_err(|e| CandorError::file(&file, e))?;
        for (_, view) in st.tensors() {
            let dtype = match view.dtype() {
                safetensors::Dtype::F32 => DType::F32,
                safetensors::Dtype::BF16 => DType::BF16,
                safetensors::Dtype::F16 => DType::F16,
                _ => continue,
            };
            if found.is_some_and(|d| d != dtype) {
                return Ok(None);
            }
            found = Some(dtype);
        }
    }
    Ok(found)
}

fn load_dir(dir: &Path, source: ModelSource, opts: &LoadOptions) -> Result<LoadedModel> {
    let config = ModelConfig::from_file(&dir.join("config.json"))?;
    let files = weight_files(dir)?;
    let mut tensors = HashMap::new();
    for file in &files {
        let loaded =
            candle_core::safetensors::load(file, &Device::Cpu).map_err(|e| CandorError::file(file, e))?;
        for (name, t) in loaded {
            tensors.insert(name, place(t, opts)?);
        }
    }
    let model = Transformer::new(config, WeightMap::new(tensors, dir.display().to_string()), &opts.device)?;
    let tokenizer = if opts.tokenizer { load_dir_tokenizer(dir, &model.config, &source)? } else { None };
    Ok(LoadedModel { model, tokenizer, source, weights_path: dir.to_path_buf() })
}

/// A special-token field of `tokenizer_config.json`: a string or `{"content": …}`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// `None` when the directory has no `tokenizer.json` (commands that need one say so).
fn load_dir_tokenizer(
    dir: &Path,
    config: &ModelConfig,
    source: &ModelSource,
) -> Result<Option<ChatTokenizer>> {
    let tok_path = dir.join("tokenizer.json");
    if !tok_path.is_file() {
        return Ok(None);
    }
    let tokenizer =
        tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| CandorError::file(&tok_path, e))?;
    let tc_path = dir.join("tokenizer_config.json");
    let tc = if tc_path.is_file() { read_json(&tc_path)? } else { Value::Null };
    let bos = token_string(tc.get("bos_token"));
    let eos = token_string(tc.get("eos_token"));
    let jinja = dir.join("chat_template.jinja");
    let (template_text, template_source) = if jinja.is_file() {
        (Some(std::fs::read_to_string(&jinja).map_err(|e| CandorError::file(&jinja, e))?), jinja)
    } else {
        let t = match tc.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: use "default".
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(str::to_string),
            _ => None,
        };
        (t, tc_path.clone())
    };
    let template = match template_text {
        Some(t) => Some(ChatTemplate::new(
            &t,
            &template_source.display().to_string(),
            bos.as_deref(),
            eos.as_deref(),
        )?),
        None => None,
    };
    let mut eos_ids = config.eos_token_ids.clone();
    let gen_cfg = dir.join("generation_config.json");
    if gen_cfg.is_file() {
        match read_json(&gen_cfg)?.get("eos_token_id") {
            Some(Value::Number(n)) => eos_ids.extend(n.as_u64().map(|x| x as u32)),
            Some(Value::Array(a)) => eos_ids.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32)),
            _ => {}
        }
    }
    let stop = stop_ids(&tokenizer, &eos_ids, eos.as_deref());
    Ok(Some(ChatTokenizer {
        tokenizer,
        template,
        tokenizer_source: tok_path.display().to_string(),
        stop_ids: stop,
        model_source: source.to_string(),
    }))
}

/// Converts a loaded tensor to the compute dtype and device.
pub(crate) fn place(t: Tensor, opts: &LoadOptions) -> Result<Tensor> {
    Ok(t.to_dtype(opts.resolved_dtype())?.to_device(&opts.device)?)
}
