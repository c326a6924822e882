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

``select=obs`` also chooses which MLP channels a block loses (the count stays the allocation's): structured OBS as
ZipLM does it, one channel at a time, the one whose removal costs least after the previous removals' updates,
``dL_j = ||W[:, j]||^2 / [S^-1]_jj``, then ``W -= W[:, j] [S^-1]_j,: / [S^-1]_jj`` and the inverse downdated;
the refit above then gives the kept columns their final values. ``select=leverage`` is MoDeGPT's MLP step (its
Nystrom approximation): keep the channels of largest ridge leverage ``[C (C + lam I)^-1]_jj`` of the channels'
correlation ``C`` (``lam = ridge * mean(diag C)``, the public reimplementation's 1e-2 made scale-free), then the
same closed-form refit of down_proj (here with the intercept). Heads keep the score's choice (their removal must
respect the key/value groups).

``swaps=N`` adds OSSCAR's local search (Meng et al., 2024) after any selection: the refit's error is a constant minus
``tr(P_K S_KK^-1 P_K^T)`` (``P = W S``); a step removes the kept channel that costs least (structured OBS on the kept
set) and adds the removed channel whose Schur complement then explains most, when the pair lowers the error; at most
``N`` steps, stopping at the first that would not lower it.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from ..core.registry import PartConfig, register
from ..core.stats import Needs
from ..errors import PrunewiseError
from .base import Compensation


