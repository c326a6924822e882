"""ALPS (Meng et al., 2024; mazumder-lab/ALPS ``alps.py``): layer reconstruction under a sparsity constraint by ADMM,
then a conjugate-gradient refit on the chosen support.

In the coordinates where the Hessian has a unit diagonal (``Hn = D^-1 H D^-1``, ``B = D W^T``, ``H`` damped by
``damp`` of its mean diagonal first), ALPS minimises ``||X(B - B0)||^2`` subject to ``B`` having the structure's
sparsity, by ADMM on the split ``B = Z``:

- ``B = (Hn + rho I)^-1 (Hn B0 - V + rho Z)`` (the eigendecomposition of ``Hn`` is computed once; each penalty
  ``rho`` costs one product),
- ``Z`` = the projection of ``B + V / rho`` on the constraint: its largest entries kept as the structure keeps them
  (the whole layer, each row, each N:M group; per-row levels of a row-wise plan included),
- ``V += rho (B - Z)``.

Every ``update_iter`` iterations the support change decides the penalty: above 10% of the kept count ``rho`` x1.3,
above 0.5% x1.2, any change x1.1 once it has started rising (before that: ``rho / 5`` and a restart from the dense
weights), no change: stop once it has risen (before that: ``rho / 5``); capped at 1e6. After ``switch_iter``
iterations a change below 0.03% of the kept count stops too. The last iterate is projected and the kept weights
are refit by ``cg_iter`` steps of conjugate gradient on the normal equations restricted to the support.

The starting ``Z`` is the score's mask on the dense weights (the reference starts from the magnitude of ``B0``,
which is Wanda's metric compared over the whole layer: ``--score wanda --group layer``). The mask ALPS returns is
the support it converged to, with the structure's counts exact.
"""

from __future__ import annotations

import time

import torch
from pydantic import Field

from ..core.hessian import normalized_hessian
from ..core.masks import PruneOutcome
from ..core.registry import PartConfig, register
from ..core.stats import Needs
from ..errors import PrunewiseError
from .base import Compensation


class ALPSConfig(PartConfig):
    damp: float = Field(0.01, ge=0, description="share of the mean Hessian diagonal added to it (the reference's ridge)")
    rho: float = Field(0.1, gt=0, description="the starting ADMM penalty, relative to a unit input energy")
    max_iter: int = Field(300, ge=1, description="most ADMM iterations")
    update_iter: int = Field(3, ge=1, description="iterations between penalty updates")
    switch_iter: int = Field(30, ge=0, description="iterations after which a support change below 0.03% stops")
    cg_iter: int = Field(10, ge=0, description="conjugate-gradient steps of the refit on the final support")


