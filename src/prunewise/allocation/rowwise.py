"""Row-wise allocation inside a layer (TRIM): a sparsity per output row, same total as the layer's level.

For a linear with weight ``W`` (rows x inputs), sample inputs ``X`` and a score's importance,
each row ``r`` keeps its ``round(cols * (1 - x_r))`` most important weights. Starting from the
uniform vector ``x_r = s``, one iteration measures each row's quality ``q_r = cos(W_r X, W'_r X)``
(cosine between the dense and pruned outputs of that row over the samples), normalises it to
``[0, 2 * lr]``, subtracts its mean and adds it to ``x``: rows that keep their output well take
more sparsity, rows that suffer give some back. ``x`` is clipped to ``[0, max_row]`` and
re-centred on ``s``. The vector with the best layer quality (cosine of the flattened outputs) over
``iterations`` steps is kept; learning rates are tried in increasing order while they improve,
and negative ones when no positive rate beats the uniform vector (as in the reference code).
Finally the vector is rounded to whole weights per row so that the layer removes exactly
``round(s * numel)`` weights: per-row plans average to their module's level.
"""

from __future__ import annotations

import torch

from .plan import exact_counts

POSITIVE_RATES = (0.01, 0.02, 0.04, 0.08, 0.12, 0.16)
NEGATIVE_RATES = (-0.01, -0.02, -0.04)


def exact_row_counts(sparsities: torch.Tensor, cols: int, total: int) -> torch.Tensor:
    """Per-row removal counts near ``sparsities * cols`` summing exactly to ``total`` (largest remainder)."""
    rows = len(sparsities)
    shares = exact_counts({r: float(x) for r, x in enumerate(sparsities.clamp(0, 1))}, dict.fromkeys(range(rows), cols),
                          total / (rows * cols))
    return torch.tensor([round(shares[r] * cols) for r in range(rows)], dtype=torch.long)


class RowPruner:
    """Applies per-row sparsity vectors through a fixed per-row ranking (ascending importance)."""

    def __init__(self, weight: torch.Tensor, importance: torch.Tensor, samples: torch.Tensor) -> None:
        self.W = weight.float()
        self.rank = torch.empty_like(importance, dtype=torch.long)
        order = torch.argsort(importance.float(), dim=1, stable=True)
        self.rank.scatter_(1, order, torch.arange(weight.shape[1]).expand_as(order))
        self.X = samples.float().t()                     # (in, S)
        self.dense = (self.W @ self.X).double()          # (rows, S)

    def outputs(self, sparsities: torch.Tensor) -> torch.Tensor:
        counts = torch.round(sparsities.double() * self.W.shape[1]).long()
        keep = self.rank >= counts.unsqueeze(1)
        return ((self.W * keep) @ self.X).double()

    def layer_quality(self, out: torch.Tensor) -> float:
        a, b = self.dense.flatten(), out.flatten()
        return float((a @ b) / (a.norm() * b.norm() + 1e-12))

    def row_quality(self, out: torch.Tensor) -> torch.Tensor:
        num = (self.dense * out).sum(1)
        return num / (self.dense.norm(dim=1) * out.norm(dim=1) + 1e-12)


def _iterate(pruner: RowPruner, target: float, rate: float, iterations: int, max_row: float):
    x = torch.full((pruner.W.shape[0],), float(target), dtype=torch.float64)
    out = pruner.outputs(x)
    best, best_x = pruner.layer_quality(out), x.clone()
    for _ in range(iterations):
        q = pruner.row_quality(out)
        span = q.max() - q.min()
        d = (q - q.min()) / (span + 1e-6) * (2 * rate)
        x = (x + d - d.mean()).clamp(0, max_row)
        x = x - x.mean() + target
        out = pruner.outputs(x)
        score = pruner.layer_quality(out)
        if score > best:
            best, best_x = score, x.clone()
    return best_x, best


def trim_row_sparsities(weight: torch.Tensor, importance: torch.Tensor, samples: torch.Tensor, target: float,
                        iterations: int = 10, max_row: float = 0.95) -> tuple[torch.Tensor, dict]:
    """TRIM's per-row sparsities for one layer at level ``target`` (exact total; see the module doc)."""
    rows, cols = weight.shape
    total = int(round(target * rows * cols))
    if total == 0 or samples.shape[0] == 0:
        return exact_row_counts(torch.full((rows,), target), cols, total).double() / cols, {"rate": None}
    pruner = RowPruner(weight, importance, samples)
    uniform = torch.full((rows,), float(target), dtype=torch.float64)
    baseline = pruner.layer_quality(pruner.outputs(uniform))
    best_q, best_x, best_rate = baseline, uniform, None
    for rates in (POSITIVE_RATES, NEGATIVE_RATES):
        if rates is NEGATIVE_RATES and best_rate is not None:
            break
        this_best = float("-inf")
        for rate in rates:
            x, q = _iterate(pruner, target, rate, iterations, max_row)
            if q > best_q:
                best_q, best_x, best_rate = q, x, rate
            if q > this_best:
                this_best = q
            else:
                break
    x = best_x.clamp(0, max_row)
    x = x - x.mean() + target
    counts = exact_row_counts(x, cols, total)
    final = counts.double() / cols
    achieved = pruner.layer_quality(pruner.outputs(final))
    exact_uniform = exact_row_counts(uniform, cols, total).double() / cols
    uniform_q = pruner.layer_quality(pruner.outputs(exact_uniform))
    if achieved <= uniform_q:  # rounding to whole weights lost the gain: keep the (exact) uniform rows
        final, achieved, best_rate = exact_uniform, uniform_q, None
    return final, {"rate": best_rate, "baseline_cosine": baseline, "cosine": achieved,
                   "row_min": float(final.min()), "row_max": float(final.max())}
