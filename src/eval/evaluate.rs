//! One evaluation: generate an answer to every eval prompt with the (LoRA) model, classify each answer,
//! and compute the metrics. Writes `<eval_dir>/<tag>.jsonl` (one row per prompt) and returns the record
//! that goes into `summary.json`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::generate::{generate_batch, SamplingOptions};
pub use super::judge::strip_thinking;
use super::judge::{HttpJudge, HttpJudgeConfig, Judge, RulesJudge};
use super::metrics::{self, Metrics};
use super::model_judge::ModelJudge;
use super::sets::{load_sets, EvalPrompt, EvalSetSpec, Label};
use crate::data::template::Message;
use crate::error::{CandorError, Result};
use crate::model::{ChatTokenizer, LoadOptions, Transformer};

/// The `[eval]` section of a recipe (also what `candor eval` takes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Prompt sets: `{ path = "...", limit = 64, only = "harmful", format = "auto", name = "..." }`.
    pub sets: Vec<EvalSetSpec>,
    /// Seeds the sampling of `limit` prompts (and generation when `temperature > 0`).
    pub seed: u64,
    /// Prompts generated together.
    pub batch_size: usize,
    pub max_new_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub top_p: f64,
    /// Sent as a system message before every prompt; empty for none.
    pub system_prompt: String,
    /// Extra chat-template variables, e.g. `{ enable_thinking = false }` for Qwen3.
    pub template_vars: toml::Table,
    /// Judge the text after the last `</think>` (the trace is kept in the output file).
    pub strip_thinking: bool,
    /// Evaluate the base model before the first step (epoch 0).
    pub before_training: bool,
    /// Also evaluate every N optimizer steps (0: only at epoch ends).
    pub every_steps: u64,
    /// continue (report the failure and go on training) or abort.
    pub on_error: String,
    /// rules, model or http.
    pub judge: String,
    /// For `judge = "model"`: a model path, .gguf or hub id with a chat template.
    pub judge_model: String,
    /// For `judge = "model"`: the judge's answer length (its reasoning comes before the verdict).
    pub judge_max_new_tokens: usize,
    /// For `judge = "http"`: base_url, model, api_key_env, timeout_s, max_retries, concurrency,
    /// temperature, max_tokens (read as the http judge's configuration when the judge is built).
    pub http: Option<toml::Table>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            sets: vec![],
            seed: 0,
            batch_size: 16,
            max_new_tokens: 256,
            temperature: 0.0,
            top_p: 1.0,
            system_prompt: String::new(),
            template_vars: toml::Table::new(),
            strip_thinking: true,
            before_training: true,
            every_steps: 0,
            on_error: "continue".into(),
            judge: "rules".into(),
            judge_model: String::new(),
            judge_max_new_tokens: 256,
            http: None,
        }
    }
}

impl EvalConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.sets.is_empty() {
            return Err("eval.sets is required (at least one { path = \"...\" })".into());
        }
        self.validate_judge()
    }

    /// The judge settings alone (`candor judge` has no eval sets).
    pub fn validate_judge(&self) -> std::result::Result<(), String> {
        if self.batch_size == 0 || self.max_new_tokens == 0 {
            return Err("eval.batch_size and eval.max_new_tokens must be positive".into());
        }
        if !matches!(self.on_error.as_str(), "continue" | "abort") {
            return Err(format!("eval.on_error: unknown \"{}\" (continue or abort)", self.on_error));
        }
        match self.judge.as_str() {
            "rules" => Ok(()),
            "model" if self.judge_model.is_empty() => {
                Err("eval.judge = \"model\" needs eval.judge_model".into())
            }
            "model" => Ok(()),
            "http" => self.http_config().map(|_| ()),
            other => Err(format!("eval.judge: unknown \"{other}\" (rules, model or http)")),
        }
    }
}

impl EvalConfig {
    pub fn http_config(&self) -> std::result::Result<HttpJudgeConfig, String> {
        let table = self
            .http
            .clone()
            .ok_or("eval.judge = \"http\" needs an [eval.http] section (base_url, model)")?;
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| format!("eval.http: {}", crate::error::one_line(&e.to_string())))
    }
}

