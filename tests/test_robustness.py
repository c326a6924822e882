"""Reliability, second round: bad input on the newer surfaces (sweep, recover, apply-masks, plans, budgets, recipes,
compensation options). Each case ends in exit 2 with one line naming the problem and the fix, writes no output and
changes no file it did not create; or, where accepting is right, does the right thing. Faults (a full disk, damaged
files) are in test_faults.py. docs/robustness.md lists every case with its test.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from conftest import tiny_model, tiny_tokenizer, write_paragraphs
from prunewise.cli import main
from prunewise.errors import PrunewiseError
from prunewise.recipe import make_recipe

REC = "seqlen=32:tokens=1024:batch=2:lr=0.01:val_windows=4:eval_every=4:checkpoint_every=2"


def _tree_hash(*folders) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if not line.startswith("WARNING")]
    assert len(lines) == 1 and lines[0].startswith("prunewise: error: ") and "Traceback" not in err, err
    return lines[0]


def _save(folder: Path, **shape) -> str:
    tiny_model("llama", **shape).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Folders pruned once for the module: P (Wanda 50%), C (channels 50%), E (EoRA rank 8), C3 (channels of a
    3-layer model 192 wide); W a dense model whose MLP is 256 wide (C was made for 128)."""
    from prunewise.api import run

    base = tmp_path_factory.mktemp("made")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRUNEWISE_CACHE", str(base / "cache"))
        setup = {"model": _save(base / "m"), "calib": write_paragraphs(base / "calib.txt", 1),
                 "eval": write_paragraphs(base / "eval.txt", 2), "W": _save(base / "wide", intermediate=256),
                 "deep": _save(base / "deep", layers=3, intermediate=192)}
        common = dict(calibration=setup["calib"], nsamples=4, seqlen=16, evaluation=[], eval_tokens=256,
                      eval_seqlen=32, completions=False)
        for name, model, fields in (("P", setup["model"], {"sparsity": 0.5}),
                                    ("C", setup["model"], {"structure": "channels", "sparsity": 0.5}),
                                    ("E", setup["model"], {"sparsity": 0.5, "compensation": ["eora:8"],
                                                           "evaluation": [setup["eval"]]}),
                                    ("C3", setup["deep"], {"structure": "channels", "sparsity": 0.5})):
            run(make_recipe(model=model, output=str(base / name), **{**common, **fields}), progress=False)
            setup[name] = str(base / name)
    setup["base"] = base
    return setup


# ------------------------------------------------------------------ sweep: outputs, reuse, grid


def _sweep(setup: dict, out, *extra: str) -> list[str]:
    return ["sweep", "--model", setup["model"], "--calibration", setup["calib"], "--eval", setup["eval"],
            "--eval-tokens", "256", "--eval-seqlen", "32", "--nsamples", "4", "--seqlen", "16", "--scores",
            "magnitude", "--sparsities", "0.3", "--no-completions", "--output", str(out), "--no-progress", *extra]


@pytest.mark.parametrize("holder", ["users-files", "pruned-model"])
def test_a_sweep_into_a_folder_it_did_not_write_is_refused(made, tmp_path, capsys, holder):
    folder = tmp_path / "mine"
    if holder == "users-files":
        folder.mkdir()
        (folder / "report.md").write_text("my notes")
        (folder / "sweep.json").write_text('{"mine": true}')
    else:
        import shutil

        shutil.copytree(made["P"], folder)
    before = _tree_hash(folder)
    assert main(_sweep(made, folder)) == 2
    err = _one_error_line(capsys)
    assert "a sweep writes a new folder or resumes one an earlier sweep wrote" in err
    assert ("did not write" if holder == "users-files" else "pruned model prunewise wrote") in err
    assert _tree_hash(folder) == before and not list(tmp_path.glob(".mine*"))


@pytest.fixture
def no_figures(monkeypatch):
    from prunewise import sweep

    monkeypatch.setattr(sweep, "write_sweep_report", lambda out, summary: None)  # the report's figures take seconds


