"""Structured pruning: GQA-safe heads, widths, bias compensation, block/sublayer removal, export and reload."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from conftest import tiny_model
from prunewise.engine.sequential import SequentialEngine
from prunewise.engine.services import StatsVisitor
from prunewise.errors import PrunewiseError
from prunewise.export.save import save_pruned
from prunewise.models.adapters import ADAPTERS, get_adapter
from prunewise.pipeline.structured import prune_structured
from prunewise.recipe import make_recipe
from prunewise.scores import get_score
from prunewise.structures import Structured
from prunewise.structures.geometry import BlockGeometry, BlockKeep, check_gqa
from prunewise.structures.shrink import shrink_block
from prunewise.structures.units import unit_scores
from prunewise.structures.widths import choose_widths

pytestmark = pytest.mark.xdist_group("structured")  # one worker starts the module's reload process, once


LLAMA = ADAPTERS[0]  # every supported family names its linears the same way


def _by_role(stats: dict, grads: dict | None = None) -> dict:
    """Statistics keyed by role (q, k, v, o, gate, up, down), with gradients attached when given."""
    from prunewise.core.stats import LinearStats

    out = {}
    for role, name in LLAMA.roles.items():
        s = stats.get(name) or LinearStats(1)
        if grads is not None:
            s = copy.copy(s)
            s.gradient = grads[name]
        out[role] = s
    return out


def gqa_model(family: str, seed: int = 0) -> torch.nn.Module:
    """9 query heads in 3 key/value groups of 3, as smollm2-135m (head_dim 8 instead of 64)."""
    torch.manual_seed(seed)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    cfg = cls(vocab_size=128, hidden_size=72, intermediate_size=96, num_hidden_layers=2, num_attention_heads=9,
              num_key_value_heads=3, head_dim=8, max_position_embeddings=128, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _attention_out(block, x, kwargs, removed_heads=(), head_dim=8):
    """The attention sublayer's output; removed heads are silenced by zeroing their o_proj input columns."""
    cols = [h * head_dim + j for h in removed_heads for j in range(head_dim)]

    def silence(module, args):
        y = args[0].clone()
        y[..., cols] = 0
        return (y,)

    handle = block.self_attn.o_proj.register_forward_pre_hook(silence) if cols else None
    try:
        return block.self_attn(hidden_states=x, **kwargs)[0]
    finally:
        if handle is not None:
            handle.remove()


def _block_kwargs(model, x):
    pos = torch.arange(x.shape[1]).unsqueeze(0)
    emb = model.model.rotary_emb(x, pos)
    return {"position_embeddings": emb, "attention_mask": None}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["query", "group"])
@pytest.mark.parametrize("share", [0.2, 0.4, 0.7])
def test_removing_heads_never_orphans_a_query_head(family, mode, share):
    """After head pruning every kept query head still reads its own key/value head: the pruned attention equals the
    dense attention with exactly the removed heads silenced (a wrong group mapping would change the output)."""
    model = gqa_model(family)
    block = model.model.layers[0]
    g = BlockGeometry.of(LLAMA.roles_of(block), 8)
    assert (g.heads, g.kv_heads, g.group_size) == (9, 3, 3)
    scores = [{"channels": torch.rand(g.intermediate), "query": torch.rand(g.heads), "kv": torch.rand(g.kv_heads)}]
    budget = int(share * g.attn_params)
    keep = choose_widths([g], scores, Structured("heads"), budget, heads_mode=mode)[0]
    check_gqa(keep, g)
    x = torch.randn(1, 5, 72)
    kwargs = _block_kwargs(model, x)
    removed = [h for h in range(9) if h not in keep.query_heads.tolist()]
    with torch.no_grad():
        reference = _attention_out(block, x, kwargs, removed)
        pruned = copy.deepcopy(block)
        shrink_block(pruned, keep, 8, LLAMA)
        out = _attention_out(pruned, x, kwargs)
    assert 0 < len(removed) < 9
    if mode == "group":
        assert len(removed) % 3 == 0 and keep.kv_heads.numel() == 3 - len(removed) // 3
    else:
        assert keep.kv_heads.numel() == 3 and len(removed) % 3 == 0  # evenly: the same count leaves every group
    assert pruned.self_attn.num_key_value_groups == keep.query_heads.numel() // keep.kv_heads.numel()
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_check_gqa_refuses_a_query_head_without_its_kv_head():
    g = BlockGeometry.of(LLAMA.roles_of(gqa_model("llama").model.layers[0]), 8)
    bad = BlockKeep(torch.arange(g.intermediate), torch.tensor([0, 1, 3]), torch.tensor([0]))
    with pytest.raises(AssertionError, match="key/value"):
        check_gqa(bad, g)
    uneven = BlockKeep(torch.arange(g.intermediate), torch.tensor([0, 1, 3]), torch.tensor([0, 1]))
    with pytest.raises(AssertionError, match="unequal"):
        check_gqa(uneven, g)


