#!/usr/bin/env bash
# Compile-check the `cuda` feature on a machine without a GPU (CI): prepares the pinned CUDA 13.0
# toolchain (scripts/setup-cuda-build.sh), builds `cargo build --release --features cuda`, assembles
# our PTX (kernels/*.cu, compiled by build.rs) for the target GPU with ptxas, so PTX the driver would
# reject fails here instead of on the GPU machine, and checks the binary records the CUDA libraries it
# will load there.
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
eval "$(scripts/setup-cuda-build.sh "${CANDOR_CUDA_PREFIX:-$HOME/.cache/candor/cuda}" "$PWD")"
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

bin=$CARGO_TARGET_DIR/release/candor
needed=$(readelf -d "$bin" | sed -n 's/.*NEEDED.*\[\(.*\)\]/\1/p' | tr '\n' ' ')
for lib in libcuda.so.1 libcublas.so.13; do
  case " $needed " in *" $lib "*) ;; *) echo "check-cuda-build: $bin does not link $lib (NEEDED: $needed)" >&2; exit 1;; esac
done
mkdir -p dist
strip -o dist/candor-cuda "$bin"
gzip -9 -c dist/candor-cuda > dist/candor-cuda.gz
echo "check-cuda-build: ok in $(( $(date +%s) - start )) s: $bin (NEEDED: $needed); PTX assembled for sm_$CUDA_COMPUTE_CAP; stripped copy dist/candor-cuda, gzipped dist/candor-cuda.gz"
