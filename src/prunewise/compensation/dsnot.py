"""DSnoT (Zhang et al., ICLR 2024): training-free mask refinement that swaps pruned and kept weights per row.

For a row of ``W`` with mask ``M`` (True = pruned) the expected reconstruction error is
``e = sum_j M_ij * W_ij * s_j``, with ``s_j`` the per-window sum of input ``j`` averaged over the
calibration windows (the reference's ``sum_metric_row``). Each cycle, per row still active:

- **grow** the pruned weight that cancels the error best: the largest ``W_ij s_j / Var(x_j)^p`` when
  ``e > 0``, the smallest when ``e <= 0`` (``Var`` the population variance within a window, averaged
  over windows, as the reference accumulates it);
- **prune** a kept weight in Wanda order (smallest ``|W_ij| ||x_j||`` first) whose ``W_ij s_j`` has
  the error's sign: a negative one when ``e >= 0``, a positive one when ``e < 0``. Under N:M the
  pruned weight is the least important kept weight of the grown weight's group of M, so every
  group keeps N zeros;
- the row stops for good when ``|e|`` is at most ``update_threshold``, or (with ``same_sign``) when
  the swap would flip the error's sign, or when it has no candidate of the needed sign left; after
  ``max_cycle_time`` cycles at most. (The reference's pointers would walk on into weights of the
  other sign, or into kept weights, which changes a row's count; stopping keeps the count.)

Every swap prunes one weight and grows one, so each row keeps its count (and N:M its pattern). The
weights keep their dense values; the mask is what changes. The reference's ``--without_same_sign``
flag (``type=bool, default=True``) cannot be turned off from its command line, so its unstructured
runs never check the sign; that is the default here (``same_sign: false``); its N:M branch always
checks it, as here. Its ``--skip_layer`` defaults to ``mlp``: DSnoT then refines the attention
projections only; that is the default here too (``skip: mlp``; ``skip=none`` refines every linear).
Measured, attention only beats every linear in all five settings tried (Wanda 60% on smollm2-135m,
qwen2.5-coder-0.5b and gemma3-270m; Wanda 70% and SparseGPT 60% on gemma3-270m; bench/results/recovery*.md).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from ..core.registry import PartConfig, register
from ..core.stats import Needs, wanda_metric
from ..errors import PrunewiseError
from .base import Compensation


class DSnoTConfig(PartConfig):
    max_cycle_time: int = Field(50, ge=0, description="most swap cycles per row")
    update_threshold: float = Field(0.1, ge=0, description="a row stops once |its reconstruction error| is this small")
    pow_of_var_regrowing: float = Field(1.0, ge=0, description="power of the input variance dividing the growing metric")
    same_sign: bool = Field(False, description="unstructured: also stop a row whose swap would flip the error's sign "
                                               "(N:M always checks it)")
    skip: Literal["none", "mlp", "attention"] = Field("mlp", description="sublayer whose linears keep the selection's mask "
                                                                       "(the reference's default: mlp; none refines all)")


@register("compensation")
class DSnoTCompensation(Compensation):
    key = "dsnot"
    name = "dsnot"
    description = "DSnoT mask refinement: per row, swap pruned and kept weights to cancel the expected output error"
    Config = DSnoTConfig
    needs = Needs(sq_norm=True, mean=True, window_variance=True)
    refines_mask = True
    works_with = {"structure": ("unstructured", "n:m")}
    hint = "DSnoT swaps single weights; structured runs compensate with bias"

    def refine(self, weight: torch.Tensor, stats, structure, mask: torch.Tensor, importance: torch.Tensor | None = None,
               module: str = "?", kind: str | None = None) -> tuple[torch.Tensor, dict]:
        """The refined mask (True = pruned) of ``weight`` (dense values) starting from ``mask``, and notes."""
        cfg = self.config
        if cfg.skip != "none" and kind == cfg.skip:
            return mask, {}
        if stats is not None and not stats.reached:  # no calibration token reached it: nothing to refine against
            return mask, {"unreached": True}
        if stats is None or stats.sum is None or stats.window_var is None or not stats.windows:
            raise PrunewiseError(f"dsnot on {module} needs input means and variances from calibration data")
        t0 = time.perf_counter()
        W = weight.detach().float()
        rows, cols = W.shape
        device = W.device
        contrib = W * (stats.sum / stats.windows).float().unsqueeze(0)  # the reference's DSnoT_metric
        pruned = mask.to(device=device, dtype=torch.bool).clone()
        err = (contrib * pruned).sum(1)
        sign0 = torch.sign(err)
        k = max(1, min(cfg.max_cycle_time, cols))  # a pointer moves at most once per cycle
        grow = contrib / stats.window_variance.float().unsqueeze(0).pow(cfg.pow_of_var_regrowing) \
            if cfg.pow_of_var_regrowing else contrib
        inf = torch.tensor(float("inf"), device=device)
        # growing candidates: pruned weights, the largest positive first (e > 0) or the most negative first (e <= 0)
        grow_pos = _first(torch.where(pruned & (grow > 0), -grow, inf), k)
        grow_neg = _first(torch.where(pruned & (grow < 0), grow, inf), k)
        m = structure.level_quantum
        r = torch.arange(rows, device=device)
        if m:
            rank = (importance if importance is not None else wanda_metric(W, stats)).float().to(device)
            blocked = pruned.clone()  # kept weights already tried (and the pruned ones) are not pruned by a swap
        else:  # pruning candidates: kept weights of the needed sign, smallest Wanda metric first
            wanda = wanda_metric(W, stats).to(device)
            prune_pos = _first(torch.where(~pruned & (contrib > 0), wanda, inf), k)
            prune_neg = _first(torch.where(~pruned & (contrib < 0), wanda, inf), k)
        at = {name: torch.zeros(rows, dtype=torch.long, device=device) for name in ("gp", "gn", "pp", "pn")}
        active = torch.ones(rows, dtype=torch.bool, device=device)
        swaps = torch.zeros(rows, dtype=torch.long, device=device)
        for _ in range(cfg.max_cycle_time):
            if not bool(active.any()):
                break
            hi = err > 0
            g, g_ok = _take(hi, grow_pos, grow_neg, at["gp"], at["gn"], r)
            if m:
                start = g - g % m
                group = start.unsqueeze(1) + torch.arange(m, device=device)
                vals = rank.gather(1, group).masked_fill(blocked.gather(1, group), float("inf"))
                best = vals.min(1)
                p, p_ok = start + best.indices, torch.isfinite(best.values)
                blocked[r, p] = True
            else:
                p, p_ok = _take(err < 0, prune_pos, prune_neg, at["pp"], at["pn"], r)
            g_val, p_val = contrib[r, g], contrib[r, p]
            after = err + p_val - g_val
            ok = active & g_ok & p_ok & (err.abs() > cfg.update_threshold)  # a row out of candidates stops
            if m or cfg.same_sign:
                ok &= sign0 == torch.sign(after)
            pruned[r[ok], p[ok]] = True
            pruned[r[ok], g[ok]] = False
            err = torch.where(ok, after, err)
            swaps += ok.long()
            active = ok
        return pruned, {"dsnot_swaps": int(swaps.sum()), "dsnot_s": time.perf_counter() - t0}


def _first(key: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the ``k`` columns of smallest ``key`` in order, and whether each is a candidate
    (finite key)."""
    vals, idx = torch.topk(key, min(k, key.shape[1]), dim=1, largest=False, sorted=True)
    return idx, torch.isfinite(vals)


def _take(first: torch.Tensor, a, b, at_a: torch.Tensor, at_b: torch.Tensor, r: torch.Tensor):
    """Per row the next candidate of list ``a`` where ``first`` else of ``b`` (advancing that pointer), and
    whether it is one (a list that ran out gives False)."""
    (ia, va), (ib, vb) = a, b
    k = ia.shape[1]
    pa, pb = at_a.clamp(max=k - 1), at_b.clamp(max=k - 1)
    col = torch.where(first, ia[r, pa], ib[r, pb])
    ok = torch.where(first, va[r, pa] & (at_a < k), vb[r, pb] & (at_b < k))
    at_a += first.long()
    at_b += (~first).long()
    return col, ok