@register("compensation")
class ALPSCompensation(Compensation):
    key = "alps"
    name = "alps"
    description = ("ALPS: ADMM on the layer's reconstruction error under the structure's sparsity (penalty rising "
                   "with the support's stability), then a conjugate-gradient refit of the kept weights")
    Config = ALPSConfig
    needs = Needs(hessian=True)
    reconstructs = True
    chooses_mask = True  # starts from the selection's mask on the dense weights, returns the support it converged to
    default_group = "layer"  # the reference's projection keeps the largest entries of the whole layer
    works_with = {"structure": ("unstructured", "n:m")}
    hint = "ALPS reconstructs single weights; structured runs compensate with bias"

    def compensate(self, weight: torch.Tensor, stats, structure, sparsity, mask: torch.Tensor | None = None,
                   saliency=None, module: str = "?") -> PruneOutcome:
        if mask is None:
            raise PrunewiseError(f"alps on {module} needs a starting mask from the score")
        cfg = self.config
        t0 = time.perf_counter()
        device = weight.device
        eig = stats.cache.get(("alps_eig", cfg.damp))
        if eig is None:  # once per statistics object: q/k/v (and gate/up) share it
            Hn, scale, dead = normalized_hessian(stats, cfg.damp, module)
            # float32: 0.27x the time of float64 for a 1536-wide Hessian here; with the unit diagonal and the ridge
            # every (L + rho) is well away from zero
            try:
                L, Q = torch.linalg.eigh(Hn.float())
                ok = bool(torch.isfinite(L).all() and torch.isfinite(Q).all())
            except torch.linalg.LinAlgError:
                ok = False
            if not ok:  # the float64 decomposition, as the reference computes it
                L, Q = torch.linalg.eigh(Hn)
            eig = stats.cache[("alps_eig", cfg.damp)] = (L.float().to(device), Q.float().to(device),
                                                         Hn.float().to(device), scale.float().to(device), dead)
            del Hn
        L, Q, A, s, dead = eig
        W0 = weight.detach().float().clone()
        W0[:, dead.to(device)] = 0.0
        # every matrix is kept weight-shaped (out, in): B = D W^T of the docstring transposed, so the projections read
        # contiguous rows (on a transposed view the structure's selection costs 3x) and the products are right-hand
        B0 = W0 * s
        target = B0 @ A  # (Hn B0^T)^T

        select = structure.selector(weight.shape, sparsity)  # the layer-wide selection starts from its last threshold

        def project(Z: torch.Tensor) -> torch.Tensor:  # pruned mask (out, in)
            return select(Z.square())

        def solver(r: float) -> torch.Tensor:
            return (Q * (1.0 / (L + r))) @ Q.t()

        pruned = mask.to(device=device, dtype=torch.bool)
        keep_count = int((~pruned).sum())
        D_init = B0.masked_fill(pruned, 0.0)
        D, V, B = D_init.clone(), torch.zeros_like(B0), B0
        rho, rising = cfg.rho, False
        inv = solver(rho)
        last = pruned
        it = 0
        for it in range(cfg.max_iter):
            B = torch.add(target, D, alpha=rho).sub_(V) @ inv
            Z = torch.add(B, V, alpha=1.0 / rho)
            pruned = project(Z)
            D = Z.masked_fill_(pruned, 0.0)
            V.add_(B, alpha=rho).sub_(D, alpha=rho)
            if (it + 1) % cfg.update_iter:
                continue
            change = int((pruned != last).sum())
            share = change / max(keep_count, 1)
            if share > 0.1:
                rising, rho = True, rho * 1.3
            elif share > 0.005:
                rising, rho = True, rho * 1.2
            elif change > 0:
                if rising:
                    rho *= 1.1
                else:  # the support moves at a penalty too small to settle it: restart lower
                    rho /= 5
                    B, D, V = B0, D_init.clone(), torch.zeros_like(B0)
            elif rising:
                break
            else:
                rho /= 5
            last = pruned
            rho = min(rho, 1e6)
            inv = solver(rho)
            if it >= cfg.switch_iter and share < 0.0003:
                break
        pruned = project(B)
        keep = (~pruned).float()
        B = _refit(A, target, B * keep, keep, cfg.cg_iter)
        W = (B * keep) / s
        if not torch.isfinite(W).all():
            raise PrunewiseError(f"ALPS produced non-finite weights for {module}; raise its damp or use more "
                                 "calibration samples")
        notes = {"alps_iters": it + 1, "alps_rho": rho, "alps_s": time.perf_counter() - t0}
        if int(dead.sum()):
            notes["dead_inputs"] = int(dead.sum())
        return PruneOutcome(W.to(weight.dtype).contiguous(), pruned.contiguous(), notes)


def _refit(A: torch.Tensor, target: torch.Tensor, X: torch.Tensor, keep: torch.Tensor, steps: int) -> torch.Tensor:
    """Conjugate gradient on ``X A = target`` (``A`` symmetric) with ``X`` restricted to ``keep``, every row its own
    system."""
    R = (target - X @ A) * keep
    P = R.clone()
    rs = (R * R).sum(1, keepdim=True)
    for _ in range(steps):
        AP = P @ A
        den = (P * AP).sum(1, keepdim=True)
        alpha = torch.where(den > 0, rs / den.clamp_min(1e-30), torch.zeros_like(rs))
        X = X + alpha * P
        R = R - alpha * (AP * keep)
        rs_new = (R * R).sum(1, keepdim=True)
        beta = torch.where(rs > 0, rs_new / rs.clamp_min(1e-30), torch.zeros_like(rs))
        P = R + beta * P
        rs = rs_new
    return X