def test_a_sweep_over_a_replaced_model_recomputes_and_a_sweep_folder_resumes(made, tmp_path, capsys, no_figures):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(made["model"], model)
    setup = {**made, "model": str(model)}
    out = tmp_path / "sweep"
    assert main(_sweep(setup, out)) == 0
    dense = json.loads((out / "dense.json").read_text())
    assert main(_sweep(setup, out)) == 0
    assert "magnitude-uniform-0.3: done before" in capsys.readouterr().out  # the same inputs: reused
    tiny_model("llama", seed=7).save_pretrained(model)  # another model, the same shapes, the same folder
    assert main(_sweep(setup, out)) == 0
    printed = capsys.readouterr()
    assert "magnitude-uniform-0.3: finished" in printed.out and "done before" not in printed.out
    assert json.loads((out / "dense.json").read_text())["perplexity"] != dense["perplexity"]
    (out / ".prunewise-output").unlink()  # a sweep folder of an earlier version (dense.json, cells/): resumes
    assert main(_sweep(setup, out)) == 0
    assert "done before" in capsys.readouterr().out


def test_repeated_grid_values_run_once_and_colliding_ones_are_refused(made, tmp_path, capsys, caplog, no_figures):
    out = tmp_path / "sweep"
    args = _sweep(made, out)
    args[args.index("magnitude")] = "magnitude magnitude"
    args[args.index("0.3")] = "0.3,0.3"
    assert main(args) == 0
    assert "sweep: 1/1 cells" in capsys.readouterr().out and "--sparsities lists 0.3 more than once" in caplog.text
    assert json.loads((out / "sweep.json").read_text())["grid_size"] == 1
    args[args.index("0.3,0.3")] = "0.3,0.3000000001"
    args[args.index(str(out))] = str(tmp_path / "other")
    assert main(args) == 2
    assert "both name the cell magnitude-uniform-0.3" in _one_error_line(capsys)
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------ recover and apply-masks: the mask set fits


def test_recover_refuses_channel_masks_for_an_unstructured_folder(made, tmp_path, capsys):
    before = _tree_hash(made["P"], made["C"])
    assert main(["recover", "--model", made["P"], "--masks", made["C"], "--recover", f"lora:{REC}", "--output",
                 str(tmp_path / "out"), "--no-progress"]) == 2
    err = _one_error_line(capsys)
    assert "the mask set is channels but the model was pruned unstructured" in err and "masks.safetensors" in err
    assert not (tmp_path / "out").exists() and _tree_hash(made["P"], made["C"]) == before


@pytest.mark.parametrize("model, masks, expected", [
    ("W", "C", "widths (MLP, heads, key/value heads) (128, 4, 2), this model's are (256, 4, 2)"),
    ("model", "C3", "made for a model of 3 blocks, this one has 2"),
    ("model", "C3-legacy", "covers blocks 0-2 (3), this model has 2"),  # a mask file without what it was made for
    ("W", "P", "has shape (64, 128), the weight (64, 256)"),
])
def test_apply_masks_refuses_a_mask_set_made_for_another_model(made, tmp_path, capsys, model, masks, expected):
    if masks == "C3-legacy":
        masks = _strip_metadata(Path(made["C3"]) / "masks.safetensors", tmp_path / "legacy.safetensors")
    else:
        masks = made[masks]
    before = _tree_hash(made[model])
    assert main(["apply-masks", "--model", made[model], "--masks", str(masks), "--output", str(tmp_path / "x")]) == 2
    err = _one_error_line(capsys)
    assert expected in err and err.endswith("apply the mask set to the model it was made for")
    assert not (tmp_path / "x").exists() and _tree_hash(made[model]) == before


def _strip_metadata(src: Path, dest: Path) -> Path:
    """A copy of a mask file as versions before the checksum wrote it: no sha256, no made_for."""
    data = src.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    for key in ("sha256", "made_for"):
        header["__metadata__"].pop(key, None)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    dest.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    return dest


