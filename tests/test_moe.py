"""Mixtures of experts: the stock transformers families with fused experts, whole routed experts removed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    MixtralConfig,
    OlmoeConfig,
    Qwen2MoeConfig,
    Qwen3MoeConfig,
)

from conftest import tiny_tokenizer, write_paragraphs
from prunewise.core.stats import ExpertStats
from prunewise.errors import PrunewiseError
from prunewise.models.adapters import get_adapter
from prunewise.recipe import make_recipe

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, num_experts_per_tok=2, tie_word_embeddings=False,
              bos_token_id=2, eos_token_id=3, pad_token_id=1)
FAMILIES = {
    "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=8),
    "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=48),
    "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, num_experts=8, moe_intermediate_size=32, head_dim=16),
    "olmoe": lambda: OlmoeConfig(**COMMON, num_experts=8),
    # grouped routing (2 groups of 4, a token's experts from its best group), latent attention, a dense first layer
    "deepseek_v3": lambda: DeepseekV3Config(**COMMON, n_routed_experts=8, n_group=2, topk_group=1,
                                            moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
                                            q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                            v_head_dim=16),
}
COUNT_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_local_experts",
             "olmoe": "num_experts", "deepseek_v3": "n_routed_experts"}
MOE_LAYERS = {family: 1 if family == "deepseek_v3" else 2 for family in FAMILIES}  # of the 2 blocks


def tiny_moe(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]())
    with torch.no_grad():  # heavier weights than the init, so experts differ and routing is not uniform
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn_like(p) * 0.2)
    return model.eval()


@pytest.fixture
def moe_folder(tmp_path, request):
    family = request.param
    folder = tmp_path / family
    tiny_moe(family).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return {"family": family, "model": str(folder), "calib": write_paragraphs(tmp_path / "calib.txt", 1)}


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


RELOAD = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "prunewise" not in sys.modules
ids = torch.tensor(json.loads(sys.argv[1]))
for folder, out in json.loads(sys.argv[2]):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.save(model(input_ids=ids).logits, out)
    print(json.dumps(model.config.to_dict()))
"""
RELOADED = [("mixtral", "reap"), ("qwen2_moe", "ean"), ("qwen3_moe", "frequency"), ("olmoe", "reap"),
            ("deepseek_v3", "reap")]


@pytest.fixture(scope="module")
def half_the_experts(tmp_path_factory):
    """Each family pruned to half its experts (saved as `prunewise prune --output` does, and in memory), and every
    saved folder reloaded by stock transformers in one fresh process (one import of torch for the four)."""
    from prunewise.api import prune, run

    ids = torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    cases, jobs = {}, []
    for family, score in RELOADED:
        tmp = tmp_path_factory.mktemp(family)
        folder, out = tmp / family, tmp / "out"
        tiny_moe(family).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        recipe = make_recipe(model=str(folder), calibration=write_paragraphs(tmp / "calib.txt", 1), nsamples=4,
                             seqlen=32, evaluation=[], structure="experts", score=score, sparsity=0.5, output=str(out))
        run(recipe, progress=False)  # what `prunewise prune --output` writes
        result = prune(recipe, progress=False)  # the same prune, in memory
        cases[family] = {"result": result, "want": _logits(result.model, ids), "got": tmp / "l.pt"}
        jobs.append([str(out), str(tmp / "l.pt")])
    done = subprocess.run([sys.executable, "-c", RELOAD, json.dumps(ids.tolist()), json.dumps(jobs)],
                          capture_output=True, text=True, check=True)
    for (family, _), line in zip(RELOADED, done.stdout.strip().splitlines()[-len(RELOADED):]):
        cases[family]["config"] = json.loads(line)
    return cases


