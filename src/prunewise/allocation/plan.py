"""The allocation plan: how much of each module is removed. Data, not code: save, load, reuse, plot."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from pydantic import BaseModel, Field

from ..errors import PrunewiseError


class AllocationPlan(BaseModel):
    """Per-module sparsity (full module name -> fraction removed) and the budget it meets."""

    method: str
    target: float
    structure: str = "unstructured"
    modules: dict[str, float]
    numels: dict[str, int] = Field(default_factory=dict)
    params: dict = Field(default_factory=dict)
    layer_stats: dict = Field(default_factory=dict)

    def pruned_counts(self) -> dict[str, int]:
        return {m: int(round(s * self.numels[m])) for m, s in self.modules.items()}

    def achieved(self) -> float:
        """Share of the planned modules' weights the plan removes."""
        total = sum(self.numels.values())
        return sum(self.pruned_counts().values()) / total if total else 0.0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "AllocationPlan":
        return load_json_model(cls, path, "allocation plan", "write one with `prunewise prune ... --output DIR` (plan.json)")

    def check_matches(self, numels: dict[str, int]) -> None:
        """Refuse a plan written for another model."""
        missing = sorted(set(numels) - set(self.modules))
        extra = sorted(set(self.modules) - set(numels))
        if missing or extra:
            example = (missing or extra)[0]
            raise PrunewiseError(f"allocation plan does not fit this model ({len(missing)} modules missing, {len(extra)} unknown, "
                                 f"e.g. {example}); make a plan for this model")
        for m, n in numels.items():
            if self.numels.get(m, n) != n:
                raise PrunewiseError(f"allocation plan was made for a different shape of {m}; make a plan for this model")


def load_json_model(cls: type[BaseModel], path: str | Path, what: str, fix: str):
    """Read a pydantic artifact from JSON; a missing or invalid file is a one-line PrunewiseError."""
    try:
        return cls.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        raise PrunewiseError(f"{what} {path} does not exist; {fix}") from None
    except ValueError as exc:
        raise PrunewiseError(f"{what} {path} is not valid {what} JSON ({str(exc).splitlines()[0]})") from None


def exact_counts(sparsities: dict[str, float], numels: dict[str, int], target: float,
                 max_sparsity: float = 1.0) -> dict[str, float]:
    """Round per-module sparsities to whole weights so the total removed is exactly ``round(target * total)``.

    Largest-remainder rounding; no module exceeds ``max_sparsity`` or drops below 0.
    """
    total = sum(numels.values())
    goal = int(round(target * total))
    raw = {m: sparsities[m] * numels[m] for m in numels}
    counts = {m: int(min(max(raw[m], 0.0), max_sparsity * numels[m])) for m in numels}
    short = goal - sum(counts.values())
    order = sorted(numels, key=lambda m: raw[m] - counts[m], reverse=short > 0)
    step = 1 if short > 0 else -1
    while short:
        moved = False
        for m in order:
            if short == 0:
                break
            new = counts[m] + step
            if 0 <= new <= max_sparsity * numels[m]:
                counts[m] = new
                short -= step
                moved = True
        if not moved:
            raise PrunewiseError(f"cannot meet sparsity {target} with the per-module limit {max_sparsity}; lower the target")
    return {m: counts[m] / numels[m] for m in numels}


def quantize_levels(values: torch.Tensor, levels: int, target: float) -> torch.Tensor:
    """Snap per-unit sparsities to multiples of ``1/levels`` keeping the weighted mean at ``target``.

    Used for mixed N:M plans (each layer gets some N/M). Assumes equal-size units for exactness,
    which holds for the blocks of the supported families.
    """
    units = values.double().clamp(0, 1) * levels
    base = units.floor().clamp(max=levels - 1)
    goal = int(round(target * levels * len(values)))
    need = goal - int(base.sum())
    order = torch.argsort(units - base, descending=need > 0)
    for idx in order[: abs(need)]:
        base[idx] += 1 if need > 0 else -1
    return base.clamp(0, levels - 1) / levels
