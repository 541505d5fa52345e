//! Token generation with a KV cache: the prompts are read once, then each step feeds one token per row.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::{CandorError, Result};
use crate::model::{KvCache, TokenBatch, Transformer, IGNORE_INDEX};

#[derive(Debug, Clone)]
pub struct SamplingOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    /// Nucleus sampling threshold; 1.0 keeps the whole distribution.
    pub top_p: f64,
    pub seed: u64,
}

impl Default for SamplingOptions {
    fn default() -> Self {
        SamplingOptions { max_new_tokens: 256, temperature: 0.0, top_p: 1.0, seed: 0 }
    }
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub tokens: Vec<u32>,
    /// True when a stop token ended it (the stop token is not in `tokens`).
    pub stopped: bool,
    pub prompt_tokens: usize,
    pub prefill_s: f64,
    pub decode_s: f64,
}

impl Generation {
    pub fn tokens_per_s(&self) -> f64 {
        if self.decode_s > 0.0 {
            self.tokens.len() as f64 / self.decode_s
        } else {
            0.0
        }
    }
}

/// Generates a continuation of `prompt`, calling `on_token` with each new token as it is chosen.
pub fn generate(
    model: &Transformer,
    prompt: &[u32],
    stop_ids: &[u32],
    opts: &SamplingOptions,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    let mut out = generate_batch(model, &[prompt.to_vec()], stop_ids, opts, |_, id| on_token(id))?;
    Ok(out.remove(0))
}

/// Generates continuations of several prompts at once. The prompts are left-padded into one prefill;
/// then every live row gets one new token per step, reading the KV cache (padding stays masked), and a
/// row that stops leaves the batch, so finished rows cost nothing. Each row samples from its own RNG,
/// seeded from `opts.seed` and its prompt, so a row's output does not depend on its batch-mates.
/// `on_token(row, id)` sees every kept token as it is chosen.
pub fn generate_batch(
    model: &Transformer,
    prompts: &[Vec<u32>],
    stop_ids: &[u32],
    opts: &SamplingOptions,
    mut on_token: impl FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Generation>> {
    let _no_grad = crate::model::lora::no_grad();
    if prompts.iter().any(Vec::is_empty) {
        return Err(CandorError::msg("cannot generate from an empty prompt"));
    }
    let n = prompts.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut batch = TokenBatch {
        batch: n,
        seq_len: width,
        input_ids: Vec::with_capacity(n * width),
        position_ids: Vec::with_capacity(n * width),
        attention_mask: Vec::with_capacity(n * width),
        segment_ids: None,
        targets: vec![IGNORE_INDEX; n * width],
        past_mask: None,
    };
    for p in prompts {
        let pad = width - p.len();
        batch.input_ids.extend(std::iter::repeat_n(0, pad).chain(p.iter().copied()));
        batch.position_ids.extend(std::iter::repeat_n(0, pad).chain(0..p.len() as u32));
        batch.attention_mask.extend(std::iter::repeat_n(0, pad).chain(std::iter::repeat_n(1, p.len())));
    }
    let mut key_mask: Vec<Vec<u8>> = batch.attention_mask.chunks(width).map(<[u8]>::to_vec).collect();
    let mut rngs: Vec<_> = prompts.iter().map(|p| row_rng(opts.seed, p)).collect();
    let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut stopped = vec![false; n];
    let mut live: Vec<usize> = (0..n).collect();

    let mut cache = KvCache::with_capacity(model.config.num_hidden_layers, width + opts.max_new_tokens);
    let start = std::time::Instant::now();
    let hidden = model.hidden_states(&batch, Some(&mut cache), false)?;
    let mut logits = model.last_logits(&hidden)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let decode_start = std::time::Instant::now();
    while !live.is_empty() && opts.max_new_tokens > 0 {
        let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
        let mut keep = Vec::with_capacity(live.len());
        let mut next_ids = Vec::with_capacity(live.len());
        for (slot, &row) in live.iter().enumerate() {
            let next = sample_logits(&rows[slot], opts, &mut rngs[row]);
            if stop_ids.contains(&next) {
                stopped[row] = true;
                continue;
            }
            tokens[row].push(next);
            on_token(row, next)?;
            if tokens[row].len() < opts.max_new_tokens {
                keep.push(slot);
                next_ids.push(next);
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < live.len() {
            let slots: Vec<u32> = keep.iter().map(|&s| s as u32).collect();
            cache.select_rows(&slots)?;
            live = keep.iter().map(|&s| live[s]).collect();
            key_mask = keep.iter().map(|&s| std::mem::take(&mut key_mask[s])).collect();
        }
        let m = live.len();
        let step = TokenBatch {
            batch: m,
            seq_len: 1,
            input_ids: next_ids,
            position_ids: live.iter().map(|&r| (prompts[r].len() + tokens[r].len() - 1) as u32).collect(),
            attention_mask: vec![1; m],
            segment_ids: None,
            targets: vec![IGNORE_INDEX; m],
            past_mask: Some(key_mask.concat()),
        };
        key_mask.iter_mut().for_each(|k| k.push(1));
        let hidden = model.hidden_states(&step, Some(&mut cache), false)?;
        logits = model.last_logits(&hidden)?;
    }
    let decode_s = decode_start.elapsed().as_secs_f64();
    Ok(tokens
        .into_iter()
        .zip(stopped)
        .zip(prompts)
        .map(|((tokens, stopped), p)| Generation {
            tokens,
            stopped,
            prompt_tokens: p.len(),
            prefill_s,
            decode_s,
        })
        .collect())
}

fn row_rng(seed: u64, prompt: &[u32]) -> rand_chacha::ChaCha8Rng {
    // FNV-1a over the prompt: the same prompt samples the same way in any batch
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &t in prompt {
        for b in t.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ h)
}

/// Picks the next token from `[vocab]` logits: argmax when temperature is 0, else top-p sampling.
pub fn sample(logits: &Tensor, opts: &SamplingOptions, rng: &mut impl Rng) -> Result<u32> {
    let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    Ok(sample_logits(&logits, opts, rng))
}

/// [`sample`] on host logits.
pub fn sample_logits(logits: &[f32], opts: &SamplingOptions, rng: &mut impl Rng) -> u32 {
    if opts.temperature <= 0.0 {
        // first index of the maximum, as torch.argmax does
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f64)> =
        logits.iter().enumerate().map(|(i, &l)| (i, (((l - max) as f64) / opts.temperature).exp())).collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= total);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        kept += p.1;
        if kept >= opts.top_p {
            cut = i + 1;
            break;
        }
    }
    probs.truncate(cut);
    let mut u = rng.random::<f64>() * kept;
    for (i, p) in &probs {
        if u < *p {
            return *i as u32;
        }
        u -= p;
    }
    probs.last().map_or(0, |p| p.0 as u32)
}
