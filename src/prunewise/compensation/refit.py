"""Least-squares refit of the layer that consumes removed units (structured reconstruction).

When channels (MLP) or heads (attention) are removed, the output projection that reads them (``down_proj``,
``o_proj``) loses input columns. FLAP's bias compensation (``bias``) keeps only their mean contribution. The
refit chooses the kept columns and the bias together to reproduce the dense projection's output over the
calibration tokens: with ``mu`` the input mean and ``S`` its covariance (from the same dense statistics pass),

    W_K' = (W S[:, K] + lam W_K) (S[K, K] + lam I)^-1,    b' = b + W mu - W_K' mu_K,

the exact least-squares solution with an intercept (``lam = damp * mean(diag S[K, K])``: a ridge towards the
dense weights, so a poorly sampled input keeps its weights rather than blowing up). It is the closed form of the
structured OBS update (ZipLM, OSSCAR's refit) for the set removed at once; with ``K`` empty it is FLAP's bias.
The output stays a stock-loadable checkpoint: the kept columns are the same, only their values and the bias change.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.registry import PartConfig, register
from ..core.stats import Needs
from ..errors import PrunewiseError
from .base import Compensation


class RefitConfig(PartConfig):
    damp: float = Field(0.01, ge=0, description="ridge towards the dense weights, a share of the mean kept variance")


@register("compensation")
class RefitCompensation(Compensation):
    key = "refit"
    name = "refit"
    description = ("least-squares refit of o_proj / down_proj on the kept heads / channels, bias included "
                   "(structured reconstruction; FLAP's bias is its zeroth-order part)")
    Config = RefitConfig
    needs = Needs(hessian=True, mean=True)
    works_with = {"structure": ("channels", "heads", "width")}
    hint = "refit reconstructs the projections that read removed units (--structure channels, heads or width)"

    def conflicts(self, chosen) -> str | None:
        if any(p.key == "bias" for p in chosen.get("compensation", [])):
            return "compensation refit includes FLAP's bias compensation (its intercept); name refit alone"
        return None

    def fit(self, weight: torch.Tensor, bias: torch.Tensor | None, kept: torch.Tensor, stats,
            module: str = "?") -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_K', b')`` in float64 for ``weight`` (out, in) keeping input columns ``kept``."""
        if stats is None or stats.hessian is None or stats.sum is None or not stats.tokens:
            raise PrunewiseError(f"refit of {module} needs input statistics from calibration data")
        n = float(stats.tokens)
        mu = (stats.sum.double() / n)
        cov = stats.hessian.double() / n - torch.outer(mu, mu)
        W = weight.detach().double()
        b = torch.zeros(W.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
        if not kept.numel():
            return W[:, kept], b + W @ mu
        Skk = cov[kept][:, kept]
        lam = self.config.damp * float(Skk.diagonal().mean().clamp_min(1e-12))
        rhs = W @ cov[:, kept] + lam * W[:, kept]
        Skk.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(Skk)
        if int(info):
            raise PrunewiseError(f"refit of {module}: the kept inputs' covariance is singular; raise its damp "
                                 "(refit:damp=0.1) or use more calibration samples")
        Wk = torch.cholesky_solve(rhs.t(), L).t()
        if not torch.isfinite(Wk).all():
            raise PrunewiseError(f"refit of {module} produced non-finite weights; raise its damp")
        return Wk, b + W @ mu - Wk @ mu[kept]
