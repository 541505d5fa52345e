#!/usr/bin/env bash
# scripts/setup-cuda-build.sh — candor's copy of the team's setup-cuda-build.sh (../shared/tools/), so a
# fresh CPU-only x86_64 Linux machine (CI) can compile `cargo build --release --features cuda` for a GPU
# machine whose driver is CUDA 13.0 (R580) and whose CUDA runtime libraries come from pip wheels
# (site-packages/nvidia/cu13/lib) at run time. Our own kernels (kernels/*.cu, compiled by build.rs)
# need nothing beyond what candle's kernels need: the same pinned nvcc.
#
# usage:  scripts/setup-cuda-build.sh [PREFIX] [CARGO_PROJECT_DIR]
#         eval "$(scripts/setup-cuda-build.sh)"                 (stdout = env exports only)
#         defaults: PREFIX=$HOME/.cache/candor/cuda, project = this repository
# scripts/check-cuda-build.sh runs this and the build.
#
# What it does (idempotent; re-runs take about a second once done):
#  1. python venv at PREFIX/venv with the CUDA 13.0 compiler wheels, all pinned
#     (nvcc and nvvm MUST be the same release: a newer nvvm emits PTX ptxas 13.0 rejects).
#  2. CUDA_ROOT=<venv>/site-packages/nvidia/cu13 ; adds lib/libcudart.so -> libcudart.so.13
#     (candle-kernels links -lcudart).
#  3. Link-time stub libraries in CUDA_ROOT/lib/stubs (a dir cudarc's build.rs searches):
#     libcuda.so (SONAME libcuda.so.1), libnvrtc.so (.13), libcurand.so (.10),
#     libcublas.so (.13), libcublasLt.so (.13). Their symbol lists are taken from the
#     extern "C" declarations of the cudarc crate that the project actually resolves to.
#     Stubs exist only as lib*.so (no lib*.so.N file), so the loader can never pick one up
#     at run time; the binary just records NEEDED libcuda.so.1, libcublas.so.13, ...
#     CUDA_LINK_MODE=wheels instead installs the real cuBLAS/cuRAND/NVRTC 13.0 wheels
#     (~570 MB download) and links against them; only libcuda stays a stub.
#
# env knobs: CUDA_COMPUTE_CAP (default 90 = H100/H200), CUDA_LINK_MODE (stubs|wheels),
#            PYTHON (default python3), PIP_CACHE_DIR (pip's normal download cache).
set -euo pipefail

PREFIX=${1:-$HOME/.cache/candor/cuda}
PROJECT=${2:-$(cd "$(dirname "$0")/.." && pwd)}
MODE=${CUDA_LINK_MODE:-stubs}
CAP=${CUDA_COMPUTE_CAP:-90}
PY=${PYTHON:-python3}

# CUDA 13.0 toolchain, pinned (13.0 U2 set).
TOOL_PKGS="nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
# Only for CUDA_LINK_MODE=wheels: the real 13.0 runtime libraries.
LIB_PKGS="nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88"

log() { echo "[setup-cuda-build] $*" >&2; }
case $MODE in stubs|wheels) ;; *) echo "CUDA_LINK_MODE must be stubs or wheels" >&2; exit 2;; esac

mkdir -p "$PREFIX"
PREFIX=$(cd "$PREFIX" && pwd)
VENV=$PREFIX/venv

# ---- 1. venv + pinned wheels ------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
  log "creating venv $VENV"
  "$PY" -m venv "$VENV" >&2
fi
want="$TOOL_PKGS"; [ "$MODE" = wheels ] && want="$want $LIB_PKGS"
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

# ---- 2. unversioned dev symlinks for real libraries -------------------------------------
ln -sfn libcudart.so.13 "$CUDA_ROOT/lib/libcudart.so"
if [ "$MODE" = wheels ]; then
  for l in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    [ -e "$CUDA_ROOT/lib/$l" ] || { echo "missing $CUDA_ROOT/lib/$l" >&2; exit 1; }
    ln -sfn "$l" "$CUDA_ROOT/lib/${l%%.so*}.so"
  done
else
  rm -f "$CUDA_ROOT"/lib/{libcublas,libcublasLt,libcurand,libnvrtc}.so
fi

# ---- 3. stub libraries ------------------------------------------------------------------
# locate the cudarc sources the project builds with (downloads crates if needed)
# --all-features: cudarc is usually behind an optional `cuda` feature of the project
meta=$(cargo metadata --format-version 1 --all-features --manifest-path "$PROJECT/Cargo.toml" \
         --filter-platform "$(rustc -vV | sed -n 's/^host: //p')") \
  || { echo "cargo metadata failed for $PROJECT" >&2; exit 1; }
CUDARC=$(printf '%s' "$meta" | "$PY" -c 'import json,sys,os
pk=[p for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"]
print(os.path.dirname(pk[0]["manifest_path"]) if pk else "")')
[ -n "$CUDARC" ] || { echo "cudarc not found in the dependency graph of $PROJECT" >&2; exit 1; }

STUBS=$CUDA_ROOT/lib/stubs
want_stubs="$MODE $CUDARC"
if [ "$(cat "$STUBS/.stamp" 2>/dev/null)" != "$want_stubs" ]; then
  log "building link stubs from $CUDARC"
  rm -rf "$STUBS"; mkdir -p "$STUBS"
  # module dir in cudarc : symbol regex : SONAME : link name
  specs="driver:^cu[A-Z]:libcuda.so.1:cuda"
  [ "$MODE" = stubs ] && specs="$specs nvrtc:^nvrtc:libnvrtc.so.13:nvrtc curand:^curand:libcurand.so.10:curand cublas:^cublas:libcublas.so.13:cublas cublaslt:^cublasLt:libcublasLt.so.13:cublasLt"
  for s in $specs; do
    IFS=: read -r mod re soname name <<<"$s"
    src=$STUBS/$name.c
    # every `fn NAME(` inside the bindings' extern "C" blocks; 34 = CUDA_ERROR_STUB_LIBRARY
    grep -oP '^\s+fn \K\w+(?=\()' "$CUDARC/src/$mod/sys/mod.rs" | grep -E "$re" | sort -u \
      | sed 's/.*/int &(void) { return 34; }/' > "$src"
    [ -s "$src" ] || { echo "no symbols for $name" >&2; exit 1; }
    gcc -shared -fPIC -nostdlib -Wl,-soname,"$soname" -o "$STUBS/lib$name.so" "$src"
    rm -f "$src"
  done
  echo "$want_stubs" > "$STUBS/.stamp"
fi

# ---- 4. what cargo needs ----------------------------------------------------------------
cat <<EOF
export PATH="$CUDA_ROOT/bin:\$PATH"
export CUDA_ROOT="$CUDA_ROOT"
export CUDA_COMPUTE_CAP=$CAP
EOF
log "ready: eval the exports above, then: cargo build --release --features cuda"
log "run time on the GPU box: libcuda.so.1 from the driver; put .../site-packages/nvidia/cu13/lib on LD_LIBRARY_PATH"