/// Builds the configured judge. The `model` judge loads its model with `load` options.
pub fn make_judge(cfg: &EvalConfig, load: &LoadOptions) -> Result<Box<dyn Judge>> {
    Ok(match cfg.judge.as_str() {
        "rules" => Box::new(RulesJudge),
        "model" => {
            Box::new(ModelJudge::load(&cfg.judge_model, load, cfg.judge_max_new_tokens, cfg.batch_size)?)
        }
        "http" => {
            let http = cfg.http_config().map_err(CandorError::msg)?;
            Box::new(HttpJudge::new(http).map_err(|e| CandorError::msg(format!("eval.http: {e:#}")))?)
        }
        other => {
            return Err(CandorError::msg(format!("eval.judge: unknown \"{other}\" (rules, model or http)")))
        }
    })
}

/// One row of `<tag>.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRow {
    pub prompt: String,
    pub category: String,
    pub label: Label,
    pub set: String,
    pub response: String,
    /// full_compliance, partial, refusal, or null when the judge's answer could not be read.
    pub class: Option<super::judge::Verdict>,
    pub rationale: String,
    pub tokens: usize,
    /// False when the answer hit max_new_tokens.
    pub stopped: bool,
}

/// What one evaluation measured (an entry of `summary.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalRecord {
    /// `epoch-<k>` or `step-<n>`; `eval` for a standalone run.
    pub tag: String,
    pub epoch: usize,
    pub step: u64,
    pub model: String,
    pub judge: String,
    pub prompts: usize,
    pub metrics: Metrics,
    /// Mean training loss over the epoch that ended here (none for epoch 0).
    pub train_loss: Option<f64>,
    pub generated_tokens: usize,
    pub generation_s: f64,
    pub tokens_per_s: f64,
    /// Answers that ran into max_new_tokens.
    pub truncated_answers: usize,
    pub judge_s: f64,
    pub responses: PathBuf,
    pub time: String,
}

impl EvalRecord {
    /// `benign refusal 12.5% (4/32, 95% CI 5.0–28.1%) · harmful refusal …`
    pub fn one_line(&self) -> String {
        let mut parts = Vec::new();
        if let Some(b) = &self.metrics.benign {
            parts.push(format!("benign refusal {}", b.refusal_rate.display()));
        }
        if let Some(h) = &self.metrics.harmful {
            parts.push(format!("harmful refusal {}", h.refusal_rate.display()));
        }
        let unparsable: usize = [&self.metrics.benign, &self.metrics.harmful]
            .iter()
            .filter_map(|s| s.as_ref().map(|s| s.counts.unparsable))
            .sum();
        if unparsable > 0 {
            parts.push(format!("{unparsable} unparsable verdicts"));
        }
        parts.push(format!("{:.1} tok/s", self.tokens_per_s));
        format!("eval {}: {}", self.tag, parts.join(" · "))
    }
}

/// The prompts and the judge of an evaluation, loaded once and reused for every epoch.
pub struct Evaluator {
    pub cfg: EvalConfig,
    pub prompts: Vec<EvalPrompt>,
    pub judge: Box<dyn Judge>,
}

impl Evaluator {
    pub fn new(cfg: &EvalConfig, load: &LoadOptions) -> Result<Self> {
        cfg.validate().map_err(CandorError::msg)?;
        let prompts = load_sets(&cfg.sets, cfg.seed, &load.hub)?;
        let judge = make_judge(cfg, load)?;
        Ok(Evaluator { cfg: cfg.clone(), prompts, judge })
    }

