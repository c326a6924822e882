"""Task loss: mean negative log-likelihood of the completion tokens only, the prompt being context."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunewiseError


@torch.inference_mode()
def task_loss(model: nn.Module, ids: torch.Tensor, loss_mask: torch.Tensor, batch_size: int | None = None,
              progress: bool = False, desc: str = "task loss") -> dict[str, float | int]:
    """Mean NLL over positions whose target token is masked in: {'nll', 'perplexity' (= exp nll), 'tokens'}."""
    if ids.dim() != 2 or loss_mask.shape != ids.shape:
        raise PrunewiseError(
            f"task_loss needs ids and loss_mask of the same (n, L) shape, got {tuple(ids.shape)} and "
            f"{tuple(loss_mask.shape)}; pass the pair task_windows returns"
        )
    mask = loss_mask.bool()
    targets = mask[:, 1:]  # token t+1 is predicted at position t; the first token of a window is never a target
    total = int(targets.sum())
    if total == 0:
        raise PrunewiseError("task_loss found no completion token with context to score; check the loss mask")
    n, length = ids.shape
    vocab = model.config.get_text_config().vocab_size
    if batch_size is None:  # keep the logits of one batch under ~400 MB
        batch_size = max(1, int(1e8 // (length * vocab)))
    nll = 0.0
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        batch_targets = targets[start:start + batch_size]
        if not batch_targets.any():
            continue
        # causal attention: columns after the batch's last target change nothing, so they are not computed
        last = int(batch_targets.any(dim=0).nonzero().max()) + 1  # last predicting position
        batch = ids[start:start + batch_size, :last + 1]
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1]
        keep = batch_targets[:, :last]
        loss = F.cross_entropy(logits[keep].float(), batch[:, 1:][keep], reduction="sum")
        nll += float(loss)
    mean = nll / total
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": total}
