"""Inside the fused routed experts of the stock transformers MoE families: weight-level pruning, and whole experts
removed from a checkpoint streamed from disk."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import test_moe
from conftest import tiny_tokenizer, write_paragraphs
from prunewise.errors import PrunewiseError
from prunewise.models.adapters import get_adapter, prunable_weights
from prunewise.recipe import make_recipe
from test_moe import FAMILIES, MOE_LAYERS, _logits, planted_unreachable, tiny_moe

moe_folder = test_moe.moe_folder  # the tiny folders of the four families, as a fixture here too

INSIDE = [(family, structure) for family in FAMILIES for structure in ("unstructured", "2:4")]


# stock transformers in a fresh process: the pruned folder's logits, and its experts as the stock class fuses them on
# load (on disk transformers 5 may store them per expert, as Mixtral's legacy keys: the fused tensors are what runs)
RELOAD_FUSED = """
import json, sys, torch
from transformers import AutoModelForCausalLM
assert "prunewise" not in sys.modules
ids = torch.tensor(json.loads(sys.argv[1]))
for folder, out in json.loads(sys.argv[2]):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    fused = {n: p.detach() for n, p in model.named_parameters() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    with torch.no_grad():
        torch.save({"logits": model(input_ids=ids).logits, "fused": fused}, out)
"""


@pytest.fixture(scope="module")
def inside_the_experts(tmp_path_factory):
    """Each family pruned inside its experts, unstructured 50% by Wanda and 2:4 by SparseGPT, saved as `prunewise
    prune --output` saves, and every folder reloaded by stock transformers in one fresh process."""
    from prunewise.api import prune
    from prunewise.export.save import save_pruned
    from prunewise.pipeline.run import output_files

    ids = torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    cases, jobs = {}, []
    for family, structure in INSIDE:
        tmp = tmp_path_factory.mktemp(f"{family}-{structure.replace(':', 'of')}")
        folder, out = tmp / family, tmp / "out"
        tiny_moe(family).save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        score = "wanda" if structure == "unstructured" else "sparsegpt"
        recipe = make_recipe(model=str(folder), calibration=write_paragraphs(tmp / "calib.txt", 1), nsamples=4,
                             seqlen=32, evaluation=[], score=score, structure=structure, sparsity=0.5,
                             output=str(out))
        result = prune(recipe, progress=False)
        save_pruned(result.model, result.tokenizer, out, output_files(result, result.report), source=str(folder))
        cases[(family, structure)] = {"result": result, "want": _logits(result.model, ids), "got": tmp / "l.pt",
                                      "out": out, "dense": folder}
        jobs.append([str(out), str(tmp / "l.pt")])
    subprocess.run([sys.executable, "-c", RELOAD_FUSED, json.dumps(ids.tolist()), json.dumps(jobs)],
                   capture_output=True, text=True, check=True)
    return cases


@pytest.mark.xdist_group("moe-inside")
@pytest.mark.parametrize("family, structure", INSIDE)
def test_pruned_inside_the_experts_reload_stock_with_every_expert_at_the_sparsity(inside_the_experts, family, structure):
    case = inside_the_experts[(family, structure)]
    reloaded = torch.load(case["got"])
    assert (reloaded["logits"] - case["want"]).abs().max().item() < 1e-5
    result = case["result"]
    assert type(get_adapter(result.model).experts_of(result.model.model.layers[-1])).__name__.endswith("Experts")
    fused = reloaded["fused"]
    assert {k.rsplit(".", 1)[1] for k in fused} == {"gate_up_proj", "down_proj"}
    assert len(fused) == 2 * MOE_LAYERS[family]
    for name, t in fused.items():
        halves = t.chunk(2, dim=1) if name.endswith("gate_up_proj") else (t,)
        for e in range(t.shape[0]):
            for w in halves:  # each expert's gate, up and down matrix, as a linear [out, in]
                w = w[e]
                if structure == "unstructured":  # Wanda: half of every row
                    assert bool(((w == 0).sum(dim=1) == w.shape[1] // 2).all()), (name, e)
                else:  # 2:4 along the input dimension, every group of four
                    assert bool(((w.reshape(w.shape[0], -1, 4) == 0).sum(-1) >= 2).all()), (name, e)
    dense = dict(tiny_moe(family).named_parameters())
    assert all(not torch.equal(dense[k], fused[k]) for k in fused)
    modules = result.report["modules"]
    assert len([n for n in modules if ".experts." in n]) == MOE_LAYERS[family] * 8 * 3
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_unfused_experts_compute_the_stock_forward_and_fuse_back_unchanged(family):
    model = tiny_moe(family)
    adapter = get_adapter(model)
    ids = torch.randint(4, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    want = _logits(model, ids)
    views = prunable_weights(model)
    with adapter.unfused(model):
        experts = adapter.experts_of(model.model.layers[0])
        assert type(experts).__name__ == "UnfusedExperts" and len(experts) == 8
        got = _logits(model, ids)
        linears = prunable_weights(model)
        assert set(linears) == set(views)  # the same names fused (views) and unfused (linears)
        assert all(torch.equal(linears[n], views[n]) for n in views)
    assert (got - want).abs().max().item() < 1e-5
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], before[k]) for k in before)
    with pytest.raises(RuntimeError, match="boom"), adapter.unfused(model):  # fused back when the walk fails
        raise RuntimeError("boom")
    assert type(adapter.experts_of(model.model.layers[0])).__name__ != "UnfusedExperts"


def test_expert_statistics_come_from_the_tokens_the_router_sends(tmp_path):
    """Parallel order: every linear of block 0 sees the dense block's inputs, so each expert's Wanda mask must be the
    one computed by hand from the tokens its router sends it (captured from the stock fused forward)."""
    from prunewise.api import prune
    from prunewise.data import calibration_spec_windows

    model, tokenizer = tiny_moe("mixtral"), tiny_tokenizer()
    adapter = get_adapter(model)
    calib = write_paragraphs(tmp_path / "c.txt", 2)
    recipe = make_recipe(model=str(tmp_path), calibration=calib, nsamples=4, seqlen=32, evaluation=[], score="wanda",
                         sparsity=0.5, within_block="parallel")
    windows = calibration_spec_windows(tokenizer, calib, 4, 32, recipe.seed)
    experts = adapter.experts_of(model.model.layers[0])
    seen = []
    handle = experts.register_forward_pre_hook(lambda m, args: seen.append((args[0].clone(), args[1].clone())))
    with torch.no_grad():
        model(input_ids=windows)
    handle.remove()
    x = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in seen])
    index = torch.cat([b.reshape(-1, b.shape[-1]) for _, b in seen])
    gates = {e: adapter.expert_matrices(experts, e)["gate"].clone() for e in range(8)}
    result = prune(recipe, model=model, tokenizer=tokenizer, progress=False)
    pruned = adapter.experts_of(result.model.model.layers[0])
    checked = 0
    for e, gate in gates.items():
        rows = x[(index == e).any(-1)]
        if rows.shape[0] == 0:
            continue
        metric = gate.abs() * rows.double().pow(2).sum(0).sqrt().float()
        keep = metric.topk(gate.shape[1] // 2, dim=1).indices
        want = torch.zeros_like(gate, dtype=torch.bool).scatter(1, keep, True)
        assert torch.equal(adapter.expert_matrices(pruned, e)["gate"] != 0, want), e
        checked += 1
    assert checked >= 4


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_experts_no_calibration_token_reaches_are_pruned_by_magnitude_and_reported(tmp_path, score):
    """Router rows making experts 1, 4 and 6 unreachable (as in the experts-structure test): their linears get the
    documented treatment (isotropic statistics): a magnitude mask per row, kept weights unchanged; the report names
    them; every other expert is pruned from its tokens."""
    from prunewise.api import prune

    model = planted_unreachable()
    dense = {n: w.clone() for n, w in prunable_weights(model).items()}
    folder = tmp_path / "planted"
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    result = prune(make_recipe(model=str(folder), calibration=write_paragraphs(tmp_path / "calib.txt", 1), nsamples=4,
                               seqlen=32, evaluation=[], score=score, sparsity=0.5), progress=False)
    unreached = result.report["walk"]["unreached"]
    want = [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in range(2) for e in (1, 4, 6)
            for p in ("gate_proj", "up_proj", "down_proj")]
    assert sorted(unreached) == sorted(want)
    weights = prunable_weights(result.model)
    for name in want:
        w, d = weights[name], dense[name]
        if score == "wanda":  # Wanda compares within a row
            kept = torch.zeros_like(d, dtype=torch.bool).scatter(1, d.abs().topk(d.shape[1] // 2, dim=1).indices, True)
        else:  # SparseGPT within a column tile (one tile here): w^2 / [H^-1]_jj^2 with a constant diagonal
            kept = torch.zeros(d.numel(), dtype=torch.bool).scatter(0, d.abs().flatten().topk(d.numel() // 2).indices,
                                                                     True).reshape(d.shape)
        assert torch.equal(w != 0, kept), name
        assert torch.equal(w[kept], d[kept]), name  # nothing reconstructed from inputs it never had
    reached = [n for n in weights if ".experts.0." in n]
    assert all(((weights[n] == 0).float().mean() == pytest.approx(0.5, abs=0.02)) for n in reached)
    assert any(not torch.equal(weights[n][weights[n] != 0], dense[n][weights[n] != 0]) for n in reached) == \
        (score == "sparsegpt")  # SparseGPT updates the kept weights of experts that saw tokens


@pytest.mark.parametrize("moe_folder", ["qwen2_moe"], indirect=True)
def test_masks_made_inside_the_experts_reapply_to_the_dense_model(moe_folder, tmp_path):
    from prunewise.api import run
    from prunewise.core.masks import MaskSet
    from prunewise.models.loading import load_model
    from prunewise.pipeline.reapply import apply_masks, check_masks

    out = tmp_path / "out"
    run(make_recipe(model=moe_folder["model"], calibration=moe_folder["calib"], nsamples=4, seqlen=32, evaluation=[],
                    score="magnitude", structure="4:8", sparsity=0.5, output=str(out)), progress=False)
    masks = MaskSet.load(out / "masks.safetensors")
    assert "model.layers.1.mlp.experts.7.down_proj" in set(masks.weight_names())
    pruned, _ = load_model(str(out))
    check_masks(pruned, masks, applied=True)
    dense, _ = load_model(moe_folder["model"])
    apply_masks(dense, masks)
    ids = torch.randint(4, 256, (1, 16), generator=torch.Generator().manual_seed(0))
    assert (_logits(dense, ids) - _logits(pruned, ids)).abs().max().item() < 1e-6


@pytest.mark.parametrize("moe_folder", ["olmoe"], indirect=True)
def test_what_cannot_run_inside_fused_experts_is_refused_in_one_line(moe_folder):
    from prunewise.api import prune
    from prunewise.pipeline.prune import check_moe_targets

    fields = dict(model=moe_folder["model"], calibration=moe_folder["calib"], nsamples=2, seqlen=16, evaluation=[],
                  score="wanda", sparsity=0.5)
    with pytest.raises(PrunewiseError, match=r"eora.*--ignore 'mlp.experts'"):
        prune(make_recipe(**fields, compensation=[{"name": "eora", "rank": 4}]), progress=False)
    model = tiny_moe("olmoe")
    recipe = make_recipe(**fields)
    with pytest.raises(PrunewiseError, match="does not stream from disk yet"):
        check_moe_targets(model, get_adapter(model), recipe, recipe.parts(), streamed=True)
    assert check_moe_targets(model, get_adapter(model), make_recipe(**fields, ignore="experts"), recipe.parts()) is False


@pytest.mark.parametrize("moe_folder", ["qwen3_moe"], indirect=True)
def test_recovery_after_pruning_inside_the_experts_trains_the_linears_and_keeps_the_experts_zeros(moe_folder, tmp_path):
    from prunewise.api import prune
    from prunewise.pipeline.recover import recover

    recipe = make_recipe(model=moe_folder["model"], calibration=moe_folder["calib"], nsamples=4, seqlen=16,
                         evaluation=[], score="wanda", sparsity=0.5,
                         recovery=["lora:seqlen=32:tokens=512:batch=2:lr=0.01:val_windows=2:eval_every=4"])
    result = prune(recipe, progress=False)
    before = {n: w.clone() for n, w in prunable_weights(result.model).items()}
    section = recover(result, recipe, progress=False)
    assert section["parts"][0]["steps"] == 8
    after = prunable_weights(result.model)
    masks = dict(result.masks.weight_masks())
    for name, w in after.items():
        assert not bool(w[masks[name]].ne(0).any()), name  # every pruned weight still zero
        if ".experts." in name:
            assert torch.equal(w, before[name]), name  # a fused expert matrix: frozen
    assert any(not torch.equal(after[n], before[n]) for n in after if "self_attn" in n)  # the linears trained


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_experts_removed_from_a_streamed_checkpoint_equal_the_in_memory_prune_and_reload_stock(tmp_path, family):
    """The source saved as transformers 5 saves it (each expert's matrices apart, Mixtral's legacy module names),
    sharded, in bfloat16: streamed with --offload disk, the output is a complete sharded checkpoint whose fused
    expert tensors hold exactly the kept experts, equal to the in-memory prune's."""
    from safetensors.torch import load_file

    from prunewise.api import prune, run
    from prunewise.core.masks import MaskSet

    folder = tmp_path / family
    tiny_moe(family).to(torch.bfloat16).save_pretrained(folder, max_shard_size="100KB")
    tiny_tokenizer().save_pretrained(folder)
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    on_disk = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.endswith("gate_up_proj") for k in on_disk)  # per expert on disk
    fields = dict(model=str(folder), calibration=write_paragraphs(tmp_path / "calib.txt", 1), nsamples=4, seqlen=32,
                  evaluation=[], score="reap", structure="experts", sparsity=0.5, completions=False)
    out = tmp_path / "out"
    report = run(make_recipe(**fields, offload="disk", output=str(out)), progress=False)
    assert report["offload"]["mode"] == "disk"
    memory = prune(make_recipe(**fields), progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shards = {}
    for shard in sorted(set(index.values())):
        shards.update(load_file(out / shard))
    assert set(index) == set(shards)  # every shard opens, the index names every tensor and only those
    want = dict(memory.model.named_parameters())
    assert set(shards) == set(want) - ({"lm_head.weight"} if memory.model.config.tie_word_embeddings else set())
    assert all(torch.equal(shards[k], want[k].detach()) for k in shards)
    dense = dict(tiny_moe(family).to(torch.bfloat16).named_parameters())
    keep = MaskSet.load(out / "masks.safetensors").units
    for i, units in keep.items():
        name = f"model.layers.{i}.mlp.experts.gate_up_proj"
        assert shards[name].shape[0] == 4 and torch.equal(shards[name], dense[name][units["experts"]])
    ids = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    done = subprocess.run([sys.executable, "-c", RELOAD_FUSED, json.dumps(ids.tolist()),
                           json.dumps([[str(out), str(tmp_path / "l.pt")]])], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (torch.load(tmp_path / "l.pt")["logits"] - _logits(memory.model, ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("extra", [{"score": "gblm"}, {"score": "wanda", "compensation": ["dsnot"]},
                                   {"score": "wanda", "allocation": "owl"}])
def test_gradients_refinement_and_allocation_work_inside_the_experts(tmp_path, extra):
    """Parts beyond the statistics: GBLM's gradients (zero for the experts no window reaches), DSnoT's refinement
    and OWL's per-layer levels, on the planted model whose experts 1, 4 and 6 see no token."""
    from prunewise.api import prune

    model = planted_unreachable()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    result = prune(make_recipe(model=str(tmp_path / "m"), calibration=write_paragraphs(tmp_path / "c.txt", 1),
                               nsamples=4, seqlen=32, evaluation=[], sparsity=0.5, **extra), progress=False)
    weights = prunable_weights(result.model)
    experts = {n: float((w == 0).float().mean()) for n, w in weights.items() if ".experts." in n}
    assert len(experts) == 2 * 8 * 3 and len(result.report["walk"]["unreached"]) == 2 * 3 * 3
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    planned = result.report["modules"]
    assert all(experts[n] == pytest.approx(planned[n]["planned"], abs=0.02) for n in experts)
