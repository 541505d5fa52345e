//! The KV cache: decoding token by token gives the logits a full forward pass gives.

mod common;

use candle_core::IndexOp;
use candor::model::{KvCache, TokenBatch};
use common::*;

#[test]
fn cached_decoding_equals_full_forward() {
    for family in ["llama", "qwen2", "qwen3"] {
        let loaded = tiny_with_adapter(family);
        let m = &loaded.model;
        // 75 positions: the cache's buffers start at 64 positions and must grow once
        let ids: Vec<u32> = (0..75).map(|i| (i * 37 + 5) % 250).collect();
        let full = m.logits(&m.hidden_states(&TokenBatch::single(&ids), None, false).unwrap()).unwrap();
        for mut cache in
            [KvCache::new(m.config.num_hidden_layers), KvCache::with_capacity(m.config.num_hidden_layers, 75)]
        {
            let prefill = 4;
            let h = m.hidden_states(&TokenBatch::single(&ids[..prefill]), Some(&mut cache), false).unwrap();
            let mut steps = vec![m.logits(&h).unwrap().i(0).unwrap()];
            for (pos, &id) in ids.iter().enumerate().skip(prefill) {
                let mut b = TokenBatch::single(&[id]);
                b.position_ids = vec![pos as u32];
                steps.push(
                    m.logits(&m.hidden_states(&b, Some(&mut cache), false).unwrap()).unwrap().i(0).unwrap(),
                );
            }
            assert_eq!(cache.len(), ids.len());
            let cached = candle_core::Tensor::cat(&steps, 0).unwrap();
            let err = rel_err(&cached, &full.i(0).unwrap());
            assert!(err < 1e-5, "{family}: cached vs full relative error {err}");
        }
    }
}

#[test]
fn batched_generation_equals_one_prompt_at_a_time() {
    use candor::eval::generate::{generate, generate_batch, SamplingOptions};
    for family in ["llama", "qwen2", "qwen3"] {
        let loaded = tiny_with_adapter(family);
        let m = &loaded.model;
        // different lengths: left padding of up to 6 tokens
        let prompts: Vec<Vec<u32>> =
            vec![vec![5, 17, 42, 99, 3, 250, 7, 8], vec![12, 4], vec![200, 201, 9, 77, 1], vec![64, 2, 2]];
        for opts in [
            SamplingOptions { max_new_tokens: 12, ..Default::default() },
            SamplingOptions { max_new_tokens: 12, temperature: 0.8, top_p: 0.9, seed: 7 },
        ] {
            let free: Vec<_> =
                prompts.iter().map(|p| generate(m, p, &[], &opts, |_| Ok(())).unwrap()).collect();
            // a stop id that ends the first prompt early, so rows leave the batch at different steps
            let stop = free[0].tokens[3];
            let single: Vec<_> =
                prompts.iter().map(|p| generate(m, p, &[stop], &opts, |_| Ok(())).unwrap()).collect();
            let mut streamed = vec![Vec::new(); prompts.len()];
            let batched = generate_batch(m, &prompts, &[stop], &opts, |row, id| {
                streamed[row].push(id);
                Ok(())
            })
            .unwrap();
            assert!(
                single[0].stopped && single[0].tokens.len() <= 3,
                "{family}: first row did not stop early"
            );
            for (i, (s, b)) in single.iter().zip(&batched).enumerate() {
                assert_eq!(s.tokens, b.tokens, "{family} row {i} (temperature {})", opts.temperature);
                assert_eq!(s.stopped, b.stopped, "{family} row {i}");
                assert_eq!(streamed[i], b.tokens);
            }
        }
    }
}
