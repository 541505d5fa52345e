//! The CUDA path of [`super::attention`] for bf16 and f16 with head dimension 64 or 128: launch code of
//! `kernels/flash_attention.cu` (FlashAttention-style: scores and probabilities stay in shared memory,
//! one tile at a time). Other dtypes and head dimensions on the GPU run the composed, recomputing
//! version in `attention.rs`, which the kernels are checked against (`candor selftest --device cuda`;
//! on the CPU, `tests/cuda_kernels.rs` runs the kernels themselves under emulation).
//!
//! The forward keeps, besides the output, each row's softmax max and sum (8 bytes per query row and
//! head) and the bias's tile map for the backward; the backward runs three kernels (rowsum(dO ⊙ O), dQ,
//! dK and dV) into one buffer.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, CudaView, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType};

use super::cuda::{func, output, u32_arg, view, warp_per_row, FLASH_ATTENTION_PTX};
use super::cuda_storage;

const OP: &str = "flash attention";

/// `$body` with `$t` the Rust type of `$dtype` (bf16 or f16: the kernels' types).
macro_rules! with_half_type {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            other => candle_core::bail!("{OP}: no kernel for {other:?} (bf16, f16)"),
        }
    };
}
const MODULE: &str = "candor_flash_attention";
/// Threads per block of the attention kernels (4 warps), rows per forward/dQ block, keys per dK/dV
/// block; as in kernels/flash_attention.cu.
const THREADS: u32 = 128;
const ROWS: usize = 64;
const KEYS: usize = 64;

/// Whether the kernels take these inputs: on a GPU, bf16 or f16 throughout, head dimension 64 or 128,
/// nothing empty; and `CANDOR_ATTENTION` is not `composed` (the switch for A/B measurements, which
/// `scripts/gpu-check.sh` uses).
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    static COMPOSED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let composed = *COMPOSED.get_or_init(|| std::env::var("CANDOR_ATTENTION").is_ok_and(|v| v == "composed"));
    !composed
        && q.device().is_cuda()
        && q.elem_count() > 0
        && k.elem_count() > 0
        && matches!(q.dtype(), DType::BF16 | DType::F16)
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && matches!(q.dim(3), Ok(64 | 128))
}

/// `softmax(q·kᵀ/√d + bias)·v` as [`super::attention`] defines it (shapes checked there):
/// `[b, t, heads · d]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let (b, nh, t, d) = q.dims4()?;
    let op = Flash {
        bias: bias.map(Tensor::contiguous).transpose()?,
        scale: 1.0 / (d as f32).sqrt(),
        saved: Mutex::new(None),
    };
    let last = super::attention::last_dim_contiguous;
    let out = last(q)?.apply_op3(&last(k)?, &last(v)?, op)?;
    out.reshape((b, t, nh * d))
}

/// Shapes and strides of one call, as the kernels take them.
struct Dims {
    b: usize,
    nh: u32,
    nkv: u32,
    t: u32,
    tk: u32,
    d: usize,
    /// batch, head and row strides of q, k, v (elements; the last dimension is contiguous)
    q: [u64; 3],
    k: [u64; 3],
    v: [u64; 3],
}

