//! The one decoder: Llama, SmolLM2, Qwen2/2.5 and Qwen3 differ only in `ModelConfig` flags.
//!
//! The same code trains (full sequences, padding and packing masks, per-token positions) and
//! generates (KV cache). Every op on the training path carries gradients and comes from
//! [`crate::ops`]: RMSNorm, RoPE and SwiGLU (CPU loops or CUDA kernels, each with its backward;
//! candle's own fused versions drop gradients), the LoRA projections (fused on the CPU; frozen base
//! weights get no gradient on any device), attention (fused on the CPU, composed from candle ops
//! elsewhere) and the chunked LM head + cross-entropy.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;

use super::config::ModelConfig;
use super::input::{TokenBatch, IGNORE_INDEX};
use super::lora::{init_rng, DropoutRng, LoraConfig, LoraLinear};
use crate::error::{CandorError, Result};
use crate::ops::{attention, frozen_linear, linear_cross_entropy_sum, rope, swiglu, Epilogue, RotaryTable};

#[derive(Debug)]
pub struct Attention {
    pub q_proj: LoraLinear,
    pub k_proj: LoraLinear,
    pub v_proj: LoraLinear,
    pub o_proj: LoraLinear,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

#[derive(Debug)]
pub struct Mlp {
    pub gate_proj: LoraLinear,
    pub up_proj: LoraLinear,
    pub down_proj: LoraLinear,
}

#[derive(Debug)]
pub struct Layer {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

/// Keys and values of the tokens seen so far, per layer, in buffers with room to grow:
/// `[batch, kv_heads, capacity, head_dim]`, of which the first `len` positions are filled. Each step
/// writes its new keys in place and attention reads a view of the filled part, so a step costs the
/// same at position 500 as at position 5 (concatenating copied the whole cache every step). The cache
/// holds plain tensors and carries no gradient: it is for generation.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions the first append reserves room for.
    reserve: usize,
}

#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// Appends `k, v: [b, kv_heads, t, d]` and returns views of every key and value so far.
    fn append(
        slot: &mut Option<LayerCache>,
        k: &Tensor,
        v: &Tensor,
        reserve: usize,
    ) -> Result<(Tensor, Tensor)> {
        let (b, nkv, t, d) = k.dims4()?;
        let len = slot.as_ref().map_or(0, |c| c.len);
        let capacity = slot.as_ref().map_or(0, |c| c.k.dim(2).unwrap_or(0));
        if len + t > capacity {
            // grow geometrically, so n appended tokens cost O(n) copying in all
            let capacity = (2 * capacity).max(len + t).max(reserve).max(64);
            let grown = |old: Option<&Tensor>| -> Result<Tensor> {
                let buf = Tensor::zeros((b, nkv, capacity, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    buf.slice_set(&old.narrow(2, 0, len)?.contiguous()?, 2, 0)?;
                }
                Ok(buf)
            };
            let (k_buf, v_buf) = (grown(slot.as_ref().map(|c| &c.k))?, grown(slot.as_ref().map(|c| &c.v))?);
            *slot = Some(LayerCache { k: k_buf, v: v_buf, len });
        }
        let c = slot.as_mut().expect("cache slot filled above");
        c.k.slice_set(&k.detach().contiguous()?, 2, len)?;
        c.v.slice_set(&v.detach().contiguous()?, 2, len)?;
        c.len = len + t;
        Ok((c.k.narrow(2, 0, c.len)?, c.v.narrow(2, 0, c.len)?))
    }
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        KvCache::with_capacity(num_layers, 0)
    }