@pytest.mark.xdist_group("moe-reload")  # one worker builds the module fixture once for the four
@pytest.mark.parametrize("family, score", RELOADED)
def test_half_the_experts_removed_reload_with_stock_transformers_and_give_the_same_logits(half_the_experts, family,
                                                                                        score):
    case = half_the_experts[family]
    result = case["result"]
    adapter = get_adapter(result.model)
    assert adapter.expert_count(result.model) == 4
    for block in adapter.blocks(result.model)[-MOE_LAYERS[family]:]:
        experts = adapter.experts_of(block)
        assert experts.gate_up_proj.shape[0] == experts.down_proj.shape[0] == 4
        assert adapter.router_of(block).weight.shape[0] == 4
    assert case["config"][COUNT_KEY[family]] == 4
    assert (torch.load(case["got"]) - case["want"]).abs().max().item() < 1e-5
    experts = result.report["structured"]["experts"]
    assert experts["score"] == score and len(experts["layers"]) == MOE_LAYERS[family]
    assert all(len(layer["removed"]) == 4 for layer in experts["layers"])
    if family == "deepseek_v3":  # grouped routing: two from each group of four
        assert all(sum(j < 4 for j in layer["removed"]) == 2 for layer in experts["layers"])
    assert result.report["achieved_sparsity"] == pytest.approx(0.5)


def planted_unreachable():
    """A tiny Qwen3-MoE whose router rows keep experts 1, 4 and 6 from ever winning a top-2 slot (their logits are 0,
    and of the pairs +u/-u (experts 0, 2) and +v/-v (experts 3, 5) one logit is always positive)."""
    model = tiny_moe("qwen3_moe")
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for block in adapter.blocks(model):
            router = adapter.router_of(block).weight
            u, v = torch.randn(2, router.shape[1], generator=g)
            router[0], router[2], router[3], router[5] = u, -u, v, -v
            router[[1, 4, 6]] = 0.0
    return model


@pytest.mark.parametrize("score", ["frequency", "reap", "ean", "easyep"])
def test_experts_the_calibration_never_reaches_go_first_under_every_score(tmp_path, score):
    """Router rows set so that experts 1, 4 and 6 never win a top-2 slot (their logits are 0, and of the pairs
    +u/-u (experts 0, 2) and +v/-v (experts 3, 5) one logit is always positive): exactly those go at 3 of 8."""
    from prunewise.api import prune

    model = planted_unreachable()
    folder = tmp_path / "planted"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    result = prune(make_recipe(model=str(folder), calibration=write_paragraphs(tmp_path / "calib.txt", 1), nsamples=4,
                               seqlen=32, evaluation=[], structure="experts", score=score, sparsity=3 / 8),
                   progress=False)
    layers = result.report["structured"]["experts"]["layers"]
    assert len(layers) == 2
    for layer in layers:
        assert [layer["usage"][j] for j in (1, 4, 6)] == [0, 0, 0]
        assert all(layer["usage"][j] > 0 for j in (0, 2, 3, 5))
        assert layer["removed"] == [1, 4, 6]


def test_expert_stats_follow_the_routing():
    stats = ExpertStats(4)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    index = torch.tensor([[0, 2], [2, 1], [0, 1]])
    weights = torch.tensor([[0.75, 0.25], [0.5, 0.5], [0.9, 0.1]])
    stats.add(x, index, weights, lambda j, rows: rows * (j + 1))  # expert j multiplies by j + 1
    assert stats.counts.tolist() == [2, 2, 2, 0] and stats.tokens == 3
    assert stats.gate.tolist() == pytest.approx([1.65, 0.6, 0.75, 0])
    assert stats.norm.tolist() == pytest.approx([1 + 3, 2 * 2 + 2 * 3, 3 * 1 + 3 * 2, 0])
    assert stats.gated_norm.tolist() == pytest.approx([0.75 + 0.9 * 3, 0.5 * 4 + 0.1 * 6, 0.25 * 3 + 0.5 * 6, 0])
    from prunewise.scores import get_score

    assert get_score("reap").expert_scores(stats).tolist() == pytest.approx([3.45 / 2, 2.6 / 2, 3.75 / 2, 0])
    assert get_score("frequency").expert_scores(stats).tolist() == [2, 2, 2, 0]
    assert get_score("ean").expert_scores(stats).tolist() == pytest.approx([4, 10, 9, 0])


