//! Custom ops with their backward next to their forward, one op per file.
//!
//! Each fused op is a candle `CustomOp` whose `bwd` launches another (no-backward) custom op, so both
//! directions run our own code: a CPU loop (the reference, and what the CPU build uses) and a CUDA
//! kernel from `kernels/*.cu` (the fast path, `--features cuda`). Each op file also has a
//! `reference` function composed from plain differentiable candle ops, used by `tests/ops.rs` and
//! `candor selftest`.
//!
//! CPU kernels compute in f32 whatever the storage dtype (f32, bf16, f16) and round once on output;
//! the CUDA kernels do the same (f32, bf16, f16). The hot CPU loops (attention's softmax, the
//! cross-entropy rows, SwiGLU) run in an AVX-512 or AVX2 copy picked at run time (`simd`), since the
//! binary itself targets baseline x86-64.
//!
//! In bf16 on a CPU with AMX (`amx`), the large products take the bf16 operands as they are (bf16
//! products, f32 sums) and the LoRA layer's rank-r products read bf16 activations as stored (`thin`).
//!
//! Three ops are built around matrix products and have a fused CPU path in f32 (the CPU build's dtype):
//! the LoRA layer (`lora_linear`), attention, and the LM head + cross-entropy. Their value there is
//! memory: the composed versions leave five to seven full-size tensors per layer in candle's graph until
//! the step ends. On other devices the products go to cuBLAS through candle's backend, inside ops that
//! keep the same memory profile; the cross-entropy's row work has its own kernels
//! (`kernels/cross_entropy.cu`). Callers use one function per op and never choose the path.

/// `$body` with the type `$t` bound to `$dtype`'s element type (f32, bf16 or f16), or an error naming
/// `$op` for any other dtype: the one dtype dispatch of the elementwise ops' CPU and CUDA entry points.
macro_rules! with_float_type {
    ($dtype:expr, $op:expr, $t:ident => $body:expr) => {
        match $dtype {
            candle_core::DType::F32 => {
                type $t = f32;
                $body
            }
            candle_core::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            candle_core::DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!("{}: unsupported dtype {other:?}", $op),
        }
    };
}

pub mod adamw;
pub mod amx;
pub mod attention;
mod cpu_gemm;
pub mod dropout;
#[cfg(feature = "cuda")]
pub mod flash_attention;
pub mod frozen_linear;
mod gemm_ex;
pub mod linear_cross_entropy;
pub mod lora_linear;
pub mod openblas;
pub mod profile;
pub mod rms_norm;
pub mod rotary;
mod simd;
pub mod swiglu;
mod thin;

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Layout, Result, Tensor};
use half::{bf16, f16};

pub use attention::attention;
pub use frozen_linear::frozen_linear;
pub use linear_cross_entropy::linear_cross_entropy_sum;
pub use lora_linear::{Epilogue, LoraWeights};
pub use rms_norm::rms_norm;
pub use rotary::{rope, RotaryTable};
pub use swiglu::swiglu;

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// When on, the fused ops fill every output buffer they allocate with NaN before computing into it, so
/// an element a kernel forgets to write shows up as NaN instead of as stale memory or zero. For
/// `candor selftest` and the tests; costs one extra pass over each output.
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

pub(crate) fn poison_outputs() -> bool {
    POISON_OUTPUTS.load(Ordering::Relaxed)
}

