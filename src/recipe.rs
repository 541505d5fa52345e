//! The whole run in one TOML file: model, data, LoRA, optimizer, schedule, training, checkpoints.
//! Every field has a default (written here and in `recipes/README.md`); `--set section.key=value`
//! overrides any of them; unknown keys are errors that list the keys that exist.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::dataset::SourceSpec;
use crate::error::{CandorError, Result};
use crate::eval::EvalConfig;
use crate::model::lora::LoraConfig;
use crate::train::optim::AdamWConfig;
use crate::train::schedule::ScheduleKind;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Recipe {
    /// Run name: checkpoints go to `<output_dir>/<name>/`.
    pub name: String,
    pub output_dir: PathBuf,
    /// Seeds LoRA initialisation, dropout and the data order.
    pub seed: u64,
    pub model: ModelSection,
    pub data: DataSection,
    pub lora: LoraSection,
    pub optim: OptimSection,
    pub schedule: ScheduleSection,
    pub train: TrainSection,
    pub checkpoint: CheckpointSection,
    pub export: ExportSection,
    /// `[eval]`: evaluate before training and after every epoch (absent: no evaluation).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalConfig>,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            name: "run".into(),
            output_dir: "checkpoints".into(),
            seed: 0,
            model: ModelSection::default(),
            data: DataSection::default(),
            lora: LoraSection::default(),
            optim: OptimSection::default(),
            schedule: ScheduleSection::default(),
            train: TrainSection::default(),
            checkpoint: CheckpointSection::default(),
            export: ExportSection::default(),
            eval: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    /// A local directory, a .gguf file or a hub id.
    pub path: String,
    /// auto (f32 on CPU, bf16 on CUDA), f32, bf16 or f16: the frozen base's dtype.
    pub dtype: String,
    /// cpu or cuda.
    pub device: String,
}

