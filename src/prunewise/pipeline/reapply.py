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
from ..structures.geometry import BlockKeep
from ..structures.shrink import finalize_config, remove_blocks, shrink_block


@torch.no_grad()
def apply_masks(model: nn.Module, masks: MaskSet) -> nn.Module:
    """Zero the masked weights (or slice to the kept units) of ``model`` in place; returns it."""
    adapter = get_adapter(model)
    if masks.has_weight_masks:
        weights = prunable_weights(model)
        missing = sorted(set(masks.weight_names()) - set(weights))
        if missing:
            raise PrunewiseError(f"the mask set names {len(missing)} modules this model lacks (e.g. {missing[0]}); "
                                 "apply it to the model it was made for")
        for name, mask in masks.weight_masks():
            w = weights[name]
            if tuple(mask.shape) != tuple(w.shape):
                raise PrunewiseError(f"mask of {name} has shape {tuple(mask.shape)}, the weight {tuple(w.shape)}; "
                                     "apply the mask set to the model it was made for")
            w.masked_fill_(mask.to(w.device), 0.0)
    if masks.units or masks.removed_blocks:
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
