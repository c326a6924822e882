"""Tiny random-weight models built from configs, so unit tests run in seconds."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

FAMILIES = {
    "llama": LlamaConfig,
    "qwen2": Qwen2Config,
    "mistral": MistralConfig,
    "gemma3": Gemma3TextConfig,
}


def tiny_model(family: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128):
    torch.manual_seed(seed)
    cfg = FAMILIES[family](vocab_size=256, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4,
                           max_position_embeddings=256, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # larger, heavier-tailed weights than the init so pruning choices matter
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn_like(p) * 0.2 * (1 + torch.rand(p.shape[1])))
    return model.eval()


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path, monkeypatch):
    """Unit tests get an empty cache; integration tests share the real one (downloads happen once)."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("PRUNEWISE_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _threads():
    if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
        torch.set_num_threads(1)


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (8, 32), generator=g)


TEXT = ("the quick brown fox jumps over the lazy dog while a small cat sleeps near the warm fire and "
        "birds sing songs of rain and sun over green hills where rivers run to the sea 0123456789 ")


def tiny_tokenizer():
    """A byte-level BPE (at most 256 tokens) trained offline, so tiny folders are complete checkpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([TEXT] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def write_paragraphs(path, seed: int, n: int = 40, words: int = 60) -> str:
    """A .txt of ``n`` random paragraphs from TEXT's words (different seeds give disjoint text)."""
    import random

    rng = random.Random(seed)
    vocab = TEXT.split()
    paras = [" ".join(rng.choice(vocab) for _ in range(words)) + f" {seed}-{i}" for i in range(n)]
    path.write_text("\n\n".join(paras))
    return str(path)


@pytest.fixture
def tiny_folder(tmp_path):
    """A saved tiny Llama with tokenizer, plus disjoint calibration and evaluation text files."""
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return {"model": str(folder), "calib": write_paragraphs(tmp_path / "calib.txt", 1),
            "eval": write_paragraphs(tmp_path / "eval.txt", 2)}

