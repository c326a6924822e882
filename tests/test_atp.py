"""ATP (scores/atp.py, pipeline/tune.py, engine/gates.py): structure learned while tuning with LoRA."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_model
from prunewise.engine.gates import UnitGates
from prunewise.models.adapters import get_adapter
from prunewise.pipeline.structured import prune_structured
from prunewise.scores.atp import ratio_penalty
from test_structured import _recipe, _reload, _save_and_reload, reloader  # noqa: F401  (fixtures)


def test_a_closed_gate_is_exactly_the_unit_removed(windows):
    """Gating channel c / query head h computes what zeroing down_proj's column c / o_proj's columns of h computes."""
    model = tiny_model("llama")
    adapter = get_adapter(model)
    zeroed = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    values = []
    for other in adapter.blocks(zeroed):
        c = (torch.rand(128, generator=gen) > 0.4).float()
        h = torch.tensor([1.0, 0.0, 1.0, 1.0])
        values.append((c, h))
        roles = adapter.roles_of(other)
        with torch.no_grad():
            roles["down"].weight[:, c == 0] = 0
            roles["o"].weight[:, 16:32] = 0  # head 1 of 4 heads of 16
    gates = UnitGates(model, adapter, head_dim=16)
    gates.set(values)
    with torch.no_grad():
        got, want = model(input_ids=windows).logits, zeroed(input_ids=windows).logits
    gates.detach()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # detached: the model is its own again
        assert not torch.allclose(model(input_ids=windows).logits, want)


def test_ratio_penalty_is_zero_at_the_target_and_pulls_from_both_sides():
    kept = torch.tensor([0.5, 0.7, 0.9], requires_grad=True)
    pen = ratio_penalty(kept, 0.7)
    assert pen[1] == 0 and pen[0] > 0 and pen[2] > 0
    pen.sum().backward()
    assert kept.grad[0] < 0 < kept.grad[2]  # below the target: raise the share; above: lower it


def test_atp_tunes_meets_the_budget_merges_lora_and_reloads_with_the_same_logits(windows, tmp_path, _reload):  # noqa: F811
    from prunewise.export.register import MODELING_FILE

    model = tiny_model("llama", layers=2)
    dense = copy.deepcopy(model)
    recipe = _recipe(score={"name": "atp", "tokens": 8 * 32 * 4, "batch": 2, "lam_sparsity": 5.0},
                     structure="width", sparsity=0.3)
    plan, info, masks = prune_structured(model, get_adapter(model), recipe, windows, progress=False)
    atp = info["atp"]
    assert atp["steps"] == 16 and len([h for h in atp["history"] if "loss" in h]) == 16
    # the sparsity regulariser moved the gates from all open towards the target's share
    assert atp["gates_kept_share"] < 0.97
    assert abs(info["removed_share_of_targeted"] - 0.3) < 0.05
    # LoRA was merged into what was kept: kept channels' weights moved
    a = get_adapter(model)
    kept = masks.units[0]["channels"]
    w0 = a.roles_of(a.blocks(dense)[0])["gate"].weight[kept]
    assert not torch.equal(a.roles_of(a.blocks(model)[0])["gate"].weight, w0)
    cls, _ = _save_and_reload(model, tmp_path, {"modeling_prunewise.py": MODELING_FILE.read_text()}
                              if info["config"] == "custom" else {}, "remote", _reload)
    assert cls


def test_atp_is_refused_for_weight_level_targets_and_with_compensation():
    from prunewise.recipe import make_recipe

    with pytest.raises(Exception, match="score atp works with structure channels, heads, width, not unstructured"):
        make_recipe(score="atp", sparsity=0.3)
    with pytest.raises(Exception, match="score atp takes no compensation, not bias"):
        make_recipe(score="atp", structure="width", compensation=["bias"], sparsity=0.3)


def test_units_go_lowest_logit_first_across_blocks_within_the_budget():
    from prunewise.pipeline.tune import _scores_and_shares
    from prunewise.structures.geometry import BlockGeometry

    g = BlockGeometry.of(get_adapter(tiny_model("llama")).roles_of(get_adapter(tiny_model("llama")).blocks(
        tiny_model("llama"))[0]), 16)
    zc0, zc1 = torch.linspace(-1, 1, 128), torch.linspace(0, 2, 128)  # block 1's channels all rank above most of 0's
    zh = torch.full((4,), 5.0)
    budget = 40 * g.channel_cost
    _, shares = _scores_and_shares([(zc0, zh), (zc1, zh)], [g, g], budget, mlp=True, heads=True)
    removed = [round(s["mlp"] * 128) for s in shares]
    assert sum(removed) == 40 and removed[1] == 0 and shares[0]["attention"] == 0
