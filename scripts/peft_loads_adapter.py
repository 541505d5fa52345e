#!/usr/bin/env python3
"""Checks that PEFT loads an adapter candor wrote, and that it gives the golden loss.

usage: python scripts/peft_loads_adapter.py ADAPTER_DIR FAMILY   (FAMILY: llama, qwen2, qwen3; the adapter
must hold the weights of tests/fixtures/tiny-FAMILY/adapter, e.g. re-saved by `candor` or the lora tests)
"""
import sys

from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

adapter, family = sys.argv[1], sys.argv[2]
fixture = f"tests/fixtures/tiny-{family}"
base = AutoModelForCausalLM.from_pretrained(fixture, attn_implementation="eager")
model = PeftModel.from_pretrained(base, adapter)
g = load_file(f"{fixture}/golden.safetensors")
out = model(input_ids=g["input_ids"], attention_mask=g["attention_mask"], position_ids=g["position_ids"],
            labels=g["labels"])
diff = abs(out.loss.item() - g["loss"].item())
print(f"PEFT loaded {adapter}: loss {out.loss.item():.7f}, golden {g['loss'].item():.7f}, |diff| {diff:.2e}")
sys.exit(0 if diff < 1e-5 else 1)