impl Dims {
    fn of(ql: &Layout, kl: &Layout, vl: &Layout) -> Result<Dims> {
        let (b, nh, t, d) = ql.shape().dims4()?;
        let (kb, nkv, tk, kd) = kl.shape().dims4()?;
        // super::attention checks these for every path; the kernels index out of bounds without them
        if kb != b || kd != d || vl.shape().dims() != kl.shape().dims() || nkv == 0 || nh % nkv != 0 {
            candle_core::bail!(
                "{OP}: q {:?}, k {:?}, v {:?} do not fit (same batch and head size, query heads a multiple of kv heads)",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        let strides = |l: &Layout, what: &str| -> Result<[u64; 3]> {
            match l.stride() {
                [s0, s1, s2, 1] => Ok([*s0 as u64, *s1 as u64, *s2 as u64]),
                _ => candle_core::bail!("{OP}: {what} needs a contiguous last dimension (layout {l:?})"),
            }
        };
        let small = |x: usize, what: &str| u32_arg(OP, what, x);
        if b > 65_535 || nh > 65_535 {
            candle_core::bail!(
                "{OP}: a batch of {b} rows of {nh} heads is more than a grid takes (65535 each)"
            );
        }
        Ok(Dims {
            b,
            nh: small(nh, "heads")?,
            nkv: small(nkv, "KV heads")?,
            t: small(t, "queries")?,
            tk: small(tk, "keys")?,
            d,
            q: strides(ql, "q")?,
            k: strides(kl, "k")?,
            v: strides(vl, "v")?,
        })
    }

    /// The shape arguments every attention kernel ends with (`FLASH_DIMS` in the .cu file).
    fn push<'a>(&'a self, scale: &'a f32, args: &mut LaunchArgs<'a>) {
        args.arg(&self.nh).arg(&self.nkv).arg(&self.t).arg(&self.tk);
        for s in self.q.iter().chain(&self.k).chain(&self.v) {
            args.arg(s);
        }
        args.arg(scale);
    }

    fn query_blocks(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((self.t as usize).div_ceil(ROWS) as u32, self.nh, self.b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    fn key_blocks(&self) -> LaunchConfig {
        LaunchConfig {
            grid_dim: ((self.tk as usize).div_ceil(KEYS) as u32, self.nkv, self.b as u32),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// The kernel for this head dimension: `NAME_d64_bf16` and so on.
    fn func(&self, dev: &CudaDevice, name: &str, dtype: DType) -> Result<CudaFunction> {
        func(dev, MODULE, FLASH_ATTENTION_PTX, &format!("{name}_d{}", self.d), dtype)
    }
}

/// What the backward needs from the forward.
struct Saved {
    /// `[b, t, heads, 2]`: each row's max and Σ exp(x − max)
    stats: CudaSlice<f32>,
    /// the bias's tile map and blind row groups (see `attn_tile_map`), when there is a bias
    map: Option<(CudaSlice<u8>, CudaSlice<u8>)>,
}

struct Flash {
    /// f32 `[b, 1, t, tk]`, contiguous
    bias: Option<Tensor>,
    scale: f32,
    saved: Mutex<Option<Arc<Saved>>>,
}

/// The arguments every attention kernel starts with: q, k, v, and the bias with its tile map (null
/// pointers without a bias).
struct Inputs<'a, T> {
    q: CudaView<'a, T>,
    k: CudaView<'a, T>,
    v: CudaView<'a, T>,
    masks: Option<(CudaView<'a, f32>, &'a CudaSlice<u8>, &'a CudaSlice<u8>)>,
    null: u64,
}

impl<'a, T> Inputs<'a, T> {
    fn push<'b>(&'b self, args: &mut LaunchArgs<'b>) {
        args.arg(&self.q).arg(&self.k).arg(&self.v);
        match &self.masks {
            Some((bias, map, blind)) => args.arg(bias).arg(*map).arg(*blind),
            None => args.arg(&self.null).arg(&self.null).arg(&self.null),
        };
    }
}

/// A typed view of `s` from `l`'s start (the kernels index with the layout's strides).
fn strided<'a, T: CudaDType>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    Ok(slice.slice(l.start_offset()..))
}

/// The bias as a view, from its storage (which the caller keeps read-locked while it uses the view).
fn bias_view<'a, S: std::ops::Deref<Target = candle_core::Storage>>(
    locked: &'a Option<(S, &Layout)>,
) -> Result<Option<CudaView<'a, f32>>> {
    locked.as_ref().map(|(s, l)| view::<f32>(cuda_storage(s, OP)?, l, OP, "bias")).transpose()
}

impl Flash {
    fn forward<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dims = Dims::of(ql, kl, vl)?;
        let (b, t, tk) = (dims.b, dims.t as usize, dims.tk as usize);
        let dev = &qs.device;
        let stream = dev.cuda_stream();
        let (q, k, v) = (strided::<T>(qs, ql)?, strided::<T>(ks, kl)?, strided::<T>(vs, vl)?);
        let locked = self.bias.as_ref().map(Tensor::storage_and_layout);
        let bias = bias_view(&locked)?;
        let map = match &bias {
            None => None,
            Some(bias) => {
                let (gq, gk) = (t.div_ceil(16), tk.div_ceil(16));
                let mut map = output::<u8>(dev, b * gq * gk)?;
                let mut blind = output::<u8>(dev, b * gq)?;
                let f = dev
                    .get_or_load_custom_func("attn_tile_map", MODULE, FLASH_ATTENTION_PTX)?
                    .into_cuda_function();
                let mut args = stream.launch_builder(&f);
                args.arg(bias).arg(&mut map).arg(&mut blind).arg(&dims.t).arg(&dims.tk);
                let cfg = LaunchConfig {
                    grid_dim: (gq as u32, b as u32, 1),
                    block_dim: (32, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: argument list matches `attn_tile_map` in kernels/flash_attention.cu.
                unsafe { args.launch(cfg) }.w()?;
                Some((map, blind))
            }
        };
        let nh = dims.nh as usize;
        let mut out = output::<T>(dev, b * t * nh * dims.d)?;
        let mut stats = output::<f32>(dev, b * t * nh * 2)?;
        let f = dims.func(dev, "flash_fwd", T::DTYPE)?;
        {
            let masks = bias.zip(map.as_ref()).map(|(bias, (map, blind))| (bias, map, blind));
            let inputs = Inputs { q, k, v, masks, null: 0 };
            let mut args = stream.launch_builder(&f);
            inputs.push(&mut args);
            args.arg(&mut out).arg(&mut stats);
            dims.push(&self.scale, &mut args);
            // SAFETY: argument list matches `flash_fwd_d*` in kernels/flash_attention.cu.
            unsafe { args.launch(dims.query_blocks()) }.w()?;
        }
        *self.saved.lock().unwrap() = Some(Arc::new(Saved { stats, map }));
        let shape = Shape::from((b, t, nh, dims.d));
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), shape))
    }
}

