//! A training set from several sources (paths, globs, `hf://datasets/…`), mixed by weight and cap.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use super::falsereject::{read_rows, rows_to_examples, ConversationOptions, Example, OnBadRow, SkipReport};
use crate::error::{CandorError, Result};
use crate::hub::HubOptions;

/// One data source of a recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// A file, a glob (`data/*.jsonl`), or `hf://datasets/ORG/NAME/FILE`.
    pub path: String,
    /// Sampling multiplier: 2.0 uses every row twice, 0.5 a seeded half. Default 1.0.
    #[serde(default)]
    pub weight: Option<f64>,
    /// At most this many rows from the source (after weighting).
    #[serde(default)]
    pub max_rows: Option<usize>,
}

impl SourceSpec {
    pub fn path(path: &str) -> Self {
        SourceSpec { path: path.into(), weight: None, max_rows: None }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DatasetReport {
    /// Per source: (spec, usable rows read, rows used after weight and cap).
    pub sources: Vec<(String, usize, usize)>,
    pub skipped: SkipReport,
}

/// Reads every source, converts rows to conversations, and mixes them. The result is in source order;
/// batching shuffles it.
pub fn load_examples(
    sources: &[SourceSpec],
    conv: &ConversationOptions,
    on_bad_row: OnBadRow,
    hub: &HubOptions,
    seed: u64,
) -> Result<(Vec<Example>, DatasetReport)> {
    if sources.is_empty() {
        return Err(CandorError::msg("data.sources is empty"));
    }
    let mut report = DatasetReport::default();
    let mut all = Vec::new();
    for (k, src) in sources.iter().enumerate() {
        let weight = src.weight.unwrap_or(1.0);
        if !(weight > 0.0 && weight.is_finite()) {
            return Err(CandorError::msg(format!("data.sources[{k}].weight must be positive, got {weight}")));
        }
        let mut examples = Vec::new();
        for file in super::falsereject::resolve_source(&src.path, hub)? {
            examples.extend(rows_to_examples(read_rows(&file)?, conv, on_bad_row, &mut report.skipped)?);
        }
        let read = examples.len();
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ (k as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d));
        examples.shuffle(&mut rng);
        let mut want = (read as f64 * weight).round() as usize;
        if let Some(cap) = src.max_rows {
            want = want.min(cap);
        }
        let used: Vec<Example> =
            examples.iter().cycle().take(if read == 0 { 0 } else { want }).cloned().collect();
        report.sources.push((src.path.clone(), read, used.len()));
        all.extend(used);
    }
    if all.is_empty() {
        return Err(CandorError::msg("no usable rows in any data source"));
    }
    Ok((all, report))
}