class RefitConfig(PartConfig):
    damp: float = Field(0.01, ge=0, description="ridge towards the dense weights, a share of the mean kept variance")
    select: Literal["score", "obs", "leverage"] = Field(
        "score", description="which MLP channels go (the same count per block): the score's choice, structured OBS "
                             "(ZipLM's greedy removal), or MoDeGPT's Nystrom selection (ridge leverage scores)")
    ridge: float = Field(0.01, gt=0, description="leverage: the ridge, a share of the mean channel energy")
    swaps: int = Field(0, ge=0, description="OSSCAR-style local search after the selection: at most this many "
                                          "kept/removed channel swaps, each lowering the refit's error (0: none)")


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
        mu, cov = _moments(stats, module)
        W = weight.detach().double()
        b = torch.zeros(W.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
        if not kept.numel():
            return W[:, kept], b + W @ mu
        Skk = cov[kept][:, kept]  # a copy: the cached covariance is not written
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

    def select_channels(self, weight: torch.Tensor, keep: int, stats, module: str = "?",
                        start: torch.Tensor | None = None) -> torch.Tensor:
        """Sorted indices of the ``keep`` input columns of ``weight`` kept by structured OBS (greedy removal), by
        ridge leverage, or the score's ``start`` (``select``), then improved by ``swaps`` local-search swaps."""
        if self.config.select == "score":
            if start is None:
                raise PrunewiseError(f"refit of {module}: select=score needs the score's kept channels")
            kept = torch.sort(start.flatten().long()).values
        else:
            kept = self._select(weight, keep, stats, module)
        if self.config.swaps:
            kept = self.swap(weight, kept, stats, module)
        return kept

    def explained(self, weight: torch.Tensor, kept: torch.Tensor, stats, module: str = "?") -> float:
        """What the refit on ``kept`` recovers of the dense output's (ridge) energy, ``tr(P_K S_KK^-1 P_K^T)`` with
        ``P = W S`` (``S`` the covariance plus the ridge): the refit's error is a constant minus it."""
        S, P = self._swap_terms(weight, stats, module)
        K = kept.long()
        L = torch.linalg.cholesky(S[K][:, K])
        Y = torch.linalg.solve_triangular(L, P[:, K].t(), upper=False)
        return float(Y.square().sum())

    def _damped(self, cov: torch.Tensor) -> torch.Tensor:
        """A copy of ``cov`` with ``damp`` of its mean diagonal added (structured OBS's and the swaps' covariance)."""
        S = cov.clone()
        S.diagonal().add_(self.config.damp * float(cov.diagonal().mean().clamp_min(1e-12)))
        return S

    def _swap_terms(self, weight, stats, module):
        S = self._damped(_moments(stats, module)[1])
        return S, weight.detach().double() @ S

    def swap(self, weight: torch.Tensor, kept: torch.Tensor, stats, module: str = "?") -> torch.Tensor:
        """OSSCAR's local search (Meng et al., 2024) on the refit's objective: each step removes the kept channel
        whose loss costs least (structured OBS on the kept set) and adds the removed channel that then explains most
        (its Schur complement), when the pair gains; it stops at the first step that would not."""
        S, P = self._swap_terms(weight, stats, module)
        inside = torch.zeros(S.shape[0], dtype=torch.bool)
        inside[kept.long()] = True
        K = torch.nonzero(inside).flatten()
        M = torch.cholesky_inverse(torch.linalg.cholesky(S[K][:, K]))  # (S_KK)^-1, kept in K's order by the swaps
        for _ in range(self.config.swaps):
            R = torch.nonzero(~inside).flatten()
            if not K.numel() or not R.numel():
                break
            loss = (P[:, K] @ M).square().sum(0) / M.diagonal()
            i = int(torch.argmin(loss))
            rest = torch.ones(K.numel(), dtype=torch.bool)
            rest[i] = False
            K2 = K[rest]
            M2 = (M - torch.outer(M[:, i], M[i]) / M[i, i])[rest][:, rest]  # the inverse without channel K[i]
            C = S[K2][:, R]  # covariance of the kept with each candidate
            MC = M2 @ C
            residual = P[:, R] - P[:, K2] @ MC
            schur = S.diagonal()[R] - (C * MC).sum(0)
            gain = residual.square().sum(0) / schur.clamp_min(1e-30)
            j = int(torch.argmax(gain))
            if not float(gain[j]) > float(loss[i]) * (1 + 1e-9):
                break
            u, sj = MC[:, j], schur[j]  # the inverse with channel R[j] appended (block inverse by its Schur complement)
            M = torch.cat([torch.cat([M2 + torch.outer(u, u) / sj, (-u / sj).unsqueeze(1)], 1),
                           torch.cat([-u / sj, (1 / sj).reshape(1)]).unsqueeze(0)], 0)
            inside[K[i]] = False
            inside[R[j]] = True
            K = torch.cat([K2, R[j].reshape(1)])
        return torch.sort(K).values

    def _select(self, weight: torch.Tensor, keep: int, stats, module: str = "?") -> torch.Tensor:
        mu, cov = _moments(stats, module)
        if self.config.select == "leverage":  # MoDeGPT's correlation: the second moment, not centred
            C = cov + torch.outer(mu, mu)
            lam = self.config.ridge * float(C.diagonal().mean().clamp_min(1e-12))
            scores = torch.linalg.solve(C + lam * torch.eye(C.shape[0], dtype=C.dtype), C).diagonal()  # C sym.
            return torch.sort(torch.topk(scores, keep).indices).values
        L, info = torch.linalg.cholesky_ex(self._damped(cov))
        if int(info):
            raise PrunewiseError(f"structured OBS of {module}: the inputs' covariance is singular; raise refit's damp")
        inv = torch.cholesky_inverse(L)
        W = weight.detach().double().clone()
        alive = torch.ones(W.shape[1], dtype=torch.bool)
        for _ in range(W.shape[1] - keep):
            d = inv.diagonal()
            cost = W.square().sum(0) / d
            cost[~alive] = float("inf")
            j = int(torch.argmin(cost))
            W -= torch.outer(W[:, j], inv[j]) / d[j]
            inv -= torch.outer(inv[:, j], inv[j]) / inv[j, j]
            alive[j] = False
            inv[j, :] = 0.0
            inv[:, j] = 0.0
            inv[j, j] = 1.0  # a removed input stays out of every later update
        return torch.nonzero(alive).flatten()


def _moments(stats, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs' mean and covariance (float64), computed once per statistics object (selection and refit share them)."""
    found = stats.cache.get("moments") if stats is not None else None
    if found is None:
        if stats is None or stats.hessian is None or stats.sum is None or not stats.tokens:
            raise PrunewiseError(f"refit of {module} needs input statistics from calibration data")
        n = float(stats.tokens)
        mu = stats.sum.double() / n
        found = stats.cache["moments"] = (mu, stats.hessian.double() / n - torch.outer(mu, mu))
    return found
