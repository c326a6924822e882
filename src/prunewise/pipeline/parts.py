"""The parts a recipe chose, composed: score -> select (structure) -> compensate, per linear."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.masks import PruneOutcome
from ..core.registry import Part
from ..core.stats import Needs, merge


@dataclass
class PartSet:
    """One part per single axis, a list for the chained ones (compensation, recovery)."""

    score: Part
    structure: Part
    allocation: Part
    compensation: list[Part] = field(default_factory=list)
    recovery: list[Part] = field(default_factory=list)

    def chosen(self) -> dict[str, list[Part]]:
        return {"score": [self.score], "structure": [self.structure], "allocation": [self.allocation],
                "compensation": list(self.compensation), "recovery": list(self.recovery)}

    def compensation_named(self, key: str) -> Part | None:
        return next((c for c in self.compensation if c.key == key), None)

    def pruner(self) -> Pruner:
        return Pruner(self.score, self.structure, [c for c in self.compensation if c.reconstructs])


class Pruner:
    """Prunes one linear: the score ranks, the structure selects, reconstructing compensations update.

    With a score whose saliency must follow the updated weights (SparseGPT) and an OBS compensation,
    the structure selects inside the OBS sweep, tile by tile, as SparseGPT does.
    """

    def __init__(self, score, structure, reconstruct: list) -> None:
        self.score, self.structure, self.reconstruct = score, structure, reconstruct
        self.needs: Needs = merge(score.needs, *(c.needs for c in reconstruct))
        self.name = score.name if not reconstruct or (score.sweep_saliency and len(reconstruct) == 1) else \
            "+".join([score.name] + [c.name for c in reconstruct])
        self.default_group = score.default_group

    @property
    def options(self) -> dict:
        """What changes the result besides the name (a cache key for profiles)."""
        out = dict(self.score.options())
        for c in self.reconstruct:
            out.update(c.options())
        return out

    def importance(self, weight: torch.Tensor, stats, module: str = "?") -> torch.Tensor:
        return self.score.importance(weight, stats, module=module)

    def prune(self, weight: torch.Tensor, stats, structure, sparsity, module: str = "?") -> PruneOutcome:
        """``weight`` pruned to ``sparsity`` (a level, or a per-row vector) under ``structure``."""
        if not self.reconstruct:
            mask = structure.mask(self.importance(weight, stats, module), sparsity)
            return PruneOutcome(weight.masked_fill(mask, 0.0), mask)
        first, *rest = self.reconstruct
        if self.score.sweep_saliency is not None:
            outcome = first.compensate(weight, stats, structure, sparsity, saliency=self.score.sweep_saliency,
                                       module=module)
        else:
            mask = structure.mask(self.importance(weight, stats, module), sparsity)
            outcome = first.compensate(weight, stats, structure, sparsity, mask=mask, module=module)
        for comp in rest:  # later reconstructions keep the mask the first one produced
            notes = outcome.notes
            outcome = comp.compensate(outcome.weight, stats, structure, sparsity, mask=outcome.mask, module=module)
            outcome.notes = {**notes, **outcome.notes}
        return outcome


def default_compensation(score) -> list[str]:
    """Compensations a score cannot run without (SparseGPT: obs), from the part's declaration."""
    return list(score.requires.get("compensation", ())[:1])


def make_pruner(score: str, structure=None, compensation: list[str] | None = None, **options) -> Pruner:
    """A pruner from names: ``make_pruner("sparsegpt", damp=0.01)`` (obs added), ``make_pruner("wanda", compensation=["obs"])``."""
    from ..core.registry import REGISTRIES
    from ..structures import Unstructured

    reg = REGISTRIES["score"]
    cls = reg.get(score)
    part = reg.build(score, **{k: v for k, v in options.items() if k in cls.Config.model_fields})
    comps = []
    for name in (default_compensation(part) if compensation is None else compensation):
        ccls = REGISTRIES["compensation"].get(name)
        comps.append(REGISTRIES["compensation"].build(name, **{k: v for k, v in options.items()
                                                               if k in ccls.Config.model_fields}))
    return Pruner(part, structure or Unstructured(part.default_group), [c for c in comps if c.reconstructs])


def placement_for(model, recipe, parts: PartSet | None = None):
    """Where the recipe's walks compute (``recipe.device``) for ``model`` as it is stored; what cannot move yet is refused.

    The engine's walks (statistics, pruning, OWL and global scores, structured widths) onload one block
    at a time. Gradient passes (taylor, gblm), the profile and search allocations and the depth
    structures (blocks, sublayers) still run whole-model forwards where the model is stored, so with a
    placement that moves or casts blocks they are refused with one line instead of running in half precision.
    """
    from ..engine.placement import Placement
    from ..errors import PrunewiseError

    placement = Placement.of(model, getattr(recipe, "device", None) or "auto")
    if placement.trivial:
        return placement
    parts = parts or recipe.parts()
    where = f"--device {recipe.device} with {str(placement.storage).removeprefix('torch.')} weights"
    if parts.score.needs.gradient:
        raise PrunewiseError(f"{where}: the {parts.score.name} score's gradient pass runs on the whole stored model; "
                             "use --dtype float32 --device cpu for it")
    if parts.allocation.key in ("profile", "search"):
        raise PrunewiseError(f"{where}: the {parts.allocation.key} allocation does not move blocks yet; "
                             "use --dtype float32 --device cpu for it, or uniform/owl/global")
    if getattr(parts.structure, "depth", False):
        raise PrunewiseError(f"{where}: {parts.structure.name} pruning measures whole-model outputs where the model is "
                             "stored; use --dtype float32 --device cpu for it")
    return placement
