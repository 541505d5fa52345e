//! GGUF files (llama.cpp): config and tokenizer from the metadata, weights dequantized to floats and
//! renamed to the Hugging Face layout.
//!
//! llama.cpp's converter permutes the rows of Q and K of `llama` models for its interleaved RoPE;
//! we undo that so the weights match the half-rotation layout our decoder (and transformers) use.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Content};
use candle_core::quantized::tokenizer::TokenizerFromGguf;
use candle_core::{Device, Tensor};
use serde_json::json;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use super::config::ModelConfig;
use super::load::{place, LoadOptions, LoadedModel, ModelSource};
use super::tokenizer::{stop_ids, ChatTokenizer};
use super::transformer::{Transformer, WeightMap};
use crate::data::template::ChatTemplate;
use crate::error::{CandorError, Result};

pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let err = |m: String| CandorError::file(path, m);
    let mut file = std::fs::File::open(path).map_err(|e| CandorError::file(path, e))?;
    let content = Content::read(&mut file).map_err(|e| err(format!("not a readable GGUF file: {e}")))?;
    let config = config_from_metadata(&content).map_err(err)?;
    let arch = config.family.model_type();

    let mut tensors = HashMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        if name == "rope_freqs.weight" {
            continue; // folded into the config's RoPE scaling
        }
        let hf_name = hf_tensor_name(name).ok_or_else(|| err(format!("unknown tensor {name}")))?;
        let q =
            content.tensor(&mut file, name, &Device::Cpu).map_err(|e| err(format!("tensor {name}: {e}")))?;
        let mut t = q.dequantize(&Device::Cpu).map_err(|e| err(format!("tensor {name}: {e}")))?;
        if arch == "llama" {
            if hf_name.ends_with("q_proj.weight") {
                t = unpermute_rows(&t, config.num_attention_heads)?;
            } else if hf_name.ends_with("k_proj.weight") {
                t = unpermute_rows(&t, config.num_key_value_heads)?;
            }
        }
        tensors.insert(hf_name, place(t, opts)?);
    }
    let model = Transformer::new(config, WeightMap::new(tensors, path.display().to_string()), &opts.device)?;
    let tokenizer = if opts.tokenizer { Some(gguf_tokenizer(&content, path, &model.config)?) } else { None };
    Ok(LoadedModel {
        model,
        tokenizer,
        source: ModelSource::Gguf(path.to_path_buf()),
        weights_path: path.to_path_buf(),
    })
}

/// Only the tokenizer and chat template (reads the metadata, not the tensors).
pub fn load_gguf_tokenizer(path: &Path) -> Result<ChatTokenizer> {
    let err = |m: String| CandorError::file(path, m);
    let mut file = std::fs::File::open(path).map_err(|e| CandorError::file(path, e))?;
    let content = Content::read(&mut file).map_err(|e| err(format!("not a readable GGUF file: {e}")))?;
    let config = config_from_metadata(&content).map_err(err)?;
    gguf_tokenizer(&content, path, &config)
}

fn meta<'a>(c: &'a Content, key: &str) -> Option<&'a gguf_file::Value> {
    c.metadata.get(key)
}

fn meta_u64(c: &Content, key: &str) -> Option<u64> {
    use gguf_file::Value::*;
    match meta(c, key)? {
        U8(v) => Some(*v as u64),
        U16(v) => Some(*v as u64),
        U32(v) => Some(*v as u64),
        U64(v) => Some(*v),
        I32(v) => Some(*v as u64),
        I64(v) => Some(*v as u64),
        _ => None,
    }
}

fn meta_f64(c: &Content, key: &str) -> Option<f64> {
    match meta(c, key)? {
        gguf_file::Value::F32(v) => Some(*v as f64),
        gguf_file::Value::F64(v) => Some(*v),
        _ => None,
    }
}

fn meta_str<'a>(c: &'a Content, key: &str) -> Option<&'a str> {
    meta(c, key)?.to_string().ok().map(String::as_str)
}

