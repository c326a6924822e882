"""Structured pruning end to end: statistics, scores, widths (or blocks / sublayers), compensation, shrinking.

The budget is a share of the targeted decoder parameters (attention and/or MLP linears of every
block); the model that comes out is physically smaller and carries the config it is saved with.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from ..allocation.plan import AllocationPlan
from ..core.masks import MaskSet
from ..core.stats import Needs
from ..engine.sequential import SequentialEngine
from ..engine.services import InfluenceVisitor, StatsVisitor, loss_gradients, sublayer_damage
from ..errors import PrunewiseError
from ..structures.geometry import BlockGeometry, BlockKeep
from ..structures.shrink import finalize_config, remove_blocks, shrink_block
from ..structures.units import unit_scores
from ..structures.widths import choose_widths
from .parts import placement_for

log = logging.getLogger(__name__)


def count_params(model: nn.Module, adapter) -> dict[str, int]:
    """All parameters (tied tensors once) and those inside the decoder blocks."""
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in adapter.blocks(model).parameters())
    return {"total": total, "decoder": blocks}


def plan_shares(plan: AllocationPlan, prefix: str, n_blocks: int, adapter) -> list[dict[str, float]]:
    """Per block, the parameter-weighted share of its attention and of its MLP linears that a plan removes."""
    out = []
    for i in range(n_blocks):
        share = {}
        for kind in ("attention", "mlp"):
            names = adapter.coupled(kind)
            full = [f"{prefix}.{i}.{n}" for n in names if f"{prefix}.{i}.{n}" in plan.modules]
            numel = sum(plan.numels.get(f, 0) for f in full)
            share[kind] = sum(plan.modules[f] * plan.numels.get(f, 0) for f in full) / numel if numel else 0.0
        out.append(share)
    return out


def structure_plan(params: dict, keeps_info: list[dict], prefix: str, target: float, method: str,
                   structure: str) -> AllocationPlan:
    """The result as an allocation plan: per module the share of its weights removed (plottable, reusable)."""
    modules, numels = {}, {}
    for i, info in enumerate(keeps_info):
        for name, (before, after) in info.items():
            full = f"{prefix}.{i}.{name}"
            numels[full] = before
            modules[full] = 1 - after / before if before else 0.0
    return AllocationPlan(method=method, target=target, structure=structure, modules=modules, numels=numels,
                          params=params)


def _linear_sizes(block: nn.Module, adapter) -> dict[str, int]:
    out = {}
    for name in adapter.roles.values():
        try:
            out[name] = block.get_submodule(name).weight.numel()
        except AttributeError:
            out[name] = 0
    return out


def _depth_keeps(model, adapter, recipe, windows, geoms, budget, info, timings, progress):
    """Blocks (ShortGPT's block influence) or sublayers (least output damage per parameter first, a greedy fill
    of the budget). Returns what each block keeps, the blocks deleted outright, and the means for compensation."""
    parts = recipe.parts()
    compensate = parts.compensation_named("bias") is not None
    keeps = [BlockKeep.everything(g) for g in geoms]
    by_blocks = parts.structure.kind == "blocks"
    influence = None
    if by_blocks or compensate:  # block influence ranks blocks; its pass also gives the means for compensation
        t0 = time.perf_counter()
        influence = InfluenceVisitor(model, adapter)
        scores = influence.run(windows, recipe.chunk_size or 8, progress)
        timings["influence_s"] = time.perf_counter() - t0
        info["influence"] = {k: [round(float(x), 6) for x in v] for k, v in scores.items()}
    if by_blocks:
        count = int(round(budget / (geoms[0].attn_params + geoms[0].mlp_params)))
        drop = sorted(torch.argsort(scores["block"], stable=True)[:count].tolist())
    else:
        t0 = time.perf_counter()
        damage = sublayer_damage(model, adapter, windows[:parts.structure.nsamples, :parts.structure.seqlen],
                                 progress=progress)
        timings["sublayer_damage_s"] = time.perf_counter() - t0
        info["sublayer_kl"] = {k: [float(x) for x in v] for k, v in damage.items()}
        cost = {"attention": [g.attn_params for g in geoms], "mlp": [g.mlp_params for g in geoms]}
        units = sorted((float(damage[kind][i]) / cost[kind][i], i, kind)
                       for i in range(len(geoms)) for kind in ("attention", "mlp"))
        removed, slack = 0, min(min(cost["attention"]), min(cost["mlp"])) // 2
        for _, i, kind in units:
            if removed + cost[kind][i] <= budget + slack:
                removed += cost[kind][i]
                keeps[i] = keeps[i].without(attention=kind == "attention", mlp=kind == "mlp")
        drop = [i for i, k in enumerate(keeps) if not k.channels.numel() and not k.query_heads.numel()]
    info["removed_blocks"] = drop
    if not compensate:  # a block without both sublayers is simply gone
        return keeps, drop, {}
    means = {i: (influence.mean_input(i, "o"), influence.mean_input(i, "down")) for i in range(len(geoms))}
    for i in drop:  # with compensation a removed block keeps its mean contribution as biases
        keeps[i] = keeps[i].without(attention=True, mlp=True)
    return keeps, [], means


def _width_keeps(model, adapter, recipe, windows, geoms, budget, plan, timings, progress, stream=None):
    """Channels and heads: unit scores from one dense statistics pass (and gradients for taylor), then widths.
    Returns what each block keeps and, for compensation, the statistics of each block's o_proj and down_proj inputs."""
    parts = recipe.parts()
    score, structure = parts.score, parts.structure
    refit = parts.compensation_named("refit")
    compensate = parts.compensation_named("bias") is not None or refit is not None
    blocks = adapter.blocks(model)
    if getattr(score, "tunes", False):  # ATP: the units come from gates learned while tuning (LoRA merged after)
        from .tune import tune_units

        scores, shares, timings["atp"] = tune_units(model, adapter, recipe, score, geoms, budget, structure, windows,
                                                    progress, timings)
        return choose_widths(geoms, scores, structure, budget, allocation="shares", heads_mode=structure.heads_mode,
                             multiple=structure.width_multiple, shares=shares), {}
    engine = SequentialEngine(model, adapter, windows, recipe.chunk_size, progress, desc="structured statistics",
                              sequential=False, placement=placement_for(model, recipe, parts), stream=stream)
    if score.needs.gradient:
        t0 = time.perf_counter()
        engine.gradients = loss_gradients(model, adapter, windows, score.needs.gradient,
                                          chunk_size=min(recipe.chunk_size or 4, 4), progress=progress)
        timings["gradients_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    # every linear's statistics (FLAP's means and variances, Wanda's norms) and gradients, one dense pass
    scores: dict[int, object] = {}

    def score_block(i: int, block: nn.Module) -> None:  # while the block is resident (streamed: read from disk)
        stats = visitor.stats.get(i, {})
        scores[i] = unit_scores(score, adapter.roles_of(block), geoms[i],
                                {r: stats[n] for r, n in adapter.roles.items() if n in stats})

    # the refit reads the Hessians of the two projections it refits, and only theirs
    more = {adapter.roles[r]: Needs(hessian=True) for r in ("o", "down")} if refit is not None else None
    visitor = StatsVisitor(Needs(sq_norm=True, mean=True, gradient=score.needs.gradient), on_block=score_block,
                           more=more)
    if windows is not None:  # group magnitude without compensation needs no data: scored in a walk without it
        engine.run(visitor)
    else:
        engine.walk_without_data(visitor)
    timings["statistics_s"] = time.perf_counter() - t0
    scores = [scores[i] for i in range(len(blocks))]
    allocation, shares = parts.allocation.key, None
    if plan is not None:
        allocation, shares = "shares", plan_shares(plan, adapter.block_prefix(model), len(blocks), adapter)
        unused = {"channels": "attention", "heads": "mlp"}.get(structure.kind)
        if unused and any(share.get(unused, 0.0) > 0 for share in shares):
            log.warning("the plan gives levels to %s modules, which --structure %s does not remove; they are left "
                        "dense (use --structure width to apply both)", "attention" if unused == "attention" else "MLP",
                        structure.kind)
    keeps = choose_widths(geoms, scores, structure, budget, allocation=allocation,
                          heads_mode=structure.heads_mode, multiple=structure.width_multiple, shares=shares,
                          finish=score.unit_finish)
    held = {i: (visitor.stats[i][adapter.roles["o"]], visitor.stats[i][adapter.roles["down"]])
            for i in range(len(blocks))} if compensate else {}
    return keeps, held


def prune_structured(model: nn.Module, adapter, recipe, windows: torch.Tensor | None, progress: bool = True,
                     plan: AllocationPlan | None = None, stream=None) -> tuple[AllocationPlan, dict]:
    """Prune ``model`` in place as the recipe's structured structure says. Returns (plan, report fields, masks):
    the masks hold what every block keeps (its kept units) and the blocks removed outright. With ``stream``
    (widths only) each block is read from the shards to be sliced, then written out and released."""
    parts = recipe.parts()
    structure = parts.structure
    refit = parts.compensation_named("refit")
    if structure.kind == "experts":
        return _prune_experts(model, adapter, recipe, windows, progress, stream)
    blocks = adapter.blocks(model)
    prefix = adapter.block_prefix(model)
    head_dim = adapter.heads(model.config)[2]
    geoms = [BlockGeometry.of(adapter.roles_of(b), head_dim) for b in blocks]
    before = count_params(model, adapter)
    sizes_before = [_linear_sizes(b, adapter) for b in blocks]
    timings: dict[str, float] = {}
    if structure.depth:
        targeted = sum(g.attn_params + g.mlp_params for g in geoms)
    else:
        targeted = sum((g.attn_params if structure.prunes_heads else 0) + (g.mlp_params if structure.prunes_mlp else 0)
                       for g in geoms)
    budget = int(round(float(recipe.sparsity) * targeted))
    info: dict = {"targeted_params": targeted, "budget_params": budget}

    if structure.depth:
        keeps, drop_blocks, means = _depth_keeps(model, adapter, recipe, windows, geoms, budget, info, timings, progress)
    else:
        keeps, held = _width_keeps(model, adapter, recipe, windows, geoms, budget, plan, timings, progress, stream)
        if "atp" in timings:  # what ATP's tuning did (steps, the gates' kept share, the loss history)
            info["atp"] = timings.pop("atp")
        means = {i: (o.mean, down.mean) for i, (o, down) in held.items()}
        drop_blocks = []
    masks = MaskSet(structure=structure.name, removed_blocks=list(drop_blocks),
                    made_for={"blocks": len(blocks), "widths": [[g.intermediate, g.heads, g.kv_heads] for g in geoms]})
    specs_of: dict[int, dict] = {}
    for i, (block, keep) in enumerate(zip(blocks, keeps)):
        if i not in drop_blocks:
            o_mean, down_mean = means.get(i, (None, None))
            if stream is not None:  # read before the refit's channel selection, which reads down_proj's weights
                stream.load(block, prefetch=blocks[i + 1] if i + 1 < len(blocks) else None)
            fit = None
            if refit is not None:  # least squares on the kept inputs, from the statistics of o_proj and down_proj
                stats = dict(zip(("o", "down"), held.pop(i)))  # released with the block: the Hessians are large
                if (refit.config.select != "score" or refit.config.swaps) and \
                        0 < keep.channels.numel() < geoms[i].intermediate:
                    kept = refit.select_channels(adapter.roles_of(block)["down"].weight, int(keep.channels.numel()),
                                                 stats["down"], module=f"block {i} down", start=keep.channels)
                    keep = BlockKeep(kept, keep.query_heads, keep.kv_heads)

                def fit(role, weight, bias, kept, stats=stats, i=i):
                    return refit.fit(weight, bias, kept, stats[role], module=f"block {i} {role}")
            masks.units[i] = {"channels": keep.channels, "query_heads": keep.query_heads, "kv_heads": keep.kv_heads}
            specs_of[i] = shrink_block(block, keep, head_dim, adapter, o_mean, down_mean, fit=fit)
            if stream is not None:
                stream.done(block, write=True)
    if drop_blocks:
        remove_blocks(model, adapter, drop_blocks)
    kept_index = sorted(specs_of)
    specs = [specs_of[i] for i in kept_index]
    kind = finalize_config(model, adapter, specs)
    if stream is not None:  # zero biases a stock config's flag added to every (released) block
        stream.write_resident(list(adapter.blocks(model)))
    after = count_params(model, adapter)
    sizes_after = {i: _linear_sizes(b, adapter) for i, b in zip(kept_index, adapter.blocks(model))}
    keeps_info = [{n: (sizes_before[i][n], sizes_after.get(i, {}).get(n, 0)) for n in adapter.roles.values()}
                  for i in range(len(geoms))]
    removed = sum(g.attn_params + g.mlp_params for g in geoms) - sum(
        sum(p.numel() for n, p in b.named_parameters() if "norm" not in n)
        for b in adapter.blocks(model))
    info.update({
        "params_before": before, "params_after": after,
        "removed_targeted_params": removed,
        "removed_share_of_targeted": removed / targeted if targeted else 0.0,
        "removed_share_of_decoder": 1 - after["decoder"] / before["decoder"],
        "ideal_speedup": before["total"] / after["total"],
        "config": kind,
        "layers": [{"block": i, **s} for i, s in zip(kept_index, specs)],
        "timings": timings,
    })
    method = "blocks" if structure.kind == "blocks" else (
        "sublayers" if structure.kind == "sublayers" else ("plan" if plan is not None else parts.allocation.key))
    result_plan = structure_plan({"bias_compensation": parts.compensation_named("bias") is not None,
                                  "refit": refit is not None,
                                  "heads_mode": structure.heads_mode, "width_multiple": structure.width_multiple},
                                 keeps_info, prefix, float(recipe.sparsity), method, structure.name)
    return result_plan, info, masks


class ExpertVisitor:
    """A dense pass keeping every MoE layer's :class:`ExpertStats` (and nothing of its linears)."""

    modifies_weights = False

    def __init__(self) -> None:
        self.stats: dict[int, object] = {}

    def needs(self, i: int, name: str) -> None:
        return None

    def visit(self, i: int, name: str, linear: nn.Linear, stats) -> None:
        return None

    def visit_experts(self, i: int, experts: nn.Module, stats) -> None:
        self.stats[i] = stats

    def end_block(self, i: int, block: nn.Module) -> None:
        return None


def check_experts(model: nn.Module, adapter, sparsity: float) -> tuple[int, int, int]:
    """``(experts per layer, experts removed per layer, experts per token)`` for ``--structure experts``, or one
    line saying why this model or sparsity cannot be pruned so."""
    count = adapter.expert_count(model)
    moe_blocks = [i for i, b in enumerate(adapter.blocks(model)) if adapter.experts_of(b) is not None] \
        if count else []
    if not moe_blocks:
        raise PrunewiseError(f"--structure experts removes routed experts, but this {model.config.model_type} model "
                             "has no mixture-of-experts layer; use a weight-level structure or channels/heads/width")
    top_k = adapter.experts_per_token(model)
    remove = int(round(sparsity * count))
    if count - remove < top_k:
        most = (count - top_k) / count
        raise PrunewiseError(f"--sparsity {sparsity:g} keeps {count - remove} of {count} experts per layer, fewer than "
                             f"the {top_k} the router picks per token (num_experts_per_tok); use --sparsity {most:.4g} "
                             "or less")
    groups, chosen = adapter.router_groups(model)
    if groups > 1:  # the same count from every group, so that each group keeps its experts and its meaning
        size = count // groups
        kept = size - remove // groups
        # a group is scored by its two best experts, and a token's experts come from its `topk_group` groups
        least = max(2, -(-top_k // chosen))
        if remove % groups or kept < least:
            valid = [f"{r / count:g}" for r in range(groups, count, groups) if size - r // groups >= least]
            raise PrunewiseError(f"--sparsity {sparsity:g} removes {remove} of {count} experts per layer, but this router "
                                 f"picks experts in {groups} groups of {size} (n_group; {chosen} groups per token, "
                                 f"{top_k} experts per token) and needs the same count removed from every group, "
                                 f"keeping at least {least} in each; use --sparsity "
                                 + (" or ".join(valid[:4]) if valid else "0 (no expert can go)"))
    return count, remove, top_k


def _lowest(scores: torch.Tensor, remove: int, groups: int = 1) -> torch.Tensor:
    """The ``remove`` experts to go (sorted indices): the lowest scores, and among equal scores the lower index (a
    stable order: ties are reproducible); with a grouped router, ``remove / groups`` from each group of consecutive
    indices."""
    size = scores.numel() // groups
    out = [g * size + torch.argsort(scores[g * size:(g + 1) * size], stable=True)[:remove // groups]
           for g in range(groups)]
    return torch.cat(out).sort().values


def _prune_experts(model: nn.Module, adapter, recipe, windows: torch.Tensor | None, progress: bool, stream=None):
    """Whole routed experts: the score ranks each MoE layer's experts from one dense pass over the calibration
    windows (the tokens the router sends each expert), the same count goes from every layer (a stock config
    holds one count), every tensor of an expert and its router row are sliced with one index. An expert no
    calibration token reaches scores 0 under every expert score and goes first (ties: the lower index goes).
    With ``stream`` the pass reads each block from the shards; then each block is read again, sliced and written."""
    parts = recipe.parts()
    score = parts.score
    merge = parts.compensation_named("merge")
    count, remove, top_k = check_experts(model, adapter, float(recipe.sparsity))
    if windows is None:
        raise PrunewiseError(f"the {score.name} score ranks experts from calibration data; give --calibration")
    blocks = adapter.blocks(model)
    prefix = adapter.block_prefix(model)
    before = count_params(model, adapter)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    visitor = ExpertVisitor()
    SequentialEngine(model, adapter, windows, recipe.chunk_size, progress, desc="expert statistics",
                     sequential=False, placement=placement_for(model, recipe, parts), stream=stream).run(visitor)
    timings["statistics_s"] = time.perf_counter() - t0
    # an expert's parameters: its gate, up and down matrices and its router row
    per_expert = {i: sum(t.numel() for t in adapter.expert_matrices(adapter.experts_of(blocks[i]), 0).values())
                  + adapter.router_of(blocks[i]).weight.shape[1] for i in visitor.stats}
    masks = MaskSet(structure="experts", made_for={"blocks": len(blocks), "experts": count})
    layers, modules, numels = [], {}, {}
    for i, block in enumerate(tqdm(blocks, desc="removing experts", unit="block", disable=not progress or
                                   stream is None)):
        if stream is not None:
            stream.load(block, prefetch=blocks[i + 1] if i + 1 < len(blocks) else None)
        stats = visitor.stats.get(i)
        if stats is None:  # a dense layer of a MoE model
            if stream is not None:
                stream.done(block, write=True)
            continue
        scores = score.expert_scores(stats).double()
        removed = _lowest(scores, remove, adapter.router_groups(model)[0])
        kept = torch.ones(count, dtype=torch.bool)
        kept[removed] = False
        keep = kept.nonzero().flatten()
        merged = {}
        if merge is not None:  # removed experts folded into the most alike kept ones before they are sliced away
            merged = merge.assign(stats, keep, removed)
            adapter.merge_experts(block, merged, stats.counts)
        adapter.keep_experts(block, keep)
        if stream is not None:
            stream.done(block, write=True)
        masks.units[i] = {"experts": keep}
        name = f"{prefix}.{i}.{adapter.moe.experts}"
        modules[name], numels[name] = remove / count, per_expert[i] * count
        layers.append({"block": i, "removed": removed.tolist(), "tokens": stats.tokens,
                       "usage": (stats.counts / max(stats.tokens * top_k, 1)).tolist(),
                       "scores": [round(float(v), 6) for v in scores], "unreached": int((stats.counts == 0).sum()),
                       **({"merged": {str(r): k for k, rs in merged.items() for r in rs}} if merge is not None else {})})
    adapter.set_expert_count(model, count - remove)
    after = count_params(model, adapter)
    targeted = sum(numels.values())
    removed_params = before["decoder"] - after["decoder"]
    info = {
        "targeted_params": targeted, "budget_params": int(round(float(recipe.sparsity) * targeted)),
        "params_before": before, "params_after": after,
        "removed_targeted_params": removed_params,
        "removed_share_of_targeted": removed_params / targeted if targeted else 0.0,
        "removed_share_of_decoder": 1 - after["decoder"] / before["decoder"],
        "ideal_speedup": before["total"] / after["total"],
        "config": "stock",
        "experts": {"per_layer_before": count, "per_layer_after": count - remove, "per_token": top_k,
                    "score": score.name, "layers": layers},
        "layers": [],
        "timings": timings,
    }
    plan = AllocationPlan(method="uniform", target=float(recipe.sparsity), structure="experts", modules=modules,
                          numels=numels, params={"experts_per_layer": count, "experts_removed_per_layer": remove})
    return plan, info, masks
