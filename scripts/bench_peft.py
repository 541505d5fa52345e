#!/usr/bin/env python3
"""The baseline for `candor bench train-step`: one LoRA training step with transformers + PEFT.

Same work as candor's benchmark: base weights in bf16, LoRA r (alpha 2r, dropout 0) on all seven
projection types, random token ids as inputs and labels (batch x seq_len, no padding), loss = mean
next-token cross-entropy, backward, torch.optim.AdamW step. transformers' default attention (sdpa), no
gradient checkpointing, no torch.compile.

Prints one JSON object: tokens_per_s (median over the measured steps after warm-up), the step times,
peak GPU memory (torch.cuda.max_memory_allocated and max_memory_reserved, from after loading), and the
parameter counts.

usage: bench_peft.py MODEL_DIR [--batch 8] [--seq-len 1024] [--rank 16] [--steps 4] [--warmup 2]
                     [--device cuda|cpu] [--dtype bf16|f32] [--json FILE]
"""
import argparse
import resource
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "f32"])
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(dev)
    n_base = sum(p.numel() for p in model.parameters())
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len), generator=g).to(dev)
    tokens = args.batch * args.seq_len
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()

    times, losses = [], []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        s = time.perf_counter() - start
        losses.append(out.loss.item())
        if step >= args.warmup:
            times.append(s)
        print(f"  peft step {step}{' (warm-up)' if step < args.warmup else ''}: {s:.3f} s, "
              f"{tokens / s:.1f} tokens/s, loss {losses[-1]:.4f}", flush=True)

    median = statistics.median(times)
    summary = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        # the whole process's peak resident memory (what the CPU comparison uses)
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "num_parameters": n_base,
        "num_lora_parameters": sum(p.numel() for p in trainable),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "rank": args.rank,
        "optimizer": "adamw",
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "step_s": times,
        "median_step_s": median,
        "tokens_per_s": tokens / median,
        "peak_memory_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "torch": torch.__version__,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
