"""MoEfication (Zhang et al., 2022): a real-weight mixture of experts made from a dense model's own MLPs.

Per block, from one dense pass over calibration text (``samples`` token rows of every window): each MLP channel's
contribution at a token is ``|a_i| * ||down[:, i]||`` (``a`` the input of the down projection). The channels
contributing most on average form the shared expert; the rest are split into ``E`` experts of equal width by
balanced k-means on their contribution profiles over the sampled tokens (channels that fire together share an
expert); a linear router is fitted by ridge least squares to predict each expert's summed contribution from the
block's MLP input. ``models/moefy.py`` turns the choice into a stock Qwen2-MoE.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..core.stats import Needs
from ..data.mixture import calibration_spec_windows
from ..engine.sequential import SequentialEngine
from ..engine.services import StatsVisitor
from ..errors import PrunewiseError
from ..models.adapters import get_adapter
from ..models.loading import BUILDERS, load_model
from ..models.moefy import moe_from_dense

log = logging.getLogger(__name__)
ROUTER_SCALE = 1e-3  # the largest |router logit| on the sampled tokens (see models/moefy.py)


def balanced_kmeans(features: torch.Tensor, k: int, iterations: int = 12, seed: int = 0) -> torch.Tensor:
    """Rows of ``features`` (n, d) in ``k`` groups of exactly n / k by cosine similarity: each round assigns the
    most similar (row, centroid) pairs first while a group has room. Returns (k, n / k) row indices."""
    n = features.shape[0]
    if n % k:
        raise PrunewiseError(f"{n} channels do not split into {k} experts of equal width; choose an expert count "
                             "that divides the routed channels")
    size = n // k
    x = torch.nn.functional.normalize(features.double(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(n, generator=g)[:k]].clone()
    assign = torch.empty(n, dtype=torch.long)
    for _ in range(iterations):
        sim = x @ centroids.t()                                    # (n, k)
        order = torch.argsort(sim.flatten(), descending=True, stable=True)
        room = [size] * k
        assign.fill_(-1)
        for flat in order.tolist():
            row, group = divmod(flat, k)
            if assign[row] < 0 and room[group]:
                assign[row] = group
                room[group] -= 1
        new = torch.stack([x[assign == j].mean(0) for j in range(k)])
        new = torch.nn.functional.normalize(new, dim=1)
        if torch.allclose(new, centroids):
            break
        centroids = new
    return torch.stack([torch.nonzero(assign == j).flatten().sort().values for j in range(k)])


def fit_router(x: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3) -> torch.Tensor:
    """Least squares ``x @ W.T ~ target`` (x: tokens x hidden, target: tokens x E) with a ridge of ``ridge`` times
    the mean diagonal; returns W (E, hidden)."""
    x, target = x.double(), target.double()
    gram = x.t() @ x
    gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram, x.t() @ target).t()


def build_moe(entry, base: Path, out: Path, progress: bool = True) -> None:
    """Build ``entry`` (a :class:`~prunewise.models.registry.DerivedModel` of builder "moefy") from the dense
    checkpoint in ``base`` into the empty folder ``out``."""
    opts = dict(entry.options)
    experts, top_k, shared_width = int(opts["experts"]), int(opts["top_k"]), int(opts["shared"])
    t0 = time.perf_counter()
    model, tokenizer = load_model(str(base))
    adapter = get_adapter(model)
    windows = calibration_spec_windows(tokenizer, opts["data"], int(opts["nsamples"]), int(opts["seqlen"]),
                                       int(opts["seed"]))
    groups, shared, routers = {}, {}, {}
    roles = adapter.roles

    def per_block(i: int, block) -> None:
        stats = visitor.stats.pop(i)
        x = stats[roles["gate"]].samples                          # (S, hidden): the MLP's input
        a = stats[roles["down"]].samples                          # (S, I): the down projection's input
        down = adapter.roles_of(block)["down"].weight.float()
        contribution = a.abs() * down.norm(dim=0)                 # (S, I)
        order = torch.argsort(contribution.mean(0), descending=True, stable=True)
        shared[i] = order[:shared_width].sort().values
        routed = order[shared_width:].sort().values
        local = balanced_kmeans(contribution[:, routed].t(), experts, seed=int(opts["seed"]) + i)
        groups[i] = routed[local]                                 # (E, width) channel indices
        target = torch.stack([contribution[:, g].sum(1) for g in groups[i]], dim=1)
        w = fit_router(x, target)
        peak = (x.double() @ w.t()).abs().max()
        routers[i] = (w * (ROUTER_SCALE / peak)).float() if peak > 0 else w.float()

    visitor = StatsVisitor(Needs(samples=True), on_block=per_block)
    SequentialEngine(model, adapter, windows, None, progress, desc="MoEfication statistics",
                     sequential=False).run(visitor)
    n = len(adapter.blocks(model))
    moe = moe_from_dense(model, [groups[i] for i in range(n)], [shared[i] for i in range(n)],
                         [routers[i] for i in range(n)], top_k)
    moe.save_pretrained(out)
    tokenizer.save_pretrained(out)
    log.info("built %s in %.0f s", entry.name, time.perf_counter() - t0)


def register() -> None:
    """Make ``fetch_model`` able to build the derived MoE models (done on import; the command line calls it too)."""
    BUILDERS["moefy"] = build_moe


register()
