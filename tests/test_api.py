"""The recipe, the API, the CLI and export, end to end on a tiny saved model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from prunewise.api import prune, run
from prunewise.cli import main
from prunewise.errors import PrunewiseError
from prunewise.models.adapters import prunable_weights
from prunewise.recipe import Recipe, make_recipe


def _tree_hash(folder) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(folder).rglob("*") if p.is_file()}


def _recipe(tiny, tmp_path, **kw):
    fields = dict(model=tiny["model"], calibration=tiny["calib"], evaluation=[tiny["eval"]], nsamples=4, seqlen=32,
                  eval_tokens=512, eval_seqlen=32, output=str(tmp_path / "out"))
    fields.update(kw)
    return make_recipe(**fields)


@pytest.mark.parametrize("score,structure,allocation", [("wanda", "unstructured", "owl"), ("sparsegpt", "2:4", "uniform"),
                                                        ("magnitude", "unstructured", "global")])
def test_pruned_folder_loads_with_stock_transformers_and_keeps_its_zeros(tiny_folder, tmp_path, score, structure, allocation):
    before = _tree_hash(tiny_folder["model"])
    recipe = _recipe(tiny_folder, tmp_path, score=score, structure=structure, allocation=allocation,
                     sparsity=None if ":" in structure else 0.6)
    report = run(recipe, progress=False)
    out = tmp_path / "out"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    weights = prunable_weights(loaded)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    total = sum(w.numel() for w in weights.values())
    assert zeros / total == pytest.approx(report["achieved_sparsity"])
    assert abs(report["achieved_sparsity"] - recipe.sparsity) < 1e-3
    assert {"recipe.yaml", "plan.json", "report.json", "report.md", "config.json"} <= {p.name for p in out.iterdir()}
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert report["perplexity"][tiny_folder["eval"]]["pruned"] > 1
    assert _tree_hash(tiny_folder["model"]) == before  # the source is never modified
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_recipe_round_trips_through_yaml_and_the_cli_reproduces_the_api(tiny_folder, tmp_path):
    recipe = _recipe(tiny_folder, tmp_path, score="wanda", evaluation=[], output=None)
    path = tmp_path / "r.yaml"
    path.write_text(recipe.to_yaml())
    assert Recipe.from_yaml(path) == recipe
    api = prune(recipe, progress=False)
    assert main(["prune", "--recipe", str(path), "--output", str(tmp_path / "cli"), "--no-progress"]) == 0
    cli = AutoModelForCausalLM.from_pretrained(tmp_path / "cli")
    for (name, a), b in zip(prunable_weights(api.model).items(), prunable_weights(cli).values()):
        assert torch.equal(a, b), name


def test_a_saved_plan_is_reused_with_another_score(tiny_folder, tmp_path):
    run(_recipe(tiny_folder, tmp_path, score="wanda", allocation="owl", sparsity=0.7, evaluation=[]), progress=False)
    plan_path = tmp_path / "out" / "plan.json"
    plan = json.loads(plan_path.read_text())
    again = prune(_recipe(tiny_folder, tmp_path, score="sparsegpt", plan=str(plan_path), evaluation=[], output=None), progress=False)
    for name, w in prunable_weights(again.model).items():
        assert int((w == 0).sum()) == round(plan["modules"][name] * w.numel()), name


def test_existing_output_is_refused_unless_overwrite(tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PrunewiseError, match="--overwrite"):
        run(_recipe(tiny_folder, tmp_path, evaluation=[]), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(PrunewiseError, match="holds files prunewise did not write"):  # --overwrite spares them too
        run(_recipe(tiny_folder, tmp_path, evaluation=[], overwrite=True), progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    (out / ".prunewise-output").write_text("")  # a folder prunewise wrote is replaced
    run(_recipe(tiny_folder, tmp_path, evaluation=[], overwrite=True), progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_interrupted_save_leaves_no_output(tiny_folder, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    def interrupted(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(_recipe(tiny_folder, tmp_path, evaluation=[]), progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def _cli_error(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("extra,expected", [
    (["--sparsity", "1.0"], "outside [0, 1)"),
    (["--sparsity", "-0.1"], "outside [0, 1)"),
    (["--structure", "2:3"], "divisible by 3"),
    (["--structure", "4:4"], "0 < N < M"),
    (["--structure", "2:4", "--sparsity", "0.6"], "contradicts 2:4"),
    (["--score", "obs"], "score"),
    (["--allocation", "global", "--structure", "2:4"], "global allocation"),
])
def test_bad_prune_options_give_one_line_errors(tiny_folder, tmp_path, capsys, extra, expected):
    argv = ["prune", "--model", tiny_folder["model"], "--calibration", tiny_folder["calib"], "--nsamples", "2",
            "--seqlen", "16", "--eval", "--no-progress"] + extra
    assert expected in _cli_error(capsys, argv)


def test_bad_data_gives_one_line_errors(tiny_folder, tmp_path, capsys):
    base = ["prune", "--model", tiny_folder["model"], "--nsamples", "2", "--seqlen", "16", "--no-progress"]
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _cli_error(capsys, base + ["--calibration", str(empty), "--eval"]).lower()
    short = tmp_path / "short.txt"
    short.write_text("the fox")
    assert "tokens" in _cli_error(capsys, base + ["--calibration", str(short), "--eval"])
    assert "overlap" in _cli_error(capsys, base + ["--calibration", tiny_folder["calib"], "--eval", tiny_folder["calib"]]).lower()
    assert "unknown model" in _cli_error(capsys, ["prune", "--model", str(tmp_path / "nope"), "--eval"])


def test_nan_weights_are_refused_before_pruning(tiny_folder, tmp_path, capsys):
    st = Path(tiny_folder["model"]) / "model.safetensors"
    tensors = load_file(st)
    key = next(k for k in tensors if "layers.1.mlp.up_proj" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, st, metadata={"format": "pt"})
    err = _cli_error(capsys, ["prune", "--model", tiny_folder["model"], "--calibration", tiny_folder["calib"],
                              "--nsamples", "2", "--seqlen", "16", "--eval", "--no-progress"])
    assert "NaN" in err and "layers.1.mlp.up_proj" in err
