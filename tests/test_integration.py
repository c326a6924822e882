"""A few end-to-end runs on the real smollm2-135m and gemma3-270m, sized for CI (marked `integration`)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunewise.api import evaluate, prune
from prunewise.cli import main
from prunewise.models.adapters import prunable_weights
from prunewise.models.loading import load_model
from prunewise.recipe import make_recipe

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m")


def test_wanda_2of4_on_smollm2_is_exact_and_costs_perplexity(smollm):
    model, tok = load_model("smollm2-135m")
    dense = evaluate(model, tok, ["wiki-test"], eval_tokens=1024, progress=False)["wiki-test"]
    assert 10 < dense < 40  # SmolLM2-135M on Wikipedia passages: ~26 at 16k tokens
    recipe = make_recipe(score="wanda", structure="2:4", nsamples=4, seqlen=128)
    result = prune(recipe, model, tok, progress=False)
    for name, w in prunable_weights(model).items():  # 2 pruned per group; a few weights were 0 already in the GGUF
        zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert torch.all(zeros >= 2) and (zeros > 2).float().mean() < 1e-3, name
    pruned = evaluate(model, tok, ["wiki-test"], eval_tokens=1024, progress=False)["wiki-test"]
    assert dense < pruned < 20 * dense
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_sparsegpt_owl_on_smollm2_meets_budget_with_a_non_uniform_plan(smollm):
    model, tok = load_model("smollm2-135m")
    # the first ten of the 30 blocks (SparseGPT on all of them is 45 s on one core): OWL still spreads its levels over them
    recipe = make_recipe(score="sparsegpt", allocation="owl", sparsity=0.6, nsamples=4, seqlen=128,
                         targets=r"model\.layers\.[0-9]\.")
    result = prune(recipe, model, tok, progress=False)
    assert result.report["achieved_sparsity"] == pytest.approx(0.6, abs=1e-6)
    levels = sorted(set(round(v, 4) for v in result.plan.modules.values()))
    assert len(levels) > 5 and levels[0] < 0.6 < levels[-1]
    assert not result.report["cholesky_retries"]


def test_cli_saves_a_folder_that_reloads_to_identical_logits(tmp_path):
    out = tmp_path / "pruned"
    assert main(["prune", "--score", "wanda", "--sparsity", "0.5", "--nsamples", "4", "--seqlen", "128", "--eval",
                 "--no-completions", "--output", str(out), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    zeros = sum(int((w == 0).sum()) for w in prunable_weights(reloaded).values())
    assert zeros == sum(m["zeros"] for m in report["modules"].values())
    ids = torch.arange(100, 164)[None]
    with torch.no_grad():
        logits = reloaded(input_ids=ids).logits
    assert torch.isfinite(logits).all()


@pytest.mark.slow
def test_gemma3_prunes_through_its_adapter():
    model, tok = load_model("gemma3-270m")
    result = prune(make_recipe(model="gemma3-270m", score="wanda", allocation="owl", sparsity=0.5, nsamples=4, seqlen=128),
                   model, tok, progress=False)
    assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    assert len(result.plan.modules) == 7 * model.config.num_hidden_layers
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.arange(10, 40)[None]).logits).all()


# Items per task (the suite's items are whole passages, ~700 tokens each, four orders each): `make test` compares 1 + 1
# items (8 choices, each within 2e-3; about 40 s on one core); `make test-all` every item of the suite's windows.
@pytest.mark.parametrize("n_agree", [(1, 1), pytest.param((None, None), marks=pytest.mark.slow)],
                         ids=["small", "full"])
def test_accuracy_agrees_exactly_with_lm_evaluation_harness(tmp_path, n_agree):
    """Dense smollm2-135m on the tasks of the default suite: the same correct counts (acc and acc_norm) as lm-eval 0.4.13,
    and per-choice log-likelihoods within float noise (prunewise shares contexts; lm-eval runs whole sequences)."""
    pytest.importorskip("lm_eval")
    from prunewise.tasks import mc_metrics, score_items
    from prunewise.tasks.harness import run_harness
    from prunewise.tasks.suite import DEFAULT_SUITE, load_tasks

    model, tokenizer = load_model("smollm2-135m")
    names = list(DEFAULT_SUITE)  # the default suite's tasks (its items, then the first n of them)
    assert len(names) == len(n_agree)
    tasks = [task.head(n) for task, n in zip(load_tasks(names), n_agree)]
    theirs = run_harness(model, tokenizer, tmp_path / "harness", tasks)
    for task, n in zip(tasks, n_agree):
        lls = score_items(model, tokenizer, task.items)
        mine, other = mc_metrics(task.items, lls), theirs[task.name]
        assert other["n"] == mine["n"] == (n or len(task.items))
        assert (other["correct"], other["correct_norm"]) == (mine["correct"], mine["correct_norm"]), task.name
        assert max(abs(a - b) for x, y in zip(lls, other["loglikelihoods"]) for a, b in zip(x, y)) < 2e-3
        print(f"{task.name}: prunewise {mine['correct']}/{mine['correct_norm']}, "
              f"lm-eval {other['correct']}/{other['correct_norm']} of {n} (acc/acc_norm)")