impl CustomOp3 for Flash {
    fn name(&self) -> &'static str {
        "candor-flash-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{OP}: the kernels run on CUDA only (the CPU has its own fused attention)")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        with_half_type!(q.dtype(), T => self.forward::<T>((q, ql), (k, kl), (v, vl)))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        d_out: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let saved = self.saved.lock().unwrap().clone();
        let Some(saved) = saved else { candle_core::bail!("{OP}: backward before forward") };
        let op = Backward {
            out: out.clone(),
            d_out: d_out.to_dtype(out.dtype())?.contiguous()?,
            bias: self.bias.clone(),
            scale: self.scale,
            saved,
        };
        let grads = q.apply_op3_no_bwd(k, v, &op)?;
        let (b, nh, t, d) = q.dims4()?;
        let (_, nkv, tk, _) = k.dims4()?;
        let (nq, nk) = (b * t * nh * d, b * tk * nkv * d);
        // [b, len, heads, d] storage, returned as [b, heads, len, d] views like the inputs
        let dq = grads.narrow(0, 0, nq)?.reshape((b, t, nh, d))?.transpose(1, 2)?;
        let dk = grads.narrow(0, nq, nk)?.reshape((b, tk, nkv, d))?.transpose(1, 2)?;
        let dv = grads.narrow(0, nq + nk, nk)?.reshape((b, tk, nkv, d))?.transpose(1, 2)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward as an op of (q, k, v): dQ, dK and dV flattened into one buffer
/// (`[b, t, heads, d]`, then `[b, tk, kv_heads, d]` twice).
struct Backward {
    out: Tensor,
    d_out: Tensor,
    bias: Option<Tensor>,
    scale: f32,
    saved: Arc<Saved>,
}