/// Storage types of the CPU kernels: read as f32, computed in f32, written back rounded.
pub(crate) trait Elem: Copy + Send + Sync + 'static {
    const NAN: Self;
    const ZERO: Self;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Elem for f32 {
    const NAN: Self = f32::NAN;
    const ZERO: Self = 0.0;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Elem for bf16 {
    const NAN: Self = bf16::NAN;
    const ZERO: Self = bf16::ZERO;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Elem for f16 {
    const NAN: Self = f16::NAN;
    const ZERO: Self = f16::ZERO;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// A new CPU output buffer: zeros, or NaN when poisoning is on. Large buffers are filled on all
/// threads: a serial fill of every op's output ran on the thread driving the step while the others
/// waited (4% of the SmolLM2 training step's samples).
pub(crate) fn cpu_output<T: Elem>(len: usize) -> Vec<T> {
    use rayon::prelude::*;
    const SERIAL_ELEMS: usize = 1 << 16;
    let value = if poison_outputs() { T::NAN } else { T::ZERO };
    if len < 4 * SERIAL_ELEMS {
        return vec![value; len];
    }
    let mut out = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(SERIAL_ELEMS)
        .for_each(|chunk| chunk.fill(std::mem::MaybeUninit::new(value)));
    // SAFETY: the loop above initialised all `len` elements
    unsafe { out.set_len(len) };
    out
}

/// The elements a contiguous layout covers, or an error naming the op.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: {what} must be contiguous (layout {layout:?})"),
    }
}

/// A CPU float storage's elements as f32: those a contiguous `layout` covers, or with `None` the whole
/// buffer (for strided readers). Borrowed when f32; bf16 and f16 are widened into a new buffer, so the
/// CPU ops' f32 loops and OpenBLAS serve those dtypes too.
pub(crate) fn f32_elems<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: Option<&Layout>,
    op: &str,
    what: &str,
) -> Result<std::borrow::Cow<'a, [f32]>> {
    use candle_core::CpuStorage as S;
    use std::borrow::Cow;
    fn part<'a, T>(data: &'a [T], layout: Option<&Layout>, op: &str, what: &str) -> Result<&'a [T]> {
        layout.map_or(Ok(data), |l| contiguous(data, l, op, what))
    }
    fn widen<T: Elem>(data: &[T]) -> Vec<f32> {
        convert(data, T::to_f32)
    }
    match storage {
        S::F32(d) => Ok(Cow::Borrowed(part(d, layout, op, what)?)),
        S::BF16(d) => Ok(Cow::Owned(widen(part(d, layout, op, what)?))),
        S::F16(d) => Ok(Cow::Owned(widen(part(d, layout, op, what)?))),
        other => candle_core::bail!(
            "{op}: {what} is {:?}, expected f32, bf16 or f16",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
}

/// [`f32_elems`] of a tensor's storage, which must be on the CPU.
pub(crate) fn cpu_f32_elems<'a>(
    storage: &'a candle_core::Storage,
    layout: Option<&Layout>,
    op: &str,
    what: &str,
) -> Result<std::borrow::Cow<'a, [f32]>> {
    f32_elems(cpu_storage(storage, op)?, layout, op, what)
}

/// `f` of every element, in a new buffer: on all threads in chunks, each loop compiled for the widest
/// vectors the CPU has (an iterator `collect` ran element by element: 10% of a bf16 training step).
fn convert<A: Copy + Send + Sync, B: Copy + Send>(
    data: &[A],
    f: impl Fn(A) -> B + Sync + Send + Copy,
) -> Vec<B> {
    use rayon::prelude::*;
    use std::mem::MaybeUninit;
    // written once, straight into the allocation (no fill first: every element is written here)
    let mut out = Vec::with_capacity(data.len());
    out.spare_capacity_mut()[..data.len()].par_chunks_mut(1 << 15).zip(data.par_chunks(1 << 15)).for_each(
        |(o, d)| {
            simd::vectorised(
                #[inline(always)]
                || o.iter_mut().zip(d).for_each(|(o, &d)| *o = MaybeUninit::new(f(d))),
            )
        },
    );
    // SAFETY: the loop above initialised all `data.len()` elements
    unsafe { out.set_len(data.len()) };
    out
}