def _stats(model, windows):
    visitor = StatsVisitor()
    SequentialEngine(model, get_adapter(model), windows, progress=False, sequential=False).run(visitor)
    return visitor.stats


def test_fluctuation_is_input_variance_times_squared_column_norm(windows):
    model = tiny_model("llama")
    stats = _stats(model, windows)
    block = model.model.layers[0]
    captured = []
    h = block.mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=windows)
    h.remove()
    x = torch.cat(captured).double()
    expected = x.var(0) * block.mlp.down_proj.weight.double().pow(2).sum(0)
    got = unit_scores(get_score("fluctuation"), LLAMA.roles_of(block), BlockGeometry.of(LLAMA.roles_of(block), 16),
                      _by_role(stats[0]))["channels"]
    torch.testing.assert_close(got.double(), expected, rtol=1e-3, atol=1e-6)


def _recipe(**kw):
    return make_recipe(**{"model": "x", "sparsity": 0.4, "structure": "width", "score": "wanda", **kw})


def test_uniform_widths_are_equal_multiples_and_meet_the_budget(windows):
    model = tiny_model("llama", layers=3)
    _, info, _ = prune_structured(model, get_adapter(model), _recipe(width_multiple=8), windows, progress=False)
    widths = {(r["intermediate_size"], r["num_attention_heads"]) for r in info["layers"]}
    assert len(widths) == 1 and next(iter(widths))[0] % 8 == 0
    assert info["config"] == "stock"
    chunk = 8 * 3 * 64
    assert abs(info["removed_targeted_params"] - info["budget_params"]) <= 3 * chunk / 2 + 1


def test_global_widths_differ_per_block(windows):
    model = tiny_model("llama", layers=4)
    _, info, _ = prune_structured(model, get_adapter(model), _recipe(score="fluctuation", allocation="global"),
                               windows, progress=False)
    assert len({r["intermediate_size"] for r in info["layers"]}) > 1
    assert all(r["intermediate_size"] % 8 == 0 for r in info["layers"])
    assert info["config"] == "custom"
    assert abs(info["removed_targeted_params"] - info["budget_params"]) <= 8 * 3 * 64


def test_bias_compensation_keeps_the_mean_output_of_the_pruned_mlp(windows):
    """FLAP's compensation is exact in the mean: block 0's MLP output, averaged over the calibration tokens, is
    unchanged (its inputs are unchanged too); without compensation it is not."""
    def mlp_mean(model):
        outs = []
        h = model.model.layers[0].mlp.register_forward_hook(lambda m, a, o: outs.append(o.reshape(-1, o.shape[-1])))
        with torch.no_grad():
            model(input_ids=windows)
        h.remove()
        return torch.cat(outs).double().mean(0)

    dense = tiny_model("llama")
    want = mlp_mean(dense)
    for comp in (True, False):
        model = tiny_model("llama")
        prune_structured(model, get_adapter(model), _recipe(structure="channels", bias_compensation=comp), windows,
                         progress=False)
        assert model.model.layers[0].mlp.down_proj.weight.shape[1] < 128
        got = mlp_mean(model)
        if comp:
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        else:
            assert (got - want).abs().max() > 1e-3


