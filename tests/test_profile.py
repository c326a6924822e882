"""Sensitivity profiles and the knapsack allocation from them, on tiny random models."""

from __future__ import annotations

import copy
import itertools
import json
import sys
from unittest import mock

import pytest
import torch

from conftest import tiny_model
from prunewise.allocation.knapsack import Budget, allocate_from_profile, bytes_per_param, solve_levels
from prunewise.allocation.plan import AllocationPlan
from prunewise.allocation.profile import (
    Profiler,
    SensitivityProfile,
    check_levels,
    compute_profile,
    plot_profile,
    profile_units,
    weights_fingerprint,
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


def _profile(model, unit="block", levels=(0.0, 0.3, 0.5, 0.7, 0.9), score="magnitude", structure=None, **kw):
    return compute_profile(model, _windows(), get_score(score), structure or Unstructured("layer"), _numels(model),
                           unit=unit, levels=levels, progress=False, **kw)


@pytest.mark.parametrize("unit", ["block", "module"])
def test_damage_is_zero_at_level_zero_and_grows_with_level(unit):
    model = tiny_model("llama", layers=3)
    before = {n: w.clone() for n, w in prunable_weights(model).items()}
    profile = _profile(model, unit)
    assert profile.units == list(profile_units(_numels(model), "model.layers", unit))
    for u in profile.units:
        assert abs(profile.damage[u][0]) < 1e-6 and abs(profile.loss_increase[u][0]) < 1e-5, u
        assert all(d >= -1e-6 for d in profile.damage[u]), u
    means = [sum(profile.damage[u][j] for u in profile.units) / len(profile.units) for j in range(len(profile.levels))]
    assert all(a < b for a, b in zip(means, means[1:])), means
    assert profile.n_tokens == 6 * 24 and sum(profile.numels.values()) == sum(_numels(model).values())
    for n, w in prunable_weights(model).items():  # every unit's weights were put back
        assert torch.equal(w, before[n]), n


def _direct(model, members, level, score_name, windows):
    """Prune only ``members`` in a copy of the model through the engine, then run the whole model."""
    pruned = copy.deepcopy(model)
    adapter = get_adapter(pruned)
    numels = _numels(pruned)
    plan = AllocationPlan(method="test", target=0.0, modules={m: (level if m in members else 0.0) for m in numels},
                          numels=numels)
    visitor = PruneVisitor(get_score(score_name), Unstructured("row"), plan, adapter.block_prefix(pruned))
    SequentialEngine(pruned, adapter, windows, progress=False, sequential=False).run(visitor)
    with torch.no_grad():
        return pruned(input_ids=windows, use_cache=False).logits


@pytest.mark.parametrize("family,score", [("llama", "wanda"), ("llama", "sparsegpt"), ("gemma3", "wanda"),
                                          ("gemma3", "magnitude")])
@pytest.mark.parametrize("unit", ["block", "module"])
def test_block_restart_gives_the_logits_of_pruning_the_unit_in_the_whole_model(family, score, unit):
    model = tiny_model(family, layers=3)
    if family == "gemma3":
        model.config.final_logit_softcapping = 3.0  # make the final softcapping matter
    windows = _windows()
    numels = _numels(model)
    units = profile_units(numels, "model.layers", unit)
    profiler = Profiler(model, windows, get_score(score), Unstructured("row"), units, progress=False)
    with torch.no_grad():
        dense = model(input_ids=windows, use_cache=False).logits
    name = "model.layers.1" if unit == "block" else "model.layers.1.mlp.up_proj"
    assert torch.allclose(profiler.logits(name, 0.0), dense, atol=1e-5)
    direct = _direct(model, units[name], 0.6, score, windows)
    restarted = profiler.logits(name, 0.6)
    assert (direct - dense).abs().max() > 1e-2  # the pruning did change the output
    assert torch.allclose(restarted, direct, atol=1e-4), (restarted - direct).abs().max()

    # the measured damage is the KL between the full models' next-token distributions
    lp_d, lp_p = torch.log_softmax(dense.double(), -1), torch.log_softmax(direct.double(), -1)
    kl = (lp_d.exp() * (lp_d - lp_p)).sum(-1).mean()
    nll = lambda lp: -lp[:, :-1].gather(2, windows[:, 1:, None]).mean()
    damage, loss = profiler.measure(name, 0.6)
    assert damage == pytest.approx(float(kl), rel=1e-3, abs=1e-6)
    assert loss == pytest.approx(float(nll(lp_p) - nll(lp_d)), rel=1e-3, abs=1e-5)
    recompute = Profiler(model, windows, get_score(score), Unstructured("row"), units, progress=False, max_dense_mb=0)
    assert recompute.measure(name, 0.6) == pytest.approx((damage, loss), rel=1e-6, abs=1e-9)


def _brute(damage, removed, goal, repairable):
    best = None
    for combo in itertools.product(*[range(len(r)) for r in removed]):
        total = sum(removed[u][k] for u, k in enumerate(combo))
        cost = sum(damage[u][k] for u, k in enumerate(combo))
        if repairable:
            if total < goal:
                continue
            key = (cost,)
        else:
            key = (abs(total - goal), cost)
        if best is None or key < best[0]:
            best = (key, list(combo))
    return best[1]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("repairable", [True, False])
def test_dynamic_programme_equals_brute_force(seed, repairable):
    g = torch.Generator().manual_seed(seed)
    sizes = [int(x) * 12 for x in torch.randint(2, 30, (4,), generator=g)]
    levels = [0.25, 0.5, 0.75, 0.9]
    removed = [[round(lv * s) for lv in levels] for s in sizes]
    damage = [sorted(torch.rand(4, generator=g).tolist()) for _ in sizes]
    if seed % 2:  # non-monotone damage too
        damage = [torch.rand(4, generator=g).tolist() for _ in sizes]
    lo, hi = sum(r[0] for r in removed), sum(r[-1] for r in removed)
    for goal in torch.randint(lo, hi + 1, (8,), generator=g).tolist() + [lo, hi]:
        picks, info = solve_levels(damage, removed, goal, repairable=repairable)
        assert info["exact_grid"]
        expected = _brute(damage, removed, goal, repairable)
        cost = lambda p: sum(damage[u][k] for u, k in enumerate(p))
        total = lambda p: sum(removed[u][k] for u, k in enumerate(p))
        assert cost(picks) == pytest.approx(cost(expected)) and abs(total(picks) - goal) == abs(total(expected) - goal)
        if repairable:
            assert total(picks) >= goal


def _synthetic_profile(numels, levels=(0.3, 0.5, 0.7, 0.9), structure="unstructured", unit="block", seed=0):
    units = profile_units(numels, "model.layers", unit)
    g = torch.Generator().manual_seed(seed)
    damage = {u: sorted(torch.rand(len(levels), generator=g).tolist()) for u in units}
    return SensitivityProfile(unit_kind=unit, units=list(units), members=units, levels=list(levels), damage=damage,
                              loss_increase=damage, numels={u: sum(numels[m] for m in ms) for u, ms in units.items()},
                              module_numels=numels, score="magnitude", structure=structure, data_fingerprint="x",
                              n_windows=1, seqlen=2, n_tokens=2, dense_loss=1.0)


@pytest.mark.parametrize("unit", ["block", "module"])
@pytest.mark.parametrize("max_states", [200_000, 500])  # exact gcd grid, and a coarse grid with exact repair
def test_budgets_are_met_exactly(unit, max_states):
    model = tiny_model("llama", layers=4)
    numels = _numels(model)
    total = sum(numels.values())
    other = sum(p.numel() for p in model.parameters()) - total
    profile = _synthetic_profile(numels, unit=unit)
    bf16 = bytes_per_param("bfloat16")
    r1, r2, r3, r4 = (int(total * f) + 7 for f in (0.41, 0.63, 0.77, 0.52))
    budgets = {
        Budget("sparsity", 0.55): round(0.55 * total),
        Budget("remove_params", r1): r1,
        Budget("keep_params", other + total - r2, other_params=other): r2,
        Budget("keep_bytes", (other + total - r3) * bf16 + 1, bytes_per_param=bf16, other_params=other): r3,
        Budget("remove_bytes", r4 * 4 - 1): r4,
    }
    for budget, goal in budgets.items():
        plan = allocate_from_profile(profile, budget, max_states=max_states)
        counts = plan.pruned_counts()
        assert sum(counts.values()) == goal, budget
        assert plan.params["removed"] == goal and plan.method == "profile"
        assert set(plan.layer_stats["unit_level"].values()) <= set(profile.levels)
    # a plan from the profile prunes a model to exactly its counts
    plan = allocate_from_profile(profile, 0.6, max_states=max_states)
    visitor = PruneVisitor(get_score("magnitude"), Unstructured("layer"), plan, "model.layers")
    for i, block in enumerate(get_adapter(model).blocks(model)):
        for name, lin in get_adapter(model).linears(block).items():
            visitor.visit(i, name, lin, None)
    zeros = {n: int((w == 0).sum()) for n, w in prunable_weights(model).items()}
    assert zeros == plan.pruned_counts() and sum(zeros.values()) == round(0.6 * total)


def test_least_damage_levels_are_chosen_and_nm_levels_stay_multiples_of_one_over_m():
    model = tiny_model("llama", layers=4)
    numels = _numels(model)
    levels = [0.25, 0.5, 0.75]
    profile = _synthetic_profile(numels, levels=levels, structure="2:4")
    # block 0 is very sensitive, block 3 is robust: the knapsack moves sparsity from 0 to 3
    profile.damage["model.layers.0"] = [0.1, 5.0, 50.0]
    profile.damage["model.layers.3"] = [0.01, 0.02, 0.03]
    profile.damage["model.layers.1"] = profile.damage["model.layers.2"] = [0.1, 0.5, 5.0]
    plan = allocate_from_profile(profile, 0.5)
    assert plan.layer_stats["unit_level"] == {"model.layers.0": 0.25, "model.layers.1": 0.5, "model.layers.2": 0.5,
                                              "model.layers.3": 0.75}
    assert plan.achieved() == 0.5 and all(round(s * 4) == s * 4 for s in plan.modules.values())
    assert plan.layer_stats["predicted_damage"] == pytest.approx(0.1 + 0.5 + 0.5 + 0.03)


def test_unreachable_budget_names_the_ladder():
    numels = _numels(tiny_model("llama", layers=2))
    profile = _synthetic_profile(numels)
    for bad in (0.1, 0.95):
        with pytest.raises(PrunewiseError, match="add levels to the ladder") as err:
            allocate_from_profile(profile, bad)
        assert "\n" not in str(err.value)
    with pytest.raises(PrunewiseError, match="impossible"):
        allocate_from_profile(profile, Budget("remove_params", sum(numels.values()) + 1))


def test_levels_are_checked_against_the_structure():
    assert check_levels(None, NM(2, 4)) == (0.25, 0.5, 0.75)
    assert check_levels([0.5, 0.3, 0.5], Unstructured()) == (0.3, 0.5)
    with pytest.raises(PrunewiseError, match="multiple of 1/4"):
        check_levels([0.3], NM(2, 4))
    with pytest.raises(PrunewiseError, match="outside"):
        check_levels([1.0], Unstructured())


def test_a_cached_profile_is_returned_without_recomputation(monkeypatch, tmp_path):
    model = tiny_model("llama", layers=2)
    fp = weights_fingerprint(model)
    first = _profile(model, model_fingerprint=fp)
    monkeypatch.setattr(Profiler, "prepare", lambda self: (_ for _ in ()).throw(AssertionError("recomputed")))
    again = _profile(model, model_fingerprint=fp)
    assert again == first
    with pytest.raises(AssertionError, match="recomputed"):  # another ladder is another profile
        _profile(model, model_fingerprint=fp, levels=(0.5,))
    first.save(tmp_path / "p.json")
    assert SensitivityProfile.load(tmp_path / "p.json") == first
    with torch.no_grad():
        next(iter(prunable_weights(model).values()))[0, 0] += 1
    assert weights_fingerprint(model) != fp


def test_heatmap_is_skipped_without_matplotlib_and_drawn_with_it(monkeypatch):
    profile = _synthetic_profile(_numels(tiny_model("llama", layers=2)))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    assert plot_profile(profile) is None
    fake = mock.MagicMock()
    fake.pyplot.subplots.return_value = (mock.MagicMock(), mock.MagicMock())
    monkeypatch.setitem(sys.modules, "matplotlib", fake)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", fake.pyplot)
    assert plot_profile(profile) == b""  # the fake figure writes nothing into the buffer
    fig = fake.pyplot.subplots.return_value[0]
    assert fig.savefig.called and fake.pyplot.close.called


def test_prune_with_profile_allocation_writes_the_profile(tiny_folder, tmp_path):
    from prunewise.api import prune, run
    from prunewise.recipe import make_recipe

    fields = dict(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=4, seqlen=32, evaluation=[],
                  allocation="profile", sparsity=0.6, profile_levels=[0.4, 0.5, 0.6, 0.7, 0.8], profile_nsamples=2,
                  profile_seqlen=16, output=str(tmp_path / "out"))
    report = run(make_recipe(**fields), progress=False)
    out = tmp_path / "out"
    assert report["allocation"] == "profile" and report["achieved_sparsity"] == pytest.approx(0.6, abs=1e-4)
    profile = SensitivityProfile.load(out / "profile.json")
    assert profile.levels == [0.4, 0.5, 0.6, 0.7, 0.8] and profile.n_tokens == 2 * 16 and profile.unit_kind == "block"
    plan = json.loads((out / "plan.json").read_text())
    assert plan["method"] == "profile" and set(plan["layer_stats"]["unit_level"]) == set(profile.units)
    result = prune(make_recipe(**{**fields, "output": None, "profile_unit": "module"}), progress=False)
    assert result.plan.params["unit"] == "module" and "profile.json" in result.files
    assert result.report["achieved_sparsity"] == pytest.approx(result.plan.achieved(), abs=1e-12)
    nm = prune(make_recipe(**{**fields, "output": None, "structure": "2:4", "sparsity": None, "profile_levels": None}),
               progress=False)
    assert nm.plan.params["levels"] == [0.25, 0.5, 0.75] and nm.plan.achieved() == 0.5
    for name, w in prunable_weights(nm.model).items():  # mixed N:M: every group of 4 has the module's N zeros
        n = round(nm.plan.modules[name] * 4)
        assert torch.all((w == 0).reshape(w.shape[0], -1, 4).sum(-1) == n), name


def test_profile_options_on_the_command_line_and_in_recipes(tiny_folder, tmp_path, capsys):
    from prunewise.cli import main
    from prunewise.recipe import make_recipe

    with pytest.raises(PrunewiseError, match="multiple of 1/4"):
        make_recipe(structure="2:4", allocation="profile", profile_levels=[0.3, 0.5])
    assert make_recipe(allocation="profile", profile_levels=[0.7, 0.3]).allocation["levels"] == [0.3, 0.7]
    argv = ["prune", "--model", tiny_folder["model"], "--calibration", tiny_folder["calib"], "--nsamples", "2",
            "--seqlen", "16", "--eval", "--no-progress", "--allocation", "profile", "--profile-unit", "module",
            "--sparsity", "0.5", "--output", str(tmp_path / "cli")]
    assert main(argv) == 0
    plan = json.loads((tmp_path / "cli" / "plan.json").read_text())
    assert plan["params"]["unit"] == "module" and (tmp_path / "cli" / "profile.json").exists()
    assert main(argv[:-4] + ["--profile-unit", "layer"]) == 2
    assert "allocation profile: unit" in capsys.readouterr().err
