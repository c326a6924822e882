"""Adaptive widths: how many channels and heads each block keeps, and which.

- ``uniform``: every block removes the same share of its heads and channels;
- ``global`` (FLAP): unit scores are standardised within each block and unit type, ranked together
  across blocks and types, and removed lowest first, each unit weighted by its parameter count;
- a per-block share from any allocation plan (OWL, a saved ``plan.json``).

Heads are rounded first (query heads evenly within key/value groups, or whole groups), then MLP
channels absorb the rest of the parameter budget in chunks of ``multiple`` channels, so the target
is met to one chunk (uniform widths: to half a chunk per block, so that every block stays the same). Within a block the lowest-scoring units go.
"""

from __future__ import annotations

import math

import torch

from ..errors import PrunewiseError
from .geometry import BlockGeometry, BlockKeep


def head_units(scores: dict[str, torch.Tensor], g: BlockGeometry, mode: str, finish) -> torch.Tensor:
    """Scores of the removable attention units: query heads (mode 'query') or key/value groups (mode 'group')."""
    if mode == "query":
        return finish(scores["query"])
    grouped = scores["query"].view(g.kv_heads, g.group_size).sum(1) + scores["kv"]
    return finish(grouped)


def head_unit_cost(g: BlockGeometry, mode: str) -> int:
    return g.query_cost if mode == "query" else g.group_size * g.query_cost + g.kv_cost


