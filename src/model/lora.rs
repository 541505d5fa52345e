//! LoRA: `y = x·Wᵀ + b + scale · dropout(x)·Aᵀ·Bᵀ` over a frozen base linear layer.
//!
//! A and B are f32 `Var`s whatever the base dtype; the base weight goes through [`frozen_linear`], so it
//! never gets a gradient. Adapters are read and written in PEFT's format (`adapter_model.safetensors`
//! with `base_model.model.<module>.lora_{A,B}.weight` names, plus `adapter_config.json`).

use std::cell::Cell;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::error::{CandorError, Result};
use crate::ops::dropout::DropoutMask;
use crate::ops::{frozen_linear, Epilogue, LoraWeights};

/// The seven projection names a decoder layer has.
pub const ALL_LINEAR: &[&str] =
    &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub use_rslora: bool,
    /// Module names (`q_proj`, …); `all-linear` is expanded to all seven.
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 16,
            alpha: 32.0,
            dropout: 0.0,
            use_rslora: false,
            target_modules: vec!["all-linear".into()],
        }
    }
}

impl LoraConfig {
    /// alpha / r, or alpha / √r with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// The target names with `all-linear` expanded, validated.
    pub fn resolved_targets(&self) -> Result<BTreeSet<String>> {
        let mut out = BTreeSet::new();
        for t in &self.target_modules {
            if t == "all-linear" {
                out.extend(ALL_LINEAR.iter().map(|s| s.to_string()));
            } else if ALL_LINEAR.contains(&t.as_str()) {
                out.insert(t.clone());
            } else {
                return Err(CandorError::msg(format!(
                    "lora.target_modules: unknown module \"{t}\" (use all-linear or any of {})",
                    ALL_LINEAR.join(", ")
                )));
            }
        }
        if out.is_empty() {
            return Err(CandorError::msg("lora.target_modules is empty"));
        }
        if self.r == 0 {
            return Err(CandorError::msg("lora.r must be positive"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(CandorError::msg("lora.dropout must be in [0, 1)"));
        }
        Ok(out)
    }

    /// Reads PEFT's `adapter_config.json`.
    pub fn from_peft_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| CandorError::file(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| CandorError::file(path, e))?;
        let bad = |m: String| CandorError::file(path, m);
        if let Some(t) = v.get("peft_type").and_then(Value::as_str) {
            if t != "LORA" {
                return Err(bad(format!("peft_type \"{t}\" is not supported (only LORA)")));
            }
        }
        for key in ["rank_pattern", "alpha_pattern"] {
            if v.get(key).and_then(Value::as_object).is_some_and(|o| !o.is_empty()) {
                return Err(bad(format!("\"{key}\" is not supported")));
            }
        }
        if v.get("use_dora").and_then(Value::as_bool) == Some(true) {
            return Err(bad("use_dora = true is not supported".into()));
        }
        let r = v.get("r").and_then(Value::as_u64).ok_or_else(|| bad("missing field \"r\"".into()))? as usize;
        let alpha = v.get("lora_alpha").and_then(Value::as_f64).unwrap_or(8.0);
        let target_modules = match v.get("target_modules") {
            Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
            Some(Value::String(s)) if s == "all-linear" => vec![s.clone()],
            Some(Value::String(s)) => {
                return Err(bad(format!(
                    "target_modules as a regex (\"{s}\") is not supported; list module names"
                )))
            }
            _ => return Err(bad("missing field \"target_modules\"".into())),
        };
        let cfg = LoraConfig {
            r,
            alpha,
            dropout: v.get("lora_dropout").and_then(Value::as_f64).unwrap_or(0.0),
            use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            target_modules,
        };
        cfg.resolved_targets().map_err(|e| bad(e.to_string()))?;
        Ok(cfg)
    }

    /// PEFT's `adapter_config.json` for this configuration.
    pub fn to_peft_json(&self, base_model: Option<&str>) -> Value {
        let targets: Vec<String> =
            self.resolved_targets().map(|t| t.into_iter().collect()).unwrap_or_default();
        json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "use_rslora": self.use_rslora,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "rank_pattern": {},
            "alpha_pattern": {},
            "use_dora": false,
            "revision": null,
        })
    }
}

/// The trainable half of a LoRA layer.
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    /// `[r, in_features]`, f32.
    pub a: Var,
    /// `[out_features, r]`, f32.
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
}

