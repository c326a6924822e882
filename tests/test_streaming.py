"""Out of core: a sharded checkpoint pruned block by block from disk to disk, never built in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model, tiny_tokenizer, write_paragraphs
from prunewise.api import MaskSet, run
from prunewise.errors import PrunewiseError
from prunewise.models.lazy import CheckpointTensors, empty_model
from prunewise.recipe import make_recipe


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    tiny_model(layers=3).to(torch.bfloat16).save_pretrained(root / "model", max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(root / "model")
    assert len(list((root / "model").glob("model-*.safetensors"))) > 1  # the source is itself sharded
    return {"root": root, "model": str(root / "model"), "calib": write_paragraphs(root / "calib.txt", 1),
            "eval": write_paragraphs(root / "eval.txt", 2)}


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        out.update(load_file(f))
    return out


def _recipe(sharded, offload: str, out: str, **fields):
    return make_recipe(model=sharded["model"], calibration=sharded["calib"], nsamples=8, seqlen=32,
                       evaluation=[sharded["eval"]], eval_tokens=2000, eval_seqlen=32, completions=False,
                       offload=offload, output=out, overwrite=True, **fields)


def test_meta_tree_holds_no_memory_and_the_reader_finds_every_tensor(sharded):
    model = empty_model(sharded["model"], torch.bfloat16)
    assert all(p.device.type == "meta" for p in model.parameters())
    tensors = CheckpointTensors(sharded["model"])
    assert len(tensors.files) == 29 and len(set(tensors.files.values())) > 1
    read = tensors.read(["model.layers.2.mlp.down_proj.weight"])
    assert read["model.layers.2.mlp.down_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("fields", [{"score": "wanda"}, {"score": "sparsegpt"}, {"score": "wanda", "structure": "2:4"},
                                    {"score": "wanda", "allocation": "owl", "sparsity": 0.6},
                                    {"score": "wanda", "compensation": ["alps"], "allocation": "owl", "sparsity": 0.6},
                                    {"score": "fluctuation", "structure": "width", "sparsity": 0.25,
                                     "allocation": "global", "compensation": ["bias"]},
                                    {"score": "fluctuation", "structure": "width", "sparsity": 0.25,
                                     "allocation": "global", "compensation": ["refit"]}],
                         ids=["wanda", "sparsegpt", "wanda-2of4", "wanda-owl", "wanda-alps-owl", "flap-width-global-bias",
                                                   "width-global-refit"])
def test_streamed_prune_is_bit_identical_to_the_in_memory_prune(sharded, fields):
    root = sharded["root"]
    reports = {off: run(_recipe(sharded, off, str(root / f"out-{off}"), **fields), progress=False)
               for off in ("none", "disk")}
    memory, streamed = _tensors(root / "out-none"), _tensors(root / "out-disk")
    assert memory.keys() == streamed.keys()
    assert all(torch.equal(memory[k], streamed[k]) for k in memory)
    assert reports["disk"]["perplexity"] == reports["none"]["perplexity"]  # dense and pruned, streamed the same way
    assert reports["disk"]["achieved_sparsity"] == reports["none"]["achieved_sparsity"]
    assert reports["disk"]["offload"]["bytes_written"] > 0
    a, b = (MaskSet.load(root / f"out-{off}") for off in ("none", "disk"))  # streamed: packed block by block
    assert a.weights.keys() == b.weights.keys() and all(torch.equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_streamed_output_is_a_complete_sharded_checkpoint_that_stock_transformers_loads(sharded):
    from transformers import AutoModelForCausalLM

    out = sharded["root"] / "out-check"
    report = run(_recipe(sharded, "disk", str(out), score="wanda"), progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = {f: load_file(out / f) for f in set(index["weight_map"].values())}
    assert all(name in shards[f] for name, f in index["weight_map"].items())  # the index is complete
    assert sum(len(s) for s in shards.values()) == len(index["weight_map"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    for name, entry in report["modules"].items():
        weight = dict(model.named_parameters())[f"{name}.weight"]
        assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=1e-6) == entry["sparsity"]
    assert not list(sharded["root"].glob(".out-check.*"))  # no staging or temporary folder left


@pytest.mark.parametrize("fields, message", [
    ({"structure": "blocks", "sparsity": 0.3}, "blocks measures whole-model outputs in memory"),
    ({"score": "gblm"}, "gradient pass needs the model in memory"),
    ({"allocation": {"name": "profile", "nsamples": 2, "seqlen": 16}}, "the profile allocation needs the model in memory"),
])
def test_streaming_refuses_what_needs_the_model_in_memory_before_any_work(sharded, fields, message):
    out = sharded["root"] / "out-refused"
    with pytest.raises(PrunewiseError, match=message):
        run(_recipe(sharded, "disk", str(out), **fields), progress=False)
    assert not out.exists()


def test_streaming_to_a_disk_too_small_fails_before_any_work(sharded, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1000))
    out = sharded["root"] / "out-small"
    with pytest.raises(PrunewiseError, match="MB free"):
        run(_recipe(sharded, "disk", str(out), score="wanda"), progress=False)
    assert not out.exists() and not list(sharded["root"].glob(".out-small.*"))


def test_shards_are_written_without_a_copy_and_read_back_exactly(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from prunewise.engine.streaming import write_safetensors

    tensors = {"w": torch.randn(6, 10).to(torch.bfloat16), "b": torch.randn(7), "ids": torch.arange(5),
               "mask": torch.rand(3, 4) > 0.5, "empty": torch.zeros(0, 4), "scalar": torch.tensor(2.5),
               "strided": torch.randn(4, 4).half()[:, :2]}
    write_safetensors(tmp_path / "x.safetensors", tensors, {"format": "pt"})
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_checkpoint_reads_are_plain_reads_of_exact_tensors_and_a_truncated_shard_is_one_line(tmp_path):
    from safetensors.torch import save_file

    tensors = {"a": torch.randn(5, 3).to(torch.bfloat16), "b": torch.arange(6, dtype=torch.int32), "c": torch.randn(4)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    back = CheckpointTensors(tmp_path).read(["c", "a", "b"])
    assert all(torch.equal(back[k], tensors[k]) and back[k].dtype == tensors[k].dtype for k in tensors)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(PrunewiseError, match="truncated"):
        CheckpointTensors(tmp_path).read(["c", "a", "b"])


@pytest.mark.parametrize("narrow", [torch.bfloat16, torch.float16])
def test_a_wide_tensor_narrowed_while_read_equals_its_cast_and_a_truncated_one_is_one_line(tmp_path, monkeypatch, narrow):
    """Read in bands of 64 bytes (16 float32 values; 101 x 7 leaves a partial last band, a 3-value tensor fits
    one) and cast as read: the same values as reading it whole then ``Tensor.to``; a tensor already narrower
    and an integer one are read as they are stored."""
    from safetensors.torch import save_file

    from prunewise.models import lazy

    monkeypatch.setattr(lazy, "READ_BAND", 64)
    g = torch.Generator().manual_seed(0)
    tensors = {"wide": torch.randn(101, 7, generator=g) * 1e3, "f64": torch.randn(9, 5, dtype=torch.float64, generator=g),
               "half": torch.randn(40, 3, generator=g).to(torch.bfloat16), "ids": torch.arange(50, dtype=torch.int64),
               "small": torch.randn(3)}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    back = CheckpointTensors(tmp_path).read(list(tensors), narrow=narrow)
    for k in ("wide", "f64", "small"):
        assert back[k].dtype == narrow and torch.equal(back[k], tensors[k].to(narrow)), k
    for k in ("half", "ids"):
        assert back[k].dtype == tensors[k].dtype and torch.equal(back[k], tensors[k]), k
    data = (tmp_path / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    import json

    end_of_wide = header_end + json.loads(data[8:header_end])["wide"]["data_offsets"][1]
    (tmp_path / "model.safetensors").write_bytes(data[:end_of_wide - 100])
    with pytest.raises(PrunewiseError, match="truncated") as err:
        CheckpointTensors(tmp_path).read(["wide"], narrow=narrow)
    assert "\n" not in str(err.value)