/// Builds a Hugging Face-style `config.json` from GGUF metadata and parses it like any other.
fn config_from_metadata(c: &Content) -> std::result::Result<ModelConfig, String> {
    let arch = meta_str(c, "general.architecture").ok_or("missing general.architecture")?;
    if !super::config::SUPPORTED_MODEL_TYPES.contains(&arch) {
        return Err(format!(
            "unsupported architecture \"{arch}\" (supported: {})",
            super::config::SUPPORTED_MODEL_TYPES.join(", ")
        ));
    }
    let req = |k: &str| meta_u64(c, &format!("{arch}.{k}")).ok_or(format!("missing metadata {arch}.{k}"));
    let heads = req("attention.head_count")?;
    let hidden = req("embedding_length")?;
    let vocab = meta_u64(c, &format!("{arch}.vocab_size"))
        .or_else(|| c.tensor_infos.get("token_embd.weight").map(|t| t.shape.dims()[0] as u64))
        .ok_or("cannot tell the vocabulary size")?;
    let mut v = json!({
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": req("feed_forward_length")?,
        "num_hidden_layers": req("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": meta_u64(c, &format!("{arch}.attention.head_count_kv")).unwrap_or(heads),
        "head_dim": meta_u64(c, &format!("{arch}.attention.key_length")).unwrap_or(hidden / heads),
        "rms_norm_eps": meta_f64(c, &format!("{arch}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": meta_f64(c, &format!("{arch}.rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": meta_u64(c, &format!("{arch}.context_length")).unwrap_or(4096),
        "vocab_size": vocab,
        "tie_word_embeddings": !c.tensor_infos.contains_key("output.weight"),
        "hidden_act": "silu",
        "attention_bias": arch == "llama" && c.tensor_infos.contains_key("blk.0.attn_output.bias"),
    });
    if let Some(bos) = meta_u64(c, "tokenizer.ggml.bos_token_id") {
        v["bos_token_id"] = json!(bos);
    }
    if let Some(eos) = meta_u64(c, "tokenizer.ggml.eos_token_id") {
        v["eos_token_id"] = json!(eos);
    }
    if c.tensor_infos.contains_key("rope_freqs.weight") {
        // Llama 3.1+ GGUFs store the llama3 RoPE scaling as per-frequency factors.
        return Err(
            "rope_freqs (Llama 3.1+ RoPE scaling in GGUF) is not supported yet; use the Hugging Face model"
                .into(),
        );
    }
    ModelConfig::from_json(&v)
}

/// GGUF tensor name → Hugging Face name.
fn hf_tensor_name(name: &str) -> Option<String> {
    let simple = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let hf = match module {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "attn_q_norm" => "self_attn.q_norm",
        "attn_k_norm" => "self_attn.k_norm",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Inverse of llama.cpp's `permute`: rows were reordered per head from `[2, d/2]` to `[d/2, 2]`.
fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let half = rows / heads / 2;
    Ok(w.reshape((heads, half, 2, cols))?.transpose(1, 2)?.contiguous()?.reshape((rows, cols))?)
}

/// The tokenizer from GGUF metadata, with the pre-tokenizers candle's builder does not know.
fn gguf_tokenizer(c: &Content, path: &Path, config: &ModelConfig) -> Result<ChatTokenizer> {
    let err = |m: String| CandorError::file(path, m);
    let mut tokenizer = Tokenizer::from_gguf(c).map_err(|e| err(format!("tokenizer: {e}")))?;
    let pre = meta_str(c, "tokenizer.ggml.pre").unwrap_or("gpt2");
    match pre {
        // SmolLM: every digit on its own, then GPT-2 byte-level (the hub tokenizer.json does the same).
        "smollm" => {
            let seq = Sequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]);
            tokenizer.with_pre_tokenizer(Some(seq));
        }
        // Llama 3: digits in groups of up to three.
        "llama-bpe" => {
            const REGEX_LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
            let split = Split::new(SplitPattern::Regex(REGEX_LLAMA3.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| err(format!("tokenizer: {e}")))?;
            let seq = Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]);
            tokenizer.with_pre_tokenizer(Some(seq));
        }
        "gpt2" | "qwen2" | "llama3" | "smaug-bpe" => {}
        other => {
            return Err(err(format!(
                "tokenizer pre-tokenizer \"{other}\" is not supported (supported: gpt2, smollm, llama-bpe, qwen2)"
            )))
        }
    }
    let token = |key: &str| meta_u64(c, key).and_then(|id| tokenizer.id_to_token(id as u32));
    let bos = token("tokenizer.ggml.bos_token_id");
    let eos = token("tokenizer.ggml.eos_token_id");
    let template = match meta_str(c, "tokenizer.chat_template") {
        Some(t) => Some(ChatTemplate::new(
            t,
            &format!("{} (tokenizer.chat_template)", path.display()),
            bos.as_deref(),
            eos.as_deref(),
        )?),
        None => None,
    };
    let stop = stop_ids(&tokenizer, &config.eos_token_ids, eos.as_deref());
    Ok(ChatTokenizer {
        tokenizer,
        template,
        tokenizer_source: format!("{} (GGUF metadata, pre-tokenizer {pre})", path.display()),
        stop_ids: stop,
        model_source: path.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensor_names_map_to_hf() {
        assert_eq!(
            hf_tensor_name("blk.12.attn_q.weight").unwrap(),
            "model.layers.12.self_attn.q_proj.weight"
        );
        assert_eq!(hf_tensor_name("blk.0.attn_k.bias").unwrap(), "model.layers.0.self_attn.k_proj.bias");
        assert_eq!(
            hf_tensor_name("blk.3.ffn_norm.weight").unwrap(),
            "model.layers.3.post_attention_layernorm.weight"
        );
        assert_eq!(hf_tensor_name("output.weight").unwrap(), "lm_head.weight");
        assert!(hf_tensor_name("blk.0.attn_qkv.weight").is_none());
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, d/2, cols).swapaxes(1, 2).reshape(rows, cols)
        let (heads, d, cols) = (3usize, 4usize, 2usize);
        let rows = heads * d;
        let w =
            Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu).unwrap().reshape((rows, cols)).unwrap();
        let permuted = w
            .reshape((heads, 2, d / 2, cols))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((rows, cols))
            .unwrap();
        let back = unpermute_rows(&permuted, heads).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), w.to_vec2::<f32>().unwrap());
    }
}
