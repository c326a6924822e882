"""The one pipeline: registries and recipe validation, old recipes, GBLM, OBS after any selector, masks as data."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer
from prunewise.core.registry import REGISTRIES, listing
from prunewise.core.stats import Needs
from prunewise.engine.sequential import SequentialEngine
from prunewise.engine.services import StatsVisitor
from prunewise.errors import PrunewiseError
from prunewise.models.adapters import get_adapter, prunable_weights
from prunewise.recipe import Recipe, make_recipe
from prunewise.scores import get_score

FIXTURES = Path(__file__).parent / "fixtures"


# ---- registries and recipes ------------------------------------------------------------------------------------

def test_every_axis_has_its_parts_and_the_listing_names_them():
    expected = {"score": {"magnitude", "wanda", "sparsegpt", "gblm", "fluctuation", "taylor", "frequency", "reap", "ean",
                          "easyep", "ria", "dpruner", "atp"},
                "structure": {"unstructured", "n:m", "channels", "heads", "width", "sublayers", "blocks", "experts"},
                "allocation": {"uniform", "global", "owl", "profile", "search"},
                "compensation": {"obs", "bias", "dsnot", "eora", "alps", "admm", "refit", "merge"}, "recovery": {"lora", "distill"}}
    for axis, names in expected.items():
        assert set(REGISTRIES[axis].names()) == names, axis
    text = listing()
    for names in expected.values():
        for name in names:
            assert f"  {name} " in text


@pytest.mark.parametrize("fields, reason", [
    ({"score": "fluctuation"}, "score fluctuation works with structure channels, heads, width, not unstructured"),
    ({"score": "sparsegpt", "compensation": []}, "score sparsegpt needs compensation obs or dsnot"),
    ({"structure": "blocks", "allocation": "owl"}, "structure blocks works with allocation uniform, not owl"),
    ({"structure": "width", "compensation": ["obs"]}, "compensation obs works with structure unstructured, n:m, not width"),
    ({"structure": "2:4", "allocation": "global"}, "allocation global works with structure unstructured, channels, heads, "
                                                   "width, not 2:4"),
    ({"allocation": {"name": "owl", "lambda": 0.7}}, "allocation owl: lambda: Input should be less than 0.5"),
    ({"score": {"name": "wanda", "damp": 0.1}}, "score wanda: damp: Extra inputs are not permitted"),
    ({"compensation": ["lora"]}, "unknown compensation 'lora'; choose one of: admm, alps, bias, dsnot, eora, merge, obs, refit"),
    ({"structure": "width", "compensation": ["dsnot"]}, "compensation dsnot works with structure unstructured, n:m, not width"),
    ({"compensation": ["dsnot:7"]}, "write options as dsnot:OPTION=VALUE"),
])
def test_invalid_combinations_are_refused_with_the_registrys_reason(fields, reason):
    with pytest.raises(PrunewiseError) as err:
        make_recipe(model="x", sparsity=0.5, **fields)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_flat_recipes_of_the_previous_version_load_into_the_per_axis_entries():
    old = Recipe.from_yaml(FIXTURES / "recipe-flat-sparsegpt-owl.yaml")
    new = make_recipe(score={"name": "sparsegpt", "damp": 0.02}, allocation={"name": "owl", "m": 4.0, "lambda": 0.1},
                      compensation=[{"name": "obs", "damp": 0.02, "blocksize": 64}], sparsity=0.6, nsamples=32,
                      seqlen=256, calibration="code:0.7,wiki:0.3", evaluation=["wiki-test", "code"])
    assert old == new
    assert old.score == {"name": "sparsegpt", "damp": 0.02, "saliency": "obs"}
    assert old.allocation == {"name": "owl", "rowwise": False, "m": 4.0, "lambda": 0.1}
    flap = Recipe.from_yaml(FIXTURES / "recipe-flat-flap-width.yaml")
    assert flap.structure == {"name": "width", "heads_mode": "group", "width_multiple": 16}
    assert flap.compensation == [{"name": "bias"}] and flap.allocation["name"] == "global"
    # what this version writes reads back to the same recipe
    path = FIXTURES.parent / "fixtures" / "recipe-flat-flap-width.yaml"
    assert Recipe.model_validate(flap.model_dump()) == flap and path.exists()


# ---- GBLM --------------------------------------------------------------------------------------------------------

def _gblm_reference(model, windows, scale=100.0):
    """GBLM-Pruner's quantities as its code computes them: per-window gradients of the mean loss, scaled, squared
    and summed in float32, then the root; ``scaler_row`` as the running average of its layer wrapper."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(True)
    g2 = {}
    for s in range(windows.shape[0]):
        ref.zero_grad()
        batch = windows[s:s + 1]
        ref(input_ids=batch, labels=batch).loss.backward()
        for name, p in ref.named_parameters():
            if name.endswith("proj.weight"):
                g2[name] = g2.get(name, 0) + torch.abs((p.grad.float() * scale) ** 2)
    grads = {n: torch.sqrt(v) for n, v in g2.items()}
    scaler, count, handles = {}, {}, []
    for name, module in model.named_modules():
        if name.endswith("proj"):
            def hook(mod, args, name=name):
                inp = args[0]
                tmp = inp.shape[0]
                inp = inp.reshape(-1, inp.shape[-1]).t().float()
                n = count.get(name, 0)
                row = scaler.get(name, torch.zeros(inp.shape[0])) * (n / (n + tmp))
                count[name] = n + tmp
                scaler[name] = row + torch.norm(inp, p=2, dim=1) ** 2 / count[name]
            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for s in range(0, windows.shape[0], 2):
            model(input_ids=windows[s:s + 2])
    for h in handles:
        h.remove()
    return grads, scaler


