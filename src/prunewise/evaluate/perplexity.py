"""Perplexity with the protocol of the pruning papers.

The evaluation text is concatenated, tokenized once, cut into non-overlapping windows; perplexity
is exp of the mean negative log-likelihood over every predicted token (all but the first of each window).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


@torch.inference_mode()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int | None = None, progress: bool = True,
               desc: str = "perplexity", logit_budget: float = 2.5e7, per_window: list | None = None) -> float:
    """exp(mean NLL) over all predicted tokens of ``windows`` (n, L); by default batches hold at most
    ``logit_budget`` logits (float32: ~100 MB), one window at least. ``per_window``, when given, receives each
    window's mean NLL (for the spread between windows: how noisy the figure is)."""
    n, length = windows.shape
    vocab = model.config.get_text_config().vocab_size
    if batch_size is None:
        batch_size = max(1, int(logit_budget // (length * vocab)))
    nll, count = 0.0, 0
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        ids = windows[start:start + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits
        targets = ids[:, 1:].to(logits.device)  # logits come back from the compute device
        step = max(1, (1 << 22) // vocab)  # ~4M logits per loss call: its log-softmax is a slice, not a window
        for row in range(ids.shape[0]):  # a window's logits are a contiguous view: no copy of the batch's
            window = 0.0
            for t in range(0, length - 1, step):
                end = min(t + step, length - 1)
                window += float(F.cross_entropy(logits[row, t:end].float(), targets[row, t:end], reduction="sum"))
            nll += window
            if per_window is not None:
                per_window.append(window / (length - 1))
        count += ids[:, 1:].numel()
        del logits
    return math.exp(nll / count)


def interval95(window_nll: list[float]) -> tuple[float, float] | None:
    """A 95% interval of exp(mean NLL) from the spread of the per-window means (None under two windows)."""
    n = len(window_nll)
    if n < 2:
        return None
    mean = sum(window_nll) / n
    se = math.sqrt(sum((x - mean) ** 2 for x in window_nll) / (n - 1) / n)
    return math.exp(mean - 1.96 * se), math.exp(mean + 1.96 * se)


def ratio_interval95(pruned_nll: list[float], dense_nll: list[float]) -> tuple[float, float] | None:
    """A 95% interval of the pruned/dense perplexity ratio from the paired per-window differences (same windows)."""
    if len(pruned_nll) != len(dense_nll):
        return None
    return interval95([p - d for p, d in zip(pruned_nll, dense_nll)])
