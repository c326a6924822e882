"""SparseGPT (Frantar & Alistarh, 2023): OBS pruning with the layer Hessian and weight reconstruction.

Columns are swept left to right in blocks. Inside a block the mask is chosen by the OBS saliency
``w^2 / [H^-1]_jj^2`` (per block tile, per row, or per N:M group), each pruned weight's error is
pushed onto the not-yet-visited columns through the Cholesky factor of ``H^-1``, and the block's
accumulated error updates everything to its right.
"""

from __future__ import annotations

import logging

import torch

from ..errors import PrunewiseError
from ..structures.masks import NM, row_counts, smallest_overall, smallest_per_row
from .base import LinearStats, PruneOutcome

log = logging.getLogger(__name__)


def inverse_hessian_factor(hessian: torch.Tensor, damp: float, module: str = "?", retries: int = 4):
    """Upper Cholesky factor of ``(H + damp*mean(diag H)*I)^-1``; retries with 10x dampening on failure.

    Returns ``(factor, dead_columns, damp_used)``. Raises a one-line PrunewiseError when even the
    largest dampening fails.
    """
    H = hessian.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    mean_diag = torch.diag(H).mean()
    eye = torch.arange(H.shape[0])
    for attempt in range(retries + 1):
        use = damp * (10 ** attempt)
        Hd = H.clone()
        Hd[eye, eye] += use * mean_diag
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                if attempt:
                    log.warning("Cholesky for %s needed dampening %.3g (asked %.3g)", module, use, damp)
                return U, dead, use
    raise PrunewiseError(f"Cholesky factorisation of the Hessian of {module} failed even with dampening "
                         f"{damp * 10 ** retries:g}; use more calibration samples or a larger --damp")


class SparseGPTScore:
    """OBS-based pruning with reconstruction of the remaining weights."""

    name = "sparsegpt"
    needs = "hessian"
    default_group = "layer"

    def __init__(self, damp: float = 0.01, blocksize: int = 128) -> None:
        self.damp = damp
        self.blocksize = blocksize

    def factor(self, stats: LinearStats, module: str = "?"):
        """``(U, dead, damp_used)`` of the statistics' Hessian, computed once and kept on ``stats``.

        Linears reading the same input (q/k/v, gate/up) share one statistics object, so they share it.
        """
        found = getattr(stats, "factor", None)
        if found is None or found[0] != self.damp:
            stats.factor = found = (self.damp, *inverse_hessian_factor(stats.hessian, self.damp, module))
        return found[1:]

    def importance(self, weight: torch.Tensor, stats: LinearStats, module: str = "?") -> torch.Tensor:
        """OBS saliency of each weight when removed alone: ``w^2 / [H^-1]_jj``."""
        U, dead, _ = self.factor(stats, module)
        hinv_diag = (U * U).sum(0)  # diag of H^-1 = U^T U
        sal = weight.float().pow(2) / hinv_diag.unsqueeze(0)
        sal[:, dead] = 0.0
        return sal

    def prune(self, weight: torch.Tensor, stats: LinearStats, structure, sparsity, module: str = "?") -> PruneOutcome:
        W = weight.detach().float().clone()
        rows, cols = W.shape
        U, dead, damp_used = self.factor(stats, module)
        W[:, dead] = 0.0
        mask = torch.zeros(rows, cols, dtype=torch.bool)

        nm = structure if isinstance(structure, NM) else None
        n_zero = nm.zeros_for(float(sparsity)) if nm is not None else 0
        blocksize = self.blocksize
        if nm is not None and blocksize % nm.m:
            blocksize = nm.m * max(1, blocksize // nm.m)
        per_row = nm is None and (structure.group == "row" or (isinstance(sparsity, torch.Tensor) and sparsity.dim() == 1))
        counts = row_counts(rows, cols, sparsity) if nm is None else None
        total = int(counts.sum()) if counts is not None else 0

        for c0 in range(0, cols, blocksize):
            c1 = min(c0 + blocksize, cols)
            W1 = W[:, c0:c1].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            U1 = U[c0:c1, c0:c1]
            d1 = torch.diag(U1)
            if nm is None:
                sal = W1.pow(2) / d1.pow(2).unsqueeze(0)
                if per_row:
                    k = torch.round(counts.double() * c1 / cols) - torch.round(counts.double() * c0 / cols)
                    mask1 = smallest_per_row(sal, k.long())
                else:
                    k = round(total * c1 / cols) - round(total * c0 / cols)
                    mask1 = smallest_overall(sal, k)
            else:
                mask1 = torch.zeros_like(W1, dtype=torch.bool)
            for i in range(c1 - c0):
                w = W1[:, i]
                d = d1[i]
                if nm is not None and i % nm.m == 0 and n_zero:
                    sal = W1[:, i:i + nm.m].pow(2) / d1[i:i + nm.m].pow(2).unsqueeze(0)
                    idx = torch.topk(sal, n_zero, dim=1, largest=False).indices
                    mask1.scatter_(1, i + idx, True)
                q = w.masked_fill(mask1[:, i], 0.0)
                Q1[:, i] = q
                err = (w - q) / d
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
                Err1[:, i] = err
            W[:, c0:c1] = Q1
            mask[:, c0:c1] = mask1
            if c1 < cols:
                W[:, c1:] -= Err1 @ U[c0:c1, c1:]
        if not torch.isfinite(W).all():
            raise PrunewiseError(f"SparseGPT produced non-finite weights for {module}; raise --damp or use more calibration samples")
        W[mask] = 0.0
        notes = {"damp": damp_used} if damp_used != self.damp else {}
        if int(dead.sum()):
            notes["dead_inputs"] = int(dead.sum())
        return PruneOutcome(W.to(weight.dtype), mask, notes)
