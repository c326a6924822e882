"""The Python API: ``prune(recipe)``, ``evaluate(...)``, ``run(recipe)`` and ``apply_masks(...)``, the calls the CLI makes.

A thin front: the work is in ``pipeline/`` (the prune flow, and the evaluate-and-write path).
"""

from __future__ import annotations

from .core.masks import MaskSet
from .pipeline.prune import PruneResult, build_plan, peak_rss_mb, prune, targeted_numels
from .pipeline.reapply import apply_masks
from .pipeline.run import dense_key as _dense_key
from .pipeline.run import evaluate, run

__all__ = ["PruneResult", "MaskSet", "prune", "evaluate", "run", "apply_masks", "build_plan", "peak_rss_mb",
           "targeted_numels", "_dense_key"]
