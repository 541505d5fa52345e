//! What one forward pass reads: token ids, per-token positions, which tokens are real, which document
//! each token belongs to (packing), and the next-token targets that carry loss.

use candle_core::{Device, Tensor};

use crate::error::{CandorError, Result};

/// Targets with this value carry no loss (the Hugging Face convention).
pub const IGNORE_INDEX: i64 = -100;

/// A host-side batch of `batch × seq_len` tokens, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    pub batch: usize,
    pub seq_len: usize,
    pub input_ids: Vec<u32>,
    /// Position of each token inside its own document (restarts at 0 for each packed document).
    pub position_ids: Vec<u32>,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Vec<u8>,
    /// Document index of each token inside its row; tokens attend only within their document.
    /// `None` means one document per row.
    pub segment_ids: Option<Vec<u32>>,
    /// `targets[t]` is the token the model should predict after reading `input_ids[..=t]`, or
    /// [`IGNORE_INDEX`]. Already shifted: no shifting happens inside the model.
    pub targets: Vec<i64>,
    /// Which cached keys (`[batch × past_len]`, 1 = real) the batch may attend to when it continues a
    /// KV cache: left-padded batched generation. `None` means every cached key is real.
    pub past_mask: Option<Vec<u8>>,
}

impl TokenBatch {
    /// A batch from Hugging Face-style rows: `labels` unshifted (label t is token t), as PEFT and
    /// transformers take them; positions count from 0 per row.
    pub fn from_hf(
        input_ids: Vec<Vec<u32>>,
        attention_mask: Vec<Vec<u8>>,
        labels: Vec<Vec<i64>>,
    ) -> Result<Self> {
        let batch = input_ids.len();
        let seq_len = input_ids.first().map_or(0, Vec::len);
        if input_ids.iter().any(|r| r.len() != seq_len)
            || attention_mask.len() != batch
            || labels.len() != batch
            || attention_mask.iter().any(|r| r.len() != seq_len)
            || labels.iter().any(|r| r.len() != seq_len)
        {
            return Err(CandorError::msg("batch rows have different lengths"));
        }
        let mut targets = Vec::with_capacity(batch * seq_len);
        for row in &labels {
            targets.extend(row.iter().skip(1).copied());
            targets.push(IGNORE_INDEX);
        }
        Ok(TokenBatch {
            batch,
            seq_len,
            input_ids: input_ids.concat(),
            position_ids: (0..batch).flat_map(|_| 0..seq_len as u32).collect(),
            attention_mask: attention_mask.concat(),
            segment_ids: None,
            targets,
            past_mask: None,
        })
    }

    /// One unpadded sequence (generation prefill, parity checks).
    pub fn single(ids: &[u32]) -> Self {
        TokenBatch {
            batch: 1,
            seq_len: ids.len(),
            input_ids: ids.to_vec(),
            position_ids: (0..ids.len() as u32).collect(),
            attention_mask: vec![1; ids.len()],
            segment_ids: None,
            targets: vec![IGNORE_INDEX; ids.len()],
            past_mask: None,
        }
    }

    pub fn num_target_tokens(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }

    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.input_ids, (self.batch, self.seq_len), device)?)
    }

    pub fn positions_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.position_ids, (self.batch, self.seq_len), device)?)
    }

    /// Additive attention bias `[batch, 1, seq_len, past_len + seq_len]` (0 or a large negative), for
    /// causal attention within each document and never onto padding. `None` when nothing is masked
    /// (a single query token with no padding).
    pub fn attention_bias(&self, past_len: usize, device: &Device) -> Result<Option<Tensor>> {
        let (b, t) = (self.batch, self.seq_len);
        let keys = past_len + t;
        let past_mask = match &self.past_mask {
            Some(m) if m.len() != b * past_len => {
                return Err(CandorError::msg(format!(
                    "past mask has {} entries for {b} rows of {past_len} cached keys",
                    m.len()
                )))
            }
            Some(m) => Some(m.as_slice()),
            None => None,
        };
        let no_padding = self.attention_mask.iter().all(|&m| m == 1)
            && past_mask.is_none_or(|m| m.iter().all(|&v| v == 1));
        if t == 1 && no_padding && self.segment_ids.is_none() {
            return Ok(None);
        }
        if past_len > 0 && self.segment_ids.is_some() {
            return Err(CandorError::msg("packed batches cannot be continued from a KV cache"));
        }
        let mut bias = vec![0f32; b * t * keys];
        for row in 0..b {
            let valid = &self.attention_mask[row * t..(row + 1) * t];
            let seg = self.segment_ids.as_ref().map(|s| &s[row * t..(row + 1) * t]);
            for q in 0..t {
                let out = &mut bias[(row * t + q) * keys..(row * t + q + 1) * keys];
                for (k, o) in out.iter_mut().enumerate() {
                    // cached keys (k < past_len) are earlier in the same document; real unless masked
                    let allowed = if k < past_len {
                        past_mask.is_none_or(|m| m[row * past_len + k] == 1)
                    } else {
                        let kk = k - past_len;
                        kk <= q && valid[kk] == 1 && seg.is_none_or(|s| s[kk] == s[q])
                    };
                    if !allowed {
                        *o = f32::MIN;
                    }
                }
            }
        }
        Ok(Some(Tensor::from_vec(bias, (b, 1, t, keys), device)?))
    }
}
