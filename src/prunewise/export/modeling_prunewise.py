"""Modeling code for structurally pruned models whose blocks differ in width.

Written by prunewise into every exported folder whose widths differ per block (``auto_map`` in
config.json points here), so that ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` loads it without prunewise installed. It imports only torch and
transformers. Each class is the stock class of its family with one change: after the stock
constructor, every block is resized to ``config.prunewise_layers[i]``:

- ``intermediate_size``: MLP channels kept (0: the MLP sublayer is gone);
- ``num_attention_heads`` / ``num_key_value_heads``: heads kept (0: the attention sublayer is gone);
- ``o_proj_bias`` / ``down_proj_bias``: the output projection carries a bias (FLAP's bias
  compensation; a removed sublayer with a bias adds that constant vector to the residual stream).

Importing prunewise registers these classes with the Auto classes, so the flag is then not needed.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

LAYER_KEYS = ("intermediate_size", "num_attention_heads", "num_key_value_heads", "o_proj_bias", "down_proj_bias")


class RemovedAttention(nn.Module):
    """An attention sublayer pruned away: outputs zeros (or its compensation bias) and keeps the cache length."""

    def __init__(self, hidden_size: int, layer_idx: int, bias: bool) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.hidden_size = hidden_size

    def forward(self, hidden_states, *args, past_key_values=None, **kwargs):
        batch, length = hidden_states.shape[:2]
        if past_key_values is not None:  # a 1x1 placeholder so the cache still counts this layer's tokens
            z = hidden_states.new_zeros(batch, 1, length, 1)
            past_key_values.update(z, z, self.layer_idx)
        out = hidden_states.new_zeros(batch, length, self.hidden_size)
        if self.bias is not None:
            out = out + self.bias
        return out, None


class RemovedMLP(nn.Module):
    """An MLP sublayer pruned away: outputs zeros, or its compensation bias (the removed MLP's mean output)."""

    def __init__(self, hidden_size: int, bias: bool) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.hidden_size = hidden_size

    def forward(self, x):
        out = x.new_zeros(*x.shape[:-1], self.hidden_size)
        return out + self.bias if self.bias is not None else out


def _linear(old: nn.Linear, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias, device=old.weight.device, dtype=old.weight.dtype)


def resize_block(block: nn.Module, spec: dict, hidden_size: int, head_dim: int) -> None:
    """Replace the linears of one decoder block by empty ones of the widths in ``spec`` (weights filled later)."""
    attn, mlp = block.self_attn, block.mlp
    heads, kv = int(spec["num_attention_heads"]), int(spec["num_key_value_heads"])
    if heads == 0 or kv == 0:
        block.self_attn = RemovedAttention(hidden_size, attn.layer_idx, bool(spec.get("o_proj_bias")))
    else:
        if heads % kv:
            raise ValueError(f"block {attn.layer_idx}: {heads} query heads do not divide into {kv} key/value heads")
        attn.q_proj = _linear(attn.q_proj, hidden_size, heads * head_dim, attn.q_proj.bias is not None)
        attn.k_proj = _linear(attn.k_proj, hidden_size, kv * head_dim, attn.k_proj.bias is not None)
        attn.v_proj = _linear(attn.v_proj, hidden_size, kv * head_dim, attn.v_proj.bias is not None)
        o_bias = attn.o_proj.bias is not None or bool(spec.get("o_proj_bias"))
        attn.o_proj = _linear(attn.o_proj, heads * head_dim, hidden_size, o_bias)
        attn.num_key_value_groups = heads // kv
    width = int(spec["intermediate_size"])
    if width == 0:
        block.mlp = RemovedMLP(hidden_size, bool(spec.get("down_proj_bias")))
    else:
        mlp.gate_proj = _linear(mlp.gate_proj, hidden_size, width, mlp.gate_proj.bias is not None)
        mlp.up_proj = _linear(mlp.up_proj, hidden_size, width, mlp.up_proj.bias is not None)
        down_bias = mlp.down_proj.bias is not None or bool(spec.get("down_proj_bias"))
        mlp.down_proj = _linear(mlp.down_proj, width, hidden_size, down_bias)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def apply_layer_specs(model: nn.Module, config) -> None:
    """Resize every block of ``model`` (a stock CausalLM of the family) to ``config.prunewise_layers``."""
    specs = list(getattr(config, "prunewise_layers", None) or [])
    layers = model.model.layers
    if len(specs) != len(layers):
        raise ValueError(f"config.prunewise_layers has {len(specs)} entries for {len(layers)} blocks")
    for block, spec in zip(layers, specs):
        resize_block(block, spec, config.hidden_size, head_dim_of(config))


def _family(name: str, config_cls, model_cls):
    """A config class and a CausalLM class that resize the stock ``model_cls`` blocks after construction."""
    model_type = f"prunewise_{config_cls.model_type}"
    config_type = type(f"Pruned{name}Config", (config_cls,), {"model_type": model_type, "__module__": __name__})

    def __init__(self, config):
        model_cls.__init__(self, config)
        apply_layer_specs(self, config)

    causal_type = type(f"Pruned{name}ForCausalLM", (model_cls,),
                       {"config_class": config_type, "__init__": __init__, "__module__": __name__})
    return config_type, causal_type


PrunedLlamaConfig, PrunedLlamaForCausalLM = _family("Llama", LlamaConfig, LlamaForCausalLM)
PrunedMistralConfig, PrunedMistralForCausalLM = _family("Mistral", MistralConfig, MistralForCausalLM)
PrunedQwen2Config, PrunedQwen2ForCausalLM = _family("Qwen2", Qwen2Config, Qwen2ForCausalLM)
PrunedQwen3Config, PrunedQwen3ForCausalLM = _family("Qwen3", Qwen3Config, Qwen3ForCausalLM)
PrunedGemma3TextConfig, PrunedGemma3TextForCausalLM = _family("Gemma3Text", Gemma3TextConfig, Gemma3ForCausalLM)

# stock CausalLM class name -> (config class, CausalLM class) of its pruned twin
PRUNED_CLASSES = {
    "LlamaForCausalLM": (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    "MistralForCausalLM": (PrunedMistralConfig, PrunedMistralForCausalLM),
    "Qwen2ForCausalLM": (PrunedQwen2Config, PrunedQwen2ForCausalLM),
    "Qwen3ForCausalLM": (PrunedQwen3Config, PrunedQwen3ForCausalLM),
    "Gemma3ForCausalLM": (PrunedGemma3TextConfig, PrunedGemma3TextForCausalLM),
}