def test_recover_keeps_the_eora_adapter_and_the_masks_of_its_folder(made, tmp_path, capsys):
    out = tmp_path / "rec"
    assert main(["recover", "--model", made["E"], "--recover", f"lora:{REC}", "--output", str(out),
                 "--no-progress"]) == 0
    src = Path(made["E"])
    for name in ("eora/adapter_config.json", "eora/adapter_model.safetensors", "masks.safetensors", "plan.json"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    report = json.loads((out / "report.json").read_text())
    assert report["adapters_kept"] == ["eora"]
    one_shot = json.loads((src / "report.json").read_text())["perplexity"][made["eval"]]["pruned"]
    assert report["perplexity"][made["eval"]]["one_shot"] == pytest.approx(one_shot, rel=1e-6)  # eora computed with
    weights = load_file(str(out / "model.safetensors"))
    from prunewise.core.masks import MaskSet

    for name, mask in MaskSet.load(src).weight_masks():
        assert bool((weights[f"{name}.weight"] == 0).eq(mask).all()), name


def test_a_learning_rate_that_blows_the_weights_up_stops_and_rolls_back(made, tmp_path, capsys):
    before = _tree_hash(made["P"])
    assert main(["recover", "--model", made["P"], "--recover", "lora:seqlen=32:tokens=1024:batch=2", "--recover-lr",
                 "1e9", "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = _one_error_line(capsys)
    assert "recovery diverged at step 1" in err and "peak 1e+09" in err and "--recover-lr" in err
    assert "rolled back" in err and not (tmp_path / "out").exists() and _tree_hash(made["P"]) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]  # no checkpoint folder, lock or temporary folder


def test_a_loss_that_blows_up_without_nan_stops_the_training_and_rolls_back():
    import torch

    from prunewise.engine.train import TrainSettings, train

    w = torch.nn.Parameter(torch.ones(4))
    calls = []

    def loss_of(rows):  # finite throughout, but 50 nats above where it started after three steps
        calls.append(1)
        return (w.sum() - 4) * 0 + (1.0 if len(calls) < 4 else 50.0)

    with pytest.raises(PrunewiseError) as err:
        train({"w": w}, loss_of, 8, lambda: 0.0, TrainSettings(steps=6, batch=1, lr=0.1), progress=False)
    message = str(err.value)
    assert "recovery diverged at step 4: the recovery loss blew up from 1 to 50" in message and "\n" not in message
    assert "learning rate" in message and "rolled back to step 3" in message
    assert torch.isfinite(w).all()


def test_absurd_recovery_tokens_on_task_data_are_one_line_without_allocating(made, tmp_path, capsys):
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"prompt": f"the fox {i}", "completion": " jumps"}) + "\n" for i in range(20)))
    assert main(["recover", "--model", made["P"], "--recover", "lora:seqlen=32:batch=2", "--recover-data", str(qa),
                 "--recover-tokens", "99999999999999999999", "--output", str(tmp_path / "out"), "--no-progress"]) == 2
    err = _one_error_line(capsys)
    assert "GB for its token ids" in err and "lower --recover-tokens" in err
    assert not (tmp_path / "out").exists()


def test_recipe_data_paths_are_stored_absolute_and_recover_finds_them_from_another_folder(made, tmp_path, monkeypatch):
    import shutil

    from prunewise.api import run

    work = tmp_path / "work"
    work.mkdir()
    for name in ("calib.txt", "eval.txt"):
        shutil.copy(Path(made["base"]) / name, work / name)
    monkeypatch.chdir(work)
    run(make_recipe(model=made["model"], calibration="calib.txt", evaluation=["eval.txt"], nsamples=4, seqlen=16,
                    eval_tokens=256, eval_seqlen=32, completions=False, output="pruned"), progress=False)
    recipe = (work / "pruned" / "recipe.yaml").read_text()
    assert f"calibration: {work / 'calib.txt'}" in recipe and f"- {work / 'eval.txt'}" in recipe
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["recover", "--model", str(work / "pruned"), "--recover", f"lora:{REC}", "--output", "rec",
                 "--no-progress"]) == 0
    assert (elsewhere / "rec" / "model.safetensors").is_file()


