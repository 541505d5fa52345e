//! Hugging Face `config.json` → one [`ModelConfig`] for every supported family.
//!
//! Family differences (q/k/v bias, q/k RMSNorm, tied embeddings, RoPE scaling) are fields here, so the
//! decoder in `transformer.rs` has one code path.

use std::path::Path;

use serde_json::Value;

use crate::error::{CandorError, Result};

/// The `model_type` values we can build.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["llama", "qwen2", "qwen3"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2, Llama 3.x, SmolLM2 and other `LlamaForCausalLM` models.
    Llama,
    /// Qwen2 / Qwen2.5: bias on q, k, v.
    Qwen2,
    /// Qwen3: RMSNorm on q and k per head, no bias.
    Qwen3,
}

impl Family {
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
        }
    }
}

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1+ frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub family: Family,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q_proj, k_proj, v_proj.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Bias on gate/up/down projections.
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k before RoPE (Qwen3).
    pub qk_norm: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint was saved in (`torch_dtype` / `dtype`), if stated.
    pub saved_dtype: Option<String>,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CandorError::file(path, e))?;
        let value: Value = serde_json::from_str(&text).map_err(|e| CandorError::file(path, e))?;
        Self::from_json(&value).map_err(|e| CandorError::file(path, e))
    }

    /// Parses a `config.json` value. Errors are plain messages; callers add the file name.
    pub fn from_json(v: &Value) -> std::result::Result<Self, String> {
        let model_type = v.get("model_type").and_then(Value::as_str).ok_or("missing field \"model_type\"")?;
        let family = match model_type {
            "llama" => Family::Llama,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            other => {
                return Err(format!(
                    "unsupported model_type \"{other}\" (supported: {})",
                    SUPPORTED_MODEL_TYPES.join(", ")
                ))
            }
        };
        let usize_field = |name: &str| -> std::result::Result<usize, String> {
            v.get(name)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| format!("missing or non-integer field \"{name}\""))
        };
        let bool_field = |name: &str, default: bool| v.get(name).and_then(Value::as_bool).unwrap_or(default);

        let hidden_size = usize_field("hidden_size")?;
        let num_attention_heads = usize_field("num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err("\"num_attention_heads\" must be positive".into());
        }
        let num_key_value_heads = match v.get("num_key_value_heads") {
            Some(Value::Null) | None => num_attention_heads,
            Some(_) => usize_field("num_key_value_heads")?,
        };
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_attention_heads}) must be a multiple of num_key_value_heads ({num_key_value_heads})"
            ));
        }
        let head_dim = match v.get("head_dim") {
            Some(Value::Null) | None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(format!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given"
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => usize_field("head_dim")?,
        };
        if head_dim % 2 != 0 {
            return Err(format!("head_dim ({head_dim}) must be even for rotary embeddings"));
        }
        if let Some(act) = v.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(format!("unsupported hidden_act \"{act}\" (supported: silu)"));
            }
        }
        if bool_field("use_sliding_window", false) {
            return Err("use_sliding_window = true is not supported".into());
        }

        // RoPE: transformers >= 5 writes `rope_parameters`; older files have `rope_theta` + `rope_scaling`.
        let rope_params = v.get("rope_parameters").filter(|p| p.is_object());
        let rope_theta = rope_params
            .and_then(|p| p.get("rope_theta"))
            .or_else(|| v.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0);
        let scaling_obj = rope_params.or_else(|| v.get("rope_scaling").filter(|s| s.is_object()));
        let rope_scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(s) => parse_rope_scaling(s)?,
        };

        let eos_token_ids = match v.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_u64).map(|x| x as u32).collect(),
            _ => vec![],
        };
        let attention_bias = v.get("attention_bias").and_then(Value::as_bool);
        let (qkv_bias, o_bias) = match family {
            // Qwen2 always has q/k/v bias and never o_proj bias.
            Family::Qwen2 => (true, false),
            Family::Llama | Family::Qwen3 => {
                let b = attention_bias.unwrap_or(false);
                (b, b)
            }
        };
        Ok(ModelConfig {
            family,
            vocab_size: usize_field("vocab_size")?,
            hidden_size,
            intermediate_size: usize_field("intermediate_size")?,
            num_hidden_layers: usize_field("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .unwrap_or(4096),
            tie_word_embeddings: bool_field("tie_word_embeddings", false),
            qkv_bias,
            o_bias,
            mlp_bias: bool_field("mlp_bias", false),
            qk_norm: family == Family::Qwen3,
            bos_token_id: v.get("bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_ids,
            saved_dtype: v
                .get("dtype")
                .or_else(|| v.get("torch_dtype"))
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// Rotary inverse frequencies, one per pair of dimensions (`head_dim / 2` values), with scaling
    /// applied exactly as transformers' `ROPE_INIT_FUNCTIONS` do.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        let base: Vec<f64> =
            (0..half).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / self.head_dim as f64)).collect();
        match self.rope_scaling {
            RopeScaling::None => base.iter().map(|&f| f as f32).collect(),
            RopeScaling::Linear { factor } => base.iter().map(|&f| (f / factor) as f32).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let low_freq_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_freq_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wavelen > low_freq_wavelen { f / factor } else { f };
                        let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
                        let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        (if is_medium { smoothed } else { scaled }) as f32
                    })
                    .collect()
            }
        }
    }

    /// A Hugging Face `config.json` for this configuration (used when exporting a model whose source
    /// had none, e.g. a GGUF file). `dtype` is the saved tensors' dtype name ("float32", "bfloat16", …).
    pub fn to_hf_json(&self, dtype: &str) -> serde_json::Value {
        let (arch, model_type) = match self.family {
            Family::Llama => ("LlamaForCausalLM", "llama"),
            Family::Qwen2 => ("Qwen2ForCausalLM", "qwen2"),
            Family::Qwen3 => ("Qwen3ForCausalLM", "qwen3"),
        };
        let rope_scaling = match &self.rope_scaling {
            RopeScaling::None => serde_json::Value::Null,
            RopeScaling::Linear { factor } => serde_json::json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                serde_json::json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": *original_max_position_embeddings as u64})
            }
        };
        let eos: serde_json::Value = match self.eos_token_ids.as_slice() {
            [] => serde_json::Value::Null,
            [one] => (*one).into(),
            many => many.into(),
        };
        serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.family != Family::Qwen2 && self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "torch_dtype": dtype,
            "use_cache": true,
        })
    }

    /// Total parameter count of the base model (embeddings counted once when tied).
    pub fn num_parameters(&self) -> usize {
        let h = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let i = self.intermediate_size;
        let mut per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h;
        if self.qkv_bias {
            per_layer += q + 2 * kv;
        }
        if self.o_bias {
            per_layer += h;
        }
        if self.mlp_bias {
            per_layer += 2 * i + h;
        }
        if self.qk_norm {
            per_layer += 2 * self.head_dim;
        }
        let embed = self.vocab_size * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.num_hidden_layers * per_layer + embed + head + h
    }
}

