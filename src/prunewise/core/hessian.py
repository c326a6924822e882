"""The inverse-Hessian factor that OBS saliency and OBS compensation share."""

from __future__ import annotations

import logging

import torch

from ..errors import PrunewiseError
from .stats import LinearStats

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
        # U^T U = H^-1 with U upper: with J the order-reversing permutation and J H J = L L^T (lower L),
        # U = J L^-1 J. One Cholesky and one triangular inverse, not Cholesky, inverse and a second Cholesky
        # (0.65-0.7x the time here; the same factor to float32 rounding), and no second factorisation to fail.
        L, info = torch.linalg.cholesky_ex(Hd.flip(0, 1))
        if info == 0:
            U = torch.linalg.solve_triangular(L, torch.eye(L.shape[0], dtype=L.dtype, device=L.device),
                                              upper=False).flip(0, 1)
            if torch.isfinite(U).all():
                if attempt:
                    log.warning("Cholesky for %s needed dampening %.3g (asked %.3g)", module, use, damp)
                return U, dead, use
    raise PrunewiseError(f"Cholesky factorisation of the Hessian of {module} failed even with dampening "
                         f"{damp * 10 ** retries:g}; use more calibration samples or a larger --damp")


def hessian_factor(stats: LinearStats, damp: float, module: str = "?"):
    """``(U, dead, damp_used)`` of the statistics' Hessian, computed once per dampening and kept on ``stats``.

    Linears reading the same input (q/k/v, gate/up) share one statistics object, so they share it.
    """
    found = stats.cache.get("factor")
    if found is None or found[0] != damp:
        stats.cache["factor"] = found = (damp, *inverse_hessian_factor(stats.hessian, damp, module))
    return found[1:]


def normalized_hessian(stats: LinearStats, damp: float, module: str = "?"):
    """``(Hn, scale, dead)``: the Hessian with ``damp * mean(diag H)`` added, scaled to a unit diagonal,
    ``Hn = D^-1 H D^-1`` with ``D = diag(scale)``, ``scale = sqrt(diag H)``; dead inputs (a zero diagonal) get a unit
    diagonal and are reported. In these coordinates a weight is ``W D`` and a penalty is relative to one input's
    energy (ALPS and ADMM work there). Not kept: the parts keep what they derive from it (a float64 copy of a 7B
    model's down_proj Hessian alone is 1 GB)."""
    H = stats.hessian.to(torch.float64, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * H.diagonal().mean())
    scale = H.diagonal().sqrt()
    if not torch.isfinite(H).all():
        raise PrunewiseError(f"the Hessian of {module} is not finite; check the calibration data")
    return H.div_(scale.unsqueeze(0)).div_(scale.unsqueeze(1)), scale, dead
