#!/usr/bin/env python3
"""The reference for `candor bench data`: Hugging Face datasets' `map` doing the same work on the same rows.

Replicates a FalseReject-schema JSONL to N rows, then renders each row's conversation with the SmolLM2
chat template, tokenizes it, and builds loss labels on the assistant turn (prefix rendering, as candor
does), with the tokenizer transformers builds from the same GGUF. Prints rows/s and wall time as JSON.

usage: python scripts/bench_data_hf.py --gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
           --data data/sample/falsereject_sample.jsonl [--rows 15000] [--num-proc 2]
"""
import argparse
import json
import os
import time

import datasets
from transformers import AutoTokenizer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--rows", type=int, default=15000)
    ap.add_argument("--num-proc", type=int, default=2)
    a = ap.parse_args()
    d, f = os.path.split(os.path.abspath(a.gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    rows = [json.loads(line) for line in open(a.data) if line.strip()]
    rows = [rows[i % len(rows)] for i in range(a.rows)]
    ds = datasets.Dataset.from_list([{"prompt": r["prompt"], "response": r["instruct_response"]} for r in rows])

    def prepare(batch):
        out = {"input_ids": [], "labels": []}
        for prompt, response in zip(batch["prompt"], batch["response"]):
            user = [{"role": "user", "content": prompt}]
            full = user + [{"role": "assistant", "content": response}]
            prefix = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
            text = tok.apply_chat_template(full, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"])
            out["input_ids"].append(ids)
            out["labels"].append([-100] * n_prefix + ids[n_prefix:])
        return out

    times = []
    for _ in range(3):
        start = time.perf_counter()
        done = ds.map(prepare, batched=True, num_proc=a.num_proc, remove_columns=ds.column_names,
                      load_from_cache_file=False)
        times.append(time.perf_counter() - start)
    tokens = sum(len(x) for x in done["input_ids"])
    best = sorted(times)[len(times) // 2]
    print(json.dumps({"rows": a.rows, "num_proc": a.num_proc, "median_s": round(best, 3),
                      "rows_per_s": round(a.rows / best, 1), "tokens": tokens,
                      "datasets": datasets.__version__}))


if __name__ == "__main__":
    main()
