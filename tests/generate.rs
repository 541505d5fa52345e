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
        let ids: Vec<u32> = vec![5, 17, 42, 99, 3, 250, 7, 8, 120];
        let full = m.logits(&m.hidden_states(&TokenBatch::single(&ids), None, false).unwrap()).unwrap();

        let mut cache = KvCache::new(m.config.num_hidden_layers);
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
