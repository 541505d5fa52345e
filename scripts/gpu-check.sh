#!/usr/bin/env bash
# scripts/gpu-check.sh OUT_DIR — the one prepared check for the GPU machine (see docs/gpu-results.md).
#
# The GPU machine has no Rust and no network: build the binary here first with
#   scripts/check-cuda-build.sh        (writes dist/candor-cuda and dist/candor-cuda.gz)
# and take the repository with dist/candor-cuda.gz along (unpacked here when dist/candor-cuda is absent). There it needs python3 with torch, transformers, peft.
#
# Steps (each under `timeout`; the worst case adds up to about 7.9 minutes, 20+45+100+4x55+2x45 s):
#   a. nvidia-smi                                   -> OUT/nvidia-smi.log
#   b. candor selftest --device cuda                -> OUT/selftest.log
#   c. random-weight models shaped like Qwen2.5-0.5B and Llama-3.2-1B (transformers, bf16, temp dir)
#   d. per model: candor bench train-step (bf16, batch 8 x 1024, LoRA r=16 on 7 projections, AdamW)
#      and transformers+PEFT doing the same (scripts/bench_peft.py); GPU memory sampled by nvidia-smi;
#      for Llama-3.2-1B also candor with CANDOR_ATTENTION=composed (attention without the flash kernels)
#      and with CANDOR_LORA=composed (the LoRA layers' f32 generic path instead of bf16 GemmEx products)
#   e. one table: tokens/s, MFU (4 x params x tokens/s / 989e12), peak GPU memory, ratios
#                                                   -> OUT/summary.txt (printed last)
# Every step's full output is in OUT/<step>.log; a failed step does not stop the others.
#
# env: CANDOR_BIN (default dist/candor-cuda), PYTHON (default python3), STEPS (measured steps, default 4).
# Dry run of the script's plumbing on a CPU machine (numbers meaningless):
#   DEVICE=cpu TINY=1 BATCH=1 SEQ_LEN=64 CANDOR_BIN=target/release/candor scripts/gpu-check.sh /tmp/gc
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: scripts/gpu-check.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BIN=${CANDOR_BIN:-dist/candor-cuda}
PY=${PYTHON:-python3}
STEPS=${STEPS:-4}
DEVICE=${DEVICE:-cuda}
BATCH=${BATCH:-8}
SEQ_LEN=${SEQ_LEN:-1024}
TINY=${TINY:+--tiny}
T0=$(date +%s)
FAILED=()
log() { echo "[gpu-check +$(( $(date +%s) - T0 ))s] $*"; }

# run NAME LIMIT_S CMD...: output to the terminal and OUT/NAME.log, exit status remembered
run() {
  local name=$1 limit=$2; shift 2
  log "$name (limit ${limit} s): $*"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "exit status $rc" >> "$OUT/$name.log"
  if [ "$rc" -ne 0 ]; then
    FAILED+=("$name (exit $rc$([ "$rc" -eq 124 ] && echo ', timed out'))")
    log "$name FAILED with exit status $rc"
  fi
  return 0
}