def test_easyep_weighs_each_routed_token_by_how_much_the_moe_sublayer_turns_its_hidden_state():
    """The engine's EASY-EP sums against a hand computation from the stock forward of a tiny Qwen3-MoE: per token,
    s = max(1 - cos(h, h + MoE(norm(h))), 0) with h the residual stream entering the MoE sublayer, and per routed
    (token, expert) the gate value times the expert's output norm times s."""
    from prunewise.engine.sequential import SequentialEngine
    from prunewise.pipeline.structured import ExpertVisitor

    model = tiny_moe("qwen3_moe")
    adapter = get_adapter(model)
    ids = torch.randint(4, 256, (3, 20), generator=torch.Generator().manual_seed(4))
    block = adapter.blocks(model)[1]
    seen = {}
    hooks = [block.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.update(h=a[0])),
             block.mlp.register_forward_hook(lambda m, a, o: seen.update(o=o)),
             block.mlp.experts.register_forward_pre_hook(lambda m, a: seen.update(x=a[0], idx=a[1], w=a[2]))]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    h, o = seen["h"].reshape(-1, 64), seen["o"].reshape(-1, 64)
    turn = (1 - torch.nn.functional.cosine_similarity(h, h + o, dim=-1)).clamp_min(0).double()
    want = torch.zeros(8, dtype=torch.float64)
    for t in range(seen["x"].shape[0]):
        for k in range(seen["idx"].shape[1]):
            j = int(seen["idx"][t, k])
            f = adapter.expert_output(block.mlp.experts, j, seen["x"][t:t + 1]).double().norm()
            want[j] += float(seen["w"][t, k]) * f * turn[t]
    visitor = ExpertVisitor()
    SequentialEngine(model, adapter, ids, 1, False, sequential=False).run(visitor)
    assert visitor.stats[1].changed_norm.tolist() == pytest.approx(want.tolist(), rel=1e-5)
    assert bool((want > 0).sum() >= 4)


def test_merge_assigns_each_reached_removed_expert_to_the_kept_one_with_the_most_alike_mean_output():
    from prunewise.compensation.merge import MergeCompensation

    stats = ExpertStats(5)
    stats.counts = torch.tensor([4.0, 2.0, 0.0, 3.0, 1.0], dtype=torch.float64)
    mean = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.1, 1.0], [1.0, -0.2]], dtype=torch.float64)
    stats.output_sum = mean * stats.counts.unsqueeze(1)
    groups = MergeCompensation.assign(stats, keep=torch.tensor([0, 1]), removed=torch.tensor([2, 3, 4]))
    assert groups == {0: [4], 1: [3]}  # expert 2 no token reached: dropped, not merged


def test_merge_makes_each_kept_expert_the_token_weighted_average_of_its_group(tmp_path):
    from prunewise.api import prune

    model = tiny_moe("qwen3_moe")
    adapter = get_adapter(model)
    dense = [{n: getattr(adapter.experts_of(b), n).clone() for n in ("gate_up_proj", "down_proj")}
             for b in adapter.blocks(model)]
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    result = prune(make_recipe(model=str(tmp_path / "m"), calibration=write_paragraphs(tmp_path / "c.txt", 1),
                               nsamples=4, seqlen=32, evaluation=[], structure="experts", score="frequency",
                               sparsity=0.5, compensation=["merge"]), progress=False)
    merges = 0
    for i, layer in enumerate(result.report["structured"]["experts"]["layers"]):
        merged = {int(r): k for r, k in layer["merged"].items()}
        assert set(merged) == {r for r in layer["removed"] if layer["usage"][r] > 0}
        counts = torch.tensor(layer["usage"], dtype=torch.float64)  # shares of the routing slots: tokens / const
        keep = [j for j in range(8) if j not in layer["removed"]]
        experts = adapter.experts_of(adapter.blocks(result.model)[i])
        for slot, k in enumerate(keep):
            members = [k] + [r for r, into in merged.items() if into == k]
            merges += len(members) - 1
            w = counts[members] / counts[members].sum()
            for name in ("gate_up_proj", "down_proj"):
                want = sum(wi * dense[i][name][m].double() for wi, m in zip(w.tolist(), members))
                assert torch.allclose(getattr(experts, name)[slot].double(), want, atol=1e-6), (i, k, name)
    assert merges >= 4


