//! Conversations → token ids with a per-token "trained" flag → padded or packed batches, in a seeded
//! order that a resumed run can reproduce exactly.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::falsereject::{Example, OnBadRow, SkipReport};
use crate::error::{CandorError, Result};
use crate::model::tokenizer::ChatTokenizer;
use crate::model::{TokenBatch, IGNORE_INDEX};

/// What to do with an example longer than the maximum sequence length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Leave the example out (counted in the report).
    #[default]
    Drop,
    /// Keep the first `max_seq_len` tokens (counted in the report).
    Right,
}

/// One tokenized conversation. `trained[t]` says whether token `t` is a target (an assistant token the
/// model must predict from the tokens before it).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedExample {
    pub input_ids: Vec<u32>,
    pub trained: Vec<bool>,
    pub category: Option<String>,
    pub origin: String,
    pub truncated: bool,
}

impl TokenizedExample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn num_trained(&self) -> usize {
        self.trained.iter().filter(|&&t| t).count()
    }

    /// Next-token targets within this example: `targets[t] = ids[t+1]` where token t+1 is trained.
    pub fn targets(&self) -> impl Iterator<Item = i64> + '_ {
        (0..self.len()).map(|t| match self.trained.get(t + 1) {
            Some(true) => self.input_ids[t + 1] as i64,
            _ => IGNORE_INDEX,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct TokenizeReport {
    pub examples_in: usize,
    pub kept: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    /// Examples left with no trained token (after truncation), skipped.
    pub skipped: SkipReport,
}

#[derive(Debug, Clone)]
pub struct TokenizeOptions {
    pub max_seq_len: usize,
    pub truncation: Truncation,
    pub on_bad_row: OnBadRow,
    /// Extra template variables (`enable_thinking`, …).
    pub template_vars: serde_json::Value,
}

/// Renders and tokenizes every example in parallel, marking the assistant tokens.
pub fn tokenize_examples(
    examples: &[Example],
    tok: &ChatTokenizer,
    opts: &TokenizeOptions,
) -> Result<(Vec<TokenizedExample>, TokenizeReport)> {
    let template = tok.template()?;
    // Byte-level post-processors trim whitespace out of token offsets, which would hide tokens like the
    // " " before a digit. With add_special_tokens = false the post-processor adds no ids, so dropping it
    // changes only the offsets, which become exact.
    let mut tokenizer = tok.tokenizer.clone();
    tokenizer.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
    let results: Vec<Result<TokenizedExample>> = examples
        .par_iter()
        .map(|ex| {
            let (text, spans) = template
                .render_with_assistant_spans(&ex.messages, &opts.template_vars)
                .map_err(|e| CandorError::msg(format!("{}: {e}", ex.origin)))?;
            let enc = tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| CandorError::msg(format!("{}: tokenizing failed: {e}", ex.origin)))?;
            let trained = enc
                .get_offsets()
                .iter()
                .map(|&(start, _)| spans.iter().any(|s| s.contains(&start)))
                .collect();
            Ok(TokenizedExample {
                input_ids: enc.get_ids().to_vec(),
                trained,
                category: ex.category.clone(),
                origin: ex.origin.clone(),
                truncated: false,
            })
        })
        .collect();

    let mut report = TokenizeReport { examples_in: examples.len(), ..Default::default() };
    let mut out = Vec::with_capacity(examples.len());
    for r in results {
        let mut ex = r?;
        if ex.len() > opts.max_seq_len {
            match opts.truncation {
                Truncation::Drop => {
                    report.dropped_too_long += 1;
                    continue;
                }
                Truncation::Right => {
                    ex.input_ids.truncate(opts.max_seq_len);
                    ex.trained.truncate(opts.max_seq_len);
                    ex.truncated = true;
                    report.truncated += 1;
                }
            }
        }
        if ex.num_trained() == 0 {
            let why = format!(
                "{}: no assistant token left to train on{}",
                ex.origin,
                if ex.truncated { " after truncation" } else { "" }
            );
            match opts.on_bad_row {
                OnBadRow::Skip => {
                    report.skipped.add(why);
                    continue;
                }
                OnBadRow::Error => return Err(CandorError::msg(why)),
            }
        }
        out.push(ex);
    }
    report.kept = out.len();
    Ok((out, report))
}

/// How examples become rows of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchMode {
    /// One example per row, padded to the longest row of the batch; batches are bucketed by length.
    Padded,
    /// Several examples per row of exactly `seq_len` tokens, attending only within themselves.
    Packed,
}

/// Where a run is in its data: the trainer saves it with each checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: usize,
    /// Batches of this epoch already consumed.
    pub batch_in_epoch: usize,
}

/// A fixed plan of batches per epoch, derived only from the seed and the epoch number.
pub struct Batcher {
    examples: Vec<TokenizedExample>,
    pub mode: BatchMode,
    /// Rows per batch.
    pub batch_size: usize,
    /// Row length for packing; the upper bound for padded rows.
    pub seq_len: usize,
    pub seed: u64,
    pub pad_id: u32,
}

