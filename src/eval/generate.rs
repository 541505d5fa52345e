//! Token generation with a KV cache: the prompt is read once, then each step feeds one token.

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::model::{KvCache, TokenBatch, Transformer};

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
    let mut cache = KvCache::new(model.config.num_hidden_layers);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(opts.seed);
    let mut tokens = Vec::new();
    let start = std::time::Instant::now();
    let hidden = model.hidden_states(&TokenBatch::single(prompt), Some(&mut cache), false)?;
    let mut logits = model.last_logits(&hidden)?;
    let prefill_s = start.elapsed().as_secs_f64();
    let decode_start = std::time::Instant::now();
    let mut stopped = false;
    for step in 0..opts.max_new_tokens {
        let next = sample(&logits.squeeze(0)?, opts, &mut rng)?;
        if stop_ids.contains(&next) {
            stopped = true;
            break;
        }
        tokens.push(next);
        on_token(next)?;
        if step + 1 == opts.max_new_tokens {
            break;
        }
        let mut batch = TokenBatch::single(&[next]);
        batch.position_ids = vec![(prompt.len() + step) as u32];
        let hidden = model.hidden_states(&batch, Some(&mut cache), false)?;
        logits = model.last_logits(&hidden)?;
    }
    Ok(Generation {
        tokens,
        stopped,
        prompt_tokens: prompt.len(),
        prefill_s,
        decode_s: decode_start.elapsed().as_secs_f64(),
    })
}

/// Picks the next token from `[vocab]` logits: argmax when temperature is 0, else top-p sampling.
pub fn sample(logits: &Tensor, opts: &SamplingOptions, rng: &mut impl Rng) -> Result<u32> {
    let logits: Vec<f32> = logits.to_dtype(DType::F32)?.to_vec1()?;
    if opts.temperature <= 0.0 {
        // first index of the maximum, as torch.argmax does
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return Ok(best as u32);
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
            return Ok(*i as u32);
        }
        u -= p;
    }
    Ok(probs.last().map_or(0, |p| p.0 as u32))
}