def test_gblm_score_matches_the_reference_formula(windows):
    model = tiny_model("llama")
    grads, scaler = _gblm_reference(model, windows)
    adapter = get_adapter(model)
    engine = SequentialEngine(model, adapter, windows, 2, progress=False, sequential=False)
    visitor = StatsVisitor(Needs(sq_norm=True, gradient="per_sample_l2"))
    engine.run(visitor)
    score = get_score("gblm")
    checked = 0
    for i, per in visitor.stats.items():
        for name, stats in per.items():
            full = f"model.layers.{i}.{name}"
            w = model.get_submodule(full).weight
            want = w.abs() * torch.sqrt(scaler[full].reshape(1, -1)) + w.abs() * grads[f"{full}.weight"].abs()
            torch.testing.assert_close(score.importance(w, stats), want, rtol=2e-4, atol=1e-7)
            checked += 1
    assert checked == 14
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("fields", [
    {"sparsity": 0.5},
    {"structure": "2:4"},
    {"sparsity": 0.6, "allocation": "owl"},
    {"sparsity": 0.5, "allocation": "global"},
    {"sparsity": 0.5, "allocation": {"name": "profile", "nsamples": 2, "seqlen": 16, "levels": [0.3, 0.5, 0.7]}},
    {"sparsity": 0.5, "allocation": {"name": "search", "nsamples": 2, "seqlen": 16, "levels": [0.3, 0.5, 0.7],
                                     "generations": 2, "offspring": 4, "search_nsamples": 4, "search_seqlen": 16}},
    {"sparsity": 0.5, "compensation": ["obs"]},
    {"structure": "width", "sparsity": 0.25, "width_multiple": 8},
])
def test_gblm_works_with_every_structure_allocation_and_obs(tiny_folder, fields):
    from prunewise.api import prune

    result = prune(make_recipe(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=4, seqlen=16,
                               evaluation=[], score="gblm", **fields), progress=False)
    assert result.report["score"] == "gblm"
    assert result.report["achieved_sparsity"] == pytest.approx(result.recipe.sparsity, abs=0.05)
    assert all(torch.isfinite(p).all() for p in result.model.parameters())


# ---- OBS compensation after any selector --------------------------------------------------------------------------

def test_obs_after_a_wanda_mask_keeps_the_mask_and_lowers_the_layer_error():
    from prunewise.core.stats import LinearStats
    from prunewise.pipeline.parts import make_pruner
    from prunewise.structures import NM, Unstructured

    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)  # correlated inputs, as activations are
    x = (torch.randn(512, 64, generator=g) @ mix) * torch.linspace(0.1, 3, 64)
    w = torch.randn(32, 64, generator=g)
    stats = LinearStats(64, hessian=True)
    stats.add(x)
    for structure, s, gain in ((Unstructured("row"), 0.5, 0.85), (NM(2, 4), 0.5, 0.95)):
        plain = make_pruner("wanda").prune(w, stats, structure, s)
        obs = make_pruner("wanda", compensation=["obs"]).prune(w, stats, structure, s)
        assert torch.equal(plain.mask, obs.mask) and torch.equal(obs.weight == 0, plain.weight == 0)
        err = {k: float((x @ (w - o.weight).t()).pow(2).sum()) for k, o in (("plain", plain), ("obs", obs))}
        assert err["obs"] < gain * err["plain"], (structure, err)


def test_sparsegpt_alone_equals_sparsegpt_score_with_obs_compensation():
    from prunewise.core.stats import LinearStats
    from prunewise.pipeline.parts import make_pruner
    from prunewise.structures import Unstructured

    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 48, generator=g)
    w = torch.randn(16, 48, generator=g)
    stats = LinearStats(48, hessian=True)
    stats.add(x)
    a = make_pruner("sparsegpt").prune(w, stats, Unstructured("layer"), 0.5)
    b = make_pruner("sparsegpt", compensation=["obs"]).prune(w, stats, Unstructured("layer"), 0.5)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask)


