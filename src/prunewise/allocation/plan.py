"""The allocation plan: how much of each module is removed. Data, not code: save, load, reuse, plot."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import torch
from pydantic import BaseModel, Field, ValidationError

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
    rows: dict[str, list[float]] = Field(default_factory=dict)  # optional per-output-row sparsities (row-wise plans)

    def row_vector(self, module: str):
        """The module's per-row sparsities as a tensor, or None for a module-level entry."""
        found = self.rows.get(module)
        return None if found is None else torch.tensor(found, dtype=torch.float64)

    def check_rows(self) -> None:
        """Every per-row vector must remove exactly the module's planned count (to the weight)."""
        for m, vec in self.rows.items():
            if m not in self.modules:
                raise PrunewiseError(f"allocation plan has per-row sparsities for unknown module {m}; make the plan again")
            n, rows = self.numels.get(m), len(vec)
            if not n or n % rows:
                raise PrunewiseError(f"allocation plan's per-row vector for {m} has {rows} rows, which does not fit its {n} weights")
            cols = n // rows
            removed = sum(int(round(x * cols)) for x in vec)
            if removed != int(round(self.modules[m] * n)):
                raise PrunewiseError(f"allocation plan's per-row sparsities of {m} remove {removed} weights, not the module's "
                                     f"{int(round(self.modules[m] * n))}; make the plan again")

    def pruned_counts(self) -> dict[str, int]:
        return {m: int(round(s * self.numels[m])) for m, s in self.modules.items()}

    def achieved(self) -> float:
        """Share of the planned modules' weights the plan removes."""
        total = sum(self.numels.values())
        return sum(self.pruned_counts().values()) / total if total else 0.0

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> AllocationPlan:
        plan = load_json_model(cls, path, "allocation plan", "write one with `prunewise prune ... --output DIR` (plan.json)")
        plan.check_levels(path)
        plan.check_rows()
        return plan

    def check_levels(self, path: str | Path = "") -> None:
        """Every level a finite share in [0, 1) (per-row shares in [0, 1]), every module's weight count positive."""
        where = f"allocation plan {path}" if path else "allocation plan"
        fix = "make the plan again (prunewise prune ... --output DIR writes plan.json)"
        if not self.modules:
            raise PrunewiseError(f"{where} lists no modules; {fix}")
        for m, level in self.modules.items():
            if not (math.isfinite(level) and 0 <= level < 1):
                raise PrunewiseError(f"{where} gives {m} the level {level}, outside [0, 1) (the share of its weights "
                                     f"removed); {fix}")
        for m, n in self.numels.items():
            if n <= 0:
                raise PrunewiseError(f"{where} gives {m} {n} weights; {fix}")
        for m, vec in self.rows.items():
            bad = next((x for x in vec if not (math.isfinite(x) and 0 <= x <= 1)), None)
            if bad is not None:
                raise PrunewiseError(f"{where} gives a row of {m} the level {bad}, outside [0, 1]; {fix}")
        if not math.isfinite(self.target):
            raise PrunewiseError(f"{where} has the target {self.target}; {fix}")

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
        return cls.model_validate_json(Path(path).read_bytes())
    except FileNotFoundError:
        raise PrunewiseError(f"{what} {path} does not exist; {fix}") from None
    except IsADirectoryError:
        raise PrunewiseError(f"{what} {path} is a folder; give the JSON file itself ({fix})") from None
    except OSError as exc:
        raise PrunewiseError(f"cannot read {what} {path} ({exc.strerror or exc}); {fix}") from None
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise PrunewiseError(f"{what} {path} is not valid {what} JSON ({where + ': ' if where else ''}{err['msg']}); "
                             f"{fix}") from None
    except ValueError as exc:
        raise PrunewiseError(f"{what} {path} is not valid {what} JSON ({str(exc).splitlines()[0]}); {fix}") from None


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


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or None when matplotlib is not installed (a failed
    import of an installed matplotlib raises: it is not the same as having none)."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # an installed matplotlib whose pyplot fails to import raises
    return plt


def figure_png(fig, path: str | Path | None = None) -> bytes:
    """The figure as PNG bytes (tight layout, 110 dpi), also written to ``path`` when given."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data


def plot_plan(plan: AllocationPlan, path: str | Path | None = None) -> bytes | None:
    """Bar chart of the plan (sparsity per block, one bar per module type; per-row ranges as whiskers) and,
    for searched plans, the fitness history. PNG bytes (also written to ``path``); None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None

    grid: dict[str, dict[int, str]] = {}
    for m in plan.modules:
        found = re.search(r"\.(\d+)\.(.+)$", m)
        block, kind = (int(found.group(1)), found.group(2)) if found else (0, m)
        grid.setdefault(kind.split(".")[-1], {})[block] = m
    kinds = list(grid)
    blocks = sorted({b for d in grid.values() for b in d})
    history = plan.layer_stats.get("history") if isinstance(plan.layer_stats, dict) else None
    panels = 2 if history else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(6.0, 0.32 * len(blocks) * max(1, len(kinds)) / 3), 3.2 * panels),
                             squeeze=False)
    try:
        ax = axes[0][0]
        width = 0.8 / max(1, len(kinds))
        for k, kind in enumerate(kinds):
            xs, ys, lo, hi = [], [], [], []
            for b in blocks:
                m = grid[kind].get(b)
                if m is None:
                    continue
                xs.append(b - 0.4 + width * (k + 0.5))
                ys.append(plan.modules[m])
                rows = plan.rows.get(m)
                lo.append(plan.modules[m] - (min(rows) if rows else plan.modules[m]))
                hi.append((max(rows) if rows else plan.modules[m]) - plan.modules[m])
            ax.bar(xs, ys, width=width, label=kind, yerr=[lo, hi] if plan.rows else None,
                   error_kw={"elinewidth": 0.5, "capsize": 0})
        ax.axhline(plan.target, color="black", linestyle="--", linewidth=0.8, label=f"target {plan.target:g}")
        ax.set_xlabel("block")
        ax.set_ylabel("sparsity")
        ax.set_ylim(0, 1)
        ax.set_title(f"allocation plan: {plan.method}, {plan.structure}, removed {plan.achieved():.4f}"
                     + (" (whiskers: per-row range)" if plan.rows else ""), fontsize=9)
        ax.legend(fontsize=7, ncol=min(len(kinds) + 1, 8), loc="upper center", bbox_to_anchor=(0.5, -0.18))
        if history:
            ax2 = axes[1][0]
            ax2.plot([h["seconds"] for h in history], [h["fitness"] for h in history], ".", markersize=3,
                     label="selected offspring (last-stage windows)")
            tracked = [h for h in history if h.get("tracking_fitness") is not None]
            ax2.plot([h["seconds"] for h in tracked], [h["tracking_fitness"] for h in tracked], "o-",
                     label="parent on the fixed tracking windows")
            ax2.set_xlabel("seconds")
            ax2.set_ylabel("KL(dense || pruned)")
            ax2.set_yscale("log")
            ax2.legend(fontsize=7)
        return figure_png(fig, path)
    finally:
        plt.close(fig)
