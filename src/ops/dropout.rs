//! Inverted dropout with a bit mask: `y = x · mask / keep`, and the same product for the gradient.
//!
//! Composed from candle ops, dropout keeps an f32 mask tensor and its input alive for the backward
//! (a LoRA layer's input is shared by up to five projections, each with its own mask). This op keeps the
//! mask as bits inside itself (1/32 of an f32 mask) and records only its input. The mask is drawn by the
//! caller, so the random stream (and every result) is the same as the composed version's. CPU, f32;
//! other devices use the composed version.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// Multiplies element `i` by `scale` where bit `i` of `bits` is set, else by zero (a multiplication, so
/// signed zeros come out as the composed `x * mask` gives them).
#[derive(Clone)]
struct MaskScale {
    bits: Arc<Vec<u64>>,
    scale: f32,
}

impl MaskScale {
    fn apply(&self, x: &[f32]) -> Vec<f32> {
        x.iter()
            .enumerate()
            .map(|(i, &v)| v * if self.bits[i / 64] >> (i % 64) & 1 == 1 { self.scale } else { 0.0 })
            .collect()
    }
}

impl CustomOp1 for MaskScale {
    fn name(&self) -> &'static str {
        "candor-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            candle_core::bail!("dropout: expected f32, got {:?}", s.dtype())
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("dropout: input must be contiguous")
        };
        if end - start > self.bits.len() * 64 {
            candle_core::bail!("dropout: {} elements for a mask of {}", end - start, self.bits.len() * 64);
        }
        Ok((CpuStorage::F32(self.apply(&data[start..end])), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // the same mask and scale: d(x · m · s)/dx = m · s
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// Dropout of `x` (f32, CPU) keeping element `i` when `keep(i)` is true, scaled by `scale`.
pub fn dropout_cpu(x: &Tensor, scale: f32, mut keep: impl FnMut() -> bool) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        candle_core::bail!("dropout_cpu: f32 on the CPU only, got {:?} on {:?}", x.dtype(), x.device());
    }
    let n = x.elem_count();
    let mut bits = vec![0u64; n.div_ceil(64)];
    for i in 0..n {
        if keep() {
            bits[i / 64] |= 1 << (i % 64);
        }
    }
    x.contiguous()?.apply_op1(MaskScale { bits: Arc::new(bits), scale })
}
