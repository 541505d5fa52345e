//! The CUDA kernels in `kernels/*.cu`, run on the CPU: `tests/cuda_emu/cuda_emu.h` emulates the part of
//! CUDA they use (threads of a block as OS threads, real barriers and warp shuffles, bf16/f16 storage
//! types), and `tests/cuda_emu/kernels_test.cpp` checks every kernel against a double-precision loop
//! written from its formula, with the Rust wrappers' launch shapes and NaN-poisoned outputs. This is
//! what CI can say about the kernels' logic without a GPU; `candor selftest --device cuda` checks the
//! compiled PTX and the launch code on one.

use std::path::Path;
use std::process::Command;

#[test]
fn every_cuda_kernel_matches_its_reference_under_cpu_emulation() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut sources: Vec<_> = std::fs::read_dir(root.join("kernels"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("candor-cuda-emu");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let emu = root.join("tests/cuda_emu");
    let built = Command::new(&cxx)
        // (the kernels reinterpret 16-bit tiles as 16-byte vectors, as CUDA code does)
        .args(["-std=c++20", "-O1", "-fno-strict-aliasing", "-pthread"])
        .args(["-Wall", "-Wno-unknown-pragmas", "-I"])
        .arg(&emu)
        .arg("-I")
        .arg(root.join("kernels"))
        .args(["-include", "cuda_emu.h", "-x", "c++"])
        .args(&sources)
        .arg(emu.join("kernels_test.cpp"))
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{cxx}` ({e}): install g++ (C++20)"));
    assert!(
        built.status.success(),
        "compiling the emulated kernels failed:\n{}",
        String::from_utf8_lossy(&built.stderr)
    );

    let run = Command::new(&exe).output().expect("run the emulated kernels");
    let out = String::from_utf8_lossy(&run.stdout);
    print!("{out}");
    assert!(run.status.success(), "emulated kernels disagree with their references:\n{out}");

    // every kernel a .cu file instantiates was exercised, in every dtype it is instantiated for
    for src in &sources {
        let text = std::fs::read_to_string(src).unwrap();
        let mut kernels = Vec::new();
        for (prefix, dtypes) in [
            ("CANDOR_FOR_EACH_DTYPE(", &["f32", "bf16", "f16"][..]),
            ("CANDOR_FOR_EACH_HALF(", &["bf16", "f16"]),
        ] {
            for name in text
                .lines()
                .filter_map(|l| l.strip_prefix(prefix))
                .filter_map(|l| l.split(',').nth(1))
                .map(|n| n.trim().trim_end_matches(')'))
            {
                kernels.extend(dtypes.iter().map(|d| format!("{name}_{d}")));
            }
        }
        // and kernels declared for one type only (at the start of a line, so not inside a macro)
        kernels.extend(
            text.lines()
                .filter_map(|l| l.strip_prefix("extern \"C\" __global__ void "))
                .filter_map(|l| l.split('(').next())
                .map(|n| n.trim().to_string()),
        );
        assert!(!kernels.is_empty(), "{}: no kernels found", src.display());
        for kernel in kernels {
            assert!(
                out.contains(&format!("ok {kernel} ")),
                "{}: kernel {kernel} is not tested under emulation",
                src.display()
            );
        }
    }
}
