"""Allocation from a sensitivity profile: one ladder level per unit, least summed damage, exact budget.

The budget becomes a number ``R`` of weights to remove. Dynamic programming over the units finds,
for every reachable total of removed weights, the least summed damage and the levels that give
it. Totals are counted in units of the gcd of all (unit, level) removal counts when that grid is
small enough (exact), otherwise on a grid of about ``max_states`` steps (each count rounded to
the grid). Unstructured: the least-damage choice removing at least ``R`` is taken and
:func:`~prunewise.allocation.plan.exact_counts` hands the surplus back (or takes the grid's
rounding error), so the plan removes exactly ``R`` weights, whole weights per module. N:M: levels
must stay multiples of 1/M, so the choice whose total is closest to ``R`` is taken (least damage
among equally close ones); the budget is met as closely as the levels allow.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

from ..errors import PrunewiseError
from .plan import AllocationPlan, exact_counts
from .profile import SensitivityProfile

log = logging.getLogger(__name__)

BudgetKind = Literal["sparsity", "keep_params", "remove_params", "keep_bytes", "remove_bytes"]


def bytes_per_param(dtype: torch.dtype | str) -> float:
    """Bytes one parameter takes in ``dtype`` (a torch dtype or its name, e.g. 'bfloat16')."""
    if isinstance(dtype, str):
        found = getattr(torch, dtype.removeprefix("torch."), None)
        if not isinstance(found, torch.dtype):
            raise PrunewiseError(f"unknown dtype '{dtype}'; use a torch dtype name such as float32, bfloat16 or int8")
        dtype = found
    return float(dtype.itemsize)


@dataclass(frozen=True)
class Budget:
    """A global budget over the profiled weights: a share removed, or parameters/bytes kept or removed.

    Keep budgets count ``other_params`` (parameters outside the profiled units, always kept) too,
    so a whole-model size can be given; bytes are parameters times ``bytes_per_param``.
    """

    kind: BudgetKind
    value: float
    bytes_per_param: float = 4.0
    other_params: int = 0

    def removal(self, total: int) -> int:
        """Weights to remove out of ``total`` profiled weights."""
        if self.kind == "sparsity":
            if not 0 <= self.value < 1:
                raise PrunewiseError(f"sparsity budget {self.value} is outside [0, 1); give the share of weights to remove")
            return int(round(self.value * total))
        if self.kind not in ("keep_params", "remove_params", "keep_bytes", "remove_bytes"):
            raise PrunewiseError(f"unknown budget kind '{self.kind}'; use sparsity, keep_params, remove_params, keep_bytes or remove_bytes")
        if self.bytes_per_param <= 0:
            raise PrunewiseError(f"bytes_per_param {self.bytes_per_param} must be positive; use e.g. bytes_per_param('bfloat16')")
        if not math.isfinite(self.value) or self.value < 0:
            raise PrunewiseError(f"budget {self.kind}={self.value} must be a finite number, at least 0")
        if self.kind == "remove_params":
            count = int(round(self.value))
        elif self.kind == "remove_bytes":
            count = math.ceil(self.value / self.bytes_per_param - 1e-9)
        else:
            keep = int(round(self.value)) if self.kind == "keep_params" else math.floor(self.value / self.bytes_per_param + 1e-9)
            count = total + self.other_params - keep
        if not 0 <= count <= total:
            raise PrunewiseError(f"budget {self.kind}={self.value:g} means removing {count} of the {total} prunable weights, "
                                 "which is impossible; give a budget within the prunable weights")
        if count == total and total:
            raise PrunewiseError(f"budget {self.kind}={self.value:g} removes all {total} prunable weights (sparsity 1.0, "
                                 "which --sparsity refuses too); give a budget that keeps some of them")
        return count


def solve_levels(damage: Sequence[Sequence[float]], removed: Sequence[Sequence[int]], goal: int,
                 repairable: bool = True, max_states: int = 200_000) -> tuple[list[int], dict]:
    """Index of one option per unit minimising the summed damage, with the removal total constrained by ``goal``.

    ``repairable``: the total must be at least ``goal`` (the caller trims the surplus); otherwise the
    total closest to ``goal`` is taken. Returns the choices and facts about the grid used.
    """
    n = len(damage)
    if n == 0:
        return [], {"grid": 1, "exact_grid": True}
    lo = sum(min(r) for r in removed)
    hi = sum(max(r) for r in removed)
    if not lo <= goal <= hi:
        raise PrunewiseError(f"the budget removes {goal} weights but the ladder levels can only remove between {lo} and {hi}; "
                             "add lower or higher levels to the ladder or change the budget")
    grid = 0
    for row in removed:
        for r in row:
            grid = math.gcd(grid, int(r))
    grid = max(grid, 1)
    exact = hi // grid <= max_states
    if not exact:
        grid = math.ceil(hi / max_states)
    q = [[int(round(r / grid)) for r in row] for row in removed]
    size = sum(max(row) for row in q) + 1
    cost = np.full(size, np.inf)
    cost[0] = 0.0
    index_type = np.int8 if max(len(row) for row in q) <= 127 else np.int32
    choice = np.zeros((n, size), dtype=index_type)
    reach = 0
    for u in range(n):
        new = np.full(size, np.inf)
        pick = np.zeros(size, dtype=index_type)
        for k, (d, step) in enumerate(zip(damage[u], q[u])):
            cand = np.full(size, np.inf)
            cand[step:step + reach + 1] = cost[:reach + 1] + float(d)
            better = cand < new
            new[better] = cand[better]
            pick[better] = k
        cost, choice[u] = new, pick
        reach += max(q[u])
    states = np.arange(size)
    feasible = np.isfinite(cost)
    if repairable:
        target = -(-goal // grid) if exact else int(round(goal / grid))  # exact grid: ceil
        allowed = feasible & (states >= min(target, reach))
    else:
        gap = np.abs(states * grid - goal).astype(np.float64)
        gap[~feasible] = np.inf
        allowed = gap == gap.min()
    masked = np.where(allowed, cost, np.inf)
    state = int(np.argmin(masked))
    picks = [0] * n
    for u in range(n - 1, -1, -1):
        picks[u] = int(choice[u, state])
        state -= q[u][picks[u]]
    assert state == 0
    return picks, {"grid": grid, "exact_grid": exact}


def allocate_from_profile(profile: SensitivityProfile, budget: Budget | float, max_states: int = 200_000) -> AllocationPlan:
    """The plan choosing one ladder level per profiled unit with the least summed damage under ``budget``."""
    if not isinstance(budget, Budget):
        budget = Budget("sparsity", float(budget))
    numels = profile.module_numels
    total = sum(numels.values())
    goal = budget.removal(total)
    nm = ":" in profile.structure
    levels = profile.levels
    removed = [[sum(int(round(lv * numels[m])) for m in profile.members[u]) for lv in levels] for u in profile.units]
    damage = [profile.damage[u] for u in profile.units]
    try:
        picks, info = solve_levels(damage, removed, goal, repairable=not nm, max_states=max_states)
    except PrunewiseError:
        lo, hi = sum(min(r) for r in removed) / total, sum(max(r) for r in removed) / total
        raise PrunewiseError(f"the budget removes {goal / total:.2%} of the prunable weights but the profile's levels "
                             f"{levels} reach only {lo:.2%} to {hi:.2%}; add levels to the ladder (profile_levels) "
                             "or change the budget") from None
    chosen = {u: levels[k] for u, k in zip(profile.units, picks)}
    raw = {m: chosen[u] for u in profile.units for m in profile.members[u]}
    if nm:
        modules = raw
        achieved = sum(int(round(s * numels[m])) for m, s in modules.items())
        if achieved != goal:
            log.warning("N:M levels remove %d weights where the budget asks %d (%.4f vs %.4f): as close as the levels allow",
                        achieved, goal, achieved / total, goal / total)
    else:
        modules = exact_counts(raw, numels, goal / total)
        achieved = goal
    unit_damage = {u: profile.damage[u][k] for u, k in zip(profile.units, picks)}
    unit_loss = {u: profile.loss_increase[u][k] for u, k in zip(profile.units, picks)}
    return AllocationPlan(
        method="profile", target=goal / total, structure=profile.structure, modules=modules, numels=dict(numels),
        params={"levels": list(levels), "unit": profile.unit_kind, "budget": asdict(budget), "remove": goal,
                "removed": achieved, "score": profile.score, "profile_data": profile.data_fingerprint, **info},
        layer_stats={"unit_level": chosen, "unit_damage": unit_damage, "predicted_damage": sum(unit_damage.values()),
                     "predicted_loss_increase": sum(unit_loss.values())})


def parse_budget(text: str, dtype: str = "float32", other_params: int = 0):
    """``KIND=VALUE`` (e.g. ``keep_params=90e6``, ``remove_bytes=100e6``) as a knapsack Budget."""
    kind, sep, value = text.partition("=")
    kinds = ("keep_params", "remove_params", "keep_bytes", "remove_bytes")
    if not sep or kind.strip() not in kinds:
        raise ValueError(f"budget {text!r} must be KIND=VALUE with KIND one of {', '.join(kinds)}, e.g. keep_params=90e6")
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"budget value {value!r} is not a number; write e.g. keep_bytes=250e6") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"budget {text.strip()!r} must be a finite number of parameters or bytes, at least 0; write "
                         "e.g. keep_params=90e6")
    try:
        per = bytes_per_param(dtype)
    except PrunewiseError as exc:
        raise ValueError(str(exc)) from None
    return Budget(kind.strip(), number, per, other_params)
