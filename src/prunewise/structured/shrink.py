"""Physical shrinking: slice the tensors of a model to what each block keeps, fold in bias compensation,
remove whole blocks, and give the model the config it will be saved with.

Uniform widths keep a stock config (smaller ``intermediate_size`` and head counts, ``head_dim``
explicit); per-block widths switch the model to its family's pruned twin from
``export/modeling_prunewise.py`` (the same module the exported folder carries).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from ..errors import PrunewiseError
from ..export.modeling_prunewise import PRUNED_CLASSES, RemovedAttention, RemovedMLP, head_dim_of, resize_block
from .geometry import BlockGeometry, BlockKeep, check_gqa

log = logging.getLogger(__name__)

# families whose stock config can switch on an output bias: bias kind -> config flag (zero biases are added elsewhere)
STOCK_BIAS_FLAGS = {
    "llama": {"o_proj_bias": "attention_bias", "down_proj_bias": "mlp_bias"},
    "gemma3_text": {"o_proj_bias": "attention_bias"},
}
FLAG_SIBLINGS = {"attention_bias": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp_bias": ("gate_proj", "up_proj", "down_proj")}


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).flatten()


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def shrink_block(block: nn.Module, keep: BlockKeep, head_dim: int, o_mean: torch.Tensor | None = None,
                 down_mean: torch.Tensor | None = None) -> dict:
    """Slice one block to ``keep``; with means given, removed inputs of o_proj/down_proj are folded into their bias
    (FLAP: ``b += W[:, removed] @ mean(x[removed])``). Returns the block's ``prunewise_layers`` entry."""
    g = BlockGeometry.of(block, head_dim)
    if keep.query_heads.numel():
        check_gqa(keep, g)
    a, m = block.self_attn, block.mlp
    removed_cols = _head_rows(_complement(keep.query_heads, g.heads), head_dim)
    removed_ch = _complement(keep.channels, g.intermediate)
    o_bias = a.o_proj.bias.detach().double().clone() if a.o_proj.bias is not None else None
    down_bias = m.down_proj.bias.detach().double().clone() if m.down_proj.bias is not None else None
    if o_mean is not None and removed_cols.numel():
        add = a.o_proj.weight[:, removed_cols].double() @ o_mean.double()[removed_cols]
        o_bias = add if o_bias is None else o_bias + add
    if down_mean is not None and removed_ch.numel():
        add = m.down_proj.weight[:, removed_ch].double() @ down_mean.double()[removed_ch]
        down_bias = add if down_bias is None else down_bias + add
    if not keep.query_heads.numel():  # a removed sublayer only keeps its compensation (the constant it added on average)
        o_bias = o_bias if o_mean is not None else None
    if not keep.channels.numel():
        down_bias = down_bias if down_mean is not None else None
    spec = keep.spec(o_bias is not None, down_bias is not None)
    q_rows, kv_rows = _head_rows(keep.query_heads, head_dim), _head_rows(keep.kv_heads, head_dim)
    saved = {
        "q": (a.q_proj.weight[q_rows], None if a.q_proj.bias is None else a.q_proj.bias[q_rows]),
        "k": (a.k_proj.weight[kv_rows], None if a.k_proj.bias is None else a.k_proj.bias[kv_rows]),
        "v": (a.v_proj.weight[kv_rows], None if a.v_proj.bias is None else a.v_proj.bias[kv_rows]),
        "o": a.o_proj.weight[:, q_rows],
        "gate": (m.gate_proj.weight[keep.channels], None if m.gate_proj.bias is None else m.gate_proj.bias[keep.channels]),
        "up": (m.up_proj.weight[keep.channels], None if m.up_proj.bias is None else m.up_proj.bias[keep.channels]),
        "down": m.down_proj.weight[:, keep.channels],
    }
    resize_block(block, spec, g.hidden, head_dim)
    a, m = block.self_attn, block.mlp
    if isinstance(a, RemovedAttention):
        if a.bias is not None:
            a.bias.copy_(o_bias)
    else:
        for key, lin in (("q", a.q_proj), ("k", a.k_proj), ("v", a.v_proj)):
            _fill(lin, *saved[key])
        _fill(a.o_proj, saved["o"], o_bias)
    if isinstance(m, RemovedMLP):
        if m.bias is not None:
            m.bias.copy_(down_bias)
    else:
        _fill(m.gate_proj, *saved["gate"])
        _fill(m.up_proj, *saved["up"])
        _fill(m.down_proj, saved["down"], down_bias)
    return spec