# ------------------------------------------------------------------ recipes: type, range, duplicates


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty"),
    (b"- sparsity\n- 0.5\n", "must be a YAML mapping of recipe fields (field: value), not a list"),
    (b"sparsity: 0.5\nmodel: caf\xe9\n", "is not UTF-8 text (byte 24 is 0xe9)"),
    (None, "is a folder; give the recipe file itself"),
    (b"compensation: 5\n", "compensation must be a part name, names separated by commas or a list of parts, not 5"),
    (b"recovery: 7\n", "recovery must be a part name, names separated by commas or a list of parts, not 7"),
    (b"score: wanda\nsparsity: .nan\n", "sparsity: Input should be a finite number"),
], ids=["empty", "list", "latin-1", "folder", "compensation-5", "recovery-7", "nan"])
def test_bad_recipe_files_are_one_line(tmp_path, capsys, content, expected):
    path = tmp_path / "recipe.yaml"
    if content is None:
        path = tmp_path / "recipes"
        path.mkdir()
    else:
        path.write_bytes(content)
    assert main(["prune", "--recipe", str(path), "--output", str(tmp_path / "out")]) == 2
    assert expected in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_a_compensation_string_is_read_as_part_names(tmp_path):
    from prunewise.recipe import Recipe

    path = tmp_path / "recipe.yaml"
    for text, names in (("obs", ["obs"]), ("obs, dsnot", ["obs", "dsnot"]), ("eora:4", ["eora"])):
        path.write_text(f"compensation: {text}\nrecovery: lora\n")
        recipe = Recipe.from_yaml(path)
        assert [c["name"] for c in recipe.compensation] == names and recipe.recovery[0]["name"] == "lora"


@pytest.mark.parametrize("flags, expected", [
    (["--compensate", "eora:8,eora:16"], "compensation names eora twice"),
    (["--compensate", "obs,obs"], "compensation names obs twice"),
    (["--compensate", "dsnot,dsnot"], "compensation names dsnot twice"),
    (["--compensate", "obs:damp=0.01:damp=5"], "'obs:damp=0.01:damp=5' sets damp twice"),
    (["--compensate", "eora:16:rank=8"], "'eora:16:rank=8' sets rank twice"),
    (["--compensate", "obs:damp=inf"], "compensation obs: damp: Input should be a finite number"),
    (["--score", "sparsegpt:damp=nan"], "damp: Input should be a finite number"),
    (["--budget", "remove_params=nan"], "must be a finite number of parameters or bytes"),
    (["--budget", "keep_params=inf"], "must be a finite number of parameters or bytes"),
    (["--budget", "keep_params=-5"], "must be a finite number of parameters or bytes"),
    (["--propagate", "dense", "--within-block", "sequential"], "cannot be combined with --within-block sequential"),
    (["--propagate", "pruned-ish"], "propagate: Input should be 'pruned' or 'dense'"),
])
def test_duplicated_parts_or_options_and_non_finite_numbers_are_refused_at_validation(made, tmp_path, capsys, flags,
                                                                                      expected):
    assert main(["prune", "--model", made["model"], "--output", str(tmp_path / "out"), *flags]) == 2
    err = _one_error_line(capsys)
    assert expected in err and "invalid recipe" in err
    assert not (tmp_path / "out").exists()


def _prune(made: dict, out, *extra: str) -> list[str]:
    return ["prune", "--model", made["model"], "--calibration", made["calib"], "--eval", "--nsamples", "4",
            "--seqlen", "16", "--no-completions", "--output", str(out), "--no-progress", *extra]


def test_an_eora_rank_at_a_layers_full_rank_is_refused_before_pruning(made, tmp_path, capsys, monkeypatch):
    from prunewise.engine import sequential

    def walked(*a, **k):
        raise AssertionError("pruning started")

    monkeypatch.setattr(sequential.SequentialEngine, "run", walked)
    assert main(_prune(made, tmp_path / "out", "--compensate", "eora:100000")) == 2
    err = _one_error_line(capsys)
    assert "eora rank 100000 is not below the rank of model.layers.0.self_attn.q_proj" in err
    assert "undo the pruning" in err and not (tmp_path / "out").exists()
    assert main(_prune(made, tmp_path / "out", "--compensate", "eora:32")) == 2  # k_proj is 32 x 64: rank 32 is full
    assert "self_attn.k_proj ((32, 64), at most 32)" in _one_error_line(capsys)