def _standardise(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    std = x.std() if x.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    return (x - x.mean()) / std if std > 0 else torch.zeros_like(x)


def global_removals(units: list[dict[str, torch.Tensor]], costs: list[dict[str, int]], budget: int) -> list[dict[str, int]]:
    """FLAP's global ranking: standardised scores of every (block, type) ranked together, removed lowest first
    while the removed parameters stay within ``budget``. Returns units removed per block and type."""
    if budget <= 0:
        return [{kind: 0 for kind in per} for per in units]
    values, owners, weights = [], [], []
    for i, per in enumerate(units):
        for kind, z in per.items():  # already standardised
            values.append(z.double())
            owners += [(i, kind)] * z.numel()
            weights.append(torch.full((z.numel(),), costs[i][kind], dtype=torch.float64))
    z, w = torch.cat(values), torch.cat(weights)
    order = torch.argsort(z, stable=True)
    within = torch.cumsum(w[order], 0) <= budget
    out = [{kind: 0 for kind in per} for per in units]
    for j in order[within].tolist():
        i, kind = owners[j]
        out[i][kind] += 1
    return out


def _standardised_heads(scores: dict[str, torch.Tensor], units: torch.Tensor, g: BlockGeometry, mode: str) -> torch.Tensor:
    """Standardised head scores. With per-channel metrics (FLAP's fluctuation) the channels are standardised
    within the block and each head (or group) gets the mean of its channels, as FLAP does; else the units are."""
    channels = scores.get("query_channels")
    if channels is None:
        return _standardise(units)
    width = g.head_dim if mode == "query" else g.head_dim * g.group_size
    return _standardise(channels).view(-1, width).mean(1)


def distribute(total: int, desired: list[float], caps: list[int]) -> list[int]:
    """``total`` chunks over blocks in proportion to ``desired`` (largest deficit first), at most ``caps[i]`` each."""
    if total > sum(caps):
        raise PrunewiseError(f"cannot remove {total} chunks: only {sum(caps)} exist; lower the sparsity")
    d = torch.tensor(desired, dtype=torch.float64).clamp_min(0)
    d = d / d.sum() * total if d.sum() > 0 else torch.full_like(d, total / len(desired))
    alloc = torch.zeros(len(desired), dtype=torch.float64)
    cap = torch.tensor(caps, dtype=torch.float64)
    for _ in range(total):
        deficit = torch.where(alloc < cap, d - alloc, torch.tensor(-math.inf, dtype=torch.float64))
        alloc[int(torch.argmax(deficit))] += 1
    return [int(a) for a in alloc]


def choose_widths(geoms: list[BlockGeometry], scores: list[dict[str, torch.Tensor]], structure, budget: int,
                  allocation: str = "uniform", heads_mode: str = "query", multiple: int = 8,
                  shares: list[dict[str, float]] | None = None, finish=lambda x: x) -> list[BlockKeep]:
    """What every block keeps so that about ``budget`` targeted parameters go (exact to one channel chunk
    when MLP channels are pruned).

    ``allocation`` is 'uniform', 'global' or 'shares' (then ``shares[i]`` = {'attention': f, 'mlp': f},
    the fraction of that sublayer the block should lose, e.g. from an allocation plan).
    """
    if heads_mode not in ("query", "group"):
        raise PrunewiseError(f"unknown heads mode '{heads_mode}'; use 'query' (query heads evenly within groups) or 'group'")
    if multiple < 1:
        raise PrunewiseError(f"width multiple {multiple} must be at least 1")
    n = len(geoms)
    heads = [head_units(s, g, heads_mode, finish) for s, g in zip(scores, geoms)]
    chans = [finish(s["channels"]) for s in scores]
    targeted = sum((g.attn_params if structure.prunes_heads else 0) + (g.mlp_params if structure.prunes_mlp else 0)
                   for g in geoms)
    share = budget / targeted if targeted else 0.0
    # desired units removed per block (floats)
    if allocation == "global":
        units, costs = [], []
        for g, h, c, s in zip(geoms, heads, chans, scores):
            per, cost = {}, {}
            if structure.prunes_heads:
                per["heads"], cost["heads"] = _standardised_heads(s, h, g, heads_mode), head_unit_cost(g, heads_mode)
            if structure.prunes_mlp:
                per["mlp"], cost["mlp"] = _standardise(c), g.channel_cost
            units.append(per)
            costs.append(cost)
        removed = global_removals(units, costs, budget)
        want_heads = [float(r.get("heads", 0)) for r in removed]
        want_mlp = [float(r.get("mlp", 0)) for r in removed]
    elif allocation == "shares":
        if shares is None or len(shares) != n:
            raise PrunewiseError("a plan-driven width allocation needs one {attention, mlp} share per block")
        want_heads = [s["attention"] * h.numel() for s, h in zip(shares, heads)]
        want_mlp = [s["mlp"] * g.intermediate for s, g in zip(shares, geoms)]
    elif allocation == "uniform":
        want_heads = [share * h.numel() for h in heads]
        want_mlp = [share * g.intermediate for g in geoms]
    else:
        raise PrunewiseError(f"structured pruning allocates widths 'uniform', 'global' or from a plan, not '{allocation}'")

    keeps: list[BlockKeep] = []
    head_removed = 0
    for g, h, want in zip(geoms, heads, want_heads):
        keep = BlockKeep.everything(g)
        if structure.prunes_heads:
            keep = _keep_heads(g, h, want, heads_mode, keep, stock=allocation == "uniform")
        head_removed += g.attn_params - g.attention_params(keep.query_heads.numel(), keep.kv_heads.numel())
        keeps.append(keep)
    if structure.prunes_mlp:
        chunk_cost = multiple * geoms[0].channel_cost
        rest = max(budget - head_removed, 0)
        chunks = int(round(rest / chunk_cost))
        caps = [g.intermediate // multiple for g in geoms]
        if allocation == "uniform":  # the same width everywhere (a stock config), to within n/2 chunks of the budget
            per_block = [min(int(round(rest / (chunk_cost * n))), cap) for cap in caps]
        else:
            per_block = distribute(chunks, [w / multiple for w in want_mlp], caps)
        for keep, c, k in zip(keeps, chans, per_block):
            drop = k * multiple
            order = torch.argsort(c, stable=True)
            keep.channels = torch.sort(order[drop:]).values
    return keeps


def _nearest(target: float, allowed: list[int]) -> int:
    """The allowed count nearest to ``target`` (ties: the larger, i.e. keep more)."""
    return min(allowed, key=lambda c: (abs(c - target), -c))


def _keep_heads(g: BlockGeometry, scores: torch.Tensor, want_removed: float, mode: str, keep: BlockKeep,
                stock: bool = False) -> BlockKeep:
    """Heads kept in one block. ``stock`` (uniform widths) keeps only head counts that a stock config accepts
    (transformers checks that the hidden size is a multiple of the number of heads in some families)."""
    def ok(heads: int) -> bool:
        return heads == 0 or not stock or g.hidden % heads == 0

    if mode == "query":  # the same number of query heads in every group, the best of each group
        per_group = _nearest((g.heads - want_removed) / g.kv_heads,
                             [c for c in range(g.group_size + 1) if ok(c * g.kv_heads)])
        if per_group == 0:
            return BlockKeep(keep.channels, torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        grouped = scores.view(g.kv_heads, g.group_size)
        best = torch.topk(grouped, per_group, dim=1).indices + torch.arange(g.kv_heads).unsqueeze(1) * g.group_size
        return BlockKeep(keep.channels, torch.sort(best.flatten()).values, torch.arange(g.kv_heads))
    groups = _nearest(g.kv_heads - want_removed, [c for c in range(g.kv_heads + 1) if ok(c * g.group_size)])
    kv = torch.sort(torch.topk(scores, groups).indices).values
    q = (kv.unsqueeze(1) * g.group_size + torch.arange(g.group_size)).flatten()
    return BlockKeep(keep.channels, q, kv)