# ---- masks as data -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {"score": "wanda", "sparsity": 0.5},
    {"score": "sparsegpt", "structure": "2:4"},
    {"score": "wanda", "compensation": ["alps"], "allocation": "owl", "sparsity": 0.6},
    {"score": "ria", "compensation": ["admm"], "structure": "2:4"},
    {"score": "wanda", "structure": "width", "sparsity": 0.3, "width_multiple": 8},
    {"score": "wanda", "structure": "blocks", "sparsity": 0.5},
])
def test_saved_masks_reapplied_to_the_dense_model_reproduce_the_pruned_model(tiny_folder, tmp_path, fields):
    from prunewise.api import MaskSet, apply_masks, run
    from prunewise.models.loading import load_model

    out = tmp_path / "out"
    run(make_recipe(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=4, seqlen=16, evaluation=[],
                    completions=False, output=str(out), **fields), progress=False)
    masks = MaskSet.load(out)
    pruned, _ = load_model(str(out))
    dense, _ = load_model(tiny_folder["model"])
    apply_masks(dense, masks)
    got, want = prunable_weights(dense), prunable_weights(pruned)
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name] == 0, want[name] == 0), name
    if fields.get("structure") in ("width", "blocks"):  # no compensation: the sliced weights are the pruned ones
        for name in want:
            assert torch.equal(got[name], want[name]), name
        assert dense.config.to_dict().get("prunewise_layers") == pruned.config.to_dict().get("prunewise_layers")
    else:
        assert masks.removed() == sum(int((w == 0).sum()) for w in want.values())


@pytest.mark.parametrize("spill", [False, True])
def test_packed_and_spilled_masks_read_back_as_the_boolean_masks(tmp_path, spill):
    from prunewise.api import MaskSet

    g = torch.Generator().manual_seed(0)
    want = {"a": torch.rand(7, 13, generator=g) < 0.5, "b": torch.rand(3, 5, generator=g) < 0.3,
            "c": torch.rand(9, 8, generator=g) < 0.7}
    masks = MaskSet(spill=tmp_path / "spill" if spill else None)
    masks.weights.update({k: want[k] for k in ("a", "b")})
    masks.pack()  # a block's masks packed (or spilled), the next one still in memory
    masks.weights["c"] = want["c"]
    assert masks.has_weight_masks and sorted(masks.weight_names()) == ["a", "b", "c"]
    assert not MaskSet().has_weight_masks
    got = dict(masks.weight_masks())
    assert got.keys() == want.keys()
    for name, mask in want.items():
        assert got[name].dtype == torch.bool and torch.equal(got[name], mask), name
    masks.write(tmp_path / "m.safetensors")
    loaded = MaskSet.load(tmp_path / "m.safetensors")
    assert all(torch.equal(loaded.weights[n], want[n]) for n in want)
    if not spill:
        assert masks.removed() == sum(int(m.sum()) for m in want.values())


def test_apply_masks_cli_refuses_another_model(tiny_folder, tmp_path, capsys):
    from prunewise.api import run
    from prunewise.cli import main

    out = tmp_path / "out"
    run(make_recipe(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=2, seqlen=16, evaluation=[],
                    completions=False, output=str(out)), progress=False)
    assert main(["apply-masks", "--model", tiny_folder["model"], "--masks", str(out), "--output",
                 str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "masks.safetensors").exists()
    other = tmp_path / "other"
    tiny_model("llama", hidden=32, intermediate=64).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    assert main(["apply-masks", "--model", str(other), "--masks", str(out), "--output", str(tmp_path / "x")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("prunewise: error:")]
    assert len(errors) == 1 and errors[0].endswith("apply the mask set to the model it was made for")
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_perplexity_intervals_come_from_the_spread_between_windows(windows):
    import math

    from prunewise.evaluate.perplexity import interval95, perplexity, ratio_interval95
    from prunewise.pipeline.run import add_intervals
    from prunewise.recipe import make_recipe
    from prunewise.report.markdown import format_prune_report

    model = tiny_model()
    nll: list[float] = []
    ppl = perplexity(model, windows, progress=False, per_window=nll)
    assert len(nll) == windows.shape[0] and math.isclose(ppl, math.exp(sum(nll) / len(nll)), rel_tol=1e-9)
    lo, hi = interval95(nll)
    assert lo < ppl < hi
    assert interval95([2.0, 2.0, 2.0]) == (math.exp(2.0), math.exp(2.0)) and interval95([1.0]) is None
    # the ratio pairs the same windows: a constant shift per window has no spread
    assert ratio_interval95([x + 0.5 for x in nll], nll) == pytest.approx((math.exp(0.5), math.exp(0.5)))
    rows = {"wiki-test": {"dense": ppl, "pruned": ppl * 1.5}}
    add_intervals(rows, {"wiki-test": nll}, {"wiki-test": [x + math.log(1.5) for x in nll]})
    assert rows["wiki-test"]["windows"] == len(nll) and rows["wiki-test"]["ratio_ci95"] == pytest.approx((1.5, 1.5))
    report = {"score": "wanda", "allocation": "uniform", "structure": "unstructured", "target_sparsity": 0.5,
              "achieved_sparsity": 0.5, "perplexity": rows, "timings": {}, "peak_rss_mb": 1.0}
    text = format_prune_report(report, make_recipe())
    assert "[1.50, 1.50]" in text and f"the {len(nll)} evaluation windows" in text
