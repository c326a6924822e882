"""SparseGPT's saliency (Frantar & Alistarh, 2023): ``w^2 / [H^-1]_jj`` from the layer Hessian.

SparseGPT chooses its mask inside the OBS reconstruction sweep, tile by tile, from the saliency of
the weights as the sweep has updated them: this score gives that saliency (``sweep_saliency``) to
the ``obs`` compensation. Alone (global allocation, row-wise allocation) it ranks weights by the
saliency of removing each one alone, ``w^2 / [H^-1]_jj``.

With the ``dsnot`` compensation and no ``obs`` it is DSnoT's SparseGPT initialisation
(``--initial_method sparsegpt`` of zyxxmu/DSnoT): the mask is chosen per row from the saliency of the
weights as they are (no OBS update), DSnoT refines it, and the kept weights keep their dense values.
The reference ranks by ``w^2 / U_jj^2``, ``U`` the upper Cholesky factor of ``H^-1`` (the sweep's
diagonal applied to unupdated weights): ``saliency=sweep`` gives that; the default ``obs`` is the
saliency of removing the weight alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..core.hessian import hessian_factor
from ..core.registry import PartConfig, register
from ..core.stats import Needs
from .base import WEIGHT_LEVEL, Score


class SparseGPTConfig(PartConfig):
    damp: float = 0.01
    saliency: Literal["obs", "sweep"] = Field(
        "obs", description="outside the OBS sweep, rank by w^2/[H^-1]_jj (obs: removing the weight alone) or by "
                           "w^2/U_jj^2 (sweep: the sweep's diagonal on unupdated weights, DSnoT's SparseGPT initialisation)")


@register("score")
class SparseGPTScore(Score):
    name = "sparsegpt"
    description = ("OBS saliency w^2/[H^-1]_jj, the mask chosen inside the OBS sweep (SparseGPT); needs obs (or dsnot "
                   "alone: DSnoT's SparseGPT initialisation, no weight update)")
    Config = SparseGPTConfig
    needs = Needs(hessian=True)
    default_group = "layer"
    works_with = {"structure": WEIGHT_LEVEL}
    requires = {"compensation": ("obs", "dsnot", "alps", "admm")}  # dsnot alone: DSnoT's SparseGPT initialisation, no weight update
    hint = "sparsegpt reconstructs single weights; structured pruning scores units with magnitude, wanda, gblm, " \
           "fluctuation or taylor"

    def importance(self, weight, stats, module: str = "?") -> torch.Tensor:
        """OBS saliency of each weight when removed alone, ``w^2 / [H^-1]_jj`` (``saliency=sweep``: ``w^2 / U_jj^2``)."""
        U, dead, _ = hessian_factor(stats, self.config.damp, module)
        if self.config.saliency == "sweep":
            sal = self.sweep_saliency(weight.float(), U.diagonal())
        else:
            hinv_diag = (U * U).sum(0)  # diag of H^-1 = U^T U
            sal = weight.float().pow(2) / hinv_diag.unsqueeze(0)
        sal[:, dead] = 0.0
        return sal

    @staticmethod
    def sweep_saliency(W1: torch.Tensor, d1: torch.Tensor) -> torch.Tensor:
        """Saliency of the (updated) weights of a tile, ``d1`` the tile's diagonal of the Cholesky factor."""
        return W1.pow(2) / d1.pow(2).unsqueeze(0)
