"""Searched allocation: an evolutionary search over per-module sparsity levels (in the spirit of EvoPress).

Search space. Every targeted module ``m`` has a ladder of pruned-weight counts
``start[m] + k * step`` for integer ``k``, where ``start`` is the best of the starting plans
(uniform, OWL, profile) and ``step`` is one absolute number of weights shared by all modules
(EvoPress's ``weights_diff``: ``0.5 * min(s, 1 - s) / levels`` times the median module size). A
mutation moves one step of budget from one module to another (one module gets ``k - 1``, another
``k + 1``), one to three times, so every candidate removes exactly the same number of weights as
the start: the global budget stays exact to the weight. Sparsity is kept within
``start +- max_shift`` and ``[0, max_sparsity]`` per module.

Fitness. The mean ``KL(dense || candidate)`` of the next-token distribution over the positions of
a few calibration windows (the user's task or domain data). Selection is staged, cheap to
expensive: all offspring are scored on a few tokens, the best few of them on more tokens, and the
parent competes in the last stage only (elitist). Every stage draws fresh windows.

Cost. One dense pass keeps each module's input statistics (Wanda norms or SparseGPT Hessians, from
the dense model as in EvoPress's database), the dense log-probabilities of the search windows and
nothing else per candidate: a candidate is scored by swapping cached pruned variants of the
modules into the model (pruned once, then kept in an LRU cache bounded by ``cache_mb``) and
running the blocks from the first one where it differs from the parent, whose block inputs are
stored for the stage's windows. The model's weights are restored at the end.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
from pydantic import Field
from torch import nn
from tqdm.auto import tqdm

from ..core.registry import register
from ..errors import PrunewiseError
from .base import AllocationContext
from .plan import AllocationPlan
from .profile import Profile, ProfileConfig, Profiler, profile_plan

log = logging.getLogger(__name__)


@dataclass
class SearchConfig:
    """Knobs of the evolutionary search; the defaults finish in well under 30 minutes for smollm2-135m on 2 CPU cores."""

    generations: int = 150
    offspring: int = 12
    stage_windows: tuple[int, ...] = (1, 4)     # windows scored per selection stage (cheap to expensive)
    stage_survivors: tuple[int, ...] = (3, 1)   # candidates kept after each stage
    levels: int = 8                             # EvoPress num_levels: sets the step size
    max_shift: float | None = None              # max |sparsity - start| per module; default 0.5 * min(s, 1 - s)
    max_sparsity: float = 0.95
    time_limit_s: float = 900.0                # the generation loop stops after this many seconds
    cache_mb: float = 3072.0                    # bound on cached pruned variants (float32 weights)
    track_every: int = 10                       # generations between fitness reports on the fixed tracking windows
    track_windows: int = 4
    seed: int = 0

    def check(self) -> None:
        if len(self.stage_windows) != len(self.stage_survivors) or not self.stage_windows:
            raise PrunewiseError("search stages need as many window counts as survivor counts, e.g. windows 1 4, survivors 3 1")
        if self.stage_survivors[-1] != 1:
            raise PrunewiseError("the last search stage must keep exactly 1 survivor")
        if any(b > a for a, b in zip(self.stage_survivors, self.stage_survivors[1:])) or self.stage_survivors[0] > self.offspring:
            raise PrunewiseError("search survivors must not grow from stage to stage nor exceed the offspring count")
        if self.generations < 0 or self.offspring < 1 or self.levels < 1:
            raise PrunewiseError("search generations must be >= 0, offspring and levels >= 1")


def search_step(numels: dict[str, int], target: float, levels: int) -> int:
    """EvoPress's ``weights_diff``: weights moved by one mutation step (at least 1)."""
    sizes = sorted(numels.values())
    median = sizes[len(sizes) // 2]
    return max(1, int(0.5 * min(target, 1 - target) / levels * median))


class VariantCache:
    """Pruned weights of one module at one removal count, pruned on first use and kept in an LRU cache."""

    def __init__(self, score, structure, dense: dict[str, torch.Tensor], stats: dict, numels: dict[str, int],
                 limit_mb: float) -> None:
        self.score, self.structure, self.dense, self.stats, self.numels = score, structure, dense, stats, numels
        self.limit = limit_mb * 2 ** 20
        self.items: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()
        self.bytes = 0
        self.pruned = 0
        self.hits = 0
        self.seconds = 0.0

    def get(self, module: str, count: int) -> torch.Tensor:
        key = (module, count)
        found = self.items.get(key)
        if found is not None:
            self.items.move_to_end(key)
            self.hits += 1
            return found
        t0 = time.perf_counter()
        w = self.dense[module]
        if count == 0:
            out = w
        else:
            out = self.score.prune(w, self.stats.get(module), self.structure, count / self.numels[module],
                                   module=module).weight
        self.seconds += time.perf_counter() - t0
        self.pruned += 1
        self.items[key] = out
        self.bytes += out.numel() * out.element_size()
        while self.bytes > self.limit and len(self.items) > 1:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()
        return out


class ConfigEvaluator:
    """Scores removal-count configurations (one count per module) by KL to the dense model."""

    def __init__(self, profiler: Profiler, modules: list[str], cache: VariantCache) -> None:
        self.p, self.modules, self.cache = profiler, modules, cache
        self.block_of = [profiler.block_of[m] for m in modules]
        self.loaded: list[int | None] = [None] * len(modules)
        self.forwards = 0
        self.tokens = 0

    def load(self, config: tuple[int, ...]) -> None:
        for j, (m, c) in enumerate(zip(self.modules, config)):
            if self.loaded[j] != c:
                self.p.linears[m].weight.data.copy_(self.cache.get(m, c))
                self.loaded[j] = c

    def first_difference(self, a: tuple[int, ...], b: tuple[int, ...]) -> int:
        blocks = [self.block_of[j] for j in range(len(a)) if a[j] != b[j]]
        return min(blocks) if blocks else len(self.p.blocks)

    @torch.no_grad()
    def _run(self, first: int, hidden: torch.Tensor, keep: bool) -> tuple[torch.Tensor, list]:
        """Blocks ``first..end`` from ``hidden``; with ``keep`` also every block's input."""
        return self.p.engine.forward_from(first, hidden, self.p.kwargs, keep=keep)

    @torch.no_grad()
    def _kl(self, final: torch.Tensor, idx: list[int]) -> float:
        L = self.p.windows.shape[1]
        total = torch.zeros((), dtype=torch.float64)
        for w, h in zip(idx, final):
            lp = torch.log_softmax(self.p.adapter.final_logits(self.p.model, h).float(), dim=-1)
            ref = self.p.dense_lp[w * L:(w + 1) * L]
            total += (ref.exp() * (ref - lp)).sum().double()
        self.tokens += len(idx) * L
        return float(total / (len(idx) * L))

    @torch.no_grad()
    def score(self, parent: tuple[int, ...], candidates: list[tuple[int, ...]], idx: list[int]) -> tuple[float, list[float]]:
        """(parent's fitness, each candidate's fitness) on windows ``idx``; reuses the parent's block inputs."""
        self.load(parent)
        start = self.p.inputs[0][idx]
        final, kept = self._run(0, start, keep=True)
        parent_fit = self._kl(final, idx)
        self.forwards += 1
        out = []
        for cand in candidates:
            if cand == parent:
                out.append(parent_fit)
                continue
            first = self.first_difference(parent, cand)
            self.load(cand)
            final, _ = self._run(first, kept[first], keep=False)
            out.append(self._kl(final, idx))
            self.forwards += 1
        return parent_fit, out


class SearchReplica:
    """A Ray actor of the search: its own dense model (loaded as the driver loaded it, checked by fingerprint),
    dense pass, variant cache and evaluator. It scores what the driver sends; the driver keeps the selection."""

    def __init__(self, build, windows: torch.Tensor, modules: list[str], numels: dict[str, int], cache_mb: float,
                 threads: int, fingerprint: str | None) -> None:
        from .profile import weights_fingerprint

        torch.set_num_threads(max(1, threads))
        model, score, structure = build()
        if fingerprint is not None and weights_fingerprint(model) != fingerprint:
            raise PrunewiseError("a Ray search actor loaded other weights than the driver's model; the recipe's model "
                                 "must name the same checkpoint on every node (same path or hub revision)")
        profiler = Profiler(model, windows, score, structure, {m: [m] for m in modules}, progress=False,
                            max_dense_mb=float("inf"))
        profiler.prepare()
        dense = {m: profiler.linears[m].weight.data.clone() for m in modules}
        self.cache = VariantCache(score, structure, dense, profiler.stats, numels, cache_mb)
        self.evaluator = ConfigEvaluator(profiler, modules, self.cache)

    def score(self, parent: tuple[int, ...], candidates: list[tuple[int, ...]], idx: list[int]) -> list[float]:
        return self.evaluator.score(parent, candidates, idx)[1]

    def counters(self) -> dict:
        return {"forwards": self.evaluator.forwards, "tokens": self.evaluator.tokens,
                "variants_pruned": self.cache.pruned, "pruning_s": self.cache.seconds}


class ReplicaPool:
    """Search replicas on Ray: each stage's candidates split in contiguous shares, one per actor, fitness in order."""

    def __init__(self, remote: dict, windows: torch.Tensor, modules: list[str], numels: dict[str, int],
                 cache_mb: float, actors: int | None, offspring: int, fingerprint: str | None) -> None:
        from ..core.cluster import MAX_RETRIES, cluster_cpus, connect, error_line

        self.ray = ray = connect(remote["address"])
        self.error_line = error_line
        if not actors:
            actors = max(1, min(offspring, int(cluster_cpus() // max(remote["num_cpus"], 1e-9))))
        cls = ray.remote(SearchReplica).options(num_cpus=remote["num_cpus"], num_gpus=remote["num_gpus"],
                                                max_restarts=MAX_RETRIES, max_task_retries=MAX_RETRIES)
        self.actors = [cls.remote(remote["build"], windows, modules, numels, cache_mb, int(remote["num_cpus"]),
                                  fingerprint) for _ in range(actors)]
        self._get([a.counters.remote() for a in self.actors])  # construction errors surface here, before the loop
        log.info("search: %d Ray actors ready", actors)

    def _get(self, refs):
        try:
            return self.ray.get(refs)
        except self.ray.exceptions.RayError as exc:
            self.close()
            raise PrunewiseError(f"a Ray search actor failed: {self.error_line(exc)}") from None

    def score(self, parent: tuple[int, ...], candidates: list[tuple[int, ...]], idx: list[int]) -> list[float]:
        k = min(len(self.actors), len(candidates))
        share, extra = divmod(len(candidates), k)
        refs, start = [], 0
        for j in range(k):
            end = start + share + (j < extra)
            refs.append(self.actors[j].score.remote(parent, candidates[start:end], idx))
            start = end
        return [f for part in self._get(refs) for f in part]

    def counters(self) -> dict:
        totals: dict = {}
        for c in self._get([a.counters.remote() for a in self.actors]):
            for k, v in c.items():
                totals[k] = totals.get(k, 0) + v
        return totals

    def close(self) -> None:
        for a in self.actors:
            self.ray.kill(a)
        self.actors = []


def _mutate(parent: tuple[int, ...], lo: list[int], hi: list[int], rng: random.Random) -> tuple[int, ...]:
    child = list(parent)
    flips = min(rng.randint(1, 3), rng.randint(1, 3))  # biased to few flips, as EvoPress
    for _ in range(flips):
        down_ok = [j for j in range(len(child)) if child[j] > lo[j]]
        up_ok = [j for j in range(len(child)) if child[j] < hi[j]]
        if not down_ok or not up_ok:
            break
        d = rng.choice(down_ok)
        u = rng.choice(up_ok)
        if d == u:
            continue
        child[d] -= 1
        child[u] += 1
    return tuple(child)


@torch.no_grad()
def search_allocation(model: nn.Module, windows: torch.Tensor, score, structure, numels: dict[str, int],
                      starts: dict[str, AllocationPlan], config: SearchConfig | None = None,
                      progress: bool = True, replicas: ReplicaPool | None = None) -> AllocationPlan:
    """Evolutionary search for per-module sparsities meeting the starts' (shared, exact) budget.

    ``starts`` are plans over the same modules with the same total removed weights (uniform, OWL,
    profile ...): the best by fitness on the tracking windows becomes the first parent.
    """
    config = config or SearchConfig()
    config.check()
    if structure.level_quantum:
        raise PrunewiseError("search allocation moves single weights between modules and cannot keep N:M levels; "
                             "use allocation owl or profile with N:M")
    if not starts:
        raise PrunewiseError("the search needs at least one starting plan (uniform, owl or profile)")
    modules = list(numels)
    start_cfg = {}
    for name, plan in starts.items():
        counts = plan.pruned_counts()
        start_cfg[name] = tuple(counts[m] for m in modules)
    totals = {name: sum(cfg) for name, cfg in start_cfg.items()}
    if len(set(totals.values())) != 1:
        raise PrunewiseError(f"starting plans remove different numbers of weights {totals}; give plans for one budget")
    n_windows = windows.shape[0]
    need = max(config.stage_windows + (config.track_windows,))
    if n_windows < need:
        raise PrunewiseError(f"the search needs at least {need} calibration windows (stages {config.stage_windows}, "
                             f"tracking {config.track_windows}); got {n_windows}: raise search_nsamples")
    target = next(iter(starts.values())).target
    t_start = time.perf_counter()

    units = {m: [m] for m in modules}
    profiler = Profiler(model, windows, score, structure, units, progress=progress, max_dense_mb=float("inf"))
    profiler.prepare()
    dense = {m: profiler.linears[m].weight.data.clone() for m in modules}
    cache = VariantCache(score, structure, dense, profiler.stats, numels, config.cache_mb)
    evaluator = ConfigEvaluator(profiler, modules, cache)
    rng = random.Random(config.seed)
    track = list(range(config.track_windows))
    history: list[dict] = []
    t_prep = time.perf_counter() - t_start

    try:
        # the best start on the tracking windows
        start_fit = {name: evaluator.score(cfg, [], track)[0] for name, cfg in start_cfg.items()}
        best = min(start_fit, key=start_fit.get)
        log.info("search starts: %s -> best %s", {k: round(v, 5) for k, v in start_fit.items()}, best)

        step = search_step(numels, target, config.levels)
        shift = config.max_shift if config.max_shift is not None else 0.5 * min(target, 1 - target)
        base = start_cfg[best]
        lo, hi = [], []
        for m, c in zip(modules, base):
            n = numels[m]
            low = max(0.0, c / n - shift) * n
            high = min(config.max_sparsity, c / n + shift) * n
            lo.append(-int(math.floor((c - low) / step)))
            hi.append(int(math.floor((high - c) / step)))

        def to_counts(levels: tuple[int, ...]) -> tuple[int, ...]:
            return tuple(b + k * step for b, k in zip(base, levels))

        parent = tuple(0 for _ in modules)
        fitness = start_fit[best]
        history.append({"generation": 0, "seconds": time.perf_counter() - t_start, "fitness": fitness,
                        "tracking_fitness": fitness})
        bar = tqdm(range(1, config.generations + 1), desc="search", unit="gen", disable=not progress)
        for gen in bar:
            if time.perf_counter() - t_start - t_prep > config.time_limit_s:
                log.info("search stopped at generation %d: time limit %.0f s", gen - 1, config.time_limit_s)
                break
            kids: list[tuple[int, ...]] = []
            tries = 0
            while len(kids) < config.offspring and tries < 50 * config.offspring:
                tries += 1
                kid = _mutate(parent, lo, hi, rng)
                if kid != parent and kid not in kids:
                    kids.append(kid)
            if not kids:
                break
            pool = kids
            fits: list[float] = []
            n_stages = len(config.stage_windows)
            for stage, (n_win, keep) in enumerate(zip(config.stage_windows, config.stage_survivors)):
                if stage == n_stages - 1 and parent not in pool:  # elitist: the parent competes in the last stage
                    pool = pool + [parent]
                idx = rng.sample(range(n_windows), n_win)
                if replicas is not None:
                    fits = replicas.score(to_counts(parent), [to_counts(c) for c in pool], idx)
                else:
                    _, fits = evaluator.score(to_counts(parent), [to_counts(c) for c in pool], idx)
                order = sorted(range(len(pool)), key=lambda j: fits[j])[:keep]
                pool, fits = [pool[j] for j in order], [fits[j] for j in order]
            parent, fitness = pool[0], fits[0]
            entry = {"generation": gen, "seconds": time.perf_counter() - t_start, "fitness": fitness}
            if gen % config.track_every == 0:
                entry["tracking_fitness"], _ = evaluator.score(to_counts(parent), [], track)
            history.append(entry)
            bar.set_postfix(kl=f"{fitness:.4f}", moved=sum(abs(k) for k in parent))
        final_track, _ = evaluator.score(to_counts(parent), [], track)
        if history[-1].get("tracking_fitness") is None:
            history[-1]["tracking_fitness"] = final_track
    finally:
        for m in modules:
            profiler.linears[m].weight.data.copy_(dense[m])
    counts = to_counts(parent)
    remote = replicas.counters() if replicas is not None else {}
    seconds = time.perf_counter() - t_start
    log.info("search: %d generations, tracking KL %.5f -> %.5f, %.0f s, %d variants pruned (%.0f s)",
             history[-1]["generation"], start_fit[best], final_track, seconds, cache.pruned, cache.seconds)
    plan = AllocationPlan(
        method="search", target=target, structure=structure.name,
        modules={m: c / numels[m] for m, c in zip(modules, counts)}, numels=dict(numels),
        params={**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
                "step_weights": step, "max_shift_used": shift, "score": score.name,
                "windows": list(windows.shape)},
        layer_stats={"start": best, "start_fitness": start_fit, "final_tracking_fitness": final_track,
                     "history": history, "levels": dict(zip(modules, parent)),
                     "seconds": {"prepare": t_prep, "total": seconds, "pruning_variants": cache.seconds},
                     "variants_pruned": cache.pruned + remote.get("variants_pruned", 0),
                     "forwards": evaluator.forwards + remote.get("forwards", 0),
                     "tokens_scored": evaluator.tokens + remote.get("tokens", 0),
                     "ray_actors": len(replicas.actors) if replicas is not None else 0})
    return plan


class SearchOptions(ProfileConfig):
    generations: int = Field(150, ge=0, description="generations (the time limit may stop it first)")
    offspring: int = Field(12, ge=1, description="offspring per generation")
    time_limit: float = Field(900.0, gt=0, description="seconds for the generation loop")
    search_nsamples: int = Field(16, ge=4, description="calibration windows fitness is drawn from")
    search_seqlen: int = Field(256, ge=2, description="tokens per search window")
    cache_mb: float = Field(3072.0, gt=0, description="bound on cached pruned module variants")
    owl_m: float = Field(5.0, gt=0, description="the OWL starting plan's M")
    owl_lambda: float = Field(0.08, ge=0, lt=0.5, description="the OWL starting plan's lambda")
    actors: int | None = Field(None, ge=1, description="with ray: actors scoring offspring (default: as many as the "
                                                       "cluster's CPUs hold at num_cpus each, at most the offspring)")


@register("allocation")
class Search(Profile):
    key = "search"
    name = "search"
    description = "evolutionary search (EvoPress-style) from the best of uniform, OWL and profile; KL to dense"
    Config = SearchOptions
    works_with = {"structure": ("unstructured",)}
    hint = "search moves single weights between modules: it cannot keep N:M levels (use owl or profile with N:M), " \
           "and structured widths are allocated uniform, global, owl or from --plan (make a plan.json with an " \
           "unstructured run and pass --plan)"

    def allocate(self, ctx: AllocationContext) -> AllocationPlan:
        from .methods import allocate_uniform, owl_plan

        c = self.config
        profile_windows = ctx.own_windows(c.nsamples, c.seqlen, what="profile")
        profiled = profile_plan(ctx, c, profile_windows)
        search_windows = ctx.own_windows(c.search_nsamples, c.search_seqlen, seed_offset=1, what="search")
        starts = {"uniform": allocate_uniform(ctx.numels, ctx.target, ctx.structure, exact=True),
                  "owl": owl_plan(ctx, search_windows, c.owl_m, c.owl_lambda),
                  "profile": profiled}
        config = SearchConfig(generations=c.generations, offspring=c.offspring, time_limit_s=c.time_limit,
                              cache_mb=c.cache_mb, seed=ctx.seed)
        replicas = None
        if ctx.remote is not None:
            replicas = ReplicaPool(ctx.remote, search_windows, list(ctx.numels), ctx.numels, c.cache_mb, c.actors,
                                   c.offspring, ctx.fingerprint() if ctx.fingerprint else None)
        try:
            return search_allocation(ctx.model, search_windows, ctx.pruner, ctx.structure, ctx.numels, starts, config,
                                     ctx.progress, replicas)
        finally:
            if replicas is not None:
                replicas.close()