def test_a_budget_that_removes_every_prunable_weight_is_refused_like_sparsity_one(made, tmp_path, capsys):
    from prunewise.models.adapters import prunable_weights

    model = tiny_model("llama")
    total = sum(w.numel() for w in prunable_weights(model).values())
    others = sum(p.numel() for p in model.parameters()) - total
    for budget in (f"remove_params={total}", f"keep_params={others}"):
        assert main(_prune(made, tmp_path / "out", "--budget", budget)) == 2
        err = _one_error_line(capsys)
        assert f"removes all {total} prunable weights (sparsity 1.0" in err and "keeps some" in err
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("level", [1.5, 1.0, -0.5, "NaN"])
def test_plan_levels_outside_zero_to_one_are_refused(made, tmp_path, capsys, level):
    plan = json.loads((Path(made["P"]) / "plan.json").read_text())
    first = next(iter(plan["modules"]))
    text = json.dumps({**plan, "modules": {**plan["modules"], first: "LEVEL"}}).replace('"LEVEL"', str(level))
    (tmp_path / "plan.json").write_text(text)
    assert main(_prune(made, tmp_path / "out", "--plan", str(tmp_path / "plan.json"))) == 2
    err = _one_error_line(capsys)
    assert f"gives {first} the level {float(level)}, outside [0, 1)" in err
    assert not (tmp_path / "out").exists()


def test_a_sparsity_beside_a_plan_must_be_the_plans_own(made, tmp_path, capsys):
    plan = str(Path(made["P"]) / "plan.json")
    assert main(_prune(made, tmp_path / "out", "--plan", plan, "--sparsity", "0.7")) == 2
    assert "sparsity 0.7 contradicts the plan" in _one_error_line(capsys) and not (tmp_path / "out").exists()
    recipe = make_recipe(model=made["model"], plan=plan)  # no sparsity: the plan's own (a saved recipe carries it)
    assert recipe.sparsity == pytest.approx(0.5, abs=1e-4)
    assert make_recipe(**{**recipe.model_dump(), "sparsity": recipe.sparsity + 5e-5}).plan == plan
    with pytest.raises(PrunewiseError, match="give --plan or --budget, not both"):
        make_recipe(model=made["model"], plan=plan, budget="keep_params=1000")


# ------------------------------------------------------------------ dtypes


def test_a_weight_beyond_float16s_range_is_named_an_overflow_not_corruption(tmp_path, capsys, made):
    folder = Path(_save(tmp_path / "big"))
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    args = ["prune", "--model", str(folder), "--calibration", made["calib"], "--eval", "--no-completions",
            "--nsamples", "4", "--seqlen", "16", "--no-progress", "--dtype", "float16"]
    for extra in ([], ["--offload", "disk"]):
        assert main([*args, *extra, "--output", str(tmp_path / "out")]) == 2
        err = _one_error_line(capsys)
        assert "model.layers.0.mlp.up_proj.weight" in err and "overflow float16" in err
        assert "--dtype bfloat16 or float32" in err and "corrupt checkpoint" in err
        assert not (tmp_path / "out").exists()
    assert main([*args[:-2], "--dtype", "bfloat16", "--output", str(tmp_path / "out")]) == 0  # the advice works
    assert math.isfinite(json.loads((tmp_path / "out" / "report.json").read_text())["achieved_sparsity"])
    assert os.path.isdir(tmp_path / "out")


# ------------------------------------------------------------------ a second, independent probe of the same surfaces


def test_budget_beside_sparsity_is_refused_and_a_sweep_takes_no_budget(made, tmp_path, capsys):
    args = ["prune", "--model", made["model"], "--calibration", made["calib"], "--budget", "keep_params=50000",
            "--sparsity", "0.5", "--output", str(tmp_path / "o")]
    assert main(args) == 2 and "both say how much to remove" in _one_error_line(capsys)
    assert main(_sweep(made, tmp_path / "s", "--budget", "keep_params=50000")) == 2
    assert "leave --budget" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


@pytest.mark.parametrize("damage", ["cells-file", "figures-file", "dense-folder", "cell-folder"])
def test_a_damaged_sweep_folder_is_one_line_before_any_work(made, tmp_path, capsys, damage):
    out = tmp_path / "sw"
    assert main(_sweep(made, out)) == 0
    capsys.readouterr()
    target = {"cells-file": out / "cells", "figures-file": out / "figures", "dense-folder": out / "dense.json",
              "cell-folder": out / "cells" / "magnitude-uniform-0.3.json"}[damage]
    import shutil

    shutil.rmtree(target) if target.is_dir() else target.unlink()
    target.write_text("x") if damage.endswith("-file") else target.mkdir()
    before = _tree_hash(out)
    assert main(_sweep(made, out)) == 2
    assert "is damaged" in _one_error_line(capsys)
    assert _tree_hash(out) == before and not list(out.rglob(".*.tmp*"))


