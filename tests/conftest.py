"""Tiny random-weight models built from configs, so unit tests run in seconds."""

from __future__ import annotations

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


@pytest.fixture
def windows():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (8, 32), generator=g)
