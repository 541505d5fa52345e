//! `candor judge FILE.jsonl`: classify given answers, so a judge can be audited against human labels.

use std::io::Write;
use std::path::PathBuf;

use crate::eval::evaluate::{make_judge, strip_thinking};
use crate::eval::judge::Verdict;

#[derive(Debug, clap::Args)]
pub struct JudgeArgs {
    /// JSONL rows with "prompt" and "response"; an optional "label" (full_compliance, partial or
    /// refusal) turns on accuracy and the confusion matrix.
    pub file: PathBuf,
    /// rules, model or http.
    #[arg(long, default_value = "rules")]
    pub judge: String,
    /// The judge model for --judge model (directory, .gguf or hub id).
    #[arg(long)]
    pub judge_model: Option<String>,
    /// Other eval settings, e.g. --set http.base_url=http://127.0.0.1:8000/v1 --set http.model=NAME.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Write the classified rows here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu or cuda (for --judge model).
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

fn class_name(v: Option<Verdict>) -> &'static str {
    v.map_or("unparsable", Verdict::as_str)
}

pub fn run(a: JudgeArgs) -> anyhow::Result<()> {
    let mut overrides = vec![format!("judge={}", a.judge)];
    if let Some(m) = &a.judge_model {
        overrides.push(format!("judge_model={}", toml::Value::String(m.clone())));
    }
    overrides.extend(a.set.iter().cloned());
    let cfg = super::eval::eval_settings(None, &overrides, false)?;
    cfg.validate_judge().map_err(|e| anyhow::anyhow!(e))?;
    let mut opts = crate::model::LoadOptions::cpu();
    opts.device = super::parse_device(&a.device)?;
    let judge = make_judge(&cfg, &opts)?;

    let rows = crate::data::falsereject::read_rows(&a.file)?;
    let mut items = Vec::with_capacity(rows.len());
    let mut labels = Vec::with_capacity(rows.len());
    for row in &rows {
        let field = |name: &str| match row.value.get(name) {
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => anyhow::bail!("{}: field \"{name}\" must be a string", row.origin),
            None => anyhow::bail!("{}: missing field \"{name}\"", row.origin),
        };
        let (prompt, response) = (field("prompt")?, field("response")?);
        items.push((prompt, strip_thinking(&response).to_string()));
        labels.push(match row.value.get("label") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(Verdict::parse_label(s).ok_or_else(|| {
                anyhow::anyhow!("{}: label \"{s}\" is not full_compliance, partial or refusal", row.origin)
            })?),
            Some(_) => anyhow::bail!("{}: field \"label\" must be a string", row.origin),
        });
    }
    let judgements = judge.judge(&items)?;

    let mut out: Box<dyn Write> = match &a.out {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| anyhow::anyhow!("{}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    for (row, j) in rows.iter().zip(&judgements) {
        let mut v = row.value.clone();
        v["class"] = serde_json::Value::String(class_name(j.verdict).into());
        v["rationale"] = serde_json::Value::String(j.rationale.clone());
        writeln!(out, "{}", serde_json::to_string(&v)?)?;
    }
    out.flush()?;

    let unparsable = judgements.iter().filter(|j| j.verdict.is_none()).count();
    eprintln!("judged {} answers with {} ({unparsable} unparsable)", rows.len(), judge.name());
    let labelled: Vec<(Verdict, Option<Verdict>)> =
        labels.iter().zip(&judgements).filter_map(|(l, j)| l.map(|l| (l, j.verdict))).collect();
    if !labelled.is_empty() {
        let right = labelled.iter().filter(|(l, v)| Some(*l) == *v).count();
        let acc = crate::eval::metrics::Rate::new(right, labelled.len());
        eprintln!("accuracy against the labels: {}", acc.display());
        eprintln!("confusion (rows: label, columns: judge)");
        eprintln!(
            "{:>16} {:>16} {:>8} {:>8} {:>11}",
            "", "full_compliance", "partial", "refusal", "unparsable"
        );
        for l in Verdict::ALL {
            let count = |v: Option<Verdict>| labelled.iter().filter(|(x, y)| *x == l && *y == v).count();
            eprintln!(
                "{:>16} {:>16} {:>8} {:>8} {:>11}",
                class_name(Some(l)),
                count(Some(Verdict::FullCompliance)),
                count(Some(Verdict::Partial)),
                count(Some(Verdict::Refusal)),
                count(None)
            );
        }
    }
    Ok(())
}
