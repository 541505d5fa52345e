//! Inverted dropout with a bit mask: `y = x · mask / keep`, and the same product for the gradient.
//!
//! Composed from candle ops, dropout keeps an f32 mask tensor and its input alive for the backward
//! (a LoRA layer's input is shared by up to five projections, each with its own mask). This op keeps the
//! mask as bits inside itself (1/32 of an f32 mask) and records only its input. The mask is drawn by the
//! caller, so the random stream (and every result) is the same as the composed version's. CPU, f32;
//! other devices use the composed version.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};

/// A dropout mask: element `i` is kept and multiplied by `scale` when bit `i` of `bits` is set, else
/// multiplied by zero (a multiplication, so signed zeros come out as the composed `x * mask` gives them).
#[derive(Clone, Debug)]
pub struct DropoutMask {
    pub bits: Arc<Vec<u64>>,
    pub scale: f32,
}

impl DropoutMask {
    /// Draws one `keep()` per element, in order.
    pub fn draw(len: usize, scale: f32, mut keep: impl FnMut() -> bool) -> Self {
        let mut bits = vec![0u64; len.div_ceil(64)];
        for i in 0..len {
            if keep() {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        DropoutMask { bits: Arc::new(bits), scale }
    }

    /// How many elements the mask covers.
    pub fn len(&self) -> usize {
        self.bits.len() * 64
    }

    pub fn is_empty(&self) -> bool {
        self.bits.is_empty()
    }

    /// The factor for element `i`: `scale` or 0.
    #[inline]
    pub fn factor(&self, i: usize) -> f32 {
        if self.bits[i / 64] >> (i % 64) & 1 == 1 {
            self.scale
        } else {
            0.0
        }
    }

    pub fn apply(&self, x: &[f32]) -> Vec<f32> {
        x.iter().enumerate().map(|(i, &v)| v * self.factor(i)).collect()
    }

    /// The mask as an f32 tensor of `shape` (for composed references).
    pub fn to_tensor(&self, shape: &Shape, device: &candle_core::Device) -> Result<Tensor> {
        let v: Vec<f32> = (0..shape.elem_count()).map(|i| self.factor(i)).collect();
        Tensor::from_vec(v, shape, device)
    }
}

impl CustomOp1 for DropoutMask {
    fn name(&self) -> &'static str {
        "candor-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = super::f32_slice(s, l, "dropout", "input")?;
        if x.len() > self.len() {
            candle_core::bail!("dropout: {} elements for a mask of {}", x.len(), self.len());
        }
        Ok((CpuStorage::F32(self.apply(x)), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        // the same mask and scale: d(x · m · s)/dx = m · s
        Ok(Some(grad_res.contiguous()?.apply_op1_no_bwd(self)?))
    }
}

/// Dropout of `x` (f32, CPU) keeping element `i` when `keep(i)` is true, scaled by `scale`.
pub fn dropout_cpu(x: &Tensor, scale: f32, keep: impl FnMut() -> bool) -> Result<Tensor> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        candle_core::bail!("dropout_cpu: f32 on the CPU only, got {:?} on {:?}", x.dtype(), x.device());
    }
    x.contiguous()?.apply_op1(DropoutMask::draw(x.elem_count(), scale, keep))
}
