"""What every score shares: the score part interface (importance of single weights and of structured units)."""

from __future__ import annotations

import torch

from ..core.registry import Part
from ..core.stats import NONE, LinearStats, Needs, check_weight

__all__ = ["Score", "LinearStats", "Needs", "check_weight"]

WEIGHT_LEVEL = ("unstructured", "n:m")
UNITS = ("channels", "heads", "width")
EXPERTS = ("experts",)


class Score(Part):
    """A pruning criterion: how important each weight is (higher = keep).

    ``importance`` ranks single weights (unstructured, N:M, and the allocation methods that rank
    weights); ``unit_element`` is the per-weight quantity summed over a structured unit (a channel,
    a head) and ``unit_finish`` turns the sums into unit scores. A score that ranks whole units
    from its own statistics overrides ``unit_scores``.
    """

    needs: Needs = NONE
    default_group: str = "row"  # comparison group for unstructured sparsity: "row" or "layer"
    # a score whose saliency must be recomputed on the updated weights inside a reconstruction sweep
    # (SparseGPT): the OBS compensation then chooses the mask tile by tile with ``sweep_saliency``
    sweep_saliency = None

    def importance(self, weight: torch.Tensor, stats: LinearStats | None, module: str = "?") -> torch.Tensor:
        raise NotImplementedError

    def unit_element(self, weight: torch.Tensor, stats: LinearStats | None) -> torch.Tensor:
        return self.importance(weight, stats)

    def unit_finish(self, values: torch.Tensor) -> torch.Tensor:
        return values

    unit_scores = None  # optional: (linears by role, geometry, stats by role) -> {"channels", "query", "kv"}

    def expert_scores(self, stats) -> torch.Tensor:
        """Scores of a MoE layer's routed experts from its :class:`~prunewise.core.stats.ExpertStats` (higher = keep);
        an expert the calibration data never reached scores 0, so it goes first."""
        raise NotImplementedError(f"{self.name} does not rank experts")