/// `v` as a CPU storage of `dtype`: f32 as it is, bf16 or f16 rounded to nearest (as `to_dtype`).
pub(crate) fn cpu_storage_of(v: Vec<f32>, dtype: DType) -> Result<candle_core::CpuStorage> {
    use candle_core::CpuStorage as S;
    Ok(match dtype {
        DType::F32 => S::F32(v),
        DType::BF16 => S::BF16(convert(&v, bf16::from_f32)),
        DType::F16 => S::F16(convert(&v, f16::from_f32)),
        other => candle_core::bail!("{other:?} is not a float dtype the CPU ops compute in"),
    })
}

/// `v` as a CPU tensor of `shape` in `dtype` (see [`cpu_storage_of`]).
pub(crate) fn cpu_tensor_of(
    v: Vec<f32>,
    shape: impl Into<candle_core::Shape>,
    dtype: DType,
) -> Result<Tensor> {
    let dev = &candle_core::Device::Cpu;
    match dtype {
        DType::F32 => Tensor::from_vec(v, shape, dev),
        DType::BF16 => Tensor::from_vec(convert(&v, bf16::from_f32), shape, dev),
        DType::F16 => Tensor::from_vec(convert(&v, f16::from_f32), shape, dev),
        other => candle_core::bail!("{other:?} is not a float dtype the CPU ops compute in"),
    }
}

/// The CPU storage behind a tensor (as `Tensor::storage_and_layout` gives it), or an error naming the op.
pub(crate) fn cpu_storage<'a>(
    storage: &'a candle_core::Storage,
    op: &str,
) -> Result<&'a candle_core::CpuStorage> {
    match storage {
        candle_core::Storage::Cpu(c) => Ok(c),
        _ => candle_core::bail!("{op}: a tensor is not on the CPU"),
    }
}

/// The CUDA storage behind a tensor, or an error naming the op.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_storage<'a>(
    storage: &'a candle_core::Storage,
    op: &str,
) -> Result<&'a candle_core::CudaStorage> {
    match storage {
        candle_core::Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("{op}: a tensor is not on the GPU"),
    }
}

/// The f32 elements of a contiguous CPU storage, or an error naming the op.
pub(crate) fn f32_slice<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    match storage {
        candle_core::CpuStorage::F32(data) => contiguous(data, layout, op, what),
        other => candle_core::bail!(
            "{op}: {what} is {:?}, expected f32",
            candle_core::backend::BackendStorage::dtype(other)
        ),
    }
}

/// [`f32_slice`] of a tensor's storage, which must be on the CPU.
pub(crate) fn cpu_f32<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
    op: &str,
    what: &str,
) -> Result<&'a [f32]> {
    f32_slice(cpu_storage(storage, op)?, layout, op, what)
}

/// `e^x` in f32 within 2 ulp, written so loops over slices vectorise (libm's `expf` is a call per element
/// and was 4% of a CPU training step). Cephes' method: `x = n·ln2 + r`, a degree-6 polynomial for `e^r`,
/// `2^n` from the exponent bits. Below −87.3 (where `e^x` leaves the normal range) it returns 0, which
/// makes masked attention scores exactly zero; above 88.7 it returns +∞.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // adding and subtracting 1.5·2^23 rounds to the nearest integer without a rounding instruction
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.33, 88.72);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    // 2^n in two factors, so n = 128 (x near 88.7) does not overflow the exponent field
    let n = n as i32;
    let pow2 = |k: i32| f32::from_bits(((k + 127) << 23) as u32);
    let y = e * pow2(n >> 1) * pow2(n - (n >> 1));
    if x < -87.33 {
        0.0
    } else if x > 88.72 {
        f32::INFINITY
    } else {
        y
    }
}

/// Rows per rayon task so that each task touches at least ~32k elements (smaller tasks cost more in
/// scheduling than they save on two to sixteen cores).
pub(crate) fn rows_per_task(row_len: usize) -> usize {
    (32 * 1024 / row_len.max(1)).max(1)
}