/// Padded batches are sorted by length inside windows of this many batches.
const BUCKET_WINDOW_BATCHES: usize = 50;

impl Batcher {
    pub fn new(
        examples: Vec<TokenizedExample>,
        mode: BatchMode,
        batch_size: usize,
        seq_len: usize,
        seed: u64,
        pad_id: u32,
    ) -> Result<Self> {
        if examples.is_empty() {
            return Err(CandorError::msg("no examples to batch"));
        }
        if batch_size == 0 || seq_len == 0 {
            return Err(CandorError::msg("batch size and sequence length must be positive"));
        }
        if let Some(long) = examples.iter().find(|e| e.len() > seq_len) {
            return Err(CandorError::msg(format!(
                "{}: {} tokens, longer than the sequence length {seq_len}",
                long.origin,
                long.len()
            )));
        }
        Ok(Batcher { examples, mode, batch_size, seq_len, seed, pad_id })
    }

    pub fn examples(&self) -> &[TokenizedExample] {
        &self.examples
    }

    fn rng(&self, epoch: usize) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(self.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch as u64)
    }

    /// The batches of one epoch: each batch is a list of rows, each row a list of example indices.
    pub fn epoch_plan(&self, epoch: usize) -> Vec<Vec<Vec<usize>>> {
        let mut rng = self.rng(epoch);
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        order.shuffle(&mut rng);
        match self.mode {
            BatchMode::Padded => {
                let mut batches: Vec<Vec<Vec<usize>>> = Vec::new();
                for window in order.chunks(self.batch_size * BUCKET_WINDOW_BATCHES) {
                    let mut w = window.to_vec();
                    w.sort_by_key(|&i| self.examples[i].len());
                    batches.extend(w.chunks(self.batch_size).map(|b| b.iter().map(|&i| vec![i]).collect()));
                }
                batches.shuffle(&mut rng);
                batches
            }
            BatchMode::Packed => {
                // First fit over the shuffled order, looking back at a bounded number of open rows.
                const OPEN_ROWS: usize = 64;
                let mut rows: Vec<(usize, Vec<usize>)> = Vec::new();
                let mut first_open = 0;
                for i in order {
                    let len = self.examples[i].len();
                    let slot = rows[first_open..].iter().position(|(used, _)| used + len <= self.seq_len);
                    match slot {
                        Some(k) => {
                            let row = &mut rows[first_open + k];
                            row.0 += len;
                            row.1.push(i);
                        }
                        None => rows.push((len, vec![i])),
                    }
                    first_open = rows.len().saturating_sub(OPEN_ROWS);
                }
                let rows: Vec<Vec<usize>> = rows.into_iter().map(|(_, r)| r).collect();
                rows.chunks(self.batch_size).map(<[Vec<usize>]>::to_vec).collect()
            }
        }
    }

    /// Builds the batch for one plan entry.
    pub fn batch(&self, rows: &[Vec<usize>]) -> TokenBatch {
        let seq_len = match self.mode {
            BatchMode::Packed => self.seq_len,
            BatchMode::Padded => rows
                .iter()
                .map(|r| r.iter().map(|&i| self.examples[i].len()).sum::<usize>())
                .max()
                .unwrap_or(0),
        };
        let n = rows.len() * seq_len;
        let mut b = TokenBatch {
            batch: rows.len(),
            seq_len,
            input_ids: Vec::with_capacity(n),
            position_ids: Vec::with_capacity(n),
            attention_mask: Vec::with_capacity(n),
            segment_ids: (self.mode == BatchMode::Packed).then(|| Vec::with_capacity(n)),
            targets: Vec::with_capacity(n),
            past_mask: None,
        };
        for row in rows {
            let mut used = 0;
            for (doc, &i) in row.iter().enumerate() {
                let ex = &self.examples[i];
                b.input_ids.extend(&ex.input_ids);
                b.position_ids.extend(0..ex.len() as u32);
                b.attention_mask.extend(std::iter::repeat_n(1u8, ex.len()));
                if let Some(s) = &mut b.segment_ids {
                    s.extend(std::iter::repeat_n(doc as u32 + 1, ex.len()));
                }
                b.targets.extend(ex.targets());
                used += ex.len();
            }
            let pad = seq_len - used;
            b.input_ids.extend(std::iter::repeat_n(self.pad_id, pad));
            b.position_ids.extend(0..pad as u32);
            b.attention_mask.extend(std::iter::repeat_n(0u8, pad));
            if let Some(s) = &mut b.segment_ids {
                s.extend(std::iter::repeat_n(0, pad));
            }
            b.targets.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        }
        b
    }

    /// The batches from `cursor` to the end of its epoch, with the cursor after each.
    pub fn iter_from(&self, cursor: DataCursor) -> impl Iterator<Item = (DataCursor, TokenBatch)> + '_ {
        let plan = self.epoch_plan(cursor.epoch);
        (cursor.batch_in_epoch..plan.len()).map(move |k| {
            let next = DataCursor { epoch: cursor.epoch, batch_in_epoch: k + 1 };
            (next, self.batch(&plan[k]))
        })
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.epoch_plan(0).len()
    }
}
