"""Devices and storage precision: blocks onloaded one at a time, bf16 storage with float32 compute on the CPU."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model, tiny_tokenizer, write_paragraphs
from prunewise.api import prune
from prunewise.engine.placement import Placement, parse_device, placed, resolve_device
from prunewise.engine.sequential import SequentialEngine
from prunewise.errors import PrunewiseError
from prunewise.evaluate.perplexity import perplexity
from prunewise.models.adapters import get_adapter
from prunewise.models.loading import load_model
from prunewise.recipe import make_recipe


def test_float32_on_the_cpu_is_trivial_and_moves_nothing():
    model = tiny_model()
    placement = Placement.of(model, "cpu")
    assert placement.trivial and placement.compute == torch.float32
    block = get_adapter(model).blocks(model)[0]
    before = {n: p.data_ptr() for n, p in block.named_parameters()}
    assert placement.onload(block) is None
    assert {n: p.data_ptr() for n, p in block.named_parameters()} == before


def test_bf16_block_onloads_in_float32_and_offloads_what_was_computed():
    model = tiny_model().to(torch.bfloat16)
    placement = Placement.of(model)
    assert not placement.trivial and placement.compute == torch.float32
    block = get_adapter(model).blocks(model)[0]
    q = block.self_attn.q_proj
    stored = q.weight.data
    saved = placement.onload(block)
    assert q.weight.dtype == torch.float32 and torch.equal(q.weight.data, stored.float())
    q.weight.data[0, :5] = 0.0
    q.weight.data[1, 0] = 1.0 + 2 ** -12  # not representable in bf16: rounds on the way back
    placement.offload(block, saved, write_back=True)
    assert q.weight.dtype == torch.bfloat16 and q.weight.data_ptr() == stored.data_ptr()  # into the stored tensor
    assert (q.weight[0, :5] == 0).all() and q.weight[1, 0].item() == 1.0
    saved = placement.onload(block)
    q.weight.data.zero_()
    placement.offload(block, saved, write_back=False)  # evaluation: nothing computed is kept
    assert q.weight.abs().sum() > 0


def test_embedding_table_stays_stored_and_only_its_rows_are_cast():
    model = tiny_model().to(torch.bfloat16)
    placement = Placement.of(model)
    embed = model.model.embed_tokens
    stored = embed.weight.data
    saved = placement.onload(embed)
    assert embed.weight.dtype == torch.bfloat16 and embed.weight.data_ptr() == stored.data_ptr()  # no float32 copy
    ids = torch.randint(0, 256, (2, 8))
    out = embed(ids)
    assert out.dtype == torch.float32 and torch.equal(out, torch.nn.functional.embedding(ids, stored.float()))
    placement.offload(embed, saved, write_back=False)
    assert embed(ids).dtype == torch.bfloat16  # the cast is gone with the onload


def test_head_computes_in_bands_from_its_stored_weight():
    model = tiny_model().to(torch.bfloat16)
    placement = Placement.of(model)
    head = model.lm_head
    stored = head.weight.data
    x = torch.randn(2, 5, head.in_features, generator=torch.Generator().manual_seed(1))
    seen = []
    handle = head.register_forward_pre_hook(lambda m, a: seen.append((m.weight.dtype, m.weight.data_ptr())))
    with placed(model, get_adapter(model), placement):
        assert "forward" in vars(head)
        out = model(input_ids=torch.randint(0, 256, (1, 6))).logits
    handle.remove()
    assert seen == [(torch.bfloat16, stored.data_ptr())] and out.dtype == torch.float32  # no float32 copy of the head
    assert "forward" not in vars(head) and head(x.bfloat16()).dtype == torch.bfloat16  # the override is gone
    whole = torch.nn.functional.linear(x, stored.float())
    assert torch.equal(placement._banded_linear(head, x), whole)
    assert torch.allclose(placement._banded_linear(head, x, band_elements=3 * head.in_features), whole,
                          rtol=1e-6, atol=1e-6)  # many small bands: every output row computed once, in place


def test_capture_runs_no_block():
    model = tiny_model()
    adapter = get_adapter(model)
    calls = []
    handles = [b.self_attn.q_proj.register_forward_hook(lambda *a: calls.append(1)) for b in adapter.blocks(model)]
    windows = torch.randint(0, 256, (4, 16))
    cap = SequentialEngine(model, adapter, windows, progress=False).capture()
    for h in handles:
        h.remove()
    assert calls == []
    assert torch.equal(cap.hidden, model.model.embed_tokens(windows))  # llama: the block-0 input is the embedding
    assert len(cap.kwargs) == 2 and all("position_embeddings" in kw for kw in cap.kwargs)


def test_placed_forward_of_a_bf16_model_equals_its_float32_upcast():
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(3))
    model = tiny_model().to(torch.bfloat16)
    with placed(model, get_adapter(model), Placement.of(model)):
        streamed = perplexity(model, windows, progress=False)
        with placed(model, get_adapter(model), Placement.of(model)):  # nested (run -> evaluate): placed once
            assert perplexity(model, windows, progress=False) == streamed
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the model is left as stored
    upcast = perplexity(tiny_model().to(torch.bfloat16).float(), windows, progress=False)
    assert streamed == pytest.approx(upcast, rel=1e-6)


@pytest.fixture
def bf16_folder(tmp_path):
    folder = tmp_path / "tiny-bf16"
    tiny_model().to(torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return {"model": str(folder), "calib": write_paragraphs(tmp_path / "calib.txt", 1)}


def test_dtype_auto_is_the_checkpoint_dtype(bf16_folder, tiny_folder):
    assert next(load_model(bf16_folder["model"], "auto")[0].parameters()).dtype == torch.bfloat16
    assert next(load_model(tiny_folder["model"], "auto")[0].parameters()).dtype == torch.float32
    assert next(load_model(tiny_folder["model"], "bf16")[0].parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("score", ["wanda", "sparsegpt"])
def test_bf16_prune_keeps_bf16_and_agrees_with_float32(bf16_folder, score):
    masks = {}
    for dtype in ("float32", "bfloat16"):
        recipe = make_recipe(model=bf16_folder["model"], calibration=bf16_folder["calib"], nsamples=8, seqlen=32,
                             evaluation=[], score=score, dtype=dtype)
        model, tok = load_model(recipe.model, recipe.dtype)
        result = prune(recipe, model, tok, progress=False)
        assert {p.dtype for p in result.model.parameters()} == {getattr(torch, dtype)}
        for name, mask in result.masks.weight_masks():
            weight = dict(result.model.named_parameters())[f"{name}.weight"]
            assert (weight[mask] == 0).all()  # every masked weight exactly zero in the stored dtype
            if score == "wanda":  # 50% per row (SparseGPT chooses within column blocks)
                assert (mask.sum(1) == mask.shape[1] // 2).all()
        assert result.report["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
        masks[dtype] = dict(result.masks.weight_masks())
    differ = sum(int((masks["float32"][n] != masks["bfloat16"][n]).sum()) for n in masks["float32"])
    total = sum(m.numel() for m in masks["float32"].values())
    assert differ / total < 0.02  # the same weights are 2-byte rounded: a few ties flip, no more


def test_device_and_dtype_errors_are_one_line():
    with pytest.raises(PrunewiseError, match="unknown device 'tpu'"):
        make_recipe(device="tpu")
    with pytest.raises(PrunewiseError, match="unknown dtype 'int8'"):
        make_recipe(dtype="int8")
    assert parse_device("cuda:1") == "cuda:1"
    if not torch.cuda.is_available():
        with pytest.raises(PrunewiseError, match="no CUDA GPU"):
            resolve_device("cuda")
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu_fails_before_any_work(tiny_folder, tmp_path):
    from prunewise.api import run

    out = tmp_path / "out"
    recipe = make_recipe(model=tiny_folder["model"], calibration=tiny_folder["calib"], evaluation=[],
                         device="cuda", output=str(out))
    with pytest.raises(PrunewiseError, match="--device cuda"):
        run(recipe, progress=False)
    assert not out.exists()


def test_parts_that_cannot_move_blocks_yet_are_refused_with_a_reason(bf16_folder):
    recipe = make_recipe(model=bf16_folder["model"], calibration=bf16_folder["calib"], nsamples=4, seqlen=32,
                         evaluation=[], score="gblm", dtype="bfloat16")
    model, tok = load_model(recipe.model, recipe.dtype)
    with pytest.raises(PrunewiseError, match="gradient pass"):
        prune(recipe, model, tok, progress=False)
