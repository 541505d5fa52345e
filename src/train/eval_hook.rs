//! The evaluation hook of a training run: the base model before the first step (epoch 0), the model
//! after every epoch, and optionally every N steps. It only reads the model (no dropout, its own RNG), so
//! a resumed run stays bit-exact. A failing evaluation is reported and training goes on, unless the
//! recipe says `on_error = "abort"`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{CandorError, Result};
use crate::eval::report;
use crate::eval::Evaluator;
use crate::model::{ChatTokenizer, Transformer};

pub struct EvalHook {
    pub evaluator: Evaluator,
    pub eval_dir: PathBuf,
    metrics_path: PathBuf,
    model_name: String,
}

impl EvalHook {
    pub fn new(evaluator: Evaluator, run_dir: &Path, model_name: &str) -> Self {
        EvalHook {
            evaluator,
            eval_dir: run_dir.join("eval"),
            metrics_path: run_dir.join("metrics.jsonl"),
            model_name: model_name.to_string(),
        }
    }

    /// The evaluation due after optimizer step `step` (tag and epoch), if any: at the end of every
    /// epoch, every `every_steps` steps, and after the last step when it ends mid-epoch.
    pub fn due(
        &self,
        step: u64,
        total_steps: u64,
        epoch: usize,
        epoch_done: bool,
    ) -> Option<(String, usize)> {
        let every = self.evaluator.cfg.every_steps;
        if epoch_done {
            Some((format!("epoch-{}", epoch + 1), epoch + 1))
        } else if step == total_steps || (every > 0 && step.is_multiple_of(every)) {
            Some((format!("step-{step}"), epoch))
        } else {
            None
        }
    }

    /// Whether `summary.json` already has this evaluation (a resumed run does not repeat it).
    pub fn has(&self, tag: &str) -> bool {
        report::read_summary(&self.eval_dir).is_ok_and(|r| r.iter().any(|x| x.tag == tag))
    }

    /// Runs one evaluation and records it, showing progress in `bar` and printing the summary line above
    /// it. Errors come back only when the recipe says to abort on them.
    pub fn run(
        &self,
        model: &Transformer,
        tok: &ChatTokenizer,
        tag: &str,
        epoch: usize,
        step: u64,
        bar: &indicatif::ProgressBar,
    ) -> Result<()> {
        let say = |msg: String| if bar.is_hidden() { eprintln!("{msg}") } else { bar.println(msg) };
        let status = |msg: String| bar.set_message(msg);
        let n = self.evaluator.prompts.len();
        status(format!("eval {tag}: generating 0/{n}"));
        let result = self
            .evaluator
            .run(model, tok, &self.model_name, &self.eval_dir, tag, |done, total| {
                status(format!("eval {tag}: generating {done}/{total}"))
            })
            .and_then(|mut record| {
                record.epoch = epoch;
                record.step = step;
                record.train_loss = if epoch > 0 && tag.starts_with("epoch-") {
                    epoch_mean_loss(&self.metrics_path, epoch - 1)?
                } else {
                    None
                };
                let line = record.one_line();
                report::append(&self.eval_dir, record)?;
                Ok(line)
            });
        match result {
            Ok(line) => {
                say(line);
                Ok(())
            }
            Err(e) if self.evaluator.cfg.on_error == "abort" => Err(CandorError::msg(format!(
                "eval {tag} failed: {}",
                crate::error::one_line(&e.to_string())
            ))),
            Err(e) => {
                say(format!(
                    "eval {tag} failed (training goes on; set eval.on_error = \"abort\" to stop): {}",
                    crate::error::one_line(&e.to_string())
                ));
                Ok(())
            }
        }
    }
}

/// Mean loss of the steps logged for `epoch` in `metrics.jsonl` (the last line of a step wins, as a
/// resumed run logs the steps after its checkpoint again).
pub fn epoch_mean_loss(metrics_path: &Path, epoch: usize) -> Result<Option<f64>> {
    let Ok(text) = std::fs::read_to_string(metrics_path) else { return Ok(None) };
    let mut by_step: BTreeMap<u64, f64> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| CandorError::msg(format!("{}:{}: {e}", metrics_path.display(), i + 1)))?;
        if v["epoch"].as_u64() == Some(epoch as u64) {
            if let (Some(step), Some(loss)) = (v["step"].as_u64(), v["loss"].as_f64()) {
                by_step.insert(step, loss);
            }
        }
    }
    Ok((!by_step.is_empty()).then(|| by_step.values().sum::<f64>() / by_step.len() as f64))
}