impl Backward {
    fn run<T: CudaDType + DeviceRepr + WithDType>(
        &self,
        (qs, ql): (&CudaStorage, &Layout),
        (ks, kl): (&CudaStorage, &Layout),
        (vs, vl): (&CudaStorage, &Layout),
    ) -> Result<(CudaStorage, Shape)> {
        let dims = Dims::of(ql, kl, vl)?;
        let (b, nh, t, tk, d) = (dims.b, dims.nh as usize, dims.t as usize, dims.tk as usize, dims.d);
        let dev = &qs.device;
        let stream = dev.cuda_stream();
        let (q, k, v) = (strided::<T>(qs, ql)?, strided::<T>(ks, kl)?, strided::<T>(vs, vl)?);
        let (os, ol) = self.out.storage_and_layout();
        let (gs, gl) = self.d_out.storage_and_layout();
        let o = view::<T>(cuda_storage(&os, OP)?, ol, OP, "output")?;
        let d_out = view::<T>(cuda_storage(&gs, OP)?, gl, OP, "output gradient")?;
        let locked = self.bias.as_ref().map(Tensor::storage_and_layout);
        let bias = bias_view(&locked)?;

        let rows = b * t * nh;
        let mut delta = output::<f32>(dev, rows)?;
        {
            let f = func(dev, MODULE, FLASH_ATTENTION_PTX, "attn_delta", T::DTYPE)?;
            let (rows_u, d_u) = (u32_arg(OP, "rows", rows)?, u32_arg(OP, "head dimension", d)?);
            let mut args = stream.launch_builder(&f);
            args.arg(&o).arg(&d_out).arg(&mut delta).arg(&rows_u).arg(&d_u);
            // SAFETY: argument list matches `attn_delta_*` in kernels/flash_attention.cu.
            unsafe { args.launch(warp_per_row(rows)) }.w()?;
        }

        let (nq, nk) = (rows * d, b * tk * dims.nkv as usize * d);
        let mut grads = output::<T>(dev, nq + 2 * nk)?;
        {
            let (mut dq, mut rest) = grads.split_at_mut(nq);
            let (mut dk, mut dv) = rest.split_at_mut(nk);
            let masks = bias.zip(self.saved.map.as_ref()).map(|(bias, (map, blind))| (bias, map, blind));
            let inputs = Inputs { q, k, v, masks, null: 0 };
            let f = dims.func(dev, "flash_dq", T::DTYPE)?;
            let mut args = stream.launch_builder(&f);
            inputs.push(&mut args);
            args.arg(&d_out).arg(&self.saved.stats).arg(&delta).arg(&mut dq);
            dims.push(&self.scale, &mut args);
            // SAFETY: argument list matches `flash_dq_d*` in kernels/flash_attention.cu.
            unsafe { args.launch(dims.query_blocks()) }.w()?;

            let f = dims.func(dev, "flash_dkv", T::DTYPE)?;
            let mut args = stream.launch_builder(&f);
            inputs.push(&mut args);
            args.arg(&d_out).arg(&self.saved.stats).arg(&delta).arg(&mut dk).arg(&mut dv);
            dims.push(&self.scale, &mut args);
            // SAFETY: argument list matches `flash_dkv_d*` in kernels/flash_attention.cu.
            unsafe { args.launch(dims.key_blocks()) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(grads, dev.clone()), Shape::from(nq + 2 * nk)))
    }
}

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "candor-flash-attention-backward"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("{OP}: the kernels run on CUDA only")
    }

    fn cuda_fwd(
        &self,
        q: &CudaStorage,
        ql: &Layout,
        k: &CudaStorage,
        kl: &Layout,
        v: &CudaStorage,
        vl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        with_half_type!(q.dtype(), T => self.run::<T>((q, ql), (k, kl), (v, vl)))
    }
}