def _mlp_outputs(model, windows, block=0):
    outs = []
    h = model.model.layers[block].mlp.register_forward_hook(lambda m, a, o: outs.append(o.reshape(-1, o.shape[-1])))
    with torch.no_grad():
        model(input_ids=windows)
    h.remove()
    return torch.cat(outs).double()


def test_refit_reconstructs_the_pruned_mlp_better_than_flaps_bias_and_keeps_its_mean(windows):
    """Block 0's MLP output over the calibration tokens (its inputs unchanged by pruning): the least-squares refit
    with intercept is exact in the mean as FLAP's bias is, and its error is well below the bias's."""
    want = _mlp_outputs(tiny_model("llama"), windows)
    errors = {}
    for comp in ("bias", "refit"):
        model = tiny_model("llama")
        prune_structured(model, get_adapter(model), _recipe(structure="channels", compensation=[comp]), windows,
                         progress=False)
        got = _mlp_outputs(model, windows)
        torch.testing.assert_close(got.mean(0), want.mean(0), atol=1e-4, rtol=1e-4)
        errors[comp] = float((got - want).square().sum())
    assert errors["refit"] < 0.75 * errors["bias"], errors


def test_refit_is_the_least_squares_fit_with_an_intercept():
    from prunewise.compensation.refit import RefitCompensation
    from prunewise.core.stats import LinearStats, Needs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g) @ torch.randn(12, 12, generator=g) + torch.randn(12, generator=g)
    w, b = torch.randn(5, 12, generator=g), torch.randn(5, generator=g)
    stats = LinearStats.for_needs(12, Needs(hessian=True, mean=True))
    stats.add(x.unsqueeze(0))
    kept = torch.tensor([0, 2, 3, 7, 8, 11])
    fw, fb = RefitCompensation(RefitCompensation.Config(damp=0.0)).fit(w, b, kept, stats)
    design = torch.cat([x[:, kept], torch.ones(400, 1)], 1).double()
    sol = torch.linalg.lstsq(design, (x @ w.t() + b).double()).solution  # (kept + 1, out)
    torch.testing.assert_close(fw, sol[:-1].t(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fb, sol[-1], atol=1e-6, rtol=1e-6)


def test_structured_obs_removes_what_brute_force_removes():
    """One channel: structured OBS's choice is the exact optimum over every candidate (least-squares refit with an
    intercept for each); three of eight: the greedy sequence is within 5% of the best of all 56 subsets here."""
    from itertools import combinations

    from prunewise.compensation.refit import RefitCompensation
    from prunewise.core.stats import LinearStats, Needs

    g = torch.Generator().manual_seed(4)
    x = torch.randn(600, 8, generator=g) @ torch.randn(8, 8, generator=g) + torch.randn(8, generator=g)
    w = torch.randn(6, 8, generator=g)
    stats = LinearStats.for_needs(8, Needs(hessian=True, mean=True))
    stats.add(x.unsqueeze(0))
    part = RefitCompensation(RefitCompensation.Config(damp=0.0, select="obs"))
    y = (x @ w.t()).double()

    def cost(kept):
        design = torch.cat([x[:, list(kept)], torch.ones(600, 1)], 1).double()
        sol = torch.linalg.lstsq(design, y).solution
        return float((design @ sol - y).square().sum())

    best_one = min(combinations(range(8), 7), key=cost)
    assert part.select_channels(w, 7, stats).tolist() == list(best_one)
    chosen = part.select_channels(w, 5, stats).tolist()
    best = min(cost(k) for k in combinations(range(8), 5))
    assert cost(chosen) <= 1.05 * best


def test_osscar_swaps_lower_the_refit_error_at_every_step():
    """The swaps' objective is the refit's: least-squares error (with an intercept) per token plus ``explained`` is
    the same for every kept set; from the worst 5 of 10 channels each swap lowers the error until none does, and
    here they reach the best of all 252 sets."""
    from itertools import combinations

    from prunewise.compensation.refit import RefitCompensation
    from prunewise.core.stats import LinearStats, Needs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 10, generator=g) @ torch.randn(10, 10, generator=g) + torch.randn(10, generator=g)
    w = torch.randn(6, 10, generator=g)
    stats = LinearStats.for_needs(10, Needs(hessian=True, mean=True))
    stats.add(x.unsqueeze(0))
    y = (x @ w.t()).double()

    def cost(kept):
        design = torch.cat([x[:, list(kept)], torch.ones(600, 1)], 1).double()
        return float((design @ torch.linalg.lstsq(design, y).solution - y).square().sum()) / 600

    subsets = list(combinations(range(10), 5))
    part = RefitCompensation(RefitCompensation.Config(damp=0.0, swaps=1))
    total = [cost(k) + part.explained(w, torch.tensor(k), stats) for k in subsets[::25]]
    assert max(total) - min(total) < 1e-6 * max(total)
    kept, costs = torch.tensor(max(subsets, key=cost)), []
    for _ in range(12):
        costs.append(cost(kept.tolist()))
        after = part.select_channels(w, 5, stats, start=kept)
        if after.tolist() == kept.tolist():
            break
        assert cost(after.tolist()) < costs[-1]
        kept = after
    assert len(costs) > 2 and tuple(kept.tolist()) == min(subsets, key=cost)