def test_experts_on_a_dense_model_is_refused_in_one_line(tiny_folder):
    from prunewise.api import prune

    with pytest.raises(PrunewiseError, match="no mixture-of-experts layer"):
        prune(make_recipe(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=2, seqlen=16,
                          evaluation=[], structure="experts", score="reap", sparsity=0.5), progress=False)


@pytest.mark.parametrize("moe_folder", ["olmoe"], indirect=True)
def test_keeping_fewer_experts_than_the_router_picks_is_refused(moe_folder):
    from prunewise.api import prune

    with pytest.raises(PrunewiseError, match=r"fewer than the 2 the router picks.*--sparsity 0\.75 or less"):
        prune(make_recipe(model=moe_folder["model"], calibration=moe_folder["calib"], nsamples=2, seqlen=16,
                          evaluation=[], structure="experts", score="reap", sparsity=0.9), progress=False)


@pytest.mark.parametrize("moe_folder", ["deepseek_v3"], indirect=True)
def test_removing_experts_that_would_break_a_grouped_router_is_refused_in_one_line(moe_folder):
    from prunewise.api import prune

    fields = dict(model=moe_folder["model"], calibration=moe_folder["calib"], nsamples=2, seqlen=16, evaluation=[],
                  structure="experts", score="frequency")
    with pytest.raises(PrunewiseError, match=r"2 groups of 4 .* same count removed from every group.*--sparsity 0\.25 "
                                             r"or 0\.5$"):
        prune(make_recipe(**fields, sparsity=3 / 8), progress=False)
    with pytest.raises(PrunewiseError, match="same count removed from every group"):
        prune(make_recipe(**fields, sparsity=0.75), progress=False)  # one per group left: a group needs two


def test_a_grouped_router_loses_the_same_count_from_each_group_even_where_one_group_is_never_chosen(tmp_path):
    """Router biases that keep group 1 (experts 4-7) from ever being a token's best group: every expert score puts
    all four last, yet half the experts removed must be two of each group (removing group 1 would break the router)."""
    from prunewise.api import prune

    model = tiny_moe("deepseek_v3")
    adapter = get_adapter(model)
    with torch.no_grad():
        for block in adapter.blocks(model)[1:]:
            adapter.router_of(block).e_score_correction_bias[4:] = -10.0
    model.save_pretrained(tmp_path / "grouped")
    tiny_tokenizer().save_pretrained(tmp_path / "grouped")
    result = prune(make_recipe(model=str(tmp_path / "grouped"), calibration=write_paragraphs(tmp_path / "c.txt", 1),
                               nsamples=4, seqlen=32, evaluation=[], structure="experts", score="frequency",
                               sparsity=0.5), progress=False)
    (layer,) = result.report["structured"]["experts"]["layers"]
    assert layer["usage"][4:] == [0, 0, 0, 0] and all(u > 0 for u in layer["usage"][:4])
    assert len(layer["removed"]) == 4 and [j >= 4 for j in layer["removed"]] == [False, False, True, True]


