#!/usr/bin/env bash
# scripts/setup-cuda-build.sh — candor's copy of the team's setup-cuda-build.sh (../shared/tools/), so a
# fresh CPU-only x86_64 Linux machine (CI) can compile `cargo build --release --features cuda` for a GPU
# machine whose driver is CUDA 13.0 (R580) and whose CUDA runtime libraries come from pip wheels
# (site-packages/nvidia/cu13/lib) at run time. Our own kernels (kernels/*.cu, compiled by build.rs)
# need nothing beyond what candle's kernels need: the same pinned nvcc.
#
# usage:  scripts/setup-cuda-build.sh [PREFIX]
#         eval "$(scripts/setup-cuda-build.sh)"                 (stdout = env exports only)
#         default PREFIX=$HOME/.cache/candor/cuda
# scripts/check-cuda-build.sh runs this and the build.
#
# What it does (idempotent; re-runs take about a second once done):
#  1. python venv at PREFIX/venv with the CUDA 13.0 compiler wheels, all pinned
#     (nvcc and nvvm MUST be the same release: a newer nvvm emits PTX ptxas 13.0 rejects).
#  2. CUDA_ROOT=<venv>/site-packages/nvidia/cu13, where lib/libcudart.so is a linker script naming
#     libcudart_static.a: candle-kernels asks for `-lcudart` (the host code of its MoE kernels), and
#     linking it statically keeps every CUDA library out of the binary's NEEDED list.
# Nothing else is linked: cudarc is built with `dynamic-loading` (vendor/candle-core/Cargo.toml), so
# the driver, cuBLAS and cuRAND are opened with dlopen when `--device cuda` first needs them. The
# binary starts on any machine, and a missing library is reported by candor itself, by name.
#
# env knobs: CUDA_COMPUTE_CAP (default 90 = H100/H200), PYTHON (default python3),
#            PIP_CACHE_DIR (pip's normal download cache).
set -euo pipefail

PREFIX=${1:-$HOME/.cache/candor/cuda}
CAP=${CUDA_COMPUTE_CAP:-90}
PY=${PYTHON:-python3}

# CUDA 13.0 toolchain, pinned (13.0 U2 set).
TOOL_PKGS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"

log() { echo "[setup-cuda-build] $*" >&2; }

mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
VENV=$PREFIX/venv

# ---- 1. venv + pinned wheels ------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PY" -m venv "$VENV" >&2
fi
want="$TOOL_PKGS"
stamp=$VENV/.cuda-pkgs
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "pip install $want"
  # one resolver run, so the pins also constrain nvcc's own (unpinned) dependencies
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q $want >&2
  echo "$want" > "$stamp"
fi

CUDA_ROOT=$(echo "$VENV"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$CUDA_ROOT/bin/nvcc" ] || { echo "nvcc not found under $CUDA_ROOT" >&2; exit 1; }
"$CUDA_ROOT/bin/nvcc" --version | grep -q 'release 13\.0' \
  || { echo "expected nvcc release 13.0" >&2; exit 1; }

# ---- 2. -lcudart resolves to the static runtime ------------------------------------------
# GNU ld reads a text file found for -lcudart as a linker script (as libc.so is); the static runtime
# needs the dl/rt/pthread parts of glibc
[ -f "$CUDA_ROOT/lib/libcudart_static.a" ] || { echo "missing $CUDA_ROOT/lib/libcudart_static.a" >&2; exit 1; }
rm -f "$CUDA_ROOT/lib/libcudart.so"
echo "INPUT($CUDA_ROOT/lib/libcudart_static.a -ldl -lrt -lpthread)" > "$CUDA_ROOT/lib/libcudart.so"
rm -rf "$CUDA_ROOT/lib/stubs"

# ---- 3. what cargo needs ----------------------------------------------------------------
cat <<EOF
export PATH="$CUDA_ROOT/bin:\$PATH"
export CUDA_ROOT="$CUDA_ROOT"
export CUDA_COMPUTE_CAP=$CAP
EOF
log "ready: eval the exports above, then: cargo build --release --features cuda"
log "run time on the GPU box: libcuda.so.1 from the driver; libcublas.so.13, libcublasLt.so.13 and libcurand.so.10 on LD_LIBRARY_PATH (.../site-packages/nvidia/cu13/lib)"