# GPU memory in use, sampled every 200 ms while a benchmark runs
SAMPLER=
sample_start() { nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/$1.gpumem" 2>/dev/null & SAMPLER=$!; }
sample_stop() { [ -n "$SAMPLER" ] && kill "$SAMPLER" 2>/dev/null; wait "$SAMPLER" 2>/dev/null; SAMPLER=; }

# CUDA 13 runtime libraries come with the Python wheels; libcuda.so.1 comes from the driver
NV=$("$PY" -c 'import nvidia; print(list(nvidia.__path__)[0])' 2>/dev/null)
if [ -n "$NV" ]; then
  LIBS=$(ls -d "$NV"/cu13/lib "$NV"/*/lib 2>/dev/null | tr '\n' ':')
  export LD_LIBRARY_PATH="${LIBS}${LD_LIBRARY_PATH:-}"
fi
if [ ! -x "$BIN" ] && [ -z "${CANDOR_BIN:-}" ] && [ -f dist/candor-cuda.gz ]; then
  # what scripts/check-cuda-build.sh writes for carrying (the plain binary is over the carry limit)
  BIN_DIR=$(mktemp -d "${TMPDIR:-/tmp}/candor-bin.XXXXXX")
  BIN=$BIN_DIR/candor
  gzip -dc dist/candor-cuda.gz > "$BIN" && chmod +x "$BIN"
  echo "binary: unpacked dist/candor-cuda.gz to $BIN"
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  echo "binary: $BIN ($(stat -c %s "$BIN" 2>/dev/null || echo missing) bytes)"
  echo "LD_LIBRARY_PATH: ${LD_LIBRARY_PATH:-}"
  "$PY" -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' 2>&1
} | tee "$OUT/environment.log"
if [ ! -x "$BIN" ]; then
  echo "gpu-check: no candor binary at $BIN: build it with scripts/check-cuda-build.sh first (or set CANDOR_BIN)" >&2
  exit 2
fi

run nvidia-smi 20 bash -c 'nvidia-smi && nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader > "$0"' "$OUT/gpu.csv"
run selftest 45 "$BIN" selftest --device "$DEVICE"

MODELS=$(mktemp -d "${TMPDIR:-/tmp}/candor-gpu-check.XXXXXX")
trap 'sample_stop; rm -rf "$MODELS" ${BIN_DIR:+"$BIN_DIR"}' EXIT
run make-models 100 "$PY" scripts/make_bench_models.py "$MODELS" --device "$DEVICE" $TINY

for model in qwen2.5-0.5b llama-3.2-1b; do
  if [ ! -f "$MODELS/$model/config.json" ]; then
    FAILED+=("$model: no model to benchmark")
    continue
  fi
  variants=(candor)
  [ "$model" = llama-3.2-1b ] && variants+=(candor-composed candor-lora-composed)
  for who in "${variants[@]}"; do
    sample_start "$who-$model"
    attention=flash lora=half limit=55
    [ "$who" = candor-composed ] && attention=composed limit=45
    [ "$who" = candor-lora-composed ] && lora=composed limit=45
    run "$who-$model" $limit env CANDOR_ATTENTION=$attention CANDOR_LORA=$lora "$BIN" bench train-step "$MODELS/$model" --device "$DEVICE" \
      --dtype bf16 --batch "$BATCH" --seq-len "$SEQ_LEN" --rank 16 --steps "$STEPS" --optimizer adamw \
      --json "$OUT/$who-$model.json"
    sample_stop
  done
  sample_start "peft-$model"
  run "peft-$model" 55 "$PY" scripts/bench_peft.py "$MODELS/$model" --batch "$BATCH" --seq-len "$SEQ_LEN" --rank 16 \
    --steps "$STEPS" --warmup 2 --device "$DEVICE" --json "$OUT/peft-$model.json"
  sample_stop
done

log "summary"
"$PY" - "$OUT" "${FAILED[@]+"${FAILED[@]}"}" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys

out, failed = sys.argv[1], sys.argv[2:]
PEAK = 989e12  # H100/H200 SXM dense bf16 FLOP/s


def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def gpumem(name):
    try:
        with open(os.path.join(out, name + ".gpumem")) as f:
            vals = [float(l.split(",")[0]) for l in f if l.strip() and l.strip()[0].isdigit()]
        return max(vals) * 2**20 if vals else None
    except OSError:
        return None


def gb(b):
    return f"{b / 1e9:.1f} GB" if b else "-"


try:
    card = open(os.path.join(out, "gpu.csv")).read().strip() or "?"
except OSError:
    card = "? (nvidia-smi failed)"
selftest = open(os.path.join(out, "selftest.log")).read() if os.path.exists(os.path.join(out, "selftest.log")) else ""
print(f"card: {card}")
print("selftest: " + ("passed" if "checks passed" in selftest else "FAILED or did not run (see selftest.log)"))
c0 = load("candor-qwen2.5-0.5b.json") or load("peft-qwen2.5-0.5b.json") or {}
print(f"training step: bf16 base, LoRA r=16 on q,k,v,o,gate,up,down, batch {c0.get('batch')} x {c0.get('seq_len')} tokens, AdamW; "
      "MFU = 4 x base params x tokens/s / 989e12")
print("peak GPU memory: nvidia-smi memory.used (whole GPU, includes CUDA context and allocator caches); "
      "torch.max_memory_allocated for PEFT in brackets")
print("composed: candor with CANDOR_ATTENTION=composed (attention from cuBLAS products and candle ops, no flash kernels)")
print("lora-f32: candor with CANDOR_LORA=composed (LoRA branch through f32 copies instead of bf16 GemmEx products)")
hdr = f"{'model':14} {'trainer':7} {'tokens/s':>10} {'MFU':>7} {'step s':>8} {'peak GPU mem':>13}  {'':>10}"
print(hdr)
print("-" * len(hdr))
for model in ["qwen2.5-0.5b", "llama-3.2-1b"]:
    c, p = load(f"candor-{model}.json"), load(f"peft-{model}.json")
    n = (c or p or {}).get("num_parameters")
    rows = {}
    variants = (
        ("candor", c),
        ("peft", p),
        ("candor-composed", load(f"candor-composed-{model}.json")),
        ("candor-lora-composed", load(f"candor-lora-composed-{model}.json")),
    )
    for who, r in variants:
        if not r and who.startswith("candor-"):
            continue
        if not r:
            print(f"{model:14} {who:7} {'failed':>10}  (see {who}-{model}.log)")
            continue
        tps = r["tokens_per_s"]
        mem = gpumem(f"{who}-{model}")
        rows[who] = (tps, mem)
        who = {"candor-composed": "composed", "candor-lora-composed": "lora-f32"}.get(who, who)
        extra = f"[{gb(r.get('peak_memory_allocated_bytes'))}]" if who == "peft" else ""
        print(f"{model:14} {who:7} {tps:>10.0f} {4 * n * tps / PEAK:>7.1%} {r['median_step_s']:>8.3f} {gb(mem):>13}  {extra:>10}")
    if "candor" in rows and "peft" in rows:
        (ct, cm), (pt, pm) = rows["candor"], rows["peft"]
        mem_ratio = f"{cm / pm:.2f}x" if cm and pm else "-"
        print(f"{model:14} {'ratio':7} {ct / pt:>9.2f}x {'':>7} {'':>8} {mem_ratio:>13}   (candor / peft)")
if failed:
    print("failed steps: " + "; ".join(failed))
EOF
log "done; logs in $OUT"
[ ${#FAILED[@]} -eq 0 ]