@pytest.mark.parametrize("moe_folder", ["deepseek_v3"], indirect=True)
@pytest.mark.parametrize("offload", ["none", "disk"])
def test_moe_refusals_come_before_any_work_in_memory_and_streamed(moe_folder, tmp_path, monkeypatch, offload):
    from prunewise.api import run
    from prunewise.pipeline import run as run_module
    from prunewise.pipeline import streamed

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the refusal")

    monkeypatch.setattr(run_module, "evaluate_dense", no_work)
    monkeypatch.setattr(streamed, "streamed_perplexity", no_work)
    fields = dict(model=moe_folder["model"], calibration=moe_folder["calib"], nsamples=2, seqlen=16,
                  evaluation=[write_paragraphs(tmp_path / "eval.txt", 9)], completions=False, offload=offload,
                  output=str(tmp_path / "out"))
    with pytest.raises(PrunewiseError, match="same count removed from every group"):
        run(make_recipe(**fields, structure="experts", score="reap", sparsity=3 / 8), progress=False)
    with pytest.raises(PrunewiseError, match="shared expert"):
        run(make_recipe(**fields, structure="experts", score="reap", sparsity=0.5, targets="shared_experts"),
            progress=False)
    with pytest.raises(PrunewiseError, match="--budget is not supported with --structure experts"):
        run(make_recipe(**fields, structure="experts", score="reap", budget="remove_params=1000"), progress=False)
    if offload == "disk":
        with pytest.raises(PrunewiseError, match="does not stream from disk yet"):
            run(make_recipe(**fields, score="wanda", sparsity=0.5), progress=False)
    assert not (tmp_path / "out").exists()


def test_an_expert_score_without_the_experts_structure_is_refused():
    with pytest.raises(PrunewiseError, match="reap ranks routed experts"):
        make_recipe(model="x", score="reap", sparsity=0.5).parts()
    with pytest.raises(PrunewiseError, match="structure experts works with score"):
        make_recipe(model="x", score="wanda", structure="experts", sparsity=0.5).parts()


