"""Greedy completions of a few fixed prompts, to put dense and pruned output side by side."""

from __future__ import annotations

import torch
from torch import nn

PROMPTS = (
    "The capital of France is",
    "Photosynthesis is the process by which",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Once upon a time, in a small village,",
)


@torch.inference_mode()
def greedy_completions(model: nn.Module, tokenizer, prompts=PROMPTS, max_new_tokens: int = 32) -> list[dict]:
    """[{"prompt", "completion"}]: greedy decoding with the KV cache, special tokens dropped."""
    out = []
    device = next(model.parameters()).device
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
        out.append({"prompt": prompt, "completion": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)})
    return out