fn parse_rope_scaling(s: &Value) -> std::result::Result<RopeScaling, String> {
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
    let num = |name: &str| -> std::result::Result<f64, String> {
        s.get(name)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope scaling \"{kind}\" needs field \"{name}\""))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => {
            Err(format!("unsupported rope scaling type \"{other}\" (supported: default, linear, llama3)"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama32_1b() -> Value {
        // The layout of meta-llama/Llama-3.2-1B-Instruct's config.json (transformers 4.x).
        json!({
            "architectures": ["LlamaForCausalLM"], "attention_bias": false, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "head_dim": 64, "hidden_act": "silu",
            "hidden_size": 2048, "intermediate_size": 8192, "max_position_embeddings": 131072,
            "mlp_bias": false, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16,
            "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
            "vocab_size": 128256
        })
    }

    #[test]
    fn llama3_with_old_rope_layout() {
        let c = ModelConfig::from_json(&llama32_1b()).unwrap();
        assert_eq!(c.family, Family::Llama);
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
        assert_eq!(c.saved_dtype.as_deref(), Some("bfloat16"));
        // Llama-3.2-1B has 1.236B parameters.
        assert_eq!(c.num_parameters(), 1_235_814_400);
    }

    #[test]
    fn qwen25_has_qkv_bias_and_derived_head_dim() {
        let v = json!({
            "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_attention_heads": 14,
            "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
            "tie_word_embeddings": true, "vocab_size": 151936, "eos_token_id": 151645, "hidden_act": "silu",
            "use_sliding_window": false, "max_position_embeddings": 32768
        });
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.head_dim, 64);
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.rope_scaling, RopeScaling::None);
        // Qwen2.5-0.5B: 494M parameters.
        assert_eq!(c.num_parameters(), 494_032_768);
    }

    #[test]
    fn new_rope_parameters_layout() {
        let v = json!({
            "model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
            "num_hidden_layers": 2, "num_key_value_heads": 2, "head_dim": 24, "vocab_size": 100,
            "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}
        });
        let c = ModelConfig::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 1000000.0);
        assert!(c.qk_norm && !c.qkv_bias);
        assert_eq!(c.head_dim, 24);
    }

    #[test]
    fn hf_json_round_trips() {
        let c = ModelConfig::from_json(&llama32_1b()).unwrap();
        let back = ModelConfig::from_json(&c.to_hf_json("bfloat16")).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_model_type_lists_supported() {
        let err = ModelConfig::from_json(&json!({"model_type": "gpt2"})).unwrap_err();
        assert!(err.contains("gpt2") && err.contains("llama, qwen2, qwen3"), "{err}");
    }

    #[test]
    fn llama3_inv_freq_matches_reference_formula() {
        // Values from transformers' _compute_llama3_parameters for head_dim 64, theta 500000, factor 32.
        let c = ModelConfig::from_json(&llama32_1b()).unwrap();
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 32);
        assert!((f[0] - 1.0).abs() < 1e-7);
        // high-frequency dims are untouched, low-frequency ones divided by the factor
        let base_last = 1.0 / 500000f64.powf(62.0 / 64.0);
        assert!(((f[31] as f64) - base_last / 32.0).abs() < 1e-12);
    }
}
