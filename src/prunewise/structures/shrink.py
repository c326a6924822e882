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

# the linears that a stock config's bias flag switches on together (zero biases are added to the siblings)
FLAG_SIBLINGS = {"attention_bias": ("q", "k", "v", "o"), "mlp_bias": ("gate", "up", "down")}


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool)
    mask[kept] = False
    return torch.nonzero(mask).flatten()


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads.unsqueeze(1) * head_dim + torch.arange(head_dim)).flatten()


@torch.no_grad()
def shrink_block(block: nn.Module, keep: BlockKeep, head_dim: int, adapter, o_mean: torch.Tensor | None = None,
                 down_mean: torch.Tensor | None = None, fit=None) -> dict:
    """Slice one block to ``keep``; with means given, removed inputs of o_proj/down_proj are folded into their bias
    (FLAP: ``b += W[:, removed] @ mean(x[removed])``). With ``fit`` (``fit(role, weight, bias, kept_columns)`` ->
    ``(kept_weight, bias)``, a structured reconstruction) o_proj's and down_proj's kept columns and biases are what it
    returns instead. Returns the block's ``prunewise_layers`` entry."""
    lin = adapter.roles_of(block)
    g = BlockGeometry.of(lin, head_dim)
    if keep.query_heads.numel():
        check_gqa(keep, g)
    removed_cols = _head_rows(_complement(keep.query_heads, g.heads), head_dim)
    removed_ch = _complement(keep.channels, g.intermediate)
    o_bias = lin["o"].bias.detach().double().clone() if lin["o"].bias is not None else None
    down_bias = lin["down"].bias.detach().double().clone() if lin["down"].bias is not None else None
    o_weight = down_weight = None
    if fit is not None:  # the reconstruction gives the kept columns and the bias (FLAP's is its zeroth-order part)
        o_weight, o_bias = fit("o", lin["o"].weight, lin["o"].bias, _head_rows(keep.query_heads, head_dim))
        down_weight, down_bias = fit("down", lin["down"].weight, lin["down"].bias, keep.channels)
    else:
        if o_mean is not None and removed_cols.numel():
            add = lin["o"].weight[:, removed_cols].double() @ o_mean.double()[removed_cols]
            o_bias = add if o_bias is None else o_bias + add
        if down_mean is not None and removed_ch.numel():
            add = lin["down"].weight[:, removed_ch].double() @ down_mean.double()[removed_ch]
            down_bias = add if down_bias is None else down_bias + add
    if not keep.query_heads.numel():  # a removed sublayer only keeps its compensation (the constant it added on average)
        o_bias = o_bias if o_mean is not None else None
    if not keep.channels.numel():
        down_bias = down_bias if down_mean is not None else None
    spec = keep.spec(o_bias is not None, down_bias is not None)
    q_rows, kv_rows = _head_rows(keep.query_heads, head_dim), _head_rows(keep.kv_heads, head_dim)
    rows = {"q": q_rows, "k": kv_rows, "v": kv_rows, "gate": keep.channels, "up": keep.channels}
    saved = {r: (lin[r].weight[i], None if lin[r].bias is None else lin[r].bias[i]) for r, i in rows.items()}
    saved["o"] = (lin["o"].weight[:, q_rows] if o_weight is None else o_weight, o_bias)
    saved["down"] = (lin["down"].weight[:, keep.channels] if down_weight is None else down_weight, down_bias)
    resize_block(block, spec, g.hidden, head_dim)
    attention, feed_forward = adapter.sublayer(block, "attention"), adapter.sublayer(block, "mlp")
    if isinstance(attention, RemovedAttention):
        if attention.bias is not None:
            attention.bias.copy_(o_bias)
    if isinstance(feed_forward, RemovedMLP):
        if feed_forward.bias is not None:
            feed_forward.bias.copy_(down_bias)
    for kind, roles in (("attention", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down"))):
        if not isinstance(adapter.sublayer(block, kind), (RemovedAttention, RemovedMLP)):
            for r in roles:
                _fill(_role(adapter, block, r), *saved[r])
    return spec


def _role(adapter, block: nn.Module, role: str) -> nn.Linear:
    return block.get_submodule(adapter.roles[role])


def _fill(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    linear.weight.copy_(weight)
    if linear.bias is not None:
        if bias is None:
            linear.bias.zero_()
        else:
            linear.bias.copy_(bias)


def remove_blocks(model: nn.Module, adapter, indices: list[int]) -> None:
    """Delete whole blocks; the survivors are renumbered for the KV cache and the config follows."""
    blocks = adapter.blocks(model)
    drop = set(indices)
    if len(drop) >= len(blocks):
        raise PrunewiseError(f"cannot remove all {len(blocks)} blocks; lower the sparsity")
    adapter.set_blocks(model, [b for i, b in enumerate(blocks) if i not in drop])


def finalize_config(model: nn.Module, adapter, specs: list[dict]) -> str:
    """Give the shrunk model the config it is saved with: 'stock' when every block has the same widths (and any
    added bias has a config flag), else 'custom' (the family's pruned twin, loadable with trust_remote_code)."""
    config = model.config
    original = getattr(config, "prunewise_original", None) or {
        "intermediate_size": config.intermediate_size, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    head_dim = head_dim_of(config)
    uniform = all(s == specs[0] for s in specs) and specs[0]["intermediate_size"] > 0 and specs[0]["num_attention_heads"] > 0
    flags = adapter.bias_flags
    added = [k for k in ("o_proj_bias", "down_proj_bias") if uniform and specs[0][k] and not _stock_has(config, flags, k)]
    if uniform and all(k in flags for k in added) and _stock_accepts(config, specs[0], head_dim):
        for k in added:
            flag = flags[k]
            setattr(config, flag, True)
            for block in adapter.blocks(model):
                for role in FLAG_SIBLINGS[flag]:
                    lin = _role(adapter, block, role)
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


def _stock_has(config, flags: dict, kind: str) -> bool:
    flag = flags.get(kind)
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
