"""OBS compensation (Optimal Brain Surgeon, as SparseGPT sweeps it; Frantar & Alistarh, 2023).

Columns are swept left to right in tiles of ``blocksize``. Each removed weight's error is pushed
onto the not-yet-visited columns of its row through the upper Cholesky factor ``U`` of ``H^-1``,
and a tile's accumulated error updates everything to its right. The mask is either given (any
selector: Wanda, magnitude, ...; the wanda repo's ``prune_ablate`` and llm-compressor's
mask-preserving mode) or chosen tile by tile from a saliency of the updated weights (SparseGPT:
per tile, per row or per N:M group, as the structure's tile selector says).
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.hessian import hessian_factor
from ..core.masks import PruneOutcome
from ..core.registry import PartConfig, register
from ..core.stats import Needs
from ..errors import PrunewiseError
from .base import Compensation


class OBSConfig(PartConfig):
    damp: float = Field(0.01, gt=0, description="dampening: share of the mean Hessian diagonal added to it")
    blocksize: int = Field(128, ge=1, description="columns per tile of the sweep")


class _FixedTiles:
    """A mask chosen before the sweep, handed out tile by tile."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def begin(self, saliency, W1, d1, c0, c1):
        return self.mask[:, c0:c1].clone()

    def at_column(self, saliency, i, W1, d1, mask1):
        return None


@register("compensation")
class OBSCompensation(Compensation):
    key = "obs"
    name = "obs"
    description = "OBS weight reconstruction through the inverse Hessian (SparseGPT's update), after any selection"
    Config = OBSConfig
    needs = Needs(hessian=True)
    reconstructs = True
    works_with = {"structure": ("unstructured", "n:m")}
    hint = "OBS updates single weights; structured runs compensate with bias"

    def compensate(self, weight: torch.Tensor, stats, structure, sparsity, mask: torch.Tensor | None = None,
                   saliency=None, module: str = "?") -> PruneOutcome:
        """The OBS-updated weight for ``mask``, or for the mask ``structure`` chooses with ``saliency`` during the sweep."""
        W = weight.detach().float().clone()
        rows, cols = W.shape
        U, dead, damp_used = hessian_factor(stats, self.config.damp, module)
        W[:, dead] = 0.0
        out_mask = torch.zeros(rows, cols, dtype=torch.bool)
        blocksize = structure.tile_width(self.config.blocksize)
        tiles = _FixedTiles(mask) if mask is not None else structure.tiles(rows, cols, sparsity)

        for c0 in range(0, cols, blocksize):
            c1 = min(c0 + blocksize, cols)
            W1 = W[:, c0:c1].clone()
            ErrT = torch.empty(c1 - c0, rows)  # the tile's errors, a contiguous row per column
            U1 = U[c0:c1, c0:c1]
            d1 = torch.diag(U1)
            mask1 = tiles.begin(saliency, W1, d1, c0, c1)
            for i in range(c1 - c0):
                tiles.at_column(saliency, i, W1, d1, mask1)
                w = W1[:, i]
                err = ErrT[i]
                torch.div(w - w.masked_fill(mask1[:, i], 0.0), d1[i], out=err)
                # w_i - err * U_ii leaves column i at its pruned value q (w or 0), the columns right of it updated;
                # one fused rank-1 update (bit-identical to the product-then-subtract, 0.8x its time here)
                W1[:, i:].addr_(err, U1[i, i:], alpha=-1)
            W[:, c0:c1] = W1.masked_fill(mask1, 0.0)
            Err1 = ErrT.t()
            out_mask[:, c0:c1] = mask1
            if c1 < cols:
                W[:, c1:] -= Err1 @ U[c0:c1, c1:]
        if not torch.isfinite(W).all():
            raise PrunewiseError(f"OBS reconstruction produced non-finite weights for {module}; raise --damp or use "
                                 "more calibration samples")
        W[out_mask] = 0.0
        notes = {"damp": damp_used} if damp_used != self.config.damp else {}
        if int(dead.sum()):
            notes["dead_inputs"] = int(dead.sum())
        return PruneOutcome(W.to(weight.dtype), out_mask, notes)
