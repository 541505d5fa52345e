//! Checkpoints under `<run>/step-<N>/`: the adapter in PEFT's format, the optimizer moments, the
//! trainer state (step, data cursor, dropout RNG), the resolved recipe, and a manifest with a SHA-256
//! per file. Written into a temporary directory and renamed, so a crash never leaves a directory that
//! resume would take for a checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::data::batch::DataCursor;
use crate::error::{CandorError, Result};
use crate::model::lora::{load_peft_weights, save_peft_adapter};
use crate::model::Transformer;
use crate::recipe::Recipe;
use crate::train::optim::AdamW;

pub const MANIFEST: &str = "manifest.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps done.
    pub step: u64,
    pub total_steps: u64,
    /// The next batch to read.
    pub cursor: DataCursor,
    pub dropout_rng_seed: [u8; 32],
    /// u128 as a string (JSON numbers are not that wide).
    pub dropout_rng_word_pos: String,
    pub tokens_seen: u64,
    pub elapsed_s: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    step: u64,
    files: BTreeMap<String, String>,
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| CandorError::file(path, e))?;
    Ok(format!("{:x}", Sha256::digest(&bytes)))
}

pub fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// Writes a complete checkpoint and applies retention. Returns its directory.
pub fn save(
    run_dir: &Path,
    model: &Transformer,
    opt: &AdamW,
    state: &TrainerState,
    recipe: &Recipe,
    keep_last: usize,
) -> Result<PathBuf> {
    std::fs::create_dir_all(run_dir)
        .map_err(|e| CandorError::file(run_dir, format!("cannot create the run directory: {e}")))?;
    let final_dir = run_dir.join(step_dir_name(state.step));
    let tmp = run_dir.join(format!(".tmp-{}-{}", step_dir_name(state.step), std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| CandorError::file(&tmp, e))?;

    let lora =
        model.lora.as_ref().ok_or_else(|| CandorError::msg("the model has no LoRA adapter to save"))?;
    save_peft_adapter(&tmp, model.linears(), lora, Some(&recipe.model.path))?;
    let opt_path = tmp.join("optimizer.safetensors");
    candle_core::safetensors::save(&opt.state_tensors(), &opt_path)
        .map_err(|e| CandorError::file(&opt_path, e))?;
    write(&tmp.join("trainer_state.json"), &serde_json::to_string_pretty(state).expect("json"))?;
    write(&tmp.join("recipe.toml"), &recipe.to_toml())?;

    let mut files = BTreeMap::new();
    for name in [
        "adapter_model.safetensors",
        "adapter_config.json",
        "optimizer.safetensors",
        "trainer_state.json",
        "recipe.toml",
    ] {
        files.insert(name.to_string(), sha256_file(&tmp.join(name))?);
    }
    write(
        &tmp.join(MANIFEST),
        &serde_json::to_string_pretty(&Manifest { step: state.step, files }).expect("json"),
    )?;
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir).map_err(|e| CandorError::file(&final_dir, e))?;
    }
    std::fs::rename(&tmp, &final_dir).map_err(|e| CandorError::file(&final_dir, e))?;
    retain(run_dir, keep_last)?;
    Ok(final_dir)
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).map_err(|e| CandorError::file(path, e))
}

/// Complete-looking checkpoint directories of a run, newest first.
pub fn list(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name.strip_prefix("step-")?.parse().ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort_by_key(|e| std::cmp::Reverse(e.0));
    out
}

fn retain(run_dir: &Path, keep_last: usize) -> Result<()> {
    if keep_last == 0 {
        return Ok(());
    }
    for (_, dir) in list(run_dir).into_iter().skip(keep_last) {
        std::fs::remove_dir_all(&dir).map_err(|e| CandorError::file(&dir, e))?;
    }
    Ok(())
}

/// Checks every file against the manifest.
pub fn verify(dir: &Path) -> Result<()> {
    let manifest_path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|_| CandorError::file(&manifest_path, "missing: the checkpoint is incomplete"))?;
    let manifest: Manifest = serde_json::from_str(&text)
        .map_err(|e| CandorError::file(&manifest_path, format!("unreadable: {e}")))?;
    for (name, sum) in &manifest.files {
        let path = dir.join(name);
        if !path.is_file() {
            return Err(CandorError::file(&path, "missing from the checkpoint"));
        }
        if &sha256_file(&path)? != sum {
            return Err(CandorError::file(
                &path,
                "checksum does not match the manifest: the checkpoint is corrupt",
            ));
        }
    }
    Ok(())
}

/// The saved recipe of a checkpoint.
pub fn saved_recipe(dir: &Path) -> Result<Recipe> {
    Recipe::load(&dir.join("recipe.toml"), &[])
}

/// Refuses a checkpoint made for another model or another LoRA shape, saying what differs.
pub fn check_compatible(saved: &Recipe, current: &Recipe, dir: &Path) -> Result<()> {
    let mut diffs = Vec::new();
    if saved.model.path != current.model.path {
        diffs.push(format!("model.path \"{}\" vs \"{}\"", saved.model.path, current.model.path));
    }
    let (a, b) = (saved.lora.config(), current.lora.config());
    if a.r != b.r {
        diffs.push(format!("lora.r {} vs {}", a.r, b.r));
    }
    if a.resolved_targets()? != b.resolved_targets()? {
        diffs.push(format!("lora.target_modules {:?} vs {:?}", a.target_modules, b.target_modules));
    }
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(CandorError::file(
            dir,
            format!("checkpoint does not fit this recipe: {} (checkpoint vs recipe)", diffs.join(", ")),
        ))
    }
}

/// Loads adapter weights, optimizer state and trainer state from a verified checkpoint.
pub fn load(dir: &Path, model: &Transformer, opt: &mut AdamW) -> Result<TrainerState> {
    verify(dir)?;
    load_peft_weights(&dir.join("adapter_model.safetensors"), model.linears())?;
    let opt_path = dir.join("optimizer.safetensors");
    let tensors = candle_core::safetensors::load(&opt_path, model.device())
        .map_err(|e| CandorError::file(&opt_path, e))?;
    let state_path = dir.join("trainer_state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| CandorError::file(&state_path, e))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| CandorError::file(&state_path, e))?;
    opt.load_state(tensors, state.step).map_err(|e| CandorError::file(&opt_path, e))?;
    let pos: u128 = state
        .dropout_rng_word_pos
        .parse()
        .map_err(|_| CandorError::file(&state_path, "bad dropout_rng_word_pos"))?;
    model.set_dropout_rng_state(state.dropout_rng_seed, pos);
    Ok(state)
}
