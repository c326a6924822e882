"""Sparsity actually present in the weights, per module and overall."""

from __future__ import annotations

from torch import nn

from ..models.adapters import prunable_weights


def measure_sparsity(model: nn.Module, modules: list[str] | None = None) -> dict:
    """Zeros per prunable module (or the listed ones), their share, and the totals."""
    weights = prunable_weights(model)
    names = modules if modules is not None else list(weights)
    per = {}
    zeros = total = 0
    for name in names:
        w = weights[name]
        z = int((w == 0).sum())
        per[name] = {"zeros": z, "numel": w.numel(), "sparsity": z / w.numel()}
        zeros += z
        total += w.numel()
    all_params = sum(p.numel() for p in model.parameters())
    return {"modules": per, "zeros": zeros, "numel": total, "sparsity": zeros / total if total else 0.0,
            "all_parameters": all_params, "sparsity_of_all_parameters": zeros / all_params}
