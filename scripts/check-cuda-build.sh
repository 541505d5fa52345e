#!/usr/bin/env bash
# Compile-check the `cuda` feature on a machine without a GPU (CI): prepares the pinned CUDA 13.0
# toolchain (scripts/setup-cuda-build.sh), builds `cargo build --release --features cuda`, assembles
# our PTX (kernels/*.cu, compiled by build.rs) for the target GPU with ptxas, so PTX the driver would
# reject fails here instead of on the GPU machine, and checks the binary starts without any CUDA library
# and, on a machine without a driver, that `--device cuda` says so in one line.
#
# usage: scripts/check-cuda-build.sh            (extra arguments go to cargo build)
# env:   CARGO_TARGET_DIR (default $HOME/.cache/candor/target-cuda: keep it between runs — a cold build
#        spends ~11-14 min in nvcc on candle's kernels, a warm one 1-2 min), CANDOR_CUDA_PREFIX (the
#        toolchain venv, default $HOME/.cache/candor/cuda), CUDA_COMPUTE_CAP (default 90).
# The binary is $CARGO_TARGET_DIR/release/candor; a stripped copy goes to dist/candor-cuda (git-ignored,
# ~68 MB, over the 64 MiB a device run can carry) and gzipped to dist/candor-cuda.gz (~17 MB): carry that
# one; scripts/gpu-check.sh unpacks it on the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/candor/target-cuda}
export CARGO_TERM_COLOR=never
start=$(date +%s)
eval "$(scripts/setup-cuda-build.sh "${CANDOR_CUDA_PREFIX:-$HOME/.cache/candor/cuda}")"
cargo build --release --features cuda "$@"

# the newest build-script output of this crate holds the PTX build.rs wrote
out=$(ls -td "$CARGO_TARGET_DIR"/release/build/candor-*/out 2>/dev/null | while read -r d; do
  [ -f "$d/rms_norm.ptx" ] && { echo "$d"; break; }; done)
[ -n "$out" ] || { echo "check-cuda-build: no PTX from build.rs under $CARGO_TARGET_DIR/release/build" >&2; exit 1; }
for cu in kernels/*.cu; do
  ptx="$out/$(basename "$cu" .cu).ptx"
  [ -f "$ptx" ] || { echo "check-cuda-build: $ptx missing" >&2; exit 1; }
  ptxas -arch="sm_$CUDA_COMPUTE_CAP" "$ptx" -o /dev/null
done
# the oldest GPUs a build may target (CUDA_COMPUTE_CAP=80: A100; build.rs refuses less): our kernels
# compile and assemble for them too
ptx80=$(mktemp -d)
for cu in kernels/*.cu; do
  nvcc --ptx -arch=compute_80 -O3 -std=c++17 --expt-relaxed-constexpr -I kernels -o "$ptx80/k.ptx" "$cu"
  ptxas -arch=sm_80 "$ptx80/k.ptx" -o /dev/null
done
rm -rf "$ptx80"

bin=$CARGO_TARGET_DIR/release/candor
# cudarc opens the CUDA libraries with dlopen and cudart is static (setup-cuda-build.sh): the binary
# must not need any of them to start, so it runs on the CPU on a machine without a driver
needed=$(readelf -d "$bin" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')
case " $needed " in *" libcu"*|*" libnvrtc"*) echo "check-cuda-build: $bin links CUDA libraries (NEEDED: $needed)" >&2; exit 1;; esac
"$bin" --version > /dev/null

# `--device cuda` must fail with candor's own one-line error for each thing that can be missing. Fake
# driver and library files (built here) stand in for a machine's; skipped where a driver is installed.
if ! ldconfig -p 2>/dev/null | grep -q 'libcuda\.so\.1 '; then
  fake=$(mktemp -d); trap 'rm -rf "$fake"' EXIT
  lib() { mkdir -p "$fake/$1"; echo "$3" > "$fake/$2.c"; cc -shared -fPIC -Wl,-soname,"$2" -o "$fake/$1/$2" "$fake/$2.c"; }
  driver='int cuDriverGetVersion(int *v) { *v = VERSION; return 0; }'
  no_gpu='int cuInit(unsigned f) { return 100; } int cuGetErrorString(int e, const char **s) { *s = "no CUDA-capable device is detected"; return 0; }'
  lib driver-only libcuda.so.1 "${driver/VERSION/13000} $no_gpu"
  for dir in old-driver no-gpu no-symbol old-gpu turing; do for l in libcublasLt.so.13 libcublas.so.13 libcurand.so.10; do lib $dir $l "int unused;"; done; done
  lib old-driver libcuda.so.1 "${driver/VERSION/12040}"
  lib no-gpu libcuda.so.1 "${driver/VERSION/13000} $no_gpu"
  lib no-symbol libcuda.so.1 "${driver/VERSION/13000}"
  # a GPU of compute capability MAJOR.MINOR (attribute 75 is the major version, 76 the minor)
  gpu='int cuInit(unsigned f) { return 0; } int cuDeviceGet(int *d, int i) { *d = 0; return 0; }
    int cuDeviceGetAttribute(int *v, int a, int d) { *v = a == 75 ? MAJOR : MINOR; return 0; }'
  gpu() { local g=${gpu/MAJOR/$1}; echo "${g/MINOR/$2}"; }
  lib old-gpu libcuda.so.1 "${driver/VERSION/13000} $(gpu 8 0)"
  lib turing libcuda.so.1 "${driver/VERSION/13000} $(gpu 7 5)"
  cases=(":libcuda.so.1 not found" "driver-only:libcublasLt.so.13, libcublas.so.13, libcurand.so.10 not found"
    "old-driver:supports CUDA 12.4" "no-gpu:CUDA_ERROR_NO_DEVICE, \"no CUDA-capable device is detected\")); check"
    "no-symbol:Missing symbol cuInit" "turing:this GPU has compute capability 7.5; candor's kernels need 8.0 (A100) or newer")
  # an A100 under a build for a newer GPU (the default, 9.0)
  [ "$CUDA_COMPUTE_CAP" -gt 80 ] && cases+=("old-gpu:this GPU has compute capability 8.0 and this candor's kernels were compiled for $((CUDA_COMPUTE_CAP / 10)).$((CUDA_COMPUTE_CAP % 10)) and newer; rebuild with CUDA_COMPUTE_CAP=80")
  for case in "${cases[@]}"; do
    dir=${case%%:*}; want=${case#*:}
    set +e; err=$(LD_LIBRARY_PATH=${dir:+$fake/$dir} "$bin" selftest --device cuda 2>&1); rc=$?; set -e
    if [ $rc -ne 1 ] || [ "$(printf '%s\n' "$err" | wc -l)" -ne 1 ] || [[ $err != *"$want"* ]]; then
      echo "check-cuda-build: with ${dir:-no driver}, 'candor selftest --device cuda' should exit 1 with one line containing \"$want\"; exit $rc:" >&2
      printf '%s\n' "$err" >&2; exit 1
    fi
    echo "check-cuda-build: ${dir:-no driver}: $err"
  done
fi
mkdir -p dist
strip -o dist/candor-cuda "$bin"
gzip -9 -c dist/candor-cuda > dist/candor-cuda.gz
echo "check-cuda-build: ok in $(( $(date +%s) - start )) s: $bin (NEEDED: $needed); PTX assembled for sm_$CUDA_COMPUTE_CAP; stripped copy dist/candor-cuda, gzipped dist/candor-cuda.gz"