impl Default for ModelSection {
    fn default() -> Self {
        ModelSection { path: String::new(), dtype: "auto".into(), device: "cpu".into() }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub sources: Vec<SourceSpec>,
    /// standard (instruct_response) or reasoning (cot_response).
    pub variant: String,
    /// Added as a system message to every conversation; empty for none.
    pub system_prompt: String,
    pub max_seq_len: usize,
    /// Pack several examples per row (block-diagonal attention) instead of padding.
    pub packing: bool,
    /// drop or right.
    pub truncation: String,
    /// error or skip.
    pub on_bad_row: String,
    pub think_open: String,
    pub think_close: String,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            sources: vec![],
            variant: "standard".into(),
            system_prompt: String::new(),
            max_seq_len: 2048,
            packing: true,
            truncation: "drop".into(),
            on_bad_row: "error".into(),
            think_open: "<think>".into(),
            think_close: "</think>".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraSection {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
}

impl Default for LoraSection {
    fn default() -> Self {
        let d = LoraConfig::default();
        LoraSection {
            r: d.r,
            alpha: d.alpha,
            dropout: d.dropout,
            use_rslora: d.use_rslora,
            target_modules: d.target_modules,
        }
    }
}

impl LoraSection {
    pub fn config(&self) -> LoraConfig {
        LoraConfig {
            r: self.r,
            alpha: self.alpha,
            dropout: self.dropout,
            use_rslora: self.use_rslora,
            target_modules: self.target_modules.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimSection {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
}

impl Default for OptimSection {
    fn default() -> Self {
        let d = AdamWConfig::default();
        OptimSection {
            lr: d.lr,
            beta1: d.beta1,
            beta2: d.beta2,
            eps: d.eps,
            weight_decay: d.weight_decay,
            max_grad_norm: 1.0,
        }
    }
}

impl OptimSection {
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleSection {
    /// cosine, linear or constant (after warm-up).
    pub kind: ScheduleKind,
    /// Warm-up steps; when 0, `warmup_ratio` of the total steps.
    pub warmup_steps: u64,
    pub warmup_ratio: f64,
}

impl Default for ScheduleSection {
    fn default() -> Self {
        ScheduleSection { kind: ScheduleKind::Cosine, warmup_steps: 0, warmup_ratio: 0.03 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub epochs: usize,
    /// Stop after this many optimizer steps; 0 means train `epochs` full epochs.
    pub max_steps: u64,
    /// Rows per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
}

impl Default for TrainSection {
    fn default() -> Self {
        TrainSection { epochs: 1, max_steps: 0, micro_batch_size: 4, grad_accum: 1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save every N optimizer steps (0: only at the end of each epoch and of the run).
    pub every_steps: u64,
    /// Keep the newest K checkpoints (0 keeps all).
    pub keep_last: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        CheckpointSection { every_steps: 0, keep_last: 2 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportSection {
    /// After training, merge the last checkpoint into `<run>/merged/`.
    pub at_end: bool,
    /// bf16, f16 or f32.
    pub dtype: String,
    /// Reload the export and compare its logits with the LoRA model's.
    pub verify: bool,
}

impl Default for ExportSection {
    fn default() -> Self {
        ExportSection { at_end: false, dtype: "bf16".into(), verify: false }
    }
}

impl Recipe {
    /// Reads a recipe file and applies `--set key=value` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CandorError::file(path, e))?;
        Self::parse(&text, overrides).map_err(|e| CandorError::file(path, e))
    }

    /// Parses recipe text with overrides. Errors are plain messages (the caller adds the file).
    pub fn parse(text: &str, overrides: &[String]) -> std::result::Result<Self, String> {
        let mut value: toml::Value = toml::from_str(text).map_err(|e| one_line_toml(&e.to_string()))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        let recipe: Recipe = value.try_into().map_err(|e: toml::de::Error| one_line_toml(&e.to_string()))?;
        recipe.validate()?;
        Ok(recipe)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.model.path.is_empty() {
            return Err("model.path is required".into());
        }
        if self.data.sources.is_empty() {
            return Err("data.sources is required (at least one { path = \"...\" })".into());
        }
        if self.train.micro_batch_size == 0 || self.train.grad_accum == 0 {
            return Err("train.micro_batch_size and train.grad_accum must be positive".into());
        }
        if self.train.epochs == 0 && self.train.max_steps == 0 {
            return Err("set train.epochs or train.max_steps".into());
        }
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return Err(format!("name \"{}\" must be a plain directory name", self.name));
        }
        self.lora.config().resolved_targets().map_err(|e| e.to_string())?;
        if let Some(eval) = &self.eval {
            eval.validate()?;
        }
        Ok(())
    }

    /// The resolved recipe as TOML (printed at start, saved with every checkpoint).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("recipe serializes")
    }

    pub fn run_dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }
}

fn one_line_toml(msg: &str) -> String {
    crate::error::one_line(msg)
}

/// `a.b.c=value`: the value is read as TOML (number, bool, array, inline table, quoted string), or as a
/// bare string when it is not valid TOML.
pub(crate) fn apply_override(root: &mut toml::Value, o: &str) -> std::result::Result<(), String> {
    let (key, raw) = o.split_once('=').ok_or_else(|| format!("--set {o}: expected key=value"))?;
    let parsed: toml::Value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.trim().split('.').collect();
    let mut cur = root;
    for (i, part) in parts.iter().enumerate() {
        let table = cur
            .as_table_mut()
            .ok_or_else(|| format!("--set {key}: {} is not a table", parts[..i].join(".")))?;
        if i + 1 == parts.len() {
            table.insert(part.to_string(), parsed);
            return Ok(());
        }
        cur = table.entry(part.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = "[model]\npath = \"m.gguf\"\n[data]\nsources = [{ path = \"d.jsonl\" }]\n";

    #[test]
    fn defaults_and_overrides() {
        let r = Recipe::parse(
            MIN,
            &["optim.lr=1e-3".into(), "lora.target_modules=[\"q_proj\"]".into(), "name=quick".into()],
        )
        .unwrap();
        assert_eq!(r.optim.lr, 1e-3);
        assert_eq!(r.lora.target_modules, vec!["q_proj".to_string()]);
        assert_eq!(r.name, "quick");
        assert_eq!(r.train.micro_batch_size, 4);
        // the resolved recipe reads back to itself
        assert_eq!(Recipe::parse(&r.to_toml(), &[]).unwrap(), r);
    }

    #[test]
    fn unknown_keys_list_the_real_ones() {
        let err = Recipe::parse(MIN, &["optim.lrr=1".into()]).unwrap_err();
        assert!(err.contains("unknown field `lrr`") && err.contains("`lr`"), "{err}");
        let err = Recipe::parse(&format!("{MIN}[trainer]\nepochs = 1\n"), &[]).unwrap_err();
        assert!(err.contains("unknown field `trainer`") && err.contains("`train`"), "{err}");
        assert!(Recipe::parse("[data]\nsources = [{ path = \"d\" }]\n", &[])
            .unwrap_err()
            .contains("model.path"));
    }
}
