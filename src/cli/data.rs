//! `candor data inspect|stats`: what the model will actually be trained on.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use crate::data::batch::{tokenize_examples, TokenizeOptions, TokenizeReport, TokenizedExample, Truncation};
use crate::data::dataset::{load_examples, SourceSpec};
use crate::data::falsereject::{ConversationOptions, OnBadRow, Variant};
use crate::hub::HubOptions;
use crate::model::load_tokenizer;
use crate::model::tokenizer::ChatTokenizer;

#[derive(Debug, clap::Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DataCommand {
    /// Print rendered examples with the trained tokens highlighted.
    Inspect(InspectArgs),
    /// Rows per category, token lengths, truncation and the share of tokens that carry loss.
    Stats(DataOptions),
}

#[derive(Debug, clap::Args)]
pub struct DataOptions {
    /// Data files: paths, globs or hf://datasets/ORG/NAME/FILE (several are mixed).
    #[arg(required = true)]
    pub data: Vec<String>,
    /// The model whose tokenizer and chat template to use.
    #[arg(long)]
    pub model: String,
    /// standard (instruct_response) or reasoning (cot_response).
    #[arg(long, default_value = "standard")]
    pub variant: String,
    /// A system message added to every conversation.
    #[arg(long)]
    pub system: Option<String>,
    #[arg(long, default_value_t = 2048)]
    pub max_seq_len: usize,
    /// drop or right: what to do with conversations longer than --max-seq-len.
    #[arg(long, default_value = "drop")]
    pub truncation: String,
    /// error or skip: what to do with a bad row.
    #[arg(long, default_value = "error")]
    pub on_bad_row: String,
}

#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub opts: DataOptions,
    /// Which example to show (in file order).
    #[arg(long, default_value_t = 0)]
    pub index: usize,
    /// How many examples to show.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
}

pub fn run(args: DataArgs) -> anyhow::Result<()> {
    match args.command {
        DataCommand::Inspect(a) => inspect(a),
        DataCommand::Stats(a) => stats(a),
    }
}

/// Loads, renders and tokenizes the data as training will.
pub fn prepare(
    o: &DataOptions,
) -> anyhow::Result<(ChatTokenizer, Vec<TokenizedExample>, TokenizeReport, crate::data::dataset::DatasetReport)>
{
    let hub = HubOptions::from_env();
    let tok = load_tokenizer(&o.model, &hub)?;
    let template = tok.template()?;
    let conv = ConversationOptions {
        variant: o.variant.parse::<Variant>()?,
        system_prompt: o.system.clone(),
        reasoning_field: template.supports_reasoning_content,
        ..ConversationOptions::default()
    };
    let on_bad_row = match o.on_bad_row.as_str() {
        "error" => OnBadRow::Error,
        "skip" => OnBadRow::Skip,
        other => anyhow::bail!("--on-bad-row: unknown \"{other}\" (error or skip)"),
    };
    let truncation = match o.truncation.as_str() {
        "drop" => Truncation::Drop,
        "right" => Truncation::Right,
        other => anyhow::bail!("--truncation: unknown \"{other}\" (drop or right)"),
    };
    let sources: Vec<SourceSpec> = o.data.iter().map(|p| SourceSpec::path(p)).collect();
    let (examples, data_report) = load_examples(&sources, &conv, on_bad_row, &hub, 0)?;
    let opts = TokenizeOptions {
        max_seq_len: o.max_seq_len,
        truncation,
        on_bad_row,
        template_vars: serde_json::Value::Null,
    };
    let (tokenized, report) = tokenize_examples(&examples, &tok, &opts)?;
    Ok((tok, tokenized, report, data_report))
}

fn inspect(a: InspectArgs) -> anyhow::Result<()> {
    let (tok, examples, _, _) = prepare(&a.opts)?;
    let colour = std::io::stdout().is_terminal();
    if a.index >= examples.len() {
        anyhow::bail!("--index {}: there are {} usable examples", a.index, examples.len());
    }
    for ex in examples.iter().skip(a.index).take(a.count) {
        println!(
            "── {} ({} tokens, {} trained{}) ──",
            ex.origin,
            ex.len(),
            ex.num_trained(),
            if ex.truncated { ", truncated" } else { "" }
        );
        let mut out = String::new();
        let mut start = 0;
        while start < ex.len() {
            let trained = ex.trained[start];
            let end = (start..ex.len()).find(|&t| ex.trained[t] != trained).unwrap_or(ex.len());
            let text = tok.decode(&ex.input_ids[start..end], false)?;
            match (trained, colour) {
                (false, _) => out.push_str(&text),
                (true, true) => out.push_str(&format!("\x1b[1;32m{text}\x1b[0m")),
                (true, false) => out.push_str(&format!("[[{text}]]")),
            }
            start = end;
        }
        println!("{out}");
    }
    if !colour {
        println!("(trained tokens are inside [[ ]])");
    }
    Ok(())
}

fn percentile(sorted: &[usize], p: f64) -> usize {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn stats(o: DataOptions) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let (_, examples, report, data_report) = prepare(&o)?;
    let secs = start.elapsed().as_secs_f64();
    for (src, read, used) in &data_report.sources {
        println!("source {src}: {read} rows read, {used} used");
    }
    if data_report.skipped.count > 0 {
        println!(
            "bad rows skipped: {} (first: {})",
            data_report.skipped.count,
            data_report.skipped.first.join("; ")
        );
    }
    let mut per_category: BTreeMap<String, usize> = BTreeMap::new();
    for ex in &examples {
        *per_category.entry(ex.category.clone().unwrap_or_else(|| "(none)".into())).or_default() += 1;
    }
    println!("rows per category:");
    for (cat, n) in &per_category {
        println!("  {n:>6}  {cat}");
    }
    let mut lengths: Vec<usize> = examples.iter().map(TokenizedExample::len).collect();
    lengths.sort_unstable();
    let total: usize = lengths.iter().sum();
    let trained: usize = examples.iter().map(TokenizedExample::num_trained).sum();
    println!(
        "tokens per example: p50 {}, p90 {}, p99 {}, max {} (limit {})",
        percentile(&lengths, 0.5),
        percentile(&lengths, 0.9),
        percentile(&lengths, 0.99),
        lengths.last().copied().unwrap_or(0),
        o.max_seq_len
    );
    println!(
        "examples: {} in, {} kept, {} truncated, {} dropped as too long, {} skipped with no trained token{}",
        report.examples_in,
        report.kept,
        report.truncated,
        report.dropped_too_long,
        report.skipped.count,
        if report.skipped.first.is_empty() {
            String::new()
        } else {
            format!(" ({})", report.skipped.first.join("; "))
        }
    );
    println!(
        "tokens: {total} in all, {trained} carry loss ({:.1}%)",
        100.0 * trained as f64 / total.max(1) as f64
    );
    println!("prepared in {secs:.2} s ({:.0} rows/s)", report.examples_in as f64 / secs);
    Ok(())
}