/// A frozen linear layer with an optional LoRA adapter. `name` is the module path in the Hugging Face
/// checkpoint (`model.layers.3.self_attn.q_proj`).
#[derive(Debug, Clone)]
pub struct LoraLinear {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

/// Where LoRA dropout masks come from; `None` means inference (no dropout).
pub type DropoutRng = rand_chacha::ChaCha8Rng;

impl LoraLinear {
    pub fn frozen(name: String, weight: Tensor, bias: Option<Tensor>) -> Self {
        LoraLinear { name, weight, bias, lora: None }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Adds a fresh adapter: A Kaiming-uniform (PEFT's `a = √5`, i.e. U(±1/√in)), B zeros, so the layer's
    /// output is unchanged until B is trained.
    pub fn attach(&mut self, cfg: &LoraConfig, rng: &mut impl Rng) -> Result<()> {
        let (in_f, out_f) = (self.in_features(), self.out_features());
        let bound = 1.0 / (in_f as f64).sqrt();
        let a: Vec<f32> = (0..cfg.r * in_f).map(|_| rng.random_range(-bound..bound) as f32).collect();
        let device = self.weight.device();
        let a = Var::from_tensor(&Tensor::from_vec(a, (cfg.r, in_f), device)?)?;
        let b = Var::zeros((out_f, cfg.r), DType::F32, device)?;
        self.lora = Some(LoraAdapter { a, b, scale: cfg.scale(), dropout: cfg.dropout });
        Ok(())
    }

    /// `dropout_rng` is `Some` in training mode.
    pub fn forward(&self, x: &Tensor, dropout_rng: Option<&mut DropoutRng>) -> Result<Tensor> {
        self.forward_then(x, Epilogue::None, dropout_rng)
    }

    /// `then(self(x))`: with an adapter, one op in which `self(x)` alone never reaches the graph (see
    /// [`Epilogue`]); without, the frozen product and then the epilogue's own ops.
    pub fn forward_then(
        &self,
        x: &Tensor,
        then: Epilogue,
        dropout_rng: Option<&mut DropoutRng>,
    ) -> Result<Tensor> {
        let Some(lora) = &self.lora else {
            let y = frozen_linear(x, &self.weight, self.bias.as_ref())?;
            return Ok(then.composed(&y, crate::ops::rope)?);
        };
        // one draw per input element, in order, whichever path runs: the same seed gives the same masks
        let mask = match (dropout_rng, lora.dropout > 0.0) {
            (Some(rng), true) => Some(DropoutMask::draw_below(x.elem_count(), 1.0 - lora.dropout, rng)),
            _ => None,
        };
        // under no_grad the LoRA weights enter as plain tensors, so no autograd graph is built and every
        // activation is freed as soon as it is used
        let (a, b) = if NO_GRAD.with(Cell::get) {
            (lora.a.as_tensor().detach(), lora.b.as_tensor().detach())
        } else {
            (lora.a.as_tensor().clone(), lora.b.as_tensor().clone())
        };
        let weights =
            LoraWeights { weight: &self.weight, bias: self.bias.as_ref(), a: &a, b: &b, scale: lora.scale };
        Ok(weights.forward_then(x, then, mask)?)
    }

    /// `W + scale · B·A`, computed in f32 (the merge used by export). A and B enter detached: taken
    /// from the variables, the sum would keep B·A and scale·B·A alive in its autograd graph, tripling
    /// the memory of every merged weight.
    pub fn merged_weight_f32(&self) -> Result<Tensor> {
        let w = self.weight.to_dtype(DType::F32)?;
        match &self.lora {
            None => Ok(w),
            Some(l) => {
                let (a, b) = (l.a.as_tensor().detach(), l.b.as_tensor().detach());
                Ok((w + b.matmul(&a)?.affine(l.scale, 0.0)?)?)
            }
        }
    }
}

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// While the returned guard lives, LoRA layers on this thread build no autograd graph (as
/// `torch.no_grad()`): generation and evaluation keep only what the next step needs. Without it, the
/// trainable variables make every forward remember all its activations for a backward that never comes.
pub fn no_grad() -> NoGradGuard {
    NoGradGuard(NO_GRAD.with(|c| c.replace(true)))
}

pub struct NoGradGuard(bool);

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        let previous = self.0;
        NO_GRAD.with(|c| c.set(previous));
    }
}

/// PEFT's tensor name for a module's A or B matrix.
pub fn peft_tensor_name(module: &str, which: char) -> String {
    format!("base_model.model.{module}.lora_{which}.weight")
}

/// Writes `adapter_model.safetensors` + `adapter_config.json` into `dir`.
pub fn save_peft_adapter<'a>(
    dir: &Path,
    layers: impl Iterator<Item = &'a LoraLinear>,
    cfg: &LoraConfig,
    base_model: Option<&str>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| CandorError::file(dir, e))?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for l in layers {
        if let Some(ad) = &l.lora {
            tensors.insert(
                peft_tensor_name(&l.name, 'A'),
                ad.a.as_tensor().to_device(&candle_core::Device::Cpu)?,
            );
            tensors.insert(
                peft_tensor_name(&l.name, 'B'),
                ad.b.as_tensor().to_device(&candle_core::Device::Cpu)?,
            );
        }
    }
    let path = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| CandorError::file(&path, e))?;
    let cfg_path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&cfg.to_peft_json(base_model)).expect("json");
    std::fs::write(&cfg_path, text).map_err(|e| CandorError::file(&cfg_path, e))?;
    Ok(())
}

/// Loads A and B from a PEFT `adapter_model.safetensors` into layers that already carry adapters of the
/// same shape. Every adapter must be found, and every tensor in the file must be used.
pub fn load_peft_weights<'a>(path: &Path, layers: impl Iterator<Item = &'a LoraLinear>) -> Result<()> {
    let mut tensors = candle_core::safetensors::load(path, &candle_core::Device::Cpu)
        .map_err(|e| CandorError::file(path, e))?;
    for l in layers {
        let Some(ad) = &l.lora else { continue };
        for (which, var) in [('A', &ad.a), ('B', &ad.b)] {
            let name = peft_tensor_name(&l.name, which);
            let t = tensors
                .remove(&name)
                .ok_or_else(|| CandorError::file(path, format!("missing tensor {name}")))?;
            if t.dims() != var.dims() {
                return Err(CandorError::file(
                    path,
                    format!("tensor {name} has shape {:?}, the model expects {:?}", t.dims(), var.dims()),
                ));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(CandorError::file(
            path,
            format!("tensor {extra} does not match any LoRA layer of this model"),
        ));
    }
    Ok(())
}

/// Seeded RNG for A's initialisation.
pub fn init_rng(seed: u64) -> rand_chacha::ChaCha8Rng {
    rand_chacha::ChaCha8Rng::seed_from_u64(seed)
}
