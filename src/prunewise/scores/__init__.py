"""Scores: how important each weight is, and how a linear layer is pruned by that ranking."""

from __future__ import annotations

from ..errors import PrunewiseError
from .base import LinearStats, PruneOutcome, check_weight
from .simple import MagnitudeScore, WandaScore
from .sparsegpt import SparseGPTScore, inverse_hessian_factor

SCORES = {"magnitude": MagnitudeScore, "wanda": WandaScore, "sparsegpt": SparseGPTScore}


def get_score(name: str, **options):
    """A score by name; options (damp, blocksize) go to scores that take them."""
    if name not in SCORES:
        raise PrunewiseError(f"unknown score '{name}'; choose one of: {', '.join(SCORES)}")
    if name == "sparsegpt":
        return SparseGPTScore(**{k: v for k, v in options.items() if k in ("damp", "blocksize")})
    return SCORES[name]()


__all__ = ["SCORES", "get_score", "LinearStats", "PruneOutcome", "check_weight",
           "MagnitudeScore", "WandaScore", "SparseGPTScore", "inverse_hessian_factor"]