/// Shared CUDA plumbing: PTX compiled by `build.rs`, loaded once per device through candle's module
/// cache, and output buffers (poisoned on request).
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        self, CudaFunction, CudaSlice, CudaView, DevicePtrMut, DeviceRepr, LaunchConfig,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
    use candle_core::{CudaStorage, DType, Layout, Result};

    pub const ADAMW_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/adamw.ptx"));
    pub const CROSS_ENTROPY_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/cross_entropy.ptx"));
    pub const FLASH_ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attention.ptx"));
    pub const RMS_NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rms_norm.ptx"));
    pub const ROTARY_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rotary.ptx"));
    pub const SWIGLU_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/swiglu.ptx"));

    /// `name_f32`, `name_bf16` or `name_f16` from module `module` (a PTX text above).
    pub fn func(dev: &CudaDevice, module: &str, ptx: &str, name: &str, dtype: DType) -> Result<CudaFunction> {
        let suffix = match dtype {
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            other => candle_core::bail!("{name}: no CUDA kernel for {other:?} (f32, bf16, f16)"),
        };
        Ok(dev.get_or_load_custom_func(&format!("{name}_{suffix}"), module, ptx)?.into_cuda_function())
    }

    /// The elements a contiguous layout covers in a CUDA storage, or an error naming the op.
    pub fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
        op: &str,
        what: &str,
    ) -> Result<CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.as_cuda_slice::<T>()?.slice(a..b)),
            None => candle_core::bail!("{op}: {what} must be contiguous"),
        }
    }

    /// An uninitialised device buffer of `len` elements, or one filled with 0xFF bytes (NaN in f32,
    /// bf16 and f16) when [`super::poison_outputs`] is on.
    pub fn output<T: DeviceRepr>(dev: &CudaDevice, len: usize) -> Result<CudaSlice<T>> {
        // SAFETY: every element is written by the kernel that receives this buffer (which the
        // selftest checks by poisoning).
        // (at least one element: the driver refuses to allocate zero bytes, and a storage may be
        // longer than its tensor)
        let mut buf = unsafe { dev.alloc::<T>(len.max(1))? };
        if super::poison_outputs() {
            let stream = dev.cuda_stream();
            let bytes = buf.num_bytes();
            let (ptr, _record) = buf.device_ptr_mut(&stream);
            // SAFETY: `ptr` points at `bytes` bytes we own, on the stream the kernels run on.
            unsafe { driver::result::memset_d8_async(ptr, 0xFF, bytes, stream.cu_stream()) }.w()?;
        }
        Ok(buf)
    }

    /// A size as the kernels' 32-bit `unsigned` argument, or an error naming it (never a truncation).
    pub fn u32_arg(op: &str, what: &str, x: usize) -> Result<u32> {
        u32::try_from(x)
            .map_err(|_| candle_core::Error::Msg(format!("{op}: {what} {x} is too large for the kernel")))
    }

    /// Warp-per-row launch: blocks of 8 warps, one row each.
    pub fn warp_per_row(rows: usize) -> LaunchConfig {
        const WARPS: usize = 8;
        LaunchConfig {
            grid_dim: (rows.div_ceil(WARPS).max(1) as u32, 1, 1),
            block_dim: (32, WARPS as u32, 1),
            shared_mem_bytes: 0,
        }
    }

    /// Elementwise launch with a grid-stride loop inside the kernel.
    pub fn elementwise(n: usize) -> LaunchConfig {
        const THREADS: usize = 256;
        // enough blocks to fill an H100 several times over; the kernels loop over the rest
        let blocks = n.div_ceil(THREADS).clamp(1, 132 * 32);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::exp_f32;

    #[test]
    fn exp_f32_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let exact = (x as f64).exp();
            let err = ((exp_f32(x) as f64 - exact) / exact).abs();
            worst = worst.max(err);
            x += 0.000_97;
        }
        // two ulp of f32 is 2.4e-7 relative
        assert!(worst < 2.4e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(-88.0), 0.0);
        assert_eq!(exp_f32(f32::MIN), 0.0);
        assert_eq!(exp_f32(-f32::INFINITY), 0.0);
        assert_eq!(exp_f32(89.0), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
    }
}