def test_refit_with_obs_selection_keeps_the_count_and_beats_the_scores_choice(windows):
    want = _mlp_outputs(tiny_model("llama"), windows)
    errors, widths = {}, {}
    for select in ("score", "obs", "leverage", "swaps"):
        model = tiny_model("llama")
        refit = {"name": "refit", "select": select} if select != "swaps" else {"name": "refit", "swaps": 16}
        _, info, masks = prune_structured(model, get_adapter(model), _recipe(
            structure="channels", compensation=[refit]), windows, progress=False)
        widths[select] = [r["intermediate_size"] for r in info["layers"]]
        assert masks.units[0]["channels"].numel() == widths[select][0]
        errors[select] = float((_mlp_outputs(model, windows) - want).square().sum())
    assert widths["obs"] == widths["score"] == widths["leverage"] == widths["swaps"], widths
    assert errors["obs"] < errors["score"] and errors["swaps"] < errors["score"], errors


def test_leverage_selection_keeps_the_channels_of_largest_ridge_leverage():
    """MoDeGPT's selection, computed here from samples: diag(C (C + lam I)^-1), lam = ridge * mean(diag C)."""
    from prunewise.compensation.refit import RefitCompensation
    from prunewise.core.stats import LinearStats, Needs

    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 10, generator=g) @ torch.randn(10, 10, generator=g) * torch.rand(10, generator=g)
    stats = LinearStats.for_needs(10, Needs(hessian=True, mean=True))
    stats.add(x.unsqueeze(0))
    C = (x.t() @ x).double() / 300
    lam = 0.3 * float(C.diagonal().mean())
    lev = (C @ torch.linalg.inv(C + lam * torch.eye(10, dtype=C.dtype))).diagonal()
    part = RefitCompensation(RefitCompensation.Config(select="leverage", ridge=0.3))
    assert part.select_channels(torch.randn(4, 10), 6, stats).tolist() == sorted(lev.topk(6).indices.tolist())


# One fresh process without prunewise loads every saved folder (importing transformers costs ~10 s a process):
# it reads "path flag" lines and answers each with one line.
RELOAD = """
import sys, json, torch
from transformers import AutoModelForCausalLM
for line in sys.stdin:
    path, flag = line.split()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=flag == "remote").eval()
        assert "prunewise" not in sys.modules
        ids = torch.load(path + "/ids.pt")
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - torch.load(path + "/logits.pt")).abs().max()
        gen = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
        print(json.dumps([type(model).__name__, float(diff), gen[0].tolist()]), flush=True)
    except Exception as exc:
        print(json.dumps(["error", repr(exc)]), flush=True)
"""


