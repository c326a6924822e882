"""The visitor that prunes: each targeted linear is pruned by the score, to its planned sparsity."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..allocation.plan import AllocationPlan
from ..scores.base import LinearStats, check_weight


class PruneVisitor:
    """Prunes every linear named in the plan with ``score`` under ``structure``; records what it did."""

    modifies_weights = True

    def __init__(self, score, structure, plan: AllocationPlan, prefix: str) -> None:
        self.score, self.structure, self.plan, self.prefix = score, structure, plan, prefix
        self.records: dict[str, dict] = {}

    def _full(self, i: int, name: str) -> str:
        return f"{self.prefix}.{i}.{name}"

    def needs(self, i: int, name: str) -> str | None:
        full = self._full(i, name)
        if full not in self.plan.modules or self.plan.modules[full] == 0:
            return None
        return self.score.needs

    def visit(self, i: int, name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        full = self._full(i, name)
        sparsity = self.plan.modules.get(full, 0.0)
        if sparsity == 0:
            return
        start = time.perf_counter()
        check_weight(full, linear.weight)
        outcome = self.score.prune(linear.weight.data, stats, self.structure, sparsity, module=full)
        linear.weight.data.copy_(outcome.weight)
        record = {"target": sparsity, "pruned": int(outcome.mask.sum()), "seconds": time.perf_counter() - start}
        record.update(outcome.notes)
        self.records[full] = record

    def end_block(self, i: int, block: nn.Module) -> None:
        return None
