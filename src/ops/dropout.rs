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

    /// Keeps element `i` when the `i`-th `rng.random::<f64>()` is below `keep`, scaled by `1 / keep`:
    /// the same mask, and the same generator state afterwards, as [`DropoutMask::draw`] with that
    /// closure, several times faster. rand's `f64` is `(u >> 11) · 2⁻⁵³` of one `u64`, so
    /// `f < keep` ⇔ `(u >> 11) < ⌈keep · 2⁵³⌉`; the `u64`s are read 64 at a time (`fill` yields the
    /// stream `next_u64` would).
    pub fn draw_below(len: usize, keep: f64, rng: &mut impl rand::Rng) -> Self {
        let threshold = (keep * (1u64 << 53) as f64).ceil() as u64;
        let mut bits = vec![0u64; len.div_ceil(64)];
        let mut buf = [0u64; 64];
        for (w, word) in bits.iter_mut().enumerate() {
            let draws = &mut buf[..(len - w * 64).min(64)];
            rng.fill(draws);
            *word =
                draws.iter().enumerate().fold(0, |acc, (j, &u)| acc | (((u >> 11) < threshold) as u64) << j);
        }
        DropoutMask { bits: Arc::new(bits), scale: (1.0 / keep) as f32 }
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

#[cfg(test)]
mod tests {
    use super::DropoutMask;
    use rand::{Rng, RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn draw_below_gives_the_per_element_draws_mask_and_leaves_the_same_stream() {
        for (seed, len, keep) in [
            (0u64, 0usize, 0.95),
            (1, 1, 0.95),
            (2, 63, 0.5),
            (3, 64, 0.95),
            (4, 65, 0.9),
            (5, 100_003, 0.95),
            (6, 4096, 0.3),
        ] {
            let mut a = ChaCha8Rng::seed_from_u64(seed);
            let mut b = a.clone();
            // start at an odd 32-bit word, as after an earlier u32 draw
            if seed % 2 == 1 {
                a.next_u32();
                b.next_u32();
            }
            let fast = DropoutMask::draw_below(len, keep, &mut a);
            let slow = DropoutMask::draw(len, (1.0 / keep) as f32, || b.random::<f64>() < keep);
            assert_eq!(fast.bits, slow.bits, "seed {seed}, len {len}");
            assert_eq!(fast.scale, slow.scale);
            assert_eq!(
                a.next_u64(),
                b.next_u64(),
                "the stream moved on differently (seed {seed}, len {len})"
            );
        }
    }
}
