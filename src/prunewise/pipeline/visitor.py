"""The visitor that prunes: each targeted linear is pruned by the composed pruner, to its planned sparsity,
and its mask is kept (a :class:`MaskSet`)."""

from __future__ import annotations

import time

import torch
from torch import nn

from ..allocation.plan import AllocationPlan
from ..allocation.rowwise import trim_row_sparsities
from ..core.masks import MaskSet
from ..core.stats import LinearStats, Needs, check_weight
from ..engine.lowrank import LowRankSet
from ..errors import PrunewiseError


class PruneVisitor:
    """Prunes every linear named in the plan with ``pruner`` under ``structure``; records what it did and the masks.

    With ``rowwise`` each module's level is spread over its output rows by TRIM (from input samples
    of the calibration windows as they reach the module) and the vectors are written into the plan;
    modules whose plan already has a per-row vector use it as given.
    """

    modifies_weights = True

    def __init__(self, pruner, structure, plan: AllocationPlan, prefix: str, rowwise: bool = False,
                 pack_masks: bool = True) -> None:
        self.score, self.structure, self.plan, self.prefix = pruner, structure, plan, prefix
        self.pack_masks = pack_masks  # bit-pack each block's masks when it is done: 1 bit per weight held
        self.rowwise = rowwise
        self.records: dict[str, dict] = {}
        self.masks = MaskSet(structure=structure.name)
        self.lowrank = LowRankSet()  # low-rank corrections (EoRA), attached as each linear is pruned
        if (rowwise or plan.rows) and structure.level_quantum:
            raise PrunewiseError("row-wise sparsities cannot be N:M (every row of N:M has the same sparsity); "
                                 "use unstructured with --rowwise")

    def _full(self, i: int, name: str) -> str:
        return f"{self.prefix}.{i}.{name}"

    def needs(self, i: int, name: str) -> Needs | None:
        full = self._full(i, name)
        if full not in self.plan.modules or self.plan.modules[full] == 0:
            return None
        if self.rowwise and full not in self.plan.rows:
            return self.score.needs | Needs(sq_norm=True, samples=True)
        return self.score.needs

    def visit(self, i: int, name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        full = self._full(i, name)
        sparsity = self.plan.modules.get(full, 0.0)
        if sparsity == 0:
            return
        start = time.perf_counter()
        check_weight(full, linear.weight)
        row_info = {}
        rows = self.plan.row_vector(full)
        if rows is None and self.rowwise:
            importance = self.score.importance(linear.weight.data, stats, module=full)
            rows, row_info = trim_row_sparsities(linear.weight.data, importance, stats.samples, sparsity)
            self.plan.rows[full] = rows.tolist()
        if rows is not None:
            sparsity = rows
        outcome = self.score.prune(linear.weight.data, stats, self.structure, sparsity, module=full)
        linear.weight.data.copy_(outcome.weight)
        self.masks.weights[full] = outcome.mask.to("cpu")  # masks of every module: host memory, not the device
        if outcome.lowrank is not None:  # the rest of the walk (and the evaluation) computes with it
            self.lowrank.attach(full, linear, *outcome.lowrank)
        record = {"target": self.plan.modules[full], "pruned": int(outcome.mask.sum()),
                  "seconds": time.perf_counter() - start}
        if outcome.lowrank is not None:
            record["lowrank_rank"] = int(outcome.lowrank[0].shape[0])
        if row_info:
            record["rowwise"] = row_info
        record.update(outcome.notes)
        self.records[full] = record

    def end_block(self, i: int, block: nn.Module) -> None:
        if self.pack_masks:
            self.masks.pack()


class GeneralVisitor:
    """A dense pass over the general calibration set keeping each linear's general importance (D-Pruner's ``G``),
    on the host, from Hessians that are dropped as soon as each block is done."""

    modifies_weights = False

    def __init__(self, score) -> None:
        self.score = score
        self.general: dict[tuple[int, str], torch.Tensor] = {}

    def needs(self, i: int, name: str) -> Needs:
        return Needs(hessian=True)

    def visit(self, i: int, name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        check_weight(f"block {i} {name}", linear.weight)
        self.general[(i, name)] = self.score.general_importance(linear.weight.data, stats, f"block {i} {name}").cpu()

    def end_block(self, i: int, block: nn.Module) -> None:
        pass
