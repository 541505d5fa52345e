//! `candor eval TARGET`: the trainer's evaluation, standalone, on a base model, a checkpoint or an
//! exported directory; `candor eval --compare A B` puts two evaluations side by side.

use std::path::{Path, PathBuf};

use crate::eval::{report, EvalConfig, Evaluator};
use crate::model::{load_model, LoadedModel};
use crate::train::checkpoint;

/// Where the FalseReject test split lives on the hub (used when no eval set is configured).
pub const DEFAULT_SET: &str = "hf://datasets/AmazonScience/FalseReject/test.jsonl";

#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    /// A model (directory, .gguf or hub id), a checkpoint (checkpoints/<run>/step-<N>) or an exported
    /// directory.
    #[arg(required_unless_present = "compare")]
    pub target: Option<String>,
    /// Eval settings: a recipe (its [eval] section is used) or a TOML file of eval keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override an eval setting (repeatable), e.g. --set 'sets=[{path="x.csv", limit=40}]' --set judge=model
    /// --set judge_model=DIR. An `eval.` prefix is accepted.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where answers, summary.json, plot.svg and report.md go (default: eval/<target name>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// f32, bf16 or f16 (default: f32 on cpu, bf16 on cuda).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Compare two evaluations: directories holding summary.json (or the files), the last record of each.
    #[arg(long, num_args = 2, value_names = ["A", "B"], conflicts_with = "target")]
    pub compare: Option<Vec<PathBuf>>,
}

/// Reads eval settings: a recipe's `[eval]` table or a whole file of eval keys, then `--set` overrides;
/// without sets, the FalseReject test split from the hub.
pub fn eval_config(file: Option<&Path>, overrides: &[String]) -> anyhow::Result<EvalConfig> {
    let cfg = eval_settings(file, overrides, true)?;
    cfg.validate().map_err(|e| anyhow::anyhow!(e))?;
    Ok(cfg)
}

/// Eval settings as read, not yet validated.
pub fn eval_settings(
    file: Option<&Path>,
    overrides: &[String],
    default_set: bool,
) -> anyhow::Result<EvalConfig> {
    let mut value = match file {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let mut table: toml::Table = toml::from_str(&text).map_err(|e| {
                anyhow::anyhow!("{}: {}", path.display(), crate::error::one_line(&e.to_string()))
            })?;
            match table.remove("eval") {
                Some(toml::Value::Table(t)) => toml::Value::Table(t),
                Some(_) => anyhow::bail!("{}: eval must be a table", path.display()),
                None if table.contains_key("model") => {
                    anyhow::bail!("{}: this recipe has no [eval] section", path.display())
                }
                None => toml::Value::Table(table),
            }
        }
        None => toml::Value::Table(toml::Table::new()),
    };
    for o in overrides {
        let o = o.strip_prefix("eval.").unwrap_or(o);
        crate::recipe::apply_override(&mut value, o).map_err(|e| anyhow::anyhow!(e))?;
    }
    let table = value.as_table_mut().expect("a table");
    if default_set && !table.contains_key("sets") {
        let mut set = toml::Table::new();
        set.insert("path".into(), DEFAULT_SET.into());
        table.insert("sets".into(), toml::Value::Array(vec![toml::Value::Table(set)]));
    }
    value.try_into().map_err(|e: toml::de::Error| {
        anyhow::anyhow!("eval settings: {}", crate::error::one_line(&e.to_string()))
    })
}

/// A model with or without a checkpoint's adapter, and its display name.
fn load_target(target: &str, opts: &crate::model::LoadOptions) -> anyhow::Result<(LoadedModel, String)> {
    let path = Path::new(target);
    if path.join("manifest.json").is_file() && path.join("adapter_config.json").is_file() {
        checkpoint::verify(path)?;
        let (loaded, base) = super::export::load_checkpoint_model(path, opts)?;
        return Ok((loaded, format!("{base} + {}", path.display())));
    }
    Ok((load_model(target, opts)?, target.to_string()))
}

pub fn run(a: EvalArgs) -> anyhow::Result<()> {
    if let Some(pair) = &a.compare {
        let records = pair
            .iter()
            .map(|p| {
                let dir = if p.is_dir() {
                    p.clone()
                } else {
                    p.parent().map(Path::to_path_buf).unwrap_or_default()
                };
                let all = report::read_summary(&dir)?;
                all.into_iter().next_back().ok_or_else(|| {
                    anyhow::anyhow!("{}: no evaluation recorded (summary.json missing or empty)", p.display())
                })
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        print!("{}", report::report_md(&records));
        return Ok(());
    }
    let target = a.target.as_deref().expect("clap requires a target");
    let cfg = eval_config(a.config.as_deref(), &a.set)?;
    let model_args =
        super::ModelArgs { model: target.to_string(), device: a.device.clone(), dtype: a.dtype.clone() };
    let opts = model_args.load_options()?;
    // prompts and judge first: bad eval input fails before the model is loaded
    let evaluator = Evaluator::new(&cfg, &opts)?;
    let (loaded, name) = load_target(target, &opts)?;
    let tok = loaded.tokenizer()?;
    let out = a.out.clone().unwrap_or_else(|| {
        let stem = Path::new(target.trim_end_matches('/'))
            .file_name()
            .map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned());
        PathBuf::from("eval").join(stem)
    });
    eprintln!(
        "eval: {} prompts, judge {}, {} new tokens at most, batches of {}",
        evaluator.prompts.len(),
        evaluator.judge.name(),
        cfg.max_new_tokens,
        cfg.batch_size
    );
    let bar = indicatif::ProgressBar::new(evaluator.prompts.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} answers  ETA {eta}").expect("template"),
    );
    let record =
        evaluator.run(&loaded.model, tok, &name, &out, "eval", |done, _| bar.set_position(done as u64))?;
    bar.finish_and_clear();
    eprintln!("{}", record.one_line());
    eprintln!(
        "generated {} tokens in {:.1} s ({:.1} tokens/s); {} answers hit max_new_tokens; judged in {:.1} s",
        record.generated_tokens,
        record.generation_s,
        record.tokens_per_s,
        record.truncated_answers,
        record.judge_s
    );
    let records = report::append(&out, record)?;
    print!("{}", report::report_md(&records[records.len() - 1..]));
    eprintln!("answers, summary.json and report.md: {}", out.display());
    Ok(())
}