def test_save_models_on_a_rerun_saves_the_models_of_cells_done_before(made, tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(_sweep(made, out)) == 0
    assert main(_sweep(made, out, "--save-models")) == 0
    assert (out / "models" / "magnitude-uniform-0.3" / "config.json").is_file()


def test_eval_none_skips_the_evaluation(made, tmp_path, capsys):
    from prunewise.cli import _data_list

    assert _data_list(["none"]) == [] and _data_list(None) == [] and _data_list(["wiki-test"]) == ["wiki-test"]
    with pytest.raises(PrunewiseError, match="skips the evaluation on its own"):
        _data_list(["none", "wiki-test"])


def test_a_mask_file_without_checksum_missing_or_cut_tensors_is_refused(made, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(Path(made["P"]) / "masks.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.pop("sha256")  # as a file written before the checksum
    half = {k: v for k, v in tensors.items() if ".layers.1." not in k}
    cut = dict(tensors)
    key = next(k for k in cut if k.endswith("up_proj"))
    cut[key] = cut[key][:10].clone()
    for name, data, reason in (("half", half, "masks its metadata lists are missing"), ("cut", cut, "bytes, its shape")):
        path = tmp_path / f"{name}.safetensors"
        save_file(data, str(path), metadata=meta)
        out = tmp_path / f"out-{name}"
        assert main(["apply-masks", "--model", made["model"], "--masks", str(path), "--output", str(out)]) == 2
        assert reason in _one_error_line(capsys) and not out.exists()


def test_a_plan_made_for_another_structure_is_refused(made):
    with pytest.raises(PrunewiseError, match="was made for structure channels, not unstructured"):
        make_recipe(model=made["model"], plan=str(Path(made["C"]) / "plan.json"))


def test_yaml_keys_given_twice_and_booleans_for_counts_are_refused(tmp_path):
    from prunewise.recipe import Recipe

    (tmp_path / "dup.yaml").write_text("sparsity: 0.5\nsparsity: 0.6\n")
    (tmp_path / "bool.yaml").write_text("nsamples: true\n")
    with pytest.raises(PrunewiseError, match="the key 'sparsity' is given twice"):
        Recipe.from_yaml(tmp_path / "dup.yaml")
    with pytest.raises(PrunewiseError, match="nsamples: must be a whole number, not True"):
        Recipe.from_yaml(tmp_path / "bool.yaml")


def test_export_refuses_a_folder_with_someone_elses_manifest(tmp_path):
    from prunewise.mirror import export_data

    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "manifest.json").write_text('{"name": "my web app"}')
    with pytest.raises(PrunewiseError, match="holds no prunewise data export"):
        export_data(tmp_path / "app", corpora_names=[], tasks=[])
    assert (tmp_path / "app" / "manifest.json").read_text() == '{"name": "my web app"}'


def test_eval_applies_the_adapters_beside_the_weights_and_apply_masks_refuses_to_drop_them(made, tmp_path, capsys):
    report = json.loads((Path(made["E"]) / "report.json").read_text())
    expected = report["perplexity"][made["eval"]]["pruned"]  # the prune's own figure, with its EoRA adapter
    assert main(["eval", "--model", made["E"], "--data", made["eval"], "--eval-tokens", "256", "--seqlen", "32",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "applied: eora/" in out
    measured = float(out.strip().splitlines()[-1].split()[-1])
    assert measured == pytest.approx(expected, rel=1e-4)
    before = _tree_hash(made["E"])
    assert main(["apply-masks", "--model", made["E"], "--masks", made["P"], "--output", str(tmp_path / "o")]) == 2
    assert "which apply-masks would drop" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists() and _tree_hash(made["E"]) == before


def test_a_per_module_plan_driving_channels_names_the_attention_levels_it_leaves(made, tmp_path, caplog):
    from prunewise.api import run

    recipe = make_recipe(model=made["model"], plan=str(Path(made["P"]) / "plan.json"), structure="channels",
                         score="magnitude", calibration=made["calib"], nsamples=4, seqlen=16, evaluation=[],
                         completions=False)
    with caplog.at_level("WARNING"):
        run(recipe, progress=False)
    assert any("which --structure channels does not remove" in r.getMessage() for r in caplog.records)
