"""What a decoder block is made of, in structured units: MLP channels, query heads, key/value groups.

The adapter says where the linears are (by role: q, k, v, o, gate, up, down); this file turns one block into its widths and the
parameter cost of every removable unit, GQA-aware: query head ``h`` reads key/value head
``h // (H / KV)``, so a key/value head goes only when every query head of its group goes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


def _numel(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


@dataclass
class BlockGeometry:
    """Widths of one block and the parameters each unit holds."""

    hidden: int
    head_dim: int
    heads: int
    kv_heads: int
    intermediate: int
    attn_params: int           # q, k, v, o with their biases
    mlp_params: int            # gate, up, down with their biases
    channel_cost: int          # one MLP channel: a gate row, an up row, a down column (+ row biases)
    query_cost: int            # one query head: its q rows (+ bias) and o columns
    kv_cost: int               # one key/value head: its k and v rows (+ biases)

    @property
    def group_size(self) -> int:
        return self.heads // self.kv_heads

    @classmethod
    def of(cls, lin: dict[str, nn.Linear], head_dim: int) -> BlockGeometry:
        """From a block's linears by role (q, k, v, o, gate, up, down: ``adapter.roles_of(block)``)."""
        hidden = lin["q"].in_features
        heads = lin["q"].out_features // head_dim
        kv = lin["k"].out_features // head_dim
        inter = lin["gate"].out_features
        qb = 1 if lin["q"].bias is not None else 0
        kb = 1 if lin["k"].bias is not None else 0
        gb = 1 if lin["gate"].bias is not None else 0
        ub = 1 if lin["up"].bias is not None else 0
        return cls(hidden=hidden, head_dim=head_dim, heads=heads, kv_heads=kv, intermediate=inter,
                   attn_params=sum(_numel(lin[r]) for r in ("q", "k", "v", "o")),
                   mlp_params=sum(_numel(lin[r]) for r in ("gate", "up", "down")),
                   channel_cost=3 * hidden + gb + ub,
                   query_cost=head_dim * (2 * hidden + qb),
                   kv_cost=2 * head_dim * (hidden + kb))

    def attention_params(self, q: int, kv: int) -> int:
        """Attention parameters left with ``q`` query heads and ``kv`` key/value heads (0 heads: none at all)."""
        if q == 0:
            return 0
        o_bias = self.attn_params - self.heads * self.query_cost - self.kv_heads * self.kv_cost  # o bias, if any
        return q * self.query_cost + kv * self.kv_cost + o_bias

    def mlp_params_left(self, channels: int) -> int:
        if channels == 0:
            return 0
        down_bias = self.mlp_params - self.intermediate * self.channel_cost
        return channels * self.channel_cost + down_bias


@dataclass
class BlockKeep:
    """What one block keeps: sorted indices of MLP channels, query heads and key/value heads."""

    channels: torch.Tensor
    query_heads: torch.Tensor
    kv_heads: torch.Tensor
    notes: dict = field(default_factory=dict)

    @classmethod
    def everything(cls, g: BlockGeometry) -> BlockKeep:
        return cls(torch.arange(g.intermediate), torch.arange(g.heads), torch.arange(g.kv_heads))

    def without(self, attention: bool = False, mlp: bool = False) -> BlockKeep:
        """The same block with its attention and/or MLP sublayer removed entirely."""
        none = torch.zeros(0, dtype=torch.long)
        return BlockKeep(none if mlp else self.channels, none if attention else self.query_heads,
                         none if attention else self.kv_heads)

    def spec(self, o_bias: bool = False, down_bias: bool = False) -> dict:
        """The per-block entry of ``config.prunewise_layers``."""
        q = int(self.query_heads.numel())
        return {"intermediate_size": int(self.channels.numel()), "num_attention_heads": q,
                "num_key_value_heads": int(self.kv_heads.numel()) if q else 0,
                "o_proj_bias": bool(o_bias), "down_proj_bias": bool(down_bias)}


def check_gqa(keep: BlockKeep, g: BlockGeometry) -> None:
    """Every kept query head has its key/value head kept, and every kept group keeps the same number of query heads."""
    q, kv = keep.query_heads.tolist(), set(keep.kv_heads.tolist())
    if not q:
        return
    owners = [h // g.group_size for h in q]
    missing = sorted({o for o in owners if o not in kv})
    if missing:
        raise AssertionError(f"query heads {q} would lose their key/value heads {missing}")
    counts = {o: owners.count(o) for o in kv}
    if len(set(counts.values())) != 1 or min(counts.values()) == 0:
        raise AssertionError(f"kept key/value groups hold unequal query heads: {counts}")
