#!/usr/bin/env python3
"""Random-weight models shaped like Qwen2.5-0.5B-Instruct and Llama-3.2-1B-Instruct, for throughput
benchmarks on a machine without the hub (scripts/gpu-check.sh). Configs are typed in from the hub's
config.json files; weights are transformers' random initialisation (bf16), so only speed and memory
mean anything, not the loss.

Writes OUT/<name>/{config.json, model.safetensors...} with save_pretrained; no tokenizer (candor's
`bench train-step` and scripts/bench_peft.py feed random token ids).

usage: make_bench_models.py OUT [--only qwen2.5-0.5b|llama-3.2-1b] [--tiny] [--device cuda|cpu]
  --tiny keeps every width but uses 1 layer and a 4k vocabulary (to test the scripts on a CPU).
"""
import argparse
import os
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

SHAPES = {
    # Qwen/Qwen2.5-0.5B-Instruct config.json
    "qwen2.5-0.5b": (Qwen2Config, dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )),
    # meta-llama/Llama-3.2-1B-Instruct config.json
    "llama-3.2-1b": (LlamaConfig, dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128009,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
    )),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--only", choices=sorted(SHAPES))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, (config_class, kwargs) in SHAPES.items():
        if args.only and name != args.only:
            continue
        start = time.time()
        if args.tiny:
            kwargs = {**kwargs, "num_hidden_layers": 1, "vocab_size": 4096}
        config = config_class(**kwargs)
        config.dtype = "bfloat16"
        # initialising on the GPU takes seconds; on a CPU a 1B model takes a minute
        with torch.device(args.device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        path = os.path.join(args.out, name)
        model.save_pretrained(path)
        n = sum(p.numel() for p in model.parameters())
        print(f"{name}: {n / 1e6:.1f} M parameters -> {path} ({time.time() - start:.1f} s)", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
