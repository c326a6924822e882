"""Scores: how important each weight (or structured unit) is. One file per score, registered here."""

from __future__ import annotations

from ..core.registry import REGISTRIES
from ..core.stats import LinearStats, check_weight
from . import atp, dpruner, ean, easyep, fluctuation, frequency, gblm, magnitude, reap, ria, sparsegpt, taylor, wanda  # noqa: F401  (registration)
from .base import Score

SCORES = REGISTRIES["score"].parts


def get_score(name: str, **options) -> Score:
    """A score by name with its options (e.g. ``damp`` for sparsegpt)."""
    cls = REGISTRIES["score"].get(name)
    return REGISTRIES["score"].build(name, **{k: v for k, v in options.items() if k in cls.Config.model_fields})


__all__ = ["SCORES", "Score", "get_score", "LinearStats", "check_weight"]