    /// A cache that allocates room for `positions` keys at once (a generation's prompt plus its
    /// longest answer), so it never grows.
    pub fn with_capacity(num_layers: usize, positions: usize) -> Self {
        KvCache { layers: (0..num_layers).map(|_| None).collect(), reserve: positions }
    }

    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map_or(0, |c| c.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the given batch rows (in that order): drops finished sequences from a batched
    /// generation so they cost nothing more.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        for c in self.layers.iter_mut().flatten() {
            let idx = Tensor::new(rows, c.k.device())?;
            c.k = c.k.index_select(&idx, 0)?;
            c.v = c.v.index_select(&idx, 0)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Transformer {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `None` when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    pub lora: Option<LoraConfig>,
    inv_freq: Tensor,
    dropout_rng: Mutex<DropoutRng>,
}

/// Takes base weights by their Hugging Face names (`model.layers.0.self_attn.q_proj.weight`, …).
pub struct WeightMap {
    tensors: HashMap<String, Tensor>,
    source: String,
}

impl WeightMap {
    pub fn new(tensors: HashMap<String, Tensor>, source: impl Into<String>) -> Self {
        WeightMap { tensors, source: source.into() }
    }

    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self
            .tensors
            .remove(name)
            .ok_or_else(|| CandorError::msg(format!("{}: missing tensor {name}", self.source)))?;
        if t.dims() != shape {
            return Err(CandorError::msg(format!(
                "{}: tensor {name} has shape {:?} but config.json implies {:?}",
                self.source,
                t.dims(),
                shape
            )));
        }
        Ok(t)
    }

    fn take_opt(&mut self, name: &str, shape: &[usize], present: bool) -> Result<Option<Tensor>> {
        if present {
            self.take(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }
}

impl Transformer {
    /// Builds the model from base weights (already in the compute dtype, on the target device).
    pub fn new(config: ModelConfig, mut w: WeightMap, device: &Device) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let (q_out, kv_out) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let linear =
            |w: &mut WeightMap, name: String, out: usize, inp: usize, bias: bool| -> Result<LoraLinear> {
                let weight = w.take(&format!("{name}.weight"), &[out, inp])?;
                let b = w.take_opt(&format!("{name}.bias"), &[out], bias)?;
                Ok(LoraLinear::frozen(name, weight, b))
            };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let self_attn = Attention {
                q_proj: linear(&mut w, format!("{p}.self_attn.q_proj"), q_out, h, c.qkv_bias)?,
                k_proj: linear(&mut w, format!("{p}.self_attn.k_proj"), kv_out, h, c.qkv_bias)?,
                v_proj: linear(&mut w, format!("{p}.self_attn.v_proj"), kv_out, h, c.qkv_bias)?,
                o_proj: linear(&mut w, format!("{p}.self_attn.o_proj"), h, q_out, c.o_bias)?,
                q_norm: w.take_opt(&format!("{p}.self_attn.q_norm.weight"), &[hd], c.qk_norm)?,
                k_norm: w.take_opt(&format!("{p}.self_attn.k_norm.weight"), &[hd], c.qk_norm)?,
            };
            let mlp = Mlp {
                gate_proj: linear(&mut w, format!("{p}.mlp.gate_proj"), c.intermediate_size, h, c.mlp_bias)?,
                up_proj: linear(&mut w, format!("{p}.mlp.up_proj"), c.intermediate_size, h, c.mlp_bias)?,
                down_proj: linear(&mut w, format!("{p}.mlp.down_proj"), h, c.intermediate_size, c.mlp_bias)?,
            };
            layers.push(Layer {
                input_layernorm: w.take(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn,
                post_attention_layernorm: w.take(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp,
            });
        }
        let embed_tokens = w.take("model.embed_tokens.weight", &[c.vocab_size, h])?;
        let norm = w.take("model.norm.weight", &[h])?;
        let lm_head = if c.tie_word_embeddings {
            // Some tied checkpoints still carry a copy; it is the same matrix.
            w.tensors.remove("lm_head.weight");
            None
        } else {
            Some(w.take("lm_head.weight", &[c.vocab_size, h])?)
        };
        // Rotary buffers some exporters include.
        w.tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if let Some(extra) = w.tensors.keys().min() {
            return Err(CandorError::msg(format!(
                "{}: unexpected tensor {extra} ({} unused) — is config.json for this checkpoint?",
                w.source,
                w.tensors.len()
            )));
        }
        let inv_freq = Tensor::new(config.rope_inv_freq(), device)?;
        Ok(Transformer {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            lora: None,
            inv_freq,
            dropout_rng: Mutex::new(init_rng(0)),
        })
    }

    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// All linear layers, in a fixed order (layer by layer, q k v o gate up down).
    pub fn linears(&self) -> impl Iterator<Item = &LoraLinear> {
        self.layers.iter().flat_map(|l| {
            let a = &l.self_attn;
            let m = &l.mlp;
            [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
        })
    }

    fn linears_mut(&mut self) -> impl Iterator<Item = &mut LoraLinear> {
        self.layers.iter_mut().flat_map(|l| {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ]
        })
    }

    /// Attaches fresh LoRA adapters to the targeted projections. `seed` fixes A's initialisation and
    /// the dropout masks.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<()> {
        let targets = cfg.resolved_targets()?;
        let mut rng = init_rng(seed);
        for lin in self.linears_mut() {
            let module = lin.name.rsplit('.').next().unwrap_or_default().to_string();
            if targets.contains(&module) {
                lin.attach(cfg, &mut rng)?;
            }
        }
        *self.dropout_rng.lock().unwrap() = init_rng(seed ^ 0x9e37_79b9_7f4a_7c15);
        self.lora = Some(cfg.clone());
        Ok(())
    }

    /// The dropout RNG's position (seed, word position), saved with checkpoints for exact resume.
    pub fn dropout_rng_state(&self) -> ([u8; 32], u128) {
        let rng = self.dropout_rng.lock().unwrap();
        (rng.get_seed(), rng.get_word_pos())
    }

    pub fn set_dropout_rng_state(&self, seed: [u8; 32], word_pos: u128) {
        let mut rng = self.dropout_rng.lock().unwrap();
        *rng = rand_chacha::ChaCha8Rng::from_seed(seed);
        rng.set_word_pos(word_pos);
    }

    /// The trainable tensors, named as PEFT names them.
    pub fn lora_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for lin in self.linears() {
            if let Some(ad) = &lin.lora {
                out.push((super::lora::peft_tensor_name(&lin.name, 'A'), ad.a.clone()));
                out.push((super::lora::peft_tensor_name(&lin.name, 'B'), ad.b.clone()));
            }
        }
        out
    }

    pub fn num_lora_parameters(&self) -> usize {
        self.lora_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Hidden states after the last layer, before the final norm: `[batch, seq_len, hidden]`.
    /// `train` turns LoRA dropout on. With a cache, the batch continues the cached sequences.
    pub fn hidden_states(
        &self,
        batch: &TokenBatch,
        cache: Option<&mut KvCache>,
        train: bool,
    ) -> Result<Tensor> {
        let device = self.device();
        let past_len = cache.as_ref().map_or(0, |c| c.len());
        let ids = batch.ids_tensor(device)?;
        let bias = batch.attention_bias(past_len, device)?;
        let (table, positions) = self.rotary(batch)?;
        let mut x = self.embed_tokens.index_select(&ids.flatten_all()?, 0)?.reshape((
            batch.batch,
            batch.seq_len,
            self.config.hidden_size,
        ))?;
        let mut rng_guard = if train { Some(self.dropout_rng.lock().unwrap()) } else { None };
        let mut cache = cache;
        let reserve = cache.as_ref().map_or(0, |c| c.reserve);
        for (i, layer) in self.layers.iter().enumerate() {
            let layer_cache = cache.as_deref_mut().map(|c| (&mut c.layers[i], reserve));
            let rng = rng_guard.as_deref_mut();
            x = self.layer_forward(layer, &x, &table, &positions, bias.as_ref(), layer_cache, rng)?;
        }
        Ok(x)
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &Layer,
        x: &Tensor,
        table: &RotaryTable,
        positions: &Tensor,
        bias: Option<&Tensor>,
        cache: Option<(&mut Option<LayerCache>, usize)>,
        mut rng: Option<&mut DropoutRng>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let eps = c.rms_norm_eps;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let a = &layer.self_attn;

        let h = rms_norm(x, &layer.input_layernorm, eps)?;
        // q and k rotated in the projections' [b, t, heads, hd] layout, then viewed as [b, heads, t, hd]
        let rotated = |proj: &LoraLinear,
                       norm: Option<&Tensor>,
                       heads: usize,
                       rng: Option<&mut DropoutRng>|
         -> Result<Tensor> {
            Ok(match norm {
                // by the projection's own op, so its unrotated output never reaches the graph
                None => {
                    let then = Epilogue::Rotate { table, positions, head_dim: hd };
                    proj.forward_then(&h, then, rng)?.reshape((b, t, heads, hd))?
                }
                Some(w) => {
                    let y = proj.forward(&h, rng)?.reshape((b, t, heads, hd))?;
                    rope(&rms_norm(&y, w, eps)?, table, positions)?
                }
            })
        };
        let q = rotated(&a.q_proj, a.q_norm.as_ref(), nh, rng.as_deref_mut())?.transpose(1, 2)?;
        let k = rotated(&a.k_proj, a.k_norm.as_ref(), nkv, rng.as_deref_mut())?.transpose(1, 2)?;
        let v = a.v_proj.forward(&h, rng.as_deref_mut())?.reshape((b, t, nkv, hd))?.transpose(1, 2)?;
        let (k, v) = match cache {
            // detached inside: the cache must not keep the autograd graph of every earlier step alive
            // (through the LoRA variables), which made memory grow with the square of the length
            Some((slot, reserve)) => LayerCache::append(slot, &k, &v, reserve)?,
            None => (k, v),
        };
        let attn = attention(&q, &k, &v, bias)?; // [b, t, nh · hd]
        let x = a.o_proj.forward_then(&attn, Epilogue::Residual(x), rng.as_deref_mut())?;

        let h = rms_norm(&x, &layer.post_attention_layernorm, eps)?;
        let m = &layer.mlp;
        let gate = m.gate_proj.forward(&h, rng.as_deref_mut())?;
        let up = m.up_proj.forward(&h, rng.as_deref_mut())?;
        let act = swiglu(&gate, &up)?;
        m.down_proj.forward_then(&act, Epilogue::Residual(&x), rng)
    }

    /// The rotary table for positions `0..=max(position_ids)` (f32, shared by every layer of this
    /// forward pass) and the positions `[batch, seq_len]` (u32).
    fn rotary(&self, batch: &TokenBatch) -> Result<(RotaryTable, Tensor)> {
        let len = batch.position_ids.iter().max().map_or(1, |&p| p as usize + 1);
        let table = RotaryTable::new(&self.inv_freq, len)?;
        Ok((table, batch.positions_tensor(self.device())?))
    }

    fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Logits for every position: `[batch, seq_len, vocab]` in f32. For training use [`Self::loss_sum`],
    /// which only computes the rows that carry loss.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let h = rms_norm(hidden, &self.norm, self.config.rms_norm_eps)?;
        Ok(frozen_linear(&h, self.lm_head_weight(), None)?.to_dtype(DType::F32)?)
    }

    /// Logits of the last position of each row: `[batch, vocab]` (generation).
    pub fn last_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let t = hidden.dim(1)?;
        self.logits(&hidden.narrow(1, t - 1, 1)?)?.squeeze(1).map_err(Into::into)
    }