@pytest.fixture(scope="module")
def reloader():
    proc = subprocess.Popen([sys.executable, "-c", RELOAD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    yield proc
    proc.stdin.close()
    proc.wait(timeout=60)


@pytest.fixture
def _reload(reloader):
    def ask(path, flag):
        reloader.stdin.write(f"{path} {flag}\n")
        reloader.stdin.flush()
        line = reloader.stdout.readline()
        assert line, reloader.stderr.read()[-2000:]
        return json.loads(line)
    return ask


def _save_and_reload(model, tmp_path, files, flag, reload):
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        gen = model.generate(ids[:1, :6], max_new_tokens=8, do_sample=False)
    out = save_pruned(model, None, tmp_path / "out", files)
    torch.save(ids, out / "ids.pt")
    torch.save(logits, out / "logits.pt")
    answer = reload(out, flag)
    assert answer[0] != "error", answer[1]
    cls, diff, tokens = answer
    assert float(diff) < 1e-4
    assert tokens == gen[0].tolist()
    return cls, out


@pytest.mark.parametrize("family, comp", [("llama", "bias"), ("qwen2", "bias"), ("gemma3", "bias"), ("llama", "refit")])
def test_per_block_widths_with_bias_reload_with_remote_code_and_same_logits(family, comp, windows, tmp_path, _reload):
    from prunewise.export.register import MODELING_FILE

    model = tiny_model(family, layers=4)
    _, info, _ = prune_structured(model, get_adapter(model), _recipe(score="fluctuation", allocation="global",
                                                                  compensation=[comp]), windows, progress=False)
    assert info["config"] == "custom" and any(r["down_proj_bias"] for r in info["layers"])
    cls, out = _save_and_reload(model, tmp_path, {"modeling_prunewise.py": MODELING_FILE.read_text()}, "remote",
                                _reload)
    assert cls.startswith("Pruned")
    # with prunewise imported the folder loads without the flag
    again = AutoModelForCausalLM.from_pretrained(out)
    assert type(again).__name__ == cls


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_uniform_widths_reload_with_a_stock_config(family, windows, tmp_path, _reload):
    model = tiny_model(family, layers=2)
    _, info, _ = prune_structured(model, get_adapter(model), _recipe(score="magnitude"), None, progress=False)
    assert info["config"] == "stock"
    cls, out = _save_and_reload(model, tmp_path, {}, "stock", _reload)
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config and config["intermediate_size"] < 128 and not cls.startswith("Pruned")


def test_llama_uniform_bias_compensation_uses_stock_bias_flags(windows, tmp_path, _reload):
    model = tiny_model("llama", layers=2)
    _, info, _ = prune_structured(model, get_adapter(model), _recipe(bias_compensation=True), windows, progress=False)
    assert info["config"] == "stock"
    cls, out = _save_and_reload(model, tmp_path, {}, "stock", _reload)
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] and config["attention_bias"] and cls == "LlamaForCausalLM"


def test_blocks_remove_the_least_influential_and_generate_with_cache(windows, tmp_path, _reload):
    model = tiny_model("llama", layers=4)
    _, info, _ = prune_structured(model, get_adapter(model), _recipe(structure="blocks", sparsity=0.5), windows,
                               progress=False)
    influence = torch.tensor(info["influence"]["block"])
    assert info["removed_blocks"] == sorted(torch.argsort(influence)[:2].tolist())
    assert len(model.model.layers) == 2 and model.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in model.model.layers] == [0, 1]
    cls, _ = _save_and_reload(model, tmp_path, {}, "stock", _reload)
    assert cls == "LlamaForCausalLM"


