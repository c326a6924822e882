"""What every allocation shares: the allocation part interface and the context the pipeline gives it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import Field

from ..core.registry import Part, PartConfig
from ..errors import PrunewiseError


class AllocationConfig(PartConfig):
    rowwise: bool = Field(False, description="spread each module's level over its output rows (TRIM) on top of the plan")


@dataclass
class AllocationContext:
    """What an allocation part may use: the model, the composed pruner (score + structure + compensation),
    the targeted modules and the target, the calibration windows and engine services, given by the pipeline."""

    model: Any
    adapter: Any
    pruner: Any                 # .needs, .importance(weight, stats, module), .prune(weight, stats, structure, s, module)
    structure: Any
    numels: dict[str, int]
    target: float
    exact: bool = False         # a parameter/byte budget is met to the weight
    windows: torch.Tensor | None = None
    progress: bool = True
    seed: int = 0
    chunk_size: int | None = None
    files: dict = field(default_factory=dict)       # name -> content saved beside plan.json
    draw: Callable[[int, int, int], torch.Tensor] | None = None  # (nsamples, seqlen, seed) -> windows of its own
    engine: Callable | None = None                  # (windows, desc, sequential) -> a SequentialEngine
    fingerprint: Callable[[], str | None] | None = None  # the model weights' fingerprint (cache key)
    remote: dict | None = None  # Ray: {address, num_cpus, num_gpus, build: () -> (dense model, pruner, structure)}

    def own_windows(self, n: int, length: int, seed_offset: int = 0, what: str = "allocation") -> torch.Tensor:
        """Windows an allocation measures on: drawn apart (mixtures are concatenated by source), else the first
        ``n x length`` of the calibration windows."""
        if self.draw is not None:
            return self.draw(n, length, self.seed + seed_offset)
        if self.windows is None:
            raise PrunewiseError(f"{what} allocation needs calibration windows")
        return self.windows[:n, :length]


class Allocation(Part):
    """Turns a target into per-module levels (an :class:`AllocationPlan`)."""

    Config = AllocationConfig

    def reads_calibration(self, pruner) -> bool:
        """Whether ``allocate`` reads ``ctx.windows`` (the calibration windows the prune pass uses)."""
        return False

    def allocate(self, ctx: AllocationContext):
        raise NotImplementedError

    def conflicts(self, chosen: dict) -> str | None:
        if self.config.rowwise:
            structure = chosen["structure"][0]
            if structure.key == "n:m":
                return "row-wise allocation cannot be N:M (every N:M row has the same sparsity); use unstructured"
            if structure.key != "unstructured":
                return "row-wise allocation is for unstructured sparsity; structured pruning removes whole units"
        return None
