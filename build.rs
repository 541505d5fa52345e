//! With `--features cuda`: compiles `kernels/*.cu` to PTX with nvcc into `OUT_DIR`, where
//! `src/ops/mod.rs` embeds them with `include_str!`. Without the feature it does nothing.
//!
//! Why nvcc at build time rather than NVRTC at run time: candle-core's `cuda` feature already needs
//! the same nvcc at build time for its own kernels (candle-kernels does exactly this), so it costs no
//! new tool; kernel compile errors show up in `cargo build` on the CPU machine instead of on the scarce
//! GPU machine; the binary needs no libnvrtc at run time and does not compile anything when it starts
//! (the driver JIT-compiles the PTX for the card once, when the module is first loaded).
//!
//! Knobs: `CUDA_COMPUTE_CAP` (default 90 = H100/H200, at least 80; the PTX targets `compute_<cap>`,
//! which the driver compiles for that GPU and newer ones), `NVCC` (else
//! `$CUDA_ROOT/bin/nvcc`, else `nvcc` on PATH). `scripts/setup-cuda-build.sh` prints the exports.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    for var in ["CUDA_COMPUTE_CAP", "NVCC", "CUDA_ROOT", "NVCC_CCBIN"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    // read when the script runs, not when it is compiled: a target directory shared by two checkouts
    // reuses the compiled script, and a baked-in path would point at the other checkout
    let kernels =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR")).join("kernels");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap = cap.trim().trim_start_matches("sm_").trim_start_matches("compute_").replace('.', "");
    // the flash-attention kernels' bf16 tensor-core tiles (wmma) and the bf16 arithmetic need Ampere
    match cap.parse::<u32>() {
        Ok(c) if c >= 80 => {}
        _ => panic!(
            "CUDA_COMPUTE_CAP={cap}: candor's kernels need compute capability 8.0 or newer (80 = A100, 86/89 = \
             RTX 30xx/40xx, L4, 90 = H100/H200); set it to your GPU's (nvidia-smi --query-gpu=compute_cap --format=csv)"
        ),
    }
    // `--device cuda` compares it with the GPU's (src/cli/cuda.rs): PTX for compute_XY runs on XY and newer
    println!("cargo:rustc-env=CANDOR_CUDA_COMPUTE_CAP={cap}");
    let nvcc =
        std::env::var("NVCC").map(PathBuf::from).unwrap_or_else(|_| match std::env::var("CUDA_ROOT") {
            Ok(root) => Path::new(&root).join("bin/nvcc"),
            Err(_) => PathBuf::from("nvcc"),
        });
    // the CUDA release of this nvcc, for the driver check of `--device cuda` (src/cli/cuda.rs)
    let version = Command::new(&nvcc).arg("--version").output().unwrap_or_else(|e| no_nvcc(&nvcc, e));
    let version = String::from_utf8_lossy(&version.stdout);
    let release = version
        .split("release ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or_else(|| panic!("no \"release X.Y\" in `{} --version`: {version}", nvcc.display()));
    println!("cargo:rustc-env=CANDOR_CUDA_VERSION={release}");
    // candle-kernels links `-lcudart` without saying where (cudarc's linking mode used to add the
    // path; its dlopen mode, which we build, does not): the toolkit's lib/, where
    // setup-cuda-build.sh points libcudart.so at the static runtime
    if let Ok(root) = std::env::var("CUDA_ROOT") {
        println!("cargo:rustc-link-search=native={}", Path::new(&root).join("lib").display());
    }
    let mut sources: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .expect("kernels/ directory")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    for src in sources {
        let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let mut cmd = Command::new(&nvcc);
        cmd.arg("--ptx")
            .arg(format!("-arch=compute_{cap}"))
            .args(["-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg("-I")
            .arg(&kernels)
            .arg("-o")
            .arg(&ptx)
            .arg(&src);
        if let Ok(ccbin) = std::env::var("NVCC_CCBIN") {
            cmd.arg("-ccbin").arg(ccbin);
        }
        let status = cmd.status().unwrap_or_else(|e| no_nvcc(&nvcc, e));
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
    }
}

fn no_nvcc(nvcc: &Path, e: std::io::Error) -> ! {
    panic!(
        "cannot run {} ({e}): the cuda feature needs nvcc; run scripts/setup-cuda-build.sh and eval its exports",
        nvcc.display()
    )
}