def _fill(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight.copy_(weight)
    if linear.bias is not None:
        if bias is None:
            linear.bias.zero_()
        else:
            linear.bias.copy_(bias)


def remove_blocks(model: nn.Module, adapter, indices: list[int]) -> None:
    """Delete whole blocks; the survivors are renumbered for the KV cache and the config follows."""
    decoder = adapter.decoder(model)
    drop = set(indices)
    n = len(decoder.layers)
    if len(drop) >= n:
        raise PrunewiseError(f"cannot remove all {n} blocks; lower the sparsity")
    kept = [b for i, b in enumerate(decoder.layers) if i not in drop]
    decoder.layers = nn.ModuleList(kept)
    for j, block in enumerate(kept):
        if hasattr(block, "layer_idx"):
            block.layer_idx = j
        if hasattr(block.self_attn, "layer_idx"):
            block.self_attn.layer_idx = j
    configs = {id(model.config): model.config}
    text = getattr(model.config, "text_config", None)
    if text is not None:
        configs[id(text)] = text
    for config in configs.values():
        if getattr(config, "num_hidden_layers", None) == n:
            config.num_hidden_layers = len(kept)
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == n:
            config.layer_types = [t for i, t in enumerate(types) if i not in drop]


def finalize_config(model: nn.Module, blocks: nn.ModuleList, specs: list[dict]) -> str:
    """Give the shrunk model the config it is saved with: 'stock' when every block has the same widths (and any
    added bias has a config flag), else 'custom' (the family's pruned twin, loadable with trust_remote_code)."""
    config = model.config
    original = getattr(config, "prunewise_original", None) or {
        "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    head_dim = head_dim_of(config)
    uniform = all(s == specs[0] for s in specs) and specs[0]["intermediate_size"] > 0 and specs[0]["num_attention_heads"] > 0
    flags = STOCK_BIAS_FLAGS.get(config.model_type, {})
    added = [k for k in ("o_proj_bias", "down_proj_bias") if uniform and specs[0][k] and not _stock_has(config, k)]
    if uniform and all(k in flags for k in added) and _stock_accepts(config, specs[0], head_dim):
        for k in added:
            flag = flags[k]
            setattr(config, flag, True)
            for block in blocks:
                parent = block.self_attn if flag == "attention_bias" else block.mlp
                for name in FLAG_SIBLINGS[flag]:
                    lin = getattr(parent, name)
                    if lin.bias is None:
                        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
        config.intermediate_size = specs[0]["intermediate_size"]
        config.num_attention_heads = specs[0]["num_attention_heads"]
        config.num_key_value_heads = specs[0]["num_key_value_heads"]
        config.head_dim = head_dim
        return "stock"
    name = type(model).__name__
    twin = next((v for k, v in PRUNED_CLASSES.items() if k == name or v[1].__name__ == name), None)
    if twin is None:
        raise PrunewiseError(f"{name} has no pruned twin for per-block widths; add it to export/modeling_prunewise.py")
    config_cls, model_cls = twin
    new = config_cls(**_config_fields(config), head_dim=head_dim, prunewise_layers=specs, prunewise_original=original)
    new.auto_map = {"AutoConfig": f"modeling_prunewise.{config_cls.__name__}",
                    "AutoModelForCausalLM": f"modeling_prunewise.{model_cls.__name__}"}
    new.architectures = [model_cls.__name__]
    model.config = new
    model.__class__ = model_cls
    return "custom"


def _stock_has(config, kind: str) -> bool:
    flag = STOCK_BIAS_FLAGS.get(config.model_type, {}).get(kind)
    return bool(flag and getattr(config, flag, False))


def _stock_accepts(config, spec: dict, head_dim: int) -> bool:
    """Whether the family's own config class accepts these widths (some validate hidden % heads)."""
    fields = {**_config_fields(config), "intermediate_size": spec["intermediate_size"], "head_dim": head_dim,
              "num_attention_heads": spec["num_attention_heads"], "num_key_value_heads": spec["num_key_value_heads"]}
    try:
        type(config)(**fields)
    except Exception as exc:  # noqa: BLE001 - config validation raises ValueError or huggingface_hub's strict errors
        log.info("stock config refuses uniform widths (%s); saving per-block widths instead", exc)
        return False
    return True


def _config_fields(config) -> dict:
    """A config's own fields, to build another config from: no class identity, version or per-block widths."""
    skip = ("model_type", "architectures", "transformers_version", "auto_map", "prunewise_layers", "head_dim")
    return {k: v for k, v in config.to_dict().items() if k not in skip}
