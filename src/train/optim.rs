//! AdamW with state we can save and restore (candle's keeps its moments private), matching
//! `torch.optim.AdamW` update for update.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{CandorError, Result};

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
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far.
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = params.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<Vec<_>>>()?;
        let v = params.iter().map(|(_, v)| zeros(v)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW { config, params, m, v, step: 0 })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with learning rate `lr` (the schedule's value for this step); `grads[i]` belongs to
    /// the i-th parameter.
    pub fn apply(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let c = self.config;
        if grads.len() != self.params.len() {
            return Err(CandorError::msg(format!(
                "{} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        self.step += 1;
        let t = self.step as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2_sqrt = (1.0 - c.beta2.powi(t)).sqrt();
        for (i, (_, var)) in self.params.iter().enumerate() {
            let g = &grads[i];
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bias2_sqrt)? + c.eps)?;
            let update = (m.div(&denom)? * (lr / bias1))?;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The moments, named `exp_avg.<param>` and `exp_avg_sq.<param>` as PyTorch names them.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("exp_avg.{name}"), self.m[i].clone());
            out.insert(format!("exp_avg_sq.{name}"), self.v[i].clone());
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`] and the step count.
    pub fn load_state(&mut self, mut tensors: HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (i, (name, var)) in self.params.iter().enumerate() {
            for (prefix, slot) in [("exp_avg", &mut self.m[i]), ("exp_avg_sq", &mut self.v[i])] {
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
                *slot = t.to_dtype(DType::F32)?.to_device(var.device())?;
            }
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

/// √(Σ‖g‖²) over all gradients.
pub fn global_grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads {
        sum += g.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}
