"""Recovery after pruning: mask-preserving LoRA and distillation, checkpoints and resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from prunewise.recipe import make_recipe

RUNNER = Path(__file__).with_name("fault_runner.py")
REC = "seqlen=32:tokens=1024:batch=2:lr=0.01:val_windows=4:eval_every=4:checkpoint_every=2"


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def _masks(folder: Path) -> dict[str, torch.Tensor]:
    from prunewise.core.masks import MaskSet

    return MaskSet.load(folder / "masks.safetensors").weights


def _base(tiny_folder, out: Path, **extra) -> dict:
    return dict(model=tiny_folder["model"], calibration=tiny_folder["calib"], nsamples=4, seqlen=16,
                evaluation=[tiny_folder["eval"]], eval_tokens=512, eval_seqlen=32, completions=False, output=str(out),
                **extra)


def test_lora_recovery_lowers_the_held_out_loss_and_keeps_every_pruned_weight_zero(tiny_folder, tmp_path):
    from prunewise.api import run

    report = run(make_recipe(**_base(tiny_folder, tmp_path / "rec", score="wanda", sparsity=0.6,
                                     recovery=[f"lora:{REC}"])), progress=False)
    one_shot = run(make_recipe(**_base(tiny_folder, tmp_path / "plain", score="wanda", sparsity=0.6)), progress=False)
    part = report["recovery"]["parts"][0]
    vals = [h["val_loss"] for h in part["history"] if "val_loss" in h]
    assert vals[-1] < 0.95 * part["val_loss_before"] and vals == sorted(vals, reverse=True), (part["val_loss_before"], vals)
    assert part["steps"] == 16 and part["tokens"] == 1024 and part["trained_parameters"] > 0
    ppl = report["perplexity"][tiny_folder["eval"]]
    assert ppl["one_shot"] == pytest.approx(one_shot["perplexity"][tiny_folder["eval"]]["pruned"], rel=1e-6)
    assert ppl["pruned"] < ppl["one_shot"]
    masks, plain_masks = _masks(tmp_path / "rec"), _masks(tmp_path / "plain")
    weights, plain = _tensors(tmp_path / "rec"), _tensors(tmp_path / "plain")
    assert masks.keys() == plain_masks.keys() and all(torch.equal(masks[n], plain_masks[n]) for n in masks)
    for name, mask in masks.items():
        w = weights[f"{name}.weight"]
        assert torch.equal(w == 0, mask), name  # exactly the mask's zeros, no more, no fewer
        assert not torch.equal(w, plain[f"{name}.weight"]), name  # and the kept weights trained
    assert report["achieved_sparsity"] == one_shot["achieved_sparsity"]
    assert not (tmp_path / ".rec.recovery").exists()  # checkpoints gone once it finished


def test_distill_recovers_a_structured_model_that_stock_transformers_loads(tiny_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    from prunewise.api import run

    out = tmp_path / "width"
    report = run(make_recipe(**_base(tiny_folder, out, score="fluctuation", structure="width", sparsity=0.4,
                                     allocation="global", compensation=["bias"],
                                     recovery=[f"distill:{REC}:params=lora+bias_norm"])), progress=False)
    part = report["recovery"]["parts"][0]
    vals = [h["val_loss"] for h in part["history"] if "val_loss" in h]
    assert vals[-1] < part["val_loss_before"]
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    dense = AutoModelForCausalLM.from_pretrained(tiny_folder["model"])
    assert sum(p.numel() for p in model.parameters()) < 0.8 * sum(p.numel() for p in dense.parameters())
    assert report["perplexity"][tiny_folder["eval"]]["pruned"] < report["perplexity"][tiny_folder["eval"]]["one_shot"]


def test_unmerged_lora_is_saved_as_a_peft_adapter_and_the_base_keeps_its_zeros(tiny_folder, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prunewise.api import run

    out = tmp_path / "adapter"
    report = run(make_recipe(**_base(tiny_folder, out, score="wanda", sparsity=0.5,
                                     recovery=[f"lora:{REC}:merge=false"])), progress=False)
    assert report["recovery"]["parts"][0]["adapter"]["folder"] == "lora"
    base = AutoModelForCausalLM.from_pretrained(out)
    for name, mask in _masks(out).items():
        assert torch.equal(dict(base.named_parameters())[f"{name}.weight"] == 0, mask)
    model = PeftModel.from_pretrained(base, out / "lora")
    ids = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_an_interrupted_recovery_resumes_to_bit_identical_weights(tiny_folder, tmp_path):
    args = ["prune", "--model", tiny_folder["model"], "--calibration", tiny_folder["calib"], "--nsamples", "4",
            "--seqlen", "16", "--eval", "--no-completions", "--sparsity", "0.5",
            "--recover", f"lora:{REC}", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent), OMP_NUM_THREADS="1")
    signal_file = tmp_path / "paused"
    child = subprocess.Popen([sys.executable, str(RUNNER), "checkpoint", str(signal_file), "120", "--", *args,
                              "--output", str(tmp_path / "a")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    end = time.time() + 240
    while not signal_file.exists():
        assert child.poll() is None, child.stderr.read()[-2000:]
        assert time.time() < end
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    try:
        child.wait(timeout=1)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert child.returncode != 0
    assert (tmp_path / ".a.recovery" / "lora" / "state.pt").exists()  # the checkpoint survived
    assert not (tmp_path / "a").exists()  # and nothing half-written where the output goes
    from prunewise.cli import main

    assert main(args + ["--output", str(tmp_path / "a")]) == 0  # resumes from step 2
    assert main(args + ["--output", str(tmp_path / "b")]) == 0  # uninterrupted
    import json

    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["recovery"]["parts"][0]["resumed_from"] == 2
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("options, reason", [
    ("tokens=32:seqlen=32:batch=2", "fewer than one step of 2"),
    ("lr=1e30", "recovery diverged at step 1"),
])
def test_bad_recovery_settings_fail_with_one_line(tiny_folder, tmp_path, options, reason):
    from prunewise.api import run
    from prunewise.errors import PrunewiseError

    merged = dict(kv.split("=") for kv in REC.split(":")) | dict(kv.split("=") for kv in options.split(":"))
    with pytest.raises(PrunewiseError) as err:  # each option once: a repeated one is refused
        run(make_recipe(**_base(tiny_folder, tmp_path / "x", score="wanda", sparsity=0.5,
                                recovery=["lora:" + ":".join(f"{k}={v}" for k, v in merged.items())])),
            progress=False)
    assert reason in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "x").exists()


def test_recovery_data_that_overlaps_the_evaluation_text_is_refused(tiny_folder, tmp_path):
    from prunewise.api import run
    from prunewise.errors import PrunewiseError

    with pytest.raises(PrunewiseError) as err:
        run(make_recipe(**_base(tiny_folder, tmp_path / "x", score="wanda", sparsity=0.5,
                                recovery=[{"name": "lora", "data": tiny_folder["eval"], "seqlen": 32, "tokens": 256,
                                           "batch": 2}])), progress=False)
    assert "overlap" in str(err.value).lower() or "share" in str(err.value).lower()
    assert "\n" not in str(err.value)


def test_training_resumed_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    from prunewise.engine.train import TrainSettings, train

    def make():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 4))
        x = torch.randn(32, 4)
        y = torch.randn(32, 8)
        return w, (lambda rows: ((x[rows] @ w.t() - y[rows]) ** 2).mean()), (lambda: float(((x @ w.t() - y) ** 2).mean()))

    s = TrainSettings(steps=10, batch=4, lr=0.05, checkpoint_every=3, eval_every=5)
    w1, loss1, val1 = make()
    train({"w": w1}, loss1, 32, val1, s, progress=False)
    w2, loss2, val2 = make()
    calls = []

    def interrupted(rows):
        calls.append(1)
        if len(calls) == 4 * 7 + 1:  # inside step 8 (4 windows a step, one per call), after the checkpoint of step 6
            raise KeyboardInterrupt
        return loss2(rows)

    with pytest.raises(KeyboardInterrupt):
        train({"w": w2}, interrupted, 32, val2, s, checkpoint=tmp_path / "ck", key="k", progress=False)
    w3, loss3, val3 = make()
    log = train({"w": w3}, loss3, 32, val3, s, checkpoint=tmp_path / "ck", key="k", progress=False)
    assert log.resumed_from == 6 and torch.equal(w3, w1)


def test_recover_command_trains_a_folder_pruned_earlier_and_refuses_a_mask_set_that_does_not_match(tiny_folder,
                                                                                                    tmp_path):
    from prunewise.api import recover, run
    from prunewise.cli import main
    from prunewise.errors import PrunewiseError

    for name, fields in (("p50", {"sparsity": 0.5}), ("p24", {"structure": "2:4"})):
        run(make_recipe(**_base(tiny_folder, tmp_path / name, score="wanda", **fields)), progress=False)
    assert main(["recover", "--model", str(tmp_path / "p50"), "--recover", f"lora:{REC}", "--output",
                 str(tmp_path / "rec"), "--no-progress"]) == 0
    import json

    report = json.loads((tmp_path / "rec" / "report.json").read_text())
    row = report["perplexity"][tiny_folder["eval"]]
    assert row["pruned"] < row["one_shot"]
    weights = _tensors(tmp_path / "rec")
    for name, mask in _masks(tmp_path / "p50").items():
        assert torch.equal(weights[f"{name}.weight"] == 0, mask), name
    with pytest.raises(PrunewiseError) as err:
        recover(str(tmp_path / "p50"), [f"lora:{REC}"], str(tmp_path / "bad"),
                masks=str(tmp_path / "p24" / "masks.safetensors"), progress=False)
    assert "does not match" in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "bad").exists()


def test_a_sweep_cell_with_recovery_reports_one_shot_and_recovered(tiny_folder, tmp_path):
    from prunewise import sweep

    base = make_recipe(**{**_base(tiny_folder, None), "output": None}, recovery=[f"lora:{REC}"])
    summary = sweep.run_sweep(base, ["wanda"], [0.5], ["uniform"], tmp_path / "sweep", progress=False)
    cell = summary["cells"][0]
    assert cell["recovery"]["parts"][0]["steps"] == 16
    name = tiny_folder["eval"]
    assert cell["perplexity"][name] < cell["one_shot"][name]


def test_paser_spends_the_budget_on_the_clusters_pruning_hurt_most():
    """Three well separated groups of candidates: the group that lost most gets most of the budget, its most degraded
    windows first; a near duplicate of a chosen window is skipped; the count is exact."""
    from prunewise.data.selection import cluster_budgets, paser_select

    g = torch.Generator().manual_seed(0)
    centers = torch.eye(3, 16) * 10
    emb = torch.cat([centers[j] + 2.0 * torch.randn(20, 16, generator=g) for j in range(3)])
    deg = torch.cat([torch.linspace(2.0, 1.0, 20), torch.linspace(0.5, 0.1, 20), torch.full((20,), -0.2)])
    emb[1] = emb[0]  # the two most degraded windows of the first group mean the same
    index, info = paser_select(emb, deg, 12, 3)
    assert index.numel() == 12 and info["duplicates_dropped"] >= 1
    assert 1 not in index.tolist() and 0 in index.tolist()
    groups = [int(((index >= 20 * j) & (index < 20 * (j + 1))).sum()) for j in range(3)]
    assert groups[0] > groups[1] > 0 and groups[2] == 0, groups
    first = sorted(i for i in index.tolist() if i < 20)
    assert first == [0] + list(range(2, 2 + len(first) - 1))  # most degraded first, the duplicate skipped
    assert cluster_budgets([5.0, 1.0, 0.0], [2, 10, 10], 8) == [2, 6, 0]  # a full cluster's share moves on


def test_paser_and_random_selection_train_on_the_budget_and_report_it(tiny_folder, tmp_path):
    from prunewise.api import run

    sizes = {}
    for select in ("paser", "random"):
        report = run(make_recipe(**_base(tiny_folder, tmp_path / select, score="wanda", sparsity=0.5,
                                         recovery=[{"name": "lora", "seqlen": 16, "tokens": 128, "batch": 2,
                                                    "select": select, "pool": 3}])), progress=False)
        part = report["recovery"]["parts"][0]
        assert part["windows"] == 8 and part["selection"]["selected"] == 8 and part["selection"]["candidates"] == 24
        sizes[select] = part["selection"]["indices"]
        saved = json.loads((tmp_path / select / "report.json").read_text())["recovery"]["parts"][0]["selection"]
        assert saved["indices"] == part["selection"]["indices"]
    assert len(set(sizes["paser"])) == 8 and sizes["paser"] != sizes["random"]


def test_a_recovery_budget_smaller_than_pasers_clusters_is_refused_with_the_recipe(tiny_folder, tmp_path):
    from prunewise.errors import PrunewiseError

    with pytest.raises(PrunewiseError) as err:
        make_recipe(**_base(tiny_folder, tmp_path / "x", score="wanda", sparsity=0.5,
                            recovery=[{"name": "lora", "seqlen": 16, "tokens": 64, "select": "paser", "clusters": 6}]))
    assert "smaller than the 6 clusters PASER splits it over" in str(err.value) and "\n" not in str(err.value)
