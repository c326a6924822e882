"""Sensitivity profiles: how much the model's output moves when only one unit is pruned, per sparsity level.

A *unit* is one prunable module (e.g. the up projection of block 3) or one block (every targeted
module of block 3). Its damage at a level is the mean over all positions of
``KL(dense || pruned)`` of the next-token distribution, when that unit alone is pruned to that
level with the chosen score and structure; the increase of the next-token loss on the same
windows is recorded beside it.

Cost: one dense pass with the :class:`~prunewise.engine.sequential.SequentialEngine` keeps every
targeted module's input statistics (Hessians only for SparseGPT), the dense input of every block
and the dense log-probabilities. Each (unit, level) then prunes a copy of the unit's weights from
those statistics, runs only the blocks from the unit's block to the end, the final norm and the
output head, and puts the weights back. Memory: ``(blocks + 1) * tokens * hidden * 4`` bytes of
activations, plus ``tokens * vocab * 4`` bytes of dense log-probabilities when that fits
``max_dense_mb`` (otherwise they are recomputed from the stored final hidden state each time),
plus the statistics (SparseGPT: one ``in x in`` float32 Hessian per distinct linear input). With
8 x 256 tokens: smollm2-135m 146 MB + 403 MB (+ 403 MB of Hessians), gemma3-270m 100 MB + 2.1 GB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from ..cache import cache_dir
from ..core.registry import register
from ..core.stats import LinearStats, Needs
from ..engine.sequential import SequentialEngine
from ..errors import PrunewiseError
from ..models.adapters import ArchitectureAdapter, get_adapter
from .base import Allocation, AllocationConfig, AllocationContext
from .plan import figure_png, load_json_model, pyplot

log = logging.getLogger(__name__)

DEFAULT_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
PROFILE_FORMAT = "v1"  # bump when the way damage is measured changes (invalidates cached profiles)
UnitKind = Literal["module", "block"]


class SensitivityProfile(BaseModel):
    """Damage per unit and sparsity level (lists aligned with ``levels``), and what it was measured with."""

    unit_kind: str
    units: list[str]
    members: dict[str, list[str]]          # unit -> full module names it prunes
    levels: list[float]
    damage: dict[str, list[float]]         # unit -> mean KL(dense || pruned) per position (nats), per level
    loss_increase: dict[str, list[float]]  # unit -> next-token loss of pruned minus dense (nats), per level
    numels: dict[str, int]                 # unit -> prunable weights
    module_numels: dict[str, int]          # module -> weights
    score: str
    score_options: dict = Field(default_factory=dict)
    structure: str
    data_fingerprint: str
    model_fingerprint: str | None = None
    n_windows: int
    seqlen: int
    n_tokens: int
    dense_loss: float
    seconds: dict[str, float] = Field(default_factory=dict)
    format: str = PROFILE_FORMAT

    def damage_at(self, unit: str, level: float) -> float:
        """Damage of ``unit`` at a ladder level."""
        return self.damage[unit][self._index(level)]

    def _index(self, level: float) -> int:
        for j, x in enumerate(self.levels):
            if abs(x - level) < 1e-9:
                return j
        raise PrunewiseError(f"level {level} is not in the profile's ladder {self.levels}; use one of its levels")

    def save(self, path: str | Path) -> None:
        """Write the profile as JSON."""
        Path(path).write_text(self.model_dump_json(indent=1))

    @classmethod
    def load(cls, path: str | Path) -> SensitivityProfile:
        """Read a profile JSON written by :meth:`save`."""
        return load_json_model(cls, path, "sensitivity profile", "compute one with allocation 'profile'")


def default_levels(structure) -> tuple[float, ...]:
    """The default ladder: 0.3 ... 0.9, or every k/M (0 < k < M) for N:M structures."""
    if structure.level_quantum:
        q = structure.level_quantum
        return tuple(k / q for k in range(1, q))
    return DEFAULT_LEVELS


def check_levels(levels, structure) -> tuple[float, ...]:
    """Sorted, distinct levels in [0, 1); for N:M each a multiple of 1/M (snapped to exactly k/M)."""
    if levels is None:
        return default_levels(structure)
    out = []
    for x in levels:
        x = float(x)
        if not 0 <= x < 1:
            raise PrunewiseError(f"profile level {x} is outside [0, 1); give sparsity levels such as 0.3 0.5 0.7")
        if structure.level_quantum:
            q = structure.level_quantum
            k = x * q
            if abs(k - round(k)) > 1e-6:
                raise PrunewiseError(f"profile level {x} is not a multiple of 1/{q}; {structure.name} levels must be k/{q}")
            x = round(k) / q
        out.append(x)
    out = sorted(set(out))
    if not out:
        raise PrunewiseError("the profile needs at least one sparsity level; give e.g. 0.3 0.5 0.7")
    return tuple(out)


def profile_units(numels: dict[str, int], prefix: str, unit: UnitKind) -> dict[str, list[str]]:
    """Unit name -> member modules: each module alone, or all targeted modules of a block (``prefix.i``)."""
    if unit == "module":
        return {m: [m] for m in numels}
    if unit != "block":
        raise PrunewiseError(f"unknown profile unit '{unit}'; use 'module' or 'block'")
    units: dict[str, list[str]] = {}
    for m in numels:
        rest = m[len(prefix) + 1:] if m.startswith(prefix + ".") else ""
        index = rest.split(".", 1)[0]
        if not index.isdigit():
            raise PrunewiseError(f"module {m} is not inside a block of {prefix}; use profile unit 'module'")
        units.setdefault(f"{prefix}.{index}", []).append(m)
    return units


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over the model's parameters and config: a cache key that changes whenever the weights do."""
    digest = hashlib.sha256()
    config = dict(model.config.to_dict()) if hasattr(model, "config") else {}
    for key in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(key, None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def windows_fingerprint(windows: torch.Tensor) -> str:
    """sha256 of the token windows (shape and ids)."""
    w = windows.detach().cpu().to(torch.int64).contiguous()
    return hashlib.sha256(f"{tuple(w.shape)}".encode() + w.numpy().tobytes()).hexdigest()


def _score_options(score) -> dict:
    return dict(score.options)


def profile_cache_path(model_fingerprint: str, data_fingerprint: str, score, structure, levels, unit: str,
                       modules) -> Path:
    """Where the profile for these keys is cached (under ``cache_dir('profiles')``)."""
    key = {"format": PROFILE_FORMAT, "model": model_fingerprint, "data": data_fingerprint, "score": score.name,
           "score_options": _score_options(score), "structure": repr(structure), "levels": list(levels),
           "unit": unit, "modules": sorted(modules)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir("profiles") / f"{score.name}-{structure.name.replace(':', 'of')}-{unit}-{digest}.json"


class _DenseRecorder:
    """Non-modifying visitor that keeps the input statistics of the targeted linears."""

    modifies_weights = False

    def __init__(self, prefix: str, targets: set[str], need: Needs | None) -> None:
        self.prefix, self.targets, self.need = prefix, targets, need
        self.stats: dict[str, LinearStats] = {}

    def needs(self, i: int, name: str) -> Needs | None:
        return self.need if f"{self.prefix}.{i}.{name}" in self.targets else None

    def visit(self, i: int, name: str, linear: nn.Linear, stats: LinearStats | None) -> None:
        if stats is not None:
            self.stats[f"{self.prefix}.{i}.{name}"] = stats

    def end_block(self, i: int, block: nn.Module) -> None:
        return None


class Profiler:
    """Measures the damage of pruning one unit at one level, from one stored dense pass."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, score, structure, units: dict[str, list[str]],
                 chunk_size: int | None = None, progress: bool = True, max_dense_mb: float = 2560,
                 adapter: ArchitectureAdapter | None = None) -> None:
        self.model, self.windows, self.score, self.structure, self.units = model, windows, score, structure, units
        self.adapter = adapter or get_adapter(model)
        self.chunk = min(chunk_size or 8, windows.shape[0])
        self.progress, self.max_dense_mb = progress, max_dense_mb
        self.prefix = self.adapter.block_prefix(model)
        self.blocks = self.adapter.blocks(model)
        self.linears: dict[str, nn.Linear] = {
            f"{self.prefix}.{i}.{n}": lin for i, b in enumerate(self.blocks) for n, lin in self.adapter.linears(b).items()}
        self.block_of = {m: int(m[len(self.prefix) + 1:].split(".", 1)[0]) for ms in units.values() for m in ms}
        n, L = windows.shape
        labels = torch.full((n, L), -100, dtype=torch.long)
        labels[:, :-1] = windows[:, 1:]
        self.labels = labels.reshape(-1)
        self.ready = False

    @torch.no_grad()
    def prepare(self) -> None:
        """The dense pass: statistics, every block's dense input, the block kwargs and the dense log-probs."""
        t0 = time.perf_counter()
        targets = {m for ms in self.units.values() for m in ms}
        recorder = _DenseRecorder(self.prefix, targets, self.score.needs)
        self.engine = SequentialEngine(self.model, self.adapter, self.windows, self.chunk, self.progress,
                                       desc="profile: dense pass", sequential=False)
        recording = self.engine.run(recorder, record=True)
        n = self.windows.shape[0]
        self.inputs, self.final, self.kwargs = recording.inputs, recording.final, recording.kwargs
        if any(x.shape[0] != n for x in self.inputs) or self.final.shape[0] != n:
            raise RuntimeError("the dense pass did not run every block exactly once over every window")
        self.stats = recorder.stats
        missing = sorted(m for m in targets if self.score.needs.inputs and m not in self.stats)
        if missing:
            raise RuntimeError(f"no statistics collected for {missing[:3]}")
        vocab = self.model.get_output_embeddings().weight.shape[0]
        dense_mb = self.windows.numel() * vocab * 4 / 2 ** 20
        keep = dense_mb <= self.max_dense_mb
        if not keep:
            log.info("dense log-probabilities (%.0f MB) exceed max_dense_mb=%g: recomputing them per evaluation",
                     dense_mb, self.max_dense_mb)
        self.dense_lp = torch.empty(self.windows.numel(), vocab) if keep else None
        nll = []
        for rows, lp in self._log_probs(self._chunks_of(self.final)):
            nll.append(self._nll(lp, rows))
            if keep:
                self.dense_lp[rows] = lp
        self.dense_nll = torch.cat(nll)
        hidden_mb = (len(self.inputs) + 1) * self.final.numel() * self.final.element_size() / 2 ** 20
        log.info("profile dense pass: %.1f s, %.1f MB of stored activations, %.1f MB of dense log-probs",
                 time.perf_counter() - t0, hidden_mb, dense_mb if self.dense_lp is not None else 0)
        self.ready = True

    def _chunks_of(self, hidden: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        for start in range(0, hidden.shape[0], self.chunk):
            yield start, hidden[start:start + self.chunk]

    def _log_probs(self, chunks) -> Iterator[tuple[slice, torch.Tensor]]:
        """(token rows, float32 log-probs) slices of at most ~64 MB of logits, from last-block outputs."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        step = max(16, (64 << 20) // (vocab * 4))
        L = self.windows.shape[1]
        for start, h in chunks:
            flat = h.reshape(-1, h.shape[-1])
            for s in range(0, flat.shape[0], step):
                logits = self.adapter.final_logits(self.model, flat[s:s + step]).float()
                rows = slice(start * L + s, start * L + s + logits.shape[0])
                yield rows, torch.log_softmax(logits, dim=-1)

    def _nll(self, lp: torch.Tensor, rows: slice) -> torch.Tensor:
        labels = self.labels[rows]
        valid = labels >= 0
        return -lp[valid].gather(1, labels[valid].unsqueeze(1)).squeeze(1).double()

    def _restart(self, first_block: int) -> Iterator[tuple[int, torch.Tensor]]:
        """Last-block outputs, chunk by chunk, from the dense input of ``first_block`` through the current weights."""
        for start, h in self._chunks_of(self.inputs[first_block]):
            yield start, self.engine.forward_from(first_block, h, self.kwargs)[0]

    def _prune_members(self, unit: str, level: float) -> dict[str, torch.Tensor]:
        saved = {}
        for m in self.units[unit]:
            linear = self.linears[m]
            saved[m] = linear.weight.data.clone()
            if level == 0:
                continue
            outcome = self.score.prune(saved[m], self.stats.get(m), self.structure, level, module=m)
            linear.weight.data.copy_(outcome.weight)
        return saved

    def _restore(self, saved: dict[str, torch.Tensor]) -> None:
        for m, w in saved.items():
            self.linears[m].weight.data.copy_(w)

    def release(self, unit: str) -> None:
        """Drop what pruning ``unit`` cached on its statistics (SparseGPT's inverse-Hessian factor)."""
        for m in self.units[unit]:
            if m in self.stats:
                self.stats[m].cache.clear()

    @torch.no_grad()
    def logits(self, unit: str, level: float) -> torch.Tensor:
        """Full logits (windows, seqlen, vocab) with only ``unit`` pruned to ``level``, via the block restart."""
        if not self.ready:
            self.prepare()
        saved = self._prune_members(unit, level)
        try:
            first = min(self.block_of[m] for m in self.units[unit])
            outs = [self.adapter.final_logits(self.model, h) for _, h in self._restart(first)]
        finally:
            self._restore(saved)
        return torch.cat(outs)

    @torch.no_grad()
    def measure(self, unit: str, level: float) -> tuple[float, float]:
        """(mean KL(dense || pruned) over all positions, loss increase) with only ``unit`` pruned to ``level``."""
        if not self.ready:
            self.prepare()
        saved = self._prune_members(unit, level)
        try:
            first = min(self.block_of[m] for m in self.units[unit])
            kl = torch.zeros((), dtype=torch.float64)
            nll = torch.zeros((), dtype=torch.float64)
            dense = None if self.dense_lp is not None else self._log_probs(self._chunks_of(self.final))
            for rows, lp in self._log_probs(self._restart(first)):
                ref = self.dense_lp[rows] if dense is None else next(dense)[1]
                kl += (ref.exp() * (ref - lp)).sum(-1).double().sum()
                nll += self._nll(lp, rows).sum()
        finally:
            self._restore(saved)
        tokens = self.windows.numel()
        return float(kl / tokens), float((nll - self.dense_nll.sum()) / max(1, self.dense_nll.numel()))


def compute_profile(model: nn.Module, windows: torch.Tensor, score, structure, numels: dict[str, int],
                    unit: UnitKind = "block", levels=None, chunk_size: int | None = None, progress: bool = True,
                    model_fingerprint: str | None = None, data_fingerprint: str | None = None,
                    max_dense_mb: float = 2560) -> SensitivityProfile:
    """The sensitivity profile of the targeted modules (``numels``), loaded from the disk cache when possible.

    The cache key is the model fingerprint (given by the caller; no caching without one), the data
    fingerprint (default: a hash of the windows), the score and its options, the structure, the
    levels, the unit kind and the set of modules.
    """
    levels = check_levels(levels, structure)
    adapter = get_adapter(model)
    units = profile_units(numels, adapter.block_prefix(model), unit)
    weights = dict(model.named_parameters())
    for m in numels:
        structure.check(m, weights[f"{m}.weight"])
    data_fingerprint = data_fingerprint or windows_fingerprint(windows)
    path = None
    if model_fingerprint:
        path = profile_cache_path(model_fingerprint, data_fingerprint, score, structure, levels, unit, numels)
        if path.exists():
            try:
                profile = SensitivityProfile.load(path)
                log.info("sensitivity profile from cache %s", path)
                return profile
            except PrunewiseError as exc:
                log.warning("ignoring unreadable cached profile: %s", exc)
    else:
        log.info("no model fingerprint given: the sensitivity profile is not cached")

    t0 = time.perf_counter()
    profiler = Profiler(model, windows, score, structure, units, chunk_size, progress, max_dense_mb, adapter)
    profiler.prepare()
    t_dense = time.perf_counter() - t0
    damage: dict[str, list[float]] = {}
    loss: dict[str, list[float]] = {}
    t1 = time.perf_counter()
    bar = tqdm(units, desc=f"profile: {len(units)} {unit}s x {len(levels)} levels", unit=unit, disable=not progress)
    for name in bar:
        results = [profiler.measure(name, lv) for lv in levels]
        profiler.release(name)
        damage[name] = [r[0] for r in results]
        loss[name] = [r[1] for r in results]
    t_eval = time.perf_counter() - t1
    n_eval = max(1, len(units) * len(levels))
    log.info("profile: %d %ss x %d levels in %.1f s (%.3f s per unit and level)", len(units), unit, len(levels),
             t_eval, t_eval / n_eval)
    profile = SensitivityProfile(
        unit_kind=unit, units=list(units), members=units, levels=list(levels), damage=damage, loss_increase=loss,
        numels={u: sum(numels[m] for m in ms) for u, ms in units.items()}, module_numels=dict(numels),
        score=score.name, score_options=_score_options(score), structure=structure.name,
        data_fingerprint=data_fingerprint, model_fingerprint=model_fingerprint, n_windows=windows.shape[0],
        seqlen=windows.shape[1], n_tokens=windows.numel(), dense_loss=float(profiler.dense_nll.mean()),
        seconds={"dense_pass": t_dense, "evaluations": t_eval, "per_evaluation": t_eval / n_eval})
    if path is not None:
        tmp = path.with_suffix(".tmp")
        profile.save(tmp)
        tmp.replace(path)
    return profile


def plot_profile(profile: SensitivityProfile, path: str | Path | None = None) -> bytes | None:
    """A unit x level heatmap of log10 damage as PNG bytes (also written to ``path``); None without matplotlib."""
    plt = pyplot()
    if plt is None:
        log.info("matplotlib is not installed: skipping the sensitivity heatmap (profile.png)")
        return None
    values = torch.tensor([profile.damage[u] for u in profile.units], dtype=torch.float64)
    shown = torch.log10(values.clamp(min=1e-6)).numpy()
    rows = len(profile.units)
    fig, ax = plt.subplots(figsize=(1.2 + 0.7 * len(profile.levels), 1.5 + 0.22 * rows))
    try:
        image = ax.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(profile.levels)))
        ax.set_xticklabels([f"{x:g}" for x in profile.levels])
        ax.set_yticks(range(rows))
        ax.set_yticklabels(profile.units, fontsize=6 if rows > 40 else 8)
        ax.set_xlabel("sparsity level")
        ax.set_title(f"damage: mean KL(dense || pruned), {profile.score} {profile.structure}", fontsize=9)
        fig.colorbar(image, ax=ax, label="log10 KL (nats/token)")
        return figure_png(fig, path)
    finally:
        plt.close(fig)


class ProfileConfig(AllocationConfig):
    levels: list[float] | None = Field(None, description="sparsity ladder; default 0.3..0.9, or every k/M for N:M")
    unit: Literal["module", "block"] = Field("block", description="one level per block or per module")
    nsamples: int = Field(8, ge=1, description="calibration windows used to measure damage")
    seqlen: int = Field(256, ge=2, description="tokens per window used to measure damage")

    @field_validator("levels")
    @classmethod
    def _sorted(cls, v):
        return None if v is None else sorted({float(x) for x in v})


def profile_plan(ctx: AllocationContext, config: ProfileConfig, windows: torch.Tensor):
    """Measure (or load from the cache) the sensitivity profile on ``windows`` and solve for the target."""
    from .knapsack import allocate_from_profile

    fingerprint = ctx.fingerprint() if ctx.fingerprint else None
    profile = compute_profile(ctx.model, windows, ctx.pruner, ctx.structure, ctx.numels, unit=config.unit,
                              levels=config.levels, chunk_size=ctx.chunk_size, progress=ctx.progress,
                              model_fingerprint=fingerprint)
    ctx.files["profile.json"] = profile.model_dump_json(indent=1)
    png = plot_profile(profile)
    if png is not None:
        ctx.files["profile.png"] = png
    return allocate_from_profile(profile, ctx.target)


@register("allocation")
class Profile(Allocation):
    key = "profile"
    name = "profile"
    description = "least measured damage per unit: a sensitivity profile (KL to dense per unit and level) + knapsack"
    Config = ProfileConfig
    works_with = {"structure": ("unstructured", "n:m")}
    hint = "structured widths are allocated uniform, global (FLAP), owl or from --plan; make a plan.json with an " \
           "unstructured run and pass --plan"

    def conflicts(self, chosen):
        reason = super().conflicts(chosen)
        if reason is None and self.config.levels is not None:
            try:
                check_levels(self.config.levels, chosen["structure"][0])
            except PrunewiseError as exc:
                return str(exc)
        return reason

    def allocate(self, ctx: AllocationContext):
        windows = ctx.own_windows(self.config.nsamples, self.config.seqlen, what="profile")
        return profile_plan(ctx, self.config, windows)