def test_removed_attention_keeps_cached_decoding_exact():
    """A block without attention still advances the KV cache: cached greedy decoding equals uncached decoding."""
    model = tiny_model("llama", layers=3)
    g = BlockGeometry.of(LLAMA.roles_of(model.model.layers[0]), 16)
    none = torch.zeros(0, dtype=torch.long)
    shrink_block(model.model.layers[0], BlockKeep(torch.arange(g.intermediate), none, none), 16, LLAMA)
    shrink_block(model.model.layers[2], BlockKeep(none, torch.arange(g.heads), torch.arange(g.kv_heads)), 16, LLAMA)
    ids = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    cached = model.generate(ids, max_new_tokens=8, do_sample=False)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert cached.tolist() == seq.tolist()


def test_sublayers_meet_the_parameter_budget_of_blocks(windows):
    model = tiny_model("llama", layers=4)
    _, info, _ = prune_structured(model, get_adapter(model), _recipe(structure="sublayers", sparsity=0.5), windows,
                               progress=False)
    smallest = min(BlockGeometry.of(LLAMA.roles_of(b), 16).attn_params for b in tiny_model("llama", layers=1).model.layers)
    assert abs(info["removed_targeted_params"] - info["budget_params"]) <= smallest // 2


@pytest.mark.parametrize("fields, message", [
    ({"structure": "width", "score": "sparsegpt"}, "sparsegpt"),
    ({"structure": "unstructured", "score": "fluctuation"}, "structured units"),
    ({"structure": "unstructured", "bias_compensation": True}, "bias compensation"),
    ({"structure": "width", "allocation": "search"}, "--plan"),
    ({"structure": "blocks", "allocation": "global"}, "blocks"),
    ({"structure": "width", "rowwise": True}, "row-wise"),
    ({"structure": "rows"}, "channels, heads, width"),
])
def test_bad_structured_recipes_are_refused(fields, message):
    with pytest.raises(PrunewiseError, match=message):
        make_recipe(model="x", sparsity=0.3, **fields)