    /// Sum of next-token cross-entropy over the positions whose target is not [`IGNORE_INDEX`], and how
    /// many there were. The LM head runs only on those positions. Divide by the token count of the
    /// whole optimizer step to get the mean the trainer optimises.
    pub fn loss_sum(&self, hidden: &Tensor, targets: &[i64]) -> Result<(Tensor, usize)> {
        let hidden_size = self.config.hidden_size;
        let flat = hidden.reshape(((), hidden_size))?;
        if targets.len() != flat.dim(0)? {
            return Err(CandorError::msg(format!(
                "{} targets for {} positions",
                targets.len(),
                flat.dim(0)?
            )));
        }
        let (rows, labels): (Vec<u32>, Vec<u32>) = targets
            .iter()
            .enumerate()
            .filter(|(_, &t)| t != IGNORE_INDEX)
            .map(|(i, &t)| (i as u32, t as u32))
            .unzip();
        if let Some(bad) = labels.iter().find(|&&l| l as usize >= self.config.vocab_size) {
            return Err(CandorError::msg(format!("target id {bad} is outside the vocabulary")));
        }
        let n = rows.len();
        if n == 0 {
            return Ok((Tensor::zeros((), DType::F32, self.device())?, 0));
        }
        let device = self.device();
        let rows = Tensor::new(rows, device)?;
        let labels = Tensor::new(labels, device)?;
        let selected = rms_norm(&flat.index_select(&rows, 0)?, &self.norm, self.config.rms_norm_eps)?;
        Ok((linear_cross_entropy_sum(&selected, self.lm_head_weight(), &labels)?, n))
    }
}

/// `weight · x / √(mean(x²) + eps)` over the last dimension, statistics in f32 as transformers does
/// (the fused op in [`crate::ops::rms_norm`]).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(crate::ops::rms_norm(x, weight, eps)?)
}