@pytest.mark.parametrize("moe_folder", ["qwen2_moe"], indirect=True)
def test_the_saved_expert_masks_reapply_to_the_dense_model_and_check_the_pruned_folder(moe_folder, tmp_path):
    """The kept experts are data like any mask set: applied to the dense model they give the pruned model (the
    shared expert untouched), checked against the pruned folder they pass, against a wrong count they are refused."""
    from prunewise.api import run
    from prunewise.core.masks import MaskSet
    from prunewise.models.loading import load_model
    from prunewise.pipeline.reapply import apply_masks, check_masks

    out = tmp_path / "out"
    run(make_recipe(model=moe_folder["model"], calibration=moe_folder["calib"], nsamples=4, seqlen=32, evaluation=[],
                    structure="experts", score="reap", sparsity=0.25, output=str(out)), progress=False)
    masks = MaskSet.load(out / "masks.safetensors")
    assert masks.structure == "experts" and all(k["experts"].numel() == 6 for k in masks.units.values())
    pruned, _ = load_model(str(out))
    check_masks(pruned, masks, applied=True, structure="experts")
    dense, _ = load_model(moe_folder["model"])
    shared = dense.model.layers[0].mlp.shared_expert.gate_proj.weight.clone()
    apply_masks(dense, masks)
    assert torch.equal(dense.model.layers[0].mlp.shared_expert.gate_proj.weight, shared)
    ids = torch.randint(4, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    assert (_logits(dense, ids) - _logits(pruned, ids)).abs().max().item() < 1e-5
    with pytest.raises(PrunewiseError, match="made for 8 experts per layer"):
        check_masks(pruned, masks, structure="experts")  # a pruned model is not the dense one the set was made for


@pytest.mark.parametrize("moe_folder", ["qwen2_moe"], indirect=True)
def test_weight_level_targets_that_leave_out_the_routed_experts_leave_them_alone(moe_folder):
    from prunewise.api import prune

    fields = dict(model=moe_folder["model"], calibration=moe_folder["calib"], nsamples=2, seqlen=16, evaluation=[],
                  score="wanda", sparsity=0.5)
    dense = tiny_moe("qwen2_moe")
    result = prune(make_recipe(**fields, targets="self_attn|shared_expert\\."), progress=False)
    for a, b in zip(get_adapter(dense).blocks(dense), get_adapter(result.model).blocks(result.model)):
        assert torch.equal(a.mlp.experts.gate_up_proj, b.mlp.experts.gate_up_proj)
        assert (b.self_attn.q_proj.weight == 0).float().mean() == pytest.approx(0.5)
        assert (b.mlp.shared_expert.down_proj.weight == 0).float().mean() == pytest.approx(0.5)
    with pytest.raises(PrunewiseError, match="names the shared expert"):
        prune(make_recipe(**{**fields, "score": "reap"}, structure="experts", targets="shared_expert"), progress=False)


# ---- MoEfication: a real-weight MoE from a dense model's own MLPs -------------------------------------------------

def test_a_moefied_model_with_every_expert_selected_gives_the_dense_logits_and_reloads_stock(tmp_path):
    from conftest import tiny_model
    from prunewise.models.moefy import moe_from_dense

    dense = tiny_model("llama", layers=2, hidden=64, intermediate=128)
    g = torch.Generator().manual_seed(0)
    groups, shared, routers = [], [], []
    for _ in range(2):
        perm = torch.randperm(128, generator=g)
        shared.append(perm[:32].sort().values)
        groups.append(perm[32:].view(4, 24).sort(dim=1).values)
        routers.append(torch.randn(4, 64, generator=g) * 1e-7)
    moe = moe_from_dense(dense, groups, shared, routers, top_k=4)
    ids = torch.randint(0, 256, (2, 16), generator=g)
    assert (_logits(moe, ids) - _logits(dense, ids)).abs().max().item() < 1e-4
    moe.save_pretrained(tmp_path / "moe")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert reloaded.config.model_type == "qwen2_moe" and reloaded.config.num_experts == 4
    assert torch.equal(_logits(reloaded, ids), _logits(moe, ids))
    moe.config.num_experts_per_tok = 2  # two of four experts: a real sparse model, its logits move
    for block in moe.model.layers:
        block.mlp.gate.top_k = 2
    assert (_logits(moe, ids) - _logits(dense, ids)).abs().max().item() > 1e-3


def test_balanced_kmeans_groups_channels_that_fire_together_in_equal_groups():
    from prunewise.pipeline.moefy import balanced_kmeans, fit_router

    g = torch.Generator().manual_seed(0)
    profiles = torch.rand(4, 200, generator=g)  # four firing patterns over 200 tokens
    truth = torch.arange(24) % 4
    channels = profiles[truth] + 0.05 * torch.rand(24, 200, generator=g)
    groups = balanced_kmeans(channels, 4)
    assert groups.shape == (4, 6) and sorted(groups.flatten().tolist()) == list(range(24))
    assert all(len(set(truth[grp].tolist())) == 1 for grp in groups)
    x = torch.randn(500, 8, generator=g)
    w = torch.randn(3, 8, generator=g)
    torch.testing.assert_close(fit_router(x, x @ w.t(), ridge=0.0).float(), w, rtol=1e-4, atol=1e-4)


def test_the_models_command_can_build_the_derived_moe(capsys):
    """`prunewise models fetch smollm2-135m-moe` on a fresh cache needs the MoEfication builder registered."""
    import argparse

    from prunewise.cli import _cmd_models
    from prunewise.models.loading import BUILDERS

    BUILDERS.pop("moefy", None)  # as in a process that never imported the API
    _cmd_models(argparse.Namespace(action="list", name=None))
    assert "moefy" in BUILDERS and "smollm2-135m-moe" in capsys.readouterr().out
