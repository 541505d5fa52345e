//! Opening the GPU for `--device cuda`, with one clear error for each way it can be missing.
//!
//! The CUDA build opens the driver and the CUDA libraries with dlopen (cudarc's `dynamic-loading`,
//! see scripts/setup-cuda-build.sh), so the binary starts and trains on the CPU anywhere. cudarc panics
//! when a library it needs cannot be opened; these checks run first, so that a missing driver, a
//! missing library or a driver too old for the build's PTX is reported by name instead.

use candle_core::Device;

/// The libraries `Device::new_cuda` opens: the driver, then cuBLAS (which needs cuBLASLt beside it)
/// and cuRAND, as (name for the message, whether cudarc finds it).
#[cfg(feature = "cuda")]
fn libraries() -> [(&'static str, bool); 4] {
    use candle_core::cuda_backend::cudarc;
    // SAFETY: each call only tries dlopen on cudarc's candidate names and closes what it opened
    unsafe {
        [
            ("libcuda.so.1", cudarc::driver::sys::is_culib_present()),
            ("libcublasLt.so.13", cudarc::cublaslt::sys::is_culib_present()),
            ("libcublas.so.13", cudarc::cublas::sys::is_culib_present()),
            ("libcurand.so.10", cudarc::curand::sys::is_culib_present()),
        ]
    }
}

/// The CUDA version of the nvcc that compiled the kernels (build.rs), as the driver API writes it
/// (13.0 → 13000): the PTX needs a driver at least that new.
#[cfg(feature = "cuda")]
fn required_driver() -> i32 {
    let v = env!("CANDOR_CUDA_VERSION");
    let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
    major.parse::<i32>().unwrap_or(0) * 1000 + minor.parse::<i32>().unwrap_or(0) * 10
}

/// The compute capability the kernels' PTX targets (build.rs, `CUDA_COMPUTE_CAP`), as major·10 + minor.
#[cfg(feature = "cuda")]
fn built_for() -> i32 {
    env!("CANDOR_CUDA_COMPUTE_CAP").parse().unwrap_or(0)
}

/// The first GPU's compute capability as major·10 + minor, or `None` when the driver cannot tell (then
/// opening the device reports why).
///
/// # Safety
/// The driver library is present (checked by the caller); a symbol it lacks panics inside cudarc.
#[cfg(feature = "cuda")]
unsafe fn gpu_capability() -> Option<i32> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let ok = |r: sys::CUresult| r == sys::CUresult::CUDA_SUCCESS;
    let mut device = 0;
    if !ok(sys::cuInit(0)) || !ok(sys::cuDeviceGet(&mut device, 0)) {
        return None;
    }
    let attribute = |a| {
        let mut v = 0;
        ok(sys::cuDeviceGetAttribute(&mut v, a, device)).then_some(v)
    };
    let major = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
    let minor = attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
    Some(major * 10 + minor)
}

/// The one-line error for a GPU older than the kernels were compiled for, which would otherwise fail
/// at the first kernel launch with the driver's "no kernel image" or "unsupported PTX".
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn too_old(gpu: i32, built: i32) -> Option<String> {
    let version = |c: i32| format!("{}.{}", c / 10, c % 10);
    if gpu < 80 {
        return Some(format!(
            "--device cuda: this GPU has compute capability {}; candor's kernels need 8.0 (A100) or newer",
            version(gpu)
        ));
    }
    (gpu < built).then(|| {
        format!(
            "--device cuda: this GPU has compute capability {} and this candor's kernels were compiled for {} and newer; rebuild with CUDA_COMPUTE_CAP={gpu} (scripts/check-cuda-build.sh, or cargo build --release --features cuda)",
            version(gpu),
            version(built)
        )
    })
}

#[cfg(feature = "cuda")]
pub(super) fn open() -> anyhow::Result<Device> {
    use candle_core::cuda_backend::cudarc;
    let missing: Vec<&str> = libraries().iter().filter(|(_, found)| !found).map(|(name, _)| *name).collect();
    if missing.first() == Some(&"libcuda.so.1") {
        anyhow::bail!(
            "--device cuda: libcuda.so.1 not found: this machine has no NVIDIA driver (install one with CUDA {} support, R580 or newer), or it is not on the loader's path",
            env!("CANDOR_CUDA_VERSION")
        );
    }
    if !missing.is_empty() {
        anyhow::bail!(
            "--device cuda: {} not found: put the CUDA {} libraries on LD_LIBRARY_PATH (e.g. pip install nvidia-cublas nvidia-curand, or PyTorch's site-packages/nvidia/cu13/lib)",
            missing.join(", "),
            env!("CANDOR_CUDA_VERSION")
        );
    }
    let mut version = 0;
    // SAFETY: cuDriverGetVersion writes one int and needs no initialised context
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    if version < required_driver() {
        anyhow::bail!(
            "--device cuda: the NVIDIA driver supports CUDA {}.{}, this candor was built with CUDA {} and needs a driver that supports it (R580 or newer for 13.0)",
            version / 1000,
            version % 1000 / 10,
            env!("CANDOR_CUDA_VERSION")
        );
    }
    // cudarc panics on a symbol the driver lacks: report it as an error too, without the panic's trace
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    // (formatting a driver error calls into the driver too, so it happens inside)
    let opened = std::panic::catch_unwind(|| {
        // SAFETY: the driver library is present (checked above)
        if let Some(message) = unsafe { gpu_capability() }.and_then(|gpu| too_old(gpu, built_for())) {
            return Err(message);
        }
        Device::new_cuda(0).map_err(|e| {
            format!(
                "--device cuda: no usable GPU ({}); check `nvidia-smi`",
                crate::error::one_line(&e.to_string())
            )
        })
    });
    std::panic::set_hook(hook);
    match opened {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(message)) => anyhow::bail!(message),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown failure");
            anyhow::bail!("--device cuda: the CUDA libraries could not be used: {what}")
        }
    }
}

#[cfg(not(feature = "cuda"))]
pub(super) fn open() -> anyhow::Result<Device> {
    anyhow::bail!(
        "--device cuda: this candor was built without CUDA; rebuild with `cargo build --release --features cuda` (see scripts/setup-cuda-build.sh for a machine without the CUDA toolkit)"
    )
}

#[cfg(test)]
mod tests {
    use super::too_old;

    #[test]
    fn a_gpu_older_than_the_build_gets_the_value_to_rebuild_with() {
        // PTX for compute_XY runs on XY and newer
        for (gpu, built) in [(90, 90), (100, 90), (120, 80), (89, 86)] {
            assert_eq!(too_old(gpu, built), None, "{gpu} under a build for {built}");
        }
        let a100 = too_old(80, 90).unwrap();
        assert!(a100.contains("compute capability 8.0") && a100.contains("compiled for 9.0"), "{a100}");
        assert!(a100.contains("rebuild with CUDA_COMPUTE_CAP=80"), "{a100}");
        assert!(too_old(86, 89).unwrap().contains("CUDA_COMPUTE_CAP=86"));
        assert!(too_old(90, 100).unwrap().contains("compiled for 10.0"));
        // below Ampere nothing helps
        let turing = too_old(75, 90).unwrap();
        assert!(
            turing.contains("7.5") && turing.contains("need 8.0") && !turing.contains("rebuild"),
            "{turing}"
        );
        assert!(!turing.contains('\n') && !a100.contains('\n'));
    }
}