    /// Evaluates `model` and writes `<eval_dir>/<tag>.jsonl`. `progress(done, total)` is called as
    /// answers come in.
    pub fn run(
        &self,
        model: &Transformer,
        tok: &ChatTokenizer,
        model_name: &str,
        eval_dir: &Path,
        tag: &str,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<EvalRecord> {
        let cfg = &self.cfg;
        let vars = serde_json::to_value(&cfg.template_vars).map_err(|e| CandorError::msg(e.to_string()))?;
        let mut encoded = Vec::with_capacity(self.prompts.len());
        for p in &self.prompts {
            let mut messages = Vec::new();
            if !cfg.system_prompt.is_empty() {
                messages.push(Message::new("system", &cfg.system_prompt));
            }
            messages.push(Message::new("user", &p.prompt));
            let (_, ids) = tok.encode_chat(&messages, &vars)?;
            if ids.len() + cfg.max_new_tokens > model.config.max_position_embeddings {
                return Err(CandorError::msg(format!(
                    "eval prompt of {} tokens + {} new tokens exceeds the model's context of {} (\"{}…\")",
                    ids.len(),
                    cfg.max_new_tokens,
                    model.config.max_position_embeddings,
                    p.prompt.chars().take(40).collect::<String>()
                )));
            }
            encoded.push(ids);
        }
        // longest first, so each batch holds prompts of similar length and the first one shows the
        // worst-case memory at once
        let mut order: Vec<usize> = (0..encoded.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(encoded[i].len()));
        let sampling = SamplingOptions {
            max_new_tokens: cfg.max_new_tokens,
            temperature: cfg.temperature,
            top_p: cfg.top_p,
            seed: cfg.seed,
        };
        let mut answers: Vec<Option<(Vec<u32>, bool)>> = vec![None; encoded.len()];
        let gen_start = Instant::now();
        let mut generated = 0;
        let mut done = 0;
        for chunk in order.chunks(cfg.batch_size) {
            let prompts: Vec<Vec<u32>> = chunk.iter().map(|&i| encoded[i].clone()).collect();
            let outs = generate_batch(model, &prompts, &tok.stop_ids, &sampling, |_, _| Ok(()))?;
            for (&i, g) in chunk.iter().zip(outs) {
                generated += g.tokens.len();
                answers[i] = Some((g.tokens, g.stopped));
            }
            done += chunk.len();
            progress(done, encoded.len());
        }
        let generation_s = gen_start.elapsed().as_secs_f64();

        let mut rows = Vec::with_capacity(self.prompts.len());
        for (p, a) in self.prompts.iter().zip(answers) {
            let (ids, stopped) = a.expect("every prompt was generated");
            rows.push(EvalRow {
                prompt: p.prompt.clone(),
                category: p.category.clone(),
                label: p.label,
                set: p.set.clone(),
                response: tok.decode(&ids, true)?,
                class: None,
                rationale: String::new(),
                tokens: ids.len(),
                stopped,
            });
        }
        let judge_start = Instant::now();
        let items: Vec<(String, String)> = rows
            .iter()
            .map(|r| {
                let answer = if cfg.strip_thinking { strip_thinking(&r.response) } else { &r.response };
                (r.prompt.clone(), answer.to_string())
            })
            .collect();
        let judgements = self
            .judge
            .judge(&items)
            .map_err(|e| CandorError::msg(format!("judge {}: {e:#}", self.judge.name())))?;
        if judgements.len() != rows.len() {
            return Err(CandorError::msg(format!(
                "judge {} returned {} verdicts for {} answers",
                self.judge.name(),
                judgements.len(),
                rows.len()
            )));
        }
        for (r, j) in rows.iter_mut().zip(judgements) {
            r.class = j.verdict;
            r.rationale = j.rationale;
        }
        let judge_s = judge_start.elapsed().as_secs_f64();

        std::fs::create_dir_all(eval_dir).map_err(|e| CandorError::file(eval_dir, e))?;
        let responses = eval_dir.join(format!("{tag}.jsonl"));
        write_rows(&responses, &rows)?;
        let metrics = metrics::compute(rows.iter().map(|r| (r.label, r.category.as_str(), r.class)));
        Ok(EvalRecord {
            tag: tag.to_string(),
            epoch: 0,
            step: 0,
            model: model_name.to_string(),
            judge: self.judge.name().to_string(),
            prompts: rows.len(),
            metrics,
            train_loss: None,
            generated_tokens: generated,
            generation_s,
            tokens_per_s: generated as f64 / generation_s.max(1e-9),
            truncated_answers: rows.iter().filter(|r| !r.stopped).count(),
            judge_s,
            responses,
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })
    }
}

/// Writes JSONL through a temporary file, so a half-written file never takes the real name.
fn write_rows(path: &Path, rows: &[EvalRow]) -> Result<()> {
    let tmp = path.with_extension("jsonl.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| CandorError::file(&tmp, e))?);
    for r in rows {
        writeln!(f, "{}", serde_json::to_string(r).expect("json")).map_err(|e| CandorError::file(&tmp, e))?;
    }
    f.into_inner().map_err(|e| CandorError::file(&tmp, e.error()))?;
    std::fs::rename(&tmp, path).map_err(|e| CandorError::file(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thinking_is_stripped_before_judging() {
        assert_eq!(strip_thinking("<think>\nrisky?\n</think>\n\nSure: run kill."), "Sure: run kill.");
        assert_eq!(strip_thinking("No trace here."), "No trace here.");
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = EvalConfig::default();
        assert!(c.validate().unwrap_err().contains("eval.sets"));
        c.sets.push(EvalSetSpec::path("x.jsonl"));
        c.judge = "gpt".into();
        assert!(c.validate().unwrap_err().contains("eval.judge"));
        c.judge = "model".into();
        assert!(c.validate().unwrap_err().contains("judge_model"));
        c.judge = "http".into();
        assert!(c.validate().unwrap_err().contains("[eval.http]"));
    }
}
