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

    def pruner(self, adapter=None) -> Pruner:
        kinds = {}
        if adapter is not None:  # which sublayer a linear belongs to (parts that treat them apart: DSnoT's skip)
            kinds = {name: kind for kind in ("attention", "mlp") for name in adapter.coupled(kind)}
        return Pruner(self.score, self.structure, [c for c in self.compensation if c.reconstructs],
                      [c for c in self.compensation if c.refines_mask], kinds,
                      [c for c in self.compensation if c.adds_lowrank])


class Pruner:
    """Prunes one linear: the score ranks, the structure selects, mask refiners refine, reconstructing
    compensations update.

    With a score whose saliency must follow the updated weights (SparseGPT) and an OBS compensation,
    the structure selects inside the OBS sweep, tile by tile, as SparseGPT does. A mask refiner
    (DSnoT) then refines that mask on the dense weights and the sweep runs again with the refined
    mask fixed, so the survivors are reconstructed for the mask that is kept.
    """

    def __init__(self, score, structure, reconstruct: list, refine: list | None = None,
                 kinds: dict[str, str] | None = None, lowrank: list | None = None) -> None:
        self.score, self.structure, self.reconstruct = score, structure, reconstruct
        self.refine = list(refine or [])
        self.lowrank = list(lowrank or [])[:1]
        self.kinds = kinds or {}
        self.needs: Needs = merge(score.needs, *(c.needs for c in reconstruct + self.refine + self.lowrank))
        # SparseGPT's own OBS sweep is part of its name; any other part is named after the score
        shown = reconstruct[1:] if score.sweep_saliency and reconstruct else reconstruct
        self.name = "+".join([score.name] + [c.name for c in self.refine + shown + self.lowrank])
        self.default_group = score.default_group

    def kind(self, module: str) -> str | None:
        """``attention`` or ``mlp`` for a linear's full name, when the adapter said (else None)."""
        return next((k for name, k in self.kinds.items() if module.endswith("." + name)), None)

    @property
    def options(self) -> dict:
        """What changes the result besides the name (a cache key for profiles)."""
        out = dict(self.score.options())
        for c in self.refine + self.reconstruct + self.lowrank:
            out.update(c.options())
        return out

    def importance(self, weight: torch.Tensor, stats, module: str = "?") -> torch.Tensor:
        return self.score.importance(weight, stats, module=module)

    def prune(self, weight: torch.Tensor, stats, structure, sparsity, module: str = "?") -> PruneOutcome:
        """``weight`` pruned to ``sparsity`` (a level, or a per-row vector) under ``structure``; with a low-rank
        compensation (EoRA) the outcome carries its correction of what pruning changed."""
        outcome = self._prune(weight, stats, structure, sparsity, module)
        for part in self.lowrank:
            outcome.lowrank = part.factors(weight, outcome.weight, stats, module=module)
        return outcome

    def _prune(self, weight: torch.Tensor, stats, structure, sparsity, module: str) -> PruneOutcome:
        notes: dict = {}
        importance = None
        if sweeps(self.score, self.reconstruct):
            outcome = self.reconstruct[0].compensate(weight, stats, structure, sparsity,
                                                     saliency=self.score.sweep_saliency, module=module)
            if not self.refine:
                return self._rest(outcome, stats, structure, sparsity, module, weight)
            mask, notes = outcome.mask, outcome.notes
        else:
            importance = self.importance(weight, stats, module)
            mask = structure.mask(importance, sparsity)
        for part in self.refine:
            mask, more = part.refine(weight, stats, structure, mask, importance=importance, module=module,
                                     kind=self.kind(module))
            notes = {**notes, **more}
        if not self.reconstruct:
            return PruneOutcome(weight.masked_fill(mask, 0.0), mask, notes)
        first = self.reconstruct[0]
        outcome = first.compensate(weight, stats, structure, sparsity, mask=mask, module=module)
        outcome.notes = {**notes, **outcome.notes}
        return self._rest(outcome, stats, structure, sparsity, module, weight)

    def _rest(self, outcome: PruneOutcome, stats, structure, sparsity, module: str,
              dense: torch.Tensor | None = None) -> PruneOutcome:
        rest = self.reconstruct[1:]
        for comp in rest:
            notes = outcome.notes
            if comp.chooses_mask:
                # ALPS/ADMM: start from the mask so far, reconstruct the dense weight, return the mask they converge to
                outcome = comp.compensate(dense, stats, structure, sparsity, mask=outcome.mask, module=module)
            else:  # later reconstructions keep the mask the one before produced
                outcome = comp.compensate(outcome.weight, stats, structure, sparsity, mask=outcome.mask,
                                          module=module)
            outcome.notes = {**notes, **outcome.notes}
        return outcome


def sweeps(score, compensation) -> bool:
    """Whether the score's mask is chosen inside an OBS sweep: a sweep score (SparseGPT) with a reconstructing
    compensation. Without one (SparseGPT under DSnoT alone) it ranks the weights as they are."""
    first = next((c for c in compensation if c.reconstructs), None)
    return score.sweep_saliency is not None and first is not None and first.sweeps


def default_group(score, compensation) -> str:
    """The comparison group of unstructured pruning when the recipe names none: the score's, except that a sweep
    score outside its sweep ranks per row, as DSnoT's reference does with SparseGPT's saliency."""
    chosen = next((c.default_group for c in compensation if c.default_group), None)
    if chosen:  # a reconstruction that chooses the final mask compares as its reference does (ALPS: the layer)
        return chosen
    return "row" if score.sweep_saliency is not None and not sweeps(score, compensation) else score.default_group


def default_compensation(score) -> list[str]:
    """Compensations a score cannot run without (SparseGPT: obs), from the part's declaration."""
    return list(score.requires.get("compensation", ())[:1])


def make_pruner(score: str, structure=None, compensation: list[str] | None = None, **options) -> Pruner:
    """A pruner from names: ``make_pruner("sparsegpt", damp=0.01)`` (obs added), ``make_pruner("wanda", compensation=["obs"])``."""
    import prunewise.compensation as _compensations  # noqa: F401  (parts registered, whatever was imported first)
    import prunewise.scores as _scores  # noqa: F401

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
    return Pruner(part, structure or Unstructured(default_group(part, comps)), [c for c in comps if c.reconstructs],
                  [c for c in comps if c.refines_mask], lowrank=[c for c in comps if c.adds_lowrank])


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
