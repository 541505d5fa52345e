//! AdamW with state we can save and restore (candle's keeps its moments private), matching
//! `torch.optim.AdamW` update for update.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{CandorError, Result};
use crate::ops::adamw::{adamw_step, moments_shape, Scalars};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

pub struct AdamW {
    pub config: AdamWConfig,
    params: Vec<(String, Var)>,
    /// Per parameter, its first and second moments as one f32 `[2, ..shape]` tensor, updated in place
    /// (`ops::adamw`).
    moments: Vec<Tensor>,
    /// Updates applied so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let moments = params
            .iter()
            .map(|(_, v)| Tensor::zeros(moments_shape(v.dims()), DType::F32, v.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW { config, params, moments, step: 0 })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with learning rate `lr` (the schedule's value for this step); `grads[i]` belongs to
    /// the i-th parameter.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.apply_scaled(grads, lr, 1.0)
    }

    /// [`Self::apply`] with every gradient multiplied by `grad_scale` first (gradient clipping), inside
    /// the update: bit for bit `apply` of `grad * grad_scale`, without a pass of its own.
    pub fn apply_scaled(&mut self, grads: &[Tensor], lr: f64, grad_scale: f64) -> Result<()> {
        let _profile = crate::ops::profile::span("adamw", crate::ops::profile::Phase::Update);
        let c = self.config;
        if grads.len() != self.params.len() {
            return Err(CandorError::msg(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        self.step += 1;
        let s = Scalars::new(lr, c.beta1, c.beta2, c.eps, c.weight_decay, self.step as i32)
            .with_grad_scale(grad_scale);
        for (((name, var), mv), g) in self.params.iter().zip(&self.moments).zip(grads) {
            adamw_step(var.as_tensor(), mv, g, &s).map_err(|e| CandorError::msg(format!("{name}: {e}")))?;
        }
        Ok(())
    }

    /// The moments, named `exp_avg.<param>` and `exp_avg_sq.<param>` as PyTorch names them.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for ((name, _), mv) in self.params.iter().zip(&self.moments) {
            // copies: the moments are updated in place by the next step
            for (prefix, k) in [("exp_avg", 0), ("exp_avg_sq", 1)] {
                let t = mv.get(k).and_then(|t| t.copy()).expect("moments are [2, ..]");
                out.insert(format!("{prefix}.{name}"), t);
            }
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`] and the step count.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, step: u64) -> Result<()> {
        for ((name, var), mv) in self.params.iter().zip(self.moments.iter_mut()) {
            let mut both = vec![];
            for prefix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .remove(&key)
                    .ok_or_else(|| CandorError::msg(format!("optimizer state lacks {key}")))?;
                if t.dims() != var.dims() {
                    return Err(CandorError::msg(format!(
                        "optimizer state {key} has shape {:?}, expected {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                both.push(t.to_dtype(DType::F32)?.to_device(var.device())?);
            }
            *mv = Tensor::stack(&both, 0)?;
        }
        if let Some(extra) = tensors.keys().next() {
            return Err(CandorError::msg(format!("optimizer state has {extra}, which this model does not")));
        }
        self.step = step;
        Ok(())
    }
}

/// The gradient of each parameter from a backward pass, in parameter order. A parameter the graph
/// does not reach is an error, never a silent zero.
pub fn collect_grads(store: &GradStore, params: &[(String, Var)]) -> Result<Vec<Tensor>> {
    params
        .iter()
        .map(|(name, v)| {
            store
                .get(v.as_tensor())
                .cloned()
                .ok_or_else(|| CandorError::msg(format!("no gradient reached {name}")))
        })
        .collect()
}

/// √(Σ‖g‖²) over all gradients: each ‖g‖² summed in f32 on the gradients' device, all of them read
/// back at once (one device synchronisation, not one per tensor) and added up in f64.
pub fn global_grad_norm(grads: &[Tensor]) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let squares =
        grads.iter().map(|g| g.sqr()?.sum_all()?.reshape(1)).collect::<candle_core::Result<Vec<_>>>()?;
    let squares = Tensor::cat(&squares, 0)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(squares.iter().sum::<f64>().sqrt())
}
