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
from ..core.stats import Needs, all_finite
from ..errors import PrunewiseError
from .base import Compensation


class OBSConfig(PartConfig):
    damp: float = Field(0.01, gt=0, description="dampening: share of the mean Hessian diagonal added to it")
    blocksize: int = Field(128, ge=1, description="columns per tile of the sweep")


class _FixedTiles:
    """A mask chosen before the sweep, handed out tile by tile."""

    every = 0

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask

    def begin(self, saliency, W1, d1, c0, c1):
        return self.mask[:, c0:c1].clone()


@register("compensation")
class OBSCompensation(Compensation):
    key = "obs"
    name = "obs"
    description = "OBS weight reconstruction through the inverse Hessian (SparseGPT's update), after any selection"
    Config = OBSConfig
    needs = Needs(hessian=True)
    reconstructs = True
    sweeps = True
    works_with = {"structure": ("unstructured", "n:m")}
    hint = "OBS updates single weights; structured runs compensate with bias"

    def compensate(self, weight: torch.Tensor, stats, structure, sparsity, mask: torch.Tensor | None = None,
                   saliency=None, module: str = "?") -> PruneOutcome:
        """The OBS-updated weight for ``mask``, or for the mask ``structure`` chooses with ``saliency`` during the sweep."""
        rows, cols = weight.shape
        U, dead, damp_used = hessian_factor(stats, self.config.damp, module)
        blocksize = structure.tile_width(self.config.blocksize)
        tiles = _FixedTiles(mask) if mask is not None else structure.tiles(rows, cols, sparsity)

        # the sweep runs on the transposed weight (a contiguous row per input column): each column's rank-1 update
        # covers a contiguous block, 0.6-0.7x the time of the same update on a column slice here
        WT = weight.detach().float().t().contiguous()  # a copy: the source weight is never written
        WT[dead] = 0.0
        maskT = torch.zeros(cols, rows, dtype=torch.bool)
        every = tiles.every  # 0: a tile's mask is whole when it begins; k: chosen k columns at a time as the sweep goes
        inf = torch.tensor(float("inf"))
        for c0 in range(0, cols, blocksize):
            c1 = min(c0 + blocksize, cols)
            W1T = WT[c0:c1]
            ErrT = torch.empty(c1 - c0, rows)  # the tile's errors, a contiguous row per column
            # per column, U_ii where the weight is removed and inf where it is kept, so that one division gives the
            # error (w * mask) / U_ii bit for bit: w / U_ii where removed, w / inf = +-0 (w's sign, as w * 0) where kept
            DT = torch.empty(c1 - c0, rows)
            U1 = U[c0:c1, c0:c1]
            d1 = torch.diag(U1)
            mask1T = maskT[c0:c1]
            W1, mask1 = W1T.t(), mask1T.t()  # the tile as (rows, columns) views, for the selector
            mask1.copy_(tiles.begin(saliency, W1, d1, c0, c1))
            if not every:
                torch.where(mask1T, d1.unsqueeze(1), inf, out=DT)
            # the tile's rows as views, taken once (indexing in the loop costs more than the arithmetic at these sizes)
            w_rows, err_rows, d_rows, u_rows = W1T.unbind(0), ErrT.unbind(0), DT.unbind(0), U1.unbind(0)
            for i in range(c1 - c0):
                if every and i % every == 0:
                    tiles.at_column(saliency, i, W1, d1, mask1)
                    torch.where(mask1T[i:i + every], d1[i:i + every].unsqueeze(1), inf, out=DT[i:i + every])
                # the removed part of column i (w - q, q being w with the masked weights zeroed), divided by U_ii
                err = torch.div(w_rows[i], d_rows[i], out=err_rows[i])
                # w_i - err * U_ii leaves column i at its pruned value q, the columns right of it updated
                W1T[i:].addr_(u_rows[i][i:], err, alpha=-1)
            W1T.masked_fill_(mask1T, 0.0)  # removed weights stay exactly zero: later updates only reach columns >= c1
            if c1 < cols:
                WT[c1:].addmm_(U[c0:c1, c1:].t(), ErrT, alpha=-1)
        W = WT.t().contiguous()
        out_mask = maskT.t().contiguous()
        if not all_finite(W):
            raise PrunewiseError(f"OBS reconstruction produced non-finite weights for {module}; raise --damp or use "
                                 "more calibration samples")
        notes = {"damp": damp_used} if damp_used != self.config.damp else {}
        if int(dead.sum()):
            notes["dead_inputs"] = int(dead.sum())
        return PruneOutcome(W.to(weight.dtype), out_mask, notes)
