"""SparseGPT's saliency (Frantar & Alistarh, 2023): ``w^2 / [H^-1]_jj^2`` from the layer Hessian.

SparseGPT chooses its mask inside the OBS reconstruction sweep, tile by tile, from the saliency of
the weights as the sweep has updated them: this score gives that saliency (``sweep_saliency``) to
the ``obs`` compensation, which it requires. Alone (global allocation, row-wise allocation) it
ranks weights by the saliency of removing each one alone.
"""

from __future__ import annotations

import torch

from ..core.hessian import hessian_factor
from ..core.registry import PartConfig, register
from ..core.stats import Needs
from .base import WEIGHT_LEVEL, Score


class SparseGPTConfig(PartConfig):
    damp: float = 0.01


@register("score")
class SparseGPTScore(Score):
    name = "sparsegpt"
    description = "OBS saliency w^2/[H^-1]_jj^2, the mask chosen inside the OBS sweep (SparseGPT); needs obs"
    Config = SparseGPTConfig
    needs = Needs(hessian=True)
    default_group = "layer"
    works_with = {"structure": WEIGHT_LEVEL}
    requires = {"compensation": ("obs",)}
    hint = "sparsegpt reconstructs single weights; structured pruning scores units with magnitude, wanda, gblm, " \
           "fluctuation or taylor"

    def importance(self, weight, stats, module: str = "?") -> torch.Tensor:
        """OBS saliency of each weight when removed alone: ``w^2 / [H^-1]_jj``."""
        U, dead, _ = hessian_factor(stats, self.config.damp, module)
        hinv_diag = (U * U).sum(0)  # diag of H^-1 = U^T U
        sal = weight.float().pow(2) / hinv_diag.unsqueeze(0)
        sal[:, dead] = 0.0
        return sal

    @staticmethod
    def sweep_saliency(W1: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        """Saliency of the (updated) weights of a tile, ``d1`` the tile's diagonal of the Cholesky factor."""
        return W1.pow(2) / d1.pow(2).unsqueeze(0)
