"""Architecture adapters: the only place that knows where a family keeps its blocks and linears.

Adding a model family means adding one entry to ``ADAPTERS``. Everything else in prunewise
(engine, scores, allocation, export) asks the adapter instead of hard-coding ``model.model.layers``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import PrunewiseError

LLAMA_LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
# role -> linear name inside a block: what structured pruning slices (query/key/value/output, gate/up/down)
LLAMA_ROLES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
               "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Where one decoder-only family keeps its decoder, blocks and prunable linears."""

    family: str
    model_types: tuple[str, ...]
    linear_names: tuple[str, ...] = LLAMA_LINEARS
    # candidate attribute paths from the CausalLM to the decoder (the module holding `.layers`)
    decoder_paths: tuple[str, ...] = ("model", "model.language_model", "language_model.model")
    final_norm: str = "norm"  # attribute path, from the decoder, of the norm applied after the last block
    # the norm whose input is the residual stream between the attention and the MLP sublayer (first found)
    mid_norms: tuple[str, ...] = ("pre_feedforward_layernorm", "post_attention_layernorm")
    roles: dict[str, str] = field(default_factory=lambda: dict(LLAMA_ROLES))
    attention_module: str = "self_attn"  # the attention sublayer inside a block
    mlp_module: str = "mlp"              # the MLP sublayer inside a block
    # stock config flags that switch on an output bias (zero biases are added to the siblings): bias kind -> flag
    bias_flags: dict[str, str] = field(default_factory=lambda: {"o_proj_bias": "attention_bias",
                                                                "down_proj_bias": "mlp_bias"})

    def coupled(self, kind: str) -> tuple[str, ...]:
        """Linear names (relative to a block) of the attention or the MLP sublayer: pruned together by units."""
        return tuple(self.roles[r] for r in (ATTENTION_ROLES if kind == "attention" else MLP_ROLES))

    def roles_of(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The block's linears by role (q, k, v, o, gate, up, down)."""
        out = {}
        for role, name in self.roles.items():
            module = _get_path(block, name)
            if not isinstance(module, nn.Linear):
                raise PrunewiseError(f"a {self.family} block has no linear {name} ({role}); structured pruning needs "
                                     "q, k, v, o, gate, up and down projections")
            out[role] = module
        return out

    def sublayer(self, block: nn.Module, kind: str) -> nn.Module:
        """The block's ``attention`` or ``mlp`` sublayer module."""
        return getattr(block, self.attention_module if kind == "attention" else self.mlp_module)

    def set_sublayer(self, block: nn.Module, kind: str, module: nn.Module) -> None:
        setattr(block, self.attention_module if kind == "attention" else self.mlp_module, module)

    def set_blocks(self, model: nn.Module, blocks: list[nn.Module]) -> None:
        """Replace the block list (survivors renumbered for the KV cache) and the config's block counts."""
        decoder = self.decoder(model)
        n = len(decoder.layers)
        keep = {id(b) for b in blocks}
        dropped = [i for i, b in enumerate(decoder.layers) if id(b) not in keep]
        decoder.layers = nn.ModuleList(blocks)
        for j, block in enumerate(blocks):
            if hasattr(block, "layer_idx"):
                block.layer_idx = j
            attn = getattr(block, self.attention_module, None)
            if hasattr(attn, "layer_idx"):
                attn.layer_idx = j
        configs = {id(model.config): model.config}
        text = getattr(model.config, "text_config", None)
        if text is not None:
            configs[id(text)] = text
        for config in configs.values():
            if getattr(config, "num_hidden_layers", None) == n:
                config.num_hidden_layers = len(blocks)
            types = getattr(config, "layer_types", None)
            if isinstance(types, list) and len(types) == n:
                config.layer_types = [t for i, t in enumerate(types) if i not in dropped]

    def decoder(self, model: nn.Module) -> nn.Module:
        """The module that owns the embedding, the block list and the final norm."""
        for path in self.decoder_paths:
            module = _get_path(model, path)
            if module is not None and isinstance(getattr(module, "layers", None), nn.ModuleList):
                return module
        raise PrunewiseError(
            f"{type(model).__name__} has no decoder with a `.layers` list at {self.decoder_paths}; "
            "this checkpoint layout is not supported by the "
            f"{self.family} adapter"
        )

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return self.decoder(model).layers

    def block_prefix(self, model: nn.Module) -> str:
        """Full module name of the block list, e.g. ``model.layers``."""
        decoder = self.decoder(model)
        for name, module in model.named_modules():
            if module is decoder:
                return f"{name}.layers" if name else "layers"
        raise PrunewiseError("decoder not found among the model's modules")

    def linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """Prunable linears of one block, by name relative to the block, in forward order."""
        found = {}
        for name in self.linear_names:
            module = _get_path(block, name)
            if module is None:
                continue
            if not isinstance(module, nn.Linear):
                raise PrunewiseError(f"{name} in a {self.family} block is {type(module).__name__}, not nn.Linear; "
                                     "quantized or fused checkpoints must be dequantized first")
            found[name] = module
        if not found:
            raise PrunewiseError(f"no prunable linears found in a {self.family} block (looked for {self.linear_names})")
        return found

    def mid_norm(self, block: nn.Module) -> nn.Module:
        """The norm that reads the residual stream after the attention sublayer (its input is ``h + attn(h)``)."""
        for name in self.mid_norms:
            module = getattr(block, name, None)
            if module is not None:
                return module
        raise PrunewiseError(f"a {self.family} block has none of {self.mid_norms}; set mid_norms in its adapter")

    def final_logits(self, model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """Logits from the last block's output: the decoder's final norm, the output head, and final softcapping.

        Softcapping follows the CausalLM forward of transformers: ``tanh(logits / c) * c`` where the
        model's own config sets ``final_logit_softcapping`` (Gemma 2/3 text models).
        """
        norm = _get_path(self.decoder(model), self.final_norm)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if norm is None or head is None:
            raise PrunewiseError(f"{type(model).__name__} has no final norm at decoder.{self.final_norm} or no output head; "
                                 f"set final_norm in the {self.family} adapter")
        logits = head(norm(hidden))
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def heads(self, config) -> tuple[int, int, int]:
        """(query heads, key/value heads, head dimension)."""
        text = getattr(config, "text_config", None) or config
        n_heads = text.num_attention_heads
        n_kv = getattr(text, "num_key_value_heads", None) or n_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // n_heads
        return n_heads, n_kv, head_dim

    @contextlib.contextmanager
    def truncated(self, model: nn.Module, n_blocks: int) -> Iterator[None]:
        """Temporarily keep only the first ``n_blocks`` blocks, so a forward stops early."""
        decoder = self.decoder(model)
        full = decoder.layers
        decoder.layers = nn.ModuleList(list(full)[:n_blocks])
        try:
            yield
        finally:
            decoder.layers = full


ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    ArchitectureAdapter("llama", ("llama",)),
    ArchitectureAdapter("mistral", ("mistral",), bias_flags={}),
    ArchitectureAdapter("qwen2", ("qwen2",), bias_flags={}),
    ArchitectureAdapter("qwen3", ("qwen3",), bias_flags={}),
    ArchitectureAdapter("gemma", ("gemma", "gemma2"), bias_flags={}),
    ArchitectureAdapter("gemma3", ("gemma3", "gemma3_text"), bias_flags={"o_proj_bias": "attention_bias"}),
)


def get_adapter(model_or_config) -> ArchitectureAdapter:
    """The adapter for a model (or its config), chosen by ``config.model_type``."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type.startswith("prunewise_"):  # a family's pruned twin (per-block widths)
        model_type = model_type[len("prunewise_"):]
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    supported = ", ".join(t for a in ADAPTERS for t in a.model_types)
    raise PrunewiseError(f"no architecture adapter for model_type '{model_type}'; supported: {supported} "
                         "(add one to prunewise.models.adapters.ADAPTERS)")


def _get_path(root: nn.Module, path: str):
    module = root
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full name -> weight of every prunable linear, in block order."""
    adapter = get_adapter(model)
    prefix = adapter.block_prefix(model)
    out = {}
    for i, block in enumerate(adapter.blocks(model)):
        for name, linear in adapter.linears(block).items():
            out[f"{prefix}.{i}.{name}"] = linear.weight
    return out
