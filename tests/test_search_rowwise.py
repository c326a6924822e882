"""Searched allocation (EvoPress-style) and row-wise allocation (TRIM), on tiny random models."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import tiny_model
from prunewise.allocation.methods import allocate_uniform
from prunewise.allocation.plan import AllocationPlan, exact_counts, plot_plan
from prunewise.allocation.profile import Profiler
from prunewise.allocation.rowwise import RowPruner, exact_row_counts, trim_row_sparsities
from prunewise.allocation.search import (
    ConfigEvaluator,
    SearchConfig,
    VariantCache,
    _mutate,
    search_allocation,
    search_step,
)
from prunewise.engine.sequential import SequentialEngine
from prunewise.errors import PrunewiseError
from prunewise.models.adapters import get_adapter, prunable_weights
from prunewise.pipeline.parts import make_pruner as get_score
from prunewise.pipeline.visitor import PruneVisitor
from prunewise.structures.masks import NM, Unstructured


def _windows(n=6, length=24, seed=1):
    return torch.randint(0, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _numels(model):
    return {n: w.numel() for n, w in prunable_weights(model).items()}


def _skewed_start(numels, target, seed=0):
    rng = random.Random(seed)
    return AllocationPlan(method="skewed", target=target, numels=numels,
                          modules=exact_counts({m: target + rng.uniform(-0.15, 0.15) for m in numels}, numels, target))


# ---------------------------------------------------------------- search


def test_mutation_keeps_the_number_of_steps_and_the_bounds():
    rng = random.Random(0)
    lo, hi = [-2, -1, 0, -3, -5], [2, 3, 1, 0, 5]
    parent = (0, 0, 0, 0, 0)
    for _ in range(500):
        child = _mutate(parent, lo, hi, rng)
        assert sum(child) == sum(parent)
        assert all(a <= c <= b for a, c, b in zip(lo, child, hi))
        parent = child


def test_step_follows_evopress_weights_diff():
    numels = {"a": 100, "b": 300, "c": 900}
    assert search_step(numels, 0.7, 8) == int(0.5 * 0.3 / 8 * 300)
    assert search_step({"a": 10}, 0.5, 8) == 1


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_restart_from_the_first_changed_block_equals_a_full_forward(family):
    model = tiny_model(family, layers=3)
    numels = _numels(model)
    modules = list(numels)
    windows = _windows()
    profiler = Profiler(model, windows, get_score("wanda"), Unstructured("row"), {m: [m] for m in modules},
                        progress=False, max_dense_mb=float("inf"))
    profiler.prepare()
    dense = {m: profiler.linears[m].weight.data.clone() for m in modules}
    cache = VariantCache(get_score("wanda"), Unstructured("row"), dense, profiler.stats, numels, 64)
    evaluator = ConfigEvaluator(profiler, modules, cache)
    parent = tuple(int(0.5 * numels[m]) for m in modules)
    child = list(parent)
    last = [j for j, m in enumerate(modules) if ".2." in m]
    child[last[0]] += 40
    child[last[-1]] -= 40
    child = tuple(child)
    idx = [0, 3]
    assert evaluator.first_difference(parent, child) == 2
    parent_fit, (child_fit,) = evaluator.score(parent, [child], idx)
    alone_fit, _ = evaluator.score(child, [], idx)  # the child evaluated from block 0
    assert child_fit == pytest.approx(alone_fit, rel=1e-5)
    assert parent_fit != pytest.approx(child_fit, rel=1e-6)
    dense_cfg = tuple(0 for _ in modules)
    assert evaluator.score(dense_cfg, [], idx)[0] == pytest.approx(0.0, abs=1e-6)


def test_variant_cache_prunes_once_and_stays_within_its_bound():
    w = {"a": torch.randn(16, 16), "b": torch.randn(16, 16)}
    cache = VariantCache(get_score("magnitude"), Unstructured("layer"), w, {}, {"a": 256, "b": 256}, limit_mb=2.5 * 1024 / 2 ** 20)
    x = cache.get("a", 100)
    assert int((x == 0).sum()) == 100 and cache.get("a", 100) is x and cache.pruned == 1 and cache.hits == 1
    cache.get("a", 50)
    cache.get("b", 10)
    assert cache.bytes <= 2.5 * 1024 and ("a", 100) not in cache.items  # least recently used went first


def test_search_meets_the_budget_exactly_improves_fitness_and_leaves_the_model_unchanged():
    model = tiny_model("llama", layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    numels = _numels(model)
    target = 0.6
    starts = {"uniform": allocate_uniform(numels, target, Unstructured("row"), exact=True), "skewed": _skewed_start(numels, target)}
    config = SearchConfig(generations=12, offspring=6, stage_windows=(2, 6), stage_survivors=(2, 1), track_windows=6,
                          track_every=4, seed=0)
    plan = search_allocation(model, _windows(), get_score("wanda"), Unstructured("row"), numels, starts, config,
                             progress=False)
    goal = round(target * sum(numels.values()))
    assert sum(plan.pruned_counts().values()) == goal and plan.method == "search"
    for m, s in plan.modules.items():
        assert s * numels[m] == pytest.approx(round(s * numels[m]), abs=1e-6) and 0 <= s <= 0.95
    history = plan.layer_stats["history"]
    assert [h["generation"] for h in history] == list(range(13))
    # the last stage sees every window, so the elitist parent's fitness can only go down
    fits = [h["fitness"] for h in history]
    assert all(b <= a + 1e-12 for a, b in zip(fits, fits[1:]))
    assert fits[-1] < fits[0] and plan.layer_stats["final_tracking_fitness"] == pytest.approx(fits[-1], rel=1e-6)
    assert plan.layer_stats["start"] in starts
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_search_refuses_nm_mismatched_starts_and_too_few_windows():
    model = tiny_model("llama", layers=2)
    numels = _numels(model)
    uni = allocate_uniform(numels, 0.5, Unstructured("row"), exact=True)
    with pytest.raises(PrunewiseError, match="N:M"):
        search_allocation(model, _windows(), get_score("wanda"), NM(2, 4), numels, {"u": uni}, progress=False)
    other = allocate_uniform(numels, 0.6, Unstructured("row"), exact=True)
    with pytest.raises(PrunewiseError, match="different numbers of weights"):
        search_allocation(model, _windows(), get_score("wanda"), Unstructured("row"), numels, {"a": uni, "b": other},
                          progress=False)
    with pytest.raises(PrunewiseError, match="at least 4 calibration windows"):
        search_allocation(model, _windows(n=3), get_score("wanda"), Unstructured("row"), numels, {"u": uni},
                          progress=False)
    with pytest.raises(PrunewiseError, match="last search stage"):
        SearchConfig(stage_survivors=(3, 2)).check()


def test_search_through_the_api_and_plan_reuse(tiny_folder, tmp_path):
    from prunewise.api import prune, run
    from prunewise.recipe import make_recipe

    fields = dict(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=4, seqlen=32, evaluation=[],
                  allocation="search", sparsity=0.6, profile_nsamples=2, profile_seqlen=16, search_nsamples=6,
                  search_seqlen=16, search_generations=3, search_offspring=4, score="sparsegpt",
                  output=str(tmp_path / "out"))
    report = run(make_recipe(**fields), progress=False)
    out = tmp_path / "out"
    plan = AllocationPlan.load(out / "plan.json")
    assert plan.method == "search" and set(plan.layer_stats["start_fitness"]) == {"uniform", "owl", "profile"}
    assert report["achieved_sparsity"] == pytest.approx(plan.achieved(), abs=1e-12)
    assert (out / "plan.png").read_bytes()[:4] == b"\x89PNG" and (out / "profile.json").exists()
    assert "Search: started from" in (out / "report.md").read_text()
    # the searched plan reused with another score prunes each module to the planned count
    reused = prune(make_recipe(**{**fields, "output": None, "score": "magnitude", "plan": str(out / "plan.json")}),
                   progress=False)
    for name, w in prunable_weights(reused.model).items():
        assert int((w == 0).sum()) == plan.pruned_counts()[name], name
    with pytest.raises(PrunewiseError, match="N:M"):
        make_recipe(**{**fields, "structure": "2:4", "sparsity": None})
    # row-wise on top of the saved plan, from the command line
    from prunewise.cli import main
    argv = ["prune", "--model", tiny_folder["model"], "--calibration", tiny_folder["calib"], "--nsamples", "4",
            "--seqlen", "32", "--eval", "--no-progress", "--plan", str(out / "plan.json"), "--rowwise",
            "--output", str(tmp_path / "rows")]
    assert main(argv) == 0
    rows = AllocationPlan.load(tmp_path / "rows" / "plan.json")
    assert rows.method == "search+rowwise" and set(rows.rows) == set(plan.modules)
    assert rows.pruned_counts() == plan.pruned_counts() and "Row-wise (TRIM)" in (tmp_path / "rows" / "report.md").read_text()


# ---------------------------------------------------------------- row-wise (TRIM)


@pytest.mark.parametrize("seed", range(5))
def test_exact_row_counts_sum_to_the_total(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.rand(37, generator=g) * 0.9
    total = int(torch.randint(0, 37 * 50, (1,), generator=g))
    counts = exact_row_counts(s, 50, total)
    assert int(counts.sum()) == total and counts.min() >= 0 and counts.max() <= 50


def test_trim_moves_sparsity_to_rows_that_keep_their_output_and_beats_uniform():
    g = torch.Generator().manual_seed(0)
    rows, cols = 64, 96
    W = torch.randn(rows, cols, generator=g)
    W[:32, :4] *= 10  # rows with a few dominant weights: they keep their output even when heavily pruned
    W = W / W.norm(dim=1, keepdim=True)  # every row's output of similar size
    X = torch.randn(200, cols, generator=g)
    importance = W.abs() * X.norm(dim=0)
    target = 0.7
    sparsities, info = trim_row_sparsities(W, importance, X, target)
    assert int(torch.round(sparsities * cols).sum()) == round(target * rows * cols)
    assert info["cosine"] > info["baseline_cosine"] and info["rate"] is not None
    assert sparsities[:32].mean() > sparsities[32:].mean()
    pruner = RowPruner(W, importance, X)
    uniform = pruner.layer_quality(pruner.outputs(torch.full((rows,), target, dtype=torch.float64)))
    assert pruner.layer_quality(pruner.outputs(sparsities)) == pytest.approx(info["cosine"]) and info["cosine"] > uniform


@pytest.mark.parametrize("score", ["wanda", "sparsegpt", "magnitude"])
def test_rowwise_prune_writes_exact_row_vectors_that_reproduce_the_model(score):
    model = tiny_model("llama", layers=2)
    adapter = get_adapter(model)
    numels = _numels(model)
    plan = _skewed_start(numels, 0.6)
    s = get_score(score)
    structure = Unstructured(s.default_group)
    visitor = PruneVisitor(s, structure, plan, adapter.block_prefix(model), rowwise=True)
    SequentialEngine(model, adapter, _windows(), progress=False, sequential=score == "sparsegpt").run(visitor)
    counts = plan.pruned_counts()
    assert set(plan.rows) == set(numels)
    plan.check_rows()
    for name, w in prunable_weights(model).items():
        rows = torch.tensor(plan.rows[name], dtype=torch.float64)
        assert int((w == 0).sum()) == counts[name], name
        assert torch.equal((w == 0).sum(1), torch.round(rows * w.shape[1]).long()), name
        assert rows.mean().item() == pytest.approx(plan.modules[name], abs=1e-9)
        assert "rowwise" in visitor.records[name]
    # reusing the plan with its row vectors gives the same model
    again = tiny_model("llama", layers=2)
    reuse = AllocationPlan.model_validate_json(plan.model_dump_json())
    visitor2 = PruneVisitor(s, structure, reuse, adapter.block_prefix(again))
    SequentialEngine(again, adapter, _windows(), progress=False, sequential=score == "sparsegpt").run(visitor2)
    for (n, a), b in zip(prunable_weights(model).items(), prunable_weights(again).values()):
        assert torch.equal(a == 0, b == 0), n


def test_row_vectors_that_miss_the_module_count_are_refused(tmp_path):
    plan = AllocationPlan(method="x", target=0.5, modules={"m": 0.5}, numels={"m": 40}, rows={"m": [0.5, 0.5, 0.5, 0.75]})
    path = tmp_path / "plan.json"
    path.write_text(plan.model_dump_json())
    with pytest.raises(PrunewiseError, match="remove 23 weights, not the module's 20"):
        AllocationPlan.load(path)
    with pytest.raises(PrunewiseError, match="N:M"):
        PruneVisitor(get_score("wanda"), NM(2, 4), plan, "model.layers", rowwise=True)


def test_plan_plot_is_a_png_with_search_history():
    numels = {f"model.layers.{i}.{k}": 64 for i in range(3) for k in ("self_attn.q_proj", "mlp.down_proj")}
    plan = AllocationPlan(method="search", target=0.5, modules={m: 0.5 for m in numels}, numels=numels,
                          rows={"model.layers.0.mlp.down_proj": [0.25, 0.75]},
                          layer_stats={"history": [{"seconds": 1.0, "fitness": 0.3, "tracking_fitness": 0.3},
                                                   {"seconds": 2.0, "fitness": 0.2}]})
    png = plot_plan(plan)
    assert png[:4] == b"\x89PNG" and len(png) > 5000


def test_parameter_and_byte_budgets_set_the_exact_number_of_removed_weights(tiny_folder):
    from prunewise.api import prune
    from prunewise.recipe import make_recipe

    fields = dict(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=2, seqlen=16, evaluation=[])
    dense = prune(make_recipe(**fields, sparsity=0.0), progress=False).model
    total = sum(p.numel() for p in dense.parameters())
    result = prune(make_recipe(**fields, budget=f"keep_params={total - 5000}"), progress=False)
    zeros = sum(int((w == 0).sum()) for w in prunable_weights(result.model).values())
    assert zeros == 5000 and result.report["target_sparsity"] == pytest.approx(5000 / sum(result.plan.numels.values()))
    result = prune(make_recipe(**fields, budget="remove_bytes=8000", budget_dtype="bfloat16"), progress=False)
    assert sum(int((w == 0).sum()) for w in prunable_weights(result.model).values()) == 4000
    for bad, match in (("keep=5", "KIND=VALUE"), ("keep_params=lots", "not a number")):
        with pytest.raises(PrunewiseError, match=match):
            make_recipe(**fields, budget=bad)
    with pytest.raises(PrunewiseError, match="impossible"):
        prune(make_recipe(**fields, budget=f"keep_params={total * 2}"), progress=False)
