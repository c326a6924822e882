"""Re-apply a saved mask set to a model: the same zeros (weight level) or the same kept units (structured).

Later steps (recovery, a second prune, a fine-tuned dense model) keep exactly the sparsity a run
chose. Structured masks re-slice the same units; compensation biases are not part of a mask set.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.masks import MaskSet
from ..errors import PrunewiseError
from ..models.adapters import get_adapter, prunable_weights
from ..structures.geometry import BlockGeometry, BlockKeep
from ..structures.shrink import finalize_config, remove_blocks, shrink_block

APPLY_FIX = "apply the mask set to the model it was made for"
RECOVER_FIX = "use the mask set saved with this pruned model (its masks.safetensors)"


def _current_widths(model: nn.Module, blocks: int) -> list[tuple[int, int, int]]:
    """(intermediate, query heads, key/value heads) of every block of a model already sliced, from its config."""
    cfg = model.config
    layers = getattr(cfg, "prunewise_layers", None)
    if layers:
        return [(s["intermediate_size"], s["num_attention_heads"], s["num_key_value_heads"]) for s in layers]
    heads = cfg.num_attention_heads
    return [(cfg.intermediate_size, heads, getattr(cfg, "num_key_value_heads", None) or heads)] * blocks


@torch.no_grad()
def check_masks(model: nn.Module, masks: MaskSet, applied: bool = False, structure: str | None = None,
                fix: str = APPLY_FIX) -> None:
    """Refuse, before anything changes, a mask set that does not fit ``model``: another structure than ``structure``
    (the one the model was pruned with), another number of blocks, modules the model lacks, other shapes, kept units
    outside the model's widths. ``applied``: the model already carries the masks (a pruned folder, e.g. to recover):
    sliced widths must equal the kept units, and every weight must be zero exactly where its mask says pruned."""
    adapter = get_adapter(model)
    if structure is not None and masks.structure != structure:
        raise PrunewiseError(f"the mask set is {masks.structure} but the model was pruned {structure}: it does not "
                             f"match this model; {fix}")
    blocks = adapter.blocks(model)
    count = len(blocks) + (len(masks.removed_blocks) if applied else 0)  # blocks of the model the set was made for
    made = masks.made_for.get("blocks")
    if made is not None and made != count:
        raise PrunewiseError(f"the mask set was made for a model of {made} blocks, this one has {count}: it does not "
                             f"match this model; {fix}")
    if masks.has_weight_masks:
        weights = prunable_weights(model)
        shapes = masks.weight_shapes()
        missing = sorted(set(shapes) - set(weights))
        if missing:
            raise PrunewiseError(f"the mask set names {len(missing)} modules this model lacks (e.g. {missing[0]}); "
                                 f"{fix}")
        for name, shape in shapes.items():
            if tuple(shape) != tuple(weights[name].shape):
                raise PrunewiseError(f"mask of {name} has shape {tuple(shape)}, the weight "
                                     f"{tuple(weights[name].shape)}: it does not match this model; {fix}")
        if applied:
            for name, mask in masks.weight_masks():
                w = weights[name].detach()
                mask = mask.to(w.device)
                if bool(w[mask].ne(0).any()):
                    raise PrunewiseError(f"{name} has non-zero weights where its mask says pruned; the mask set does "
                                         f"not match this model; {fix}")
                unmarked = int(((w == 0) & ~mask).sum())
                if unmarked > 0.1 * w.numel():
                    raise PrunewiseError(f"{name} has {unmarked} zero weights its mask does not mark (the mask removes "
                                         f"{int(mask.sum())}): the mask set does not match this model; {fix}")
    if masks.structure == "experts":
        _check_experts(model, adapter, masks, blocks, applied, fix)
    elif masks.units or masks.removed_blocks:
        _check_units(model, adapter, masks, blocks, count, applied, fix)


def _check_experts(model, adapter, masks: MaskSet, blocks, applied: bool, fix: str) -> None:
    """Kept routed experts: distinct indices below the count the set was made for, the same number in every MoE
    layer (one count in a stock config); a pruned folder must hold exactly that many."""
    made = masks.made_for.get("experts")
    count = adapter.expert_count(model)
    moe = [i for i, b in enumerate(blocks) if adapter.experts_of(b) is not None] if count else []
    if sorted(masks.units) != moe:
        raise PrunewiseError(f"the mask set keeps experts in blocks {sorted(masks.units)}, this model has "
                             f"mixture-of-experts layers {moe}: it does not match this model; {fix}")
    kept = {int(keep["experts"].numel()) for keep in masks.units.values()}
    if len(kept) != 1:
        raise PrunewiseError(f"the mask set keeps different numbers of experts per layer ({sorted(kept)}): it is "
                             f"damaged; {fix}")
    for i, keep in masks.units.items():
        idx = keep["experts"]
        if idx.unique().numel() != idx.numel() or (idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= made)):
            raise PrunewiseError(f"the mask set's kept experts of block {i} are not distinct indices below {made}: it is "
                                 f"damaged; {fix}")
    want = kept.pop() if applied else made
    if count != want:
        raise PrunewiseError(f"the mask set was made for {made} experts per layer{' and keeps ' + str(want) if applied else ''}"
                             f", this model has {count}: it does not match this model; {fix}")


def _check_units(model, adapter, masks: MaskSet, blocks, count: int, applied: bool, fix: str) -> None:
    covered = sorted(set(masks.units) | set(masks.removed_blocks))
    if covered != list(range(count)):
        raise PrunewiseError(f"the mask set covers blocks {covered[0] if covered else '-'}-"
                             f"{covered[-1] if covered else '-'} ({len(covered)}), this model has {count}: it does not "
                             f"match this model; {fix}")
    if set(masks.units) & set(masks.removed_blocks):
        raise PrunewiseError(f"the mask set both keeps and removes a block: it is damaged; {fix}")
    made = masks.made_for.get("widths")
    if applied:
        current = _current_widths(model, len(blocks))
        widths = made or [None] * count
    else:
        head_dim = adapter.heads(model.config)[2]
        geoms = [BlockGeometry.of(adapter.roles_of(b), head_dim) for b in blocks]
        widths = [(g.intermediate, g.heads, g.kv_heads) for g in geoms]
        if made is not None and [tuple(w) for w in made] != widths:
            i = next(i for i, (a, b) in enumerate(zip(made, widths)) if tuple(a) != b)
            raise PrunewiseError(f"the mask set was made for block {i} of widths (MLP, heads, key/value heads) "
                                 f"{tuple(made[i])}, this model's are {widths[i]}: it does not match this model; {fix}")
    kept = [i for i in range(count) if i not in masks.removed_blocks]
    for j, i in enumerate(kept):
        keep = masks.units[i]
        if set(keep) != {"channels", "query_heads", "kv_heads"}:
            raise PrunewiseError(f"the mask set's block {i} lacks its kept units: it is damaged; {fix}")
        for k, kind in enumerate(("channels", "query_heads", "kv_heads")):
            idx = keep[kind]
            width = widths[i][k] if widths[i] is not None else None
            if idx.numel() and (int(idx.min()) < 0 or idx.unique().numel() != idx.numel()):
                raise PrunewiseError(f"the mask set's {kind.replace('_', ' ')} of block {i} are not distinct indices "
                                     f"from 0: it is damaged; {fix}")
            if idx.numel() and width is not None and int(idx.max()) >= width:
                raise PrunewiseError(f"the mask set keeps {kind.replace('_', ' ')} up to {int(idx.max())} in block {i}, "
                                     f"beyond its width {width}: it does not match this model; {fix}")
            if applied and (kind != "kv_heads" or keep["query_heads"].numel()):
                if idx.numel() != current[j][k]:
                    raise PrunewiseError(f"the mask set keeps {idx.numel()} {kind.replace('_', ' ')} in block {i}, the "
                                         f"model has {current[j][k]}: it does not match this model; {fix}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: MaskSet) -> nn.Module:
    """Zero the masked weights (or slice to the kept units) of ``model`` in place; returns it. The mask set is checked
    against the model first (``check_masks``): nothing changes when it does not fit."""
    check_masks(model, masks)
    adapter = get_adapter(model)
    if masks.has_weight_masks:
        weights = prunable_weights(model)
        for name, mask in masks.weight_masks():
            w = weights[name]
            w.masked_fill_(mask.to(w.device), 0.0)
    if masks.structure == "experts":
        blocks = adapter.blocks(model)
        for i, keep in masks.units.items():
            adapter.keep_experts(blocks[i], keep["experts"])
        adapter.set_expert_count(model, int(next(iter(masks.units.values()))["experts"].numel()))
    elif masks.units or masks.removed_blocks:
        blocks = adapter.blocks(model)
        head_dim = adapter.heads(model.config)[2]
        specs = []
        for i, block in enumerate(blocks):
            if i in masks.removed_blocks:
                continue
            keep = masks.units.get(i)
            if keep is None:
                raise PrunewiseError(f"the mask set has no kept units for block {i}; apply it to the model it was made for")
            specs.append(shrink_block(block, BlockKeep(keep["channels"], keep["query_heads"], keep["kv_heads"]),
                                      head_dim, adapter))
        if masks.removed_blocks:
            remove_blocks(model, adapter, masks.removed_blocks)
        finalize_config(model, adapter, specs)
    return model