def test_cli_prunes_structured_and_saves_a_smaller_loadable_folder(tiny_folder, tmp_path):
    from prunewise.cli import main

    out = tmp_path / "pruned"
    code = main(["prune", "--model", tiny_folder["model"], "--structure", "width", "--score", "fluctuation",
                 "--allocation", "global", "--bias-compensation", "--sparsity", "0.3", "--calibration",
                 tiny_folder["calib"], "--nsamples", "4", "--seqlen", "16", "--eval", "--output", str(out),
                 "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    config = json.loads((out / "config.json").read_text())
    custom = report["structured"]["config"] == "custom"
    assert (out / "modeling_prunewise.py").exists() == custom == ("auto_map" in config)
    assert (out / "plan.json").exists() and (out / "plan.png").exists()
    assert report["structured"]["params_after"]["total"] < report["structured"]["params_before"]["total"]
    assert "Structured:" in (out / "report.md").read_text()
    assert main(["eval", "--model", str(out), "--data", tiny_folder["eval"], "--seqlen", "32", "--eval-tokens", "256",
                 "--no-progress"]) == 0


def test_sublayer_damage_ranks_a_silent_sublayer_first(windows):
    """A sublayer that already outputs nothing does no damage when removed, so the greedy removes it first."""
    from prunewise.engine.services import sublayer_damage

    model = tiny_model("llama", layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.zero_()
    damage = sublayer_damage(model, get_adapter(model), windows[:4], progress=False)
    assert damage["mlp"][1] < 1e-9 and (damage["attention"] > 1e-6).all() and damage["mlp"][0] > 1e-6
    _, info, _ = prune_structured(model, get_adapter(model), _recipe(structure="sublayers", sparsity=0.2), windows,
                               progress=False)
    assert info["layers"][1]["intermediate_size"] == 0


def test_uniform_heads_stay_loadable_by_the_stock_gemma3_config(tmp_path, _reload):
    """Gemma 3's config requires hidden % heads == 0 (gemma3-270m: 640 hidden, 4 heads, 1 key/value head), so
    uniform widths keep 2 heads rather than 3."""
    from transformers import Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=16, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    _, info, _ = prune_structured(model, get_adapter(model), _recipe(structure="heads", score="magnitude", sparsity=0.3),
                               None, progress=False)
    assert info["config"] == "stock" and info["layers"][0]["num_attention_heads"] == 2
    cls, _ = _save_and_reload(model, tmp_path, {}, "stock", _reload)
    assert cls == "Gemma3ForCausalLM"


def test_a_uniform_width_the_stock_config_refuses_is_saved_with_per_block_widths(windows):
    from prunewise.structures.shrink import _stock_accepts

    config = tiny_model("gemma3", layers=1).config
    assert not _stock_accepts(config, {"intermediate_size": 64, "num_attention_heads": 3, "num_key_value_heads": 1}, 16)
    assert _stock_accepts(config, {"intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}, 16)


def test_taylor_scores_use_the_loss_gradient_and_leave_the_model_untouched(windows):
    from prunewise.engine.services import loss_gradients

    model = tiny_model("llama")
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    grads = loss_gradients(model, get_adapter(model), windows[:4], "sum", chunk_size=2, progress=False)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())
    reference = tiny_model("llama")
    out = reference(input_ids=windows[:4], labels=windows[:4])
    (out.loss * 4).backward()  # one chunk of 4 = two chunks of 2 summed over windows
    want = reference.model.layers[1].mlp.up_proj.weight.grad
    torch.testing.assert_close(grads[(1, "mlp.up_proj")], want, rtol=1e-3, atol=1e-6)
    block = model.model.layers[1]
    g = BlockGeometry.of(LLAMA.roles_of(block), 16)
    block_grads = {n: grads[(1, n)] for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                              "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    scores = unit_scores(get_score("taylor"), LLAMA.roles_of(block), g, _by_role({}, block_grads))
    m = block.mlp
    expected = ((m.gate_proj.weight * block_grads["mlp.gate_proj"]).abs().sum(1)
                + (m.up_proj.weight * block_grads["mlp.up_proj"]).abs().sum(1)
                + (m.down_proj.weight * block_grads["mlp.down_proj"]).abs().sum(0))
    torch.testing.assert_close(scores["channels"], expected.detach())


def test_owl_and_saved_plans_drive_structured_widths(tiny_folder, tmp_path):
    """Any allocation plan sets per-block widths: an OWL plan computed on the fly, or a plan.json reused."""
    from prunewise.api import prune

    base = dict(model=tiny_folder["model"], score="wanda", sparsity=0.4, calibration=tiny_folder["calib"], nsamples=4,
                seqlen=16, evaluation=[])
    owl = prune(make_recipe(structure="width", allocation="owl", **base), progress=False)
    info = owl.report["structured"]
    assert owl.report["allocation"] == "plan" and 0.3 < info["removed_share_of_targeted"] < 0.5
    plan = tmp_path / "plan.json"
    unstructured = prune(make_recipe(allocation="owl", **base), progress=False)
    unstructured.plan.modules = {m: (0.6 if ".0." in m else 0.2) for m in unstructured.plan.modules}
    unstructured.plan.save(plan)
    reused = prune(make_recipe(structure="channels", plan=str(plan), **base), progress=False)
    widths = [r["intermediate_size"] for r in reused.report["structured"]["layers"]]
    assert widths[0] < widths[1]  # block 0 was planned to lose three times as much


def test_a_model_with_per_block_widths_is_evaluated_after_pruning(tiny_folder, tmp_path):
    """Global widths give every block its own size (the family's pruned twin): evaluation places it block by block."""
    from prunewise.api import run
    from prunewise.recipe import make_recipe

    report = run(make_recipe(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=4, seqlen=16,
                             evaluation=[tiny_folder["eval"]], eval_tokens=512, eval_seqlen=32, completions=False,
                             score="fluctuation", structure="width", sparsity=0.4, allocation="global",
                             compensation=["bias"], output=str(tmp_path / "out")), progress=False)
    assert report["structured"]["config"] == "custom"  # per-block widths: the pruned twin class
    ppl = report["perplexity"][tiny_folder["eval"]]
    assert 1 < ppl["pruned"] < float("inf") and ppl["pruned"] != ppl["dense"]
