"""ATP (Lu et al., 2024, "All-in-One Tuning and Structural Pruning for Domain-Specific LLMs"): the structure is
learned while the model is tuned on the domain, not chosen before.

A small trainable **pruning-decision generator** (per-block learnable embeddings, a bidirectional GRU over the
blocks, one linear head per block for its MLP channels and one for its query heads, as in ATO's controller) gives
every unit a logit ``z``; in training a gate is the hard Gumbel-sigmoid sample of ``z`` at temperature ``tau``
with a straight-through gradient, so the LM loss is the loss of the gated (smaller) model. LoRA on every block
linear is trained with it, on the domain data (``--calibration``), by the project's training loop. The loss adds

- a **sparsity regulariser** ``lam_sparsity * log(max(r, t) / min(r, t))``, ``r`` the share of the gateable
  parameters the gates keep, ``t`` the target's (ATO's form: zero at the target, pulling from either side);
- a **LoRA-aware group lasso** ``lam_group * mean over gated-off units of ||unit of (W + s B A)||_2`` (the unit's
  gate/up rows and down column, or its q rows and o columns), so LoRA moves the weights of the units the generator
  removes towards zero and their removal costs less.

Afterwards the units are ranked by the generator's logits (no noise), the target's parameter budget is met by
removing the lowest logits across all blocks (so ATP allocates the widths itself), LoRA is merged and the units are
sliced out: a smaller stock-loadable model. The generator's output is multiplied by ``gen_scale`` so that its units
move as fast as its learning rate allows within the few steps a CPU can afford (Adam's step does not depend on
the gradient's scale).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from ..core.registry import PartConfig, register
from .base import UNITS, Score


class ATPConfig(PartConfig):
    tokens: int = Field(65536, ge=1, description="training tokens (steps x batch x seqlen), cycling over the "
                                                 "calibration windows (the domain data)")
    batch: int = Field(4, ge=1, description="windows per optimizer step")
    lr: float = Field(1e-3, gt=0, description="peak learning rate of LoRA and the generator (warmup 10%, cosine)")
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha")
    lam_sparsity: float = Field(2.0, ge=0, description="weight of the sparsity regulariser")
    lam_group: float = Field(0.05, ge=0, description="weight of the LoRA-aware group lasso on gated-off units")
    tau: float = Field(0.4, gt=0, description="Gumbel-sigmoid temperature")
    width: int = Field(64, ge=4, description="generator embedding and GRU width")
    gen_scale: float = Field(10.0, gt=0, description="factor on the generator's logits")
    init_logit: float = Field(3.0, description="every unit's logit at the start (gates open)")
    seed: int = 0


class GateGenerator(nn.Module):
    """Per-block embeddings -> bidirectional GRU over the blocks -> per-block logits of channels and query heads."""

    def __init__(self, channels: list[int], heads: list[int], width: int, scale: float, init_logit: float,
                 seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.scale = scale
        self.embed = nn.Parameter(torch.randn(len(channels), width, generator=gen) * 0.5)
        self.gru = nn.GRU(width, width, batch_first=True, bidirectional=True)
        self.channel_heads = nn.ModuleList(nn.Linear(2 * width, c) for c in channels)
        self.head_heads = nn.ModuleList(nn.Linear(2 * width, h) for h in heads)
        with torch.no_grad():  # deterministic init from the seed, gates open
            for p in list(self.gru.parameters()) + [m.weight for m in (*self.channel_heads, *self.head_heads)]:
                p.copy_((torch.rand(p.shape, generator=gen) * 2 - 1) / math.sqrt(2 * width))
            for m in (*self.channel_heads, *self.head_heads):
                m.bias.fill_(init_logit / scale)

    def forward(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        h, _ = self.gru(self.embed.unsqueeze(0))
        h = h[0]
        return [(self.scale * c(h[i]), self.scale * q(h[i]))
                for i, (c, q) in enumerate(zip(self.channel_heads, self.head_heads))]


def hard_gumbel_gate(logits: torch.Tensor, tau: float, gen: torch.Generator | None) -> torch.Tensor:
    """A 0/1 gate per unit, sampled as ``sigmoid((z + log u - log(1-u)) / tau) > 0.5``, straight-through."""
    u = torch.rand(logits.shape, generator=gen).clamp(1e-6, 1 - 1e-6).to(logits.device)
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def ratio_penalty(kept: torch.Tensor, target: float) -> torch.Tensor:
    """``log(max(r, t) / min(r, t))`` (ATO): zero at the target, differentiable through ``kept``."""
    r = kept.clamp_min(1e-6)
    return torch.where(r > target, torch.log(r / target), torch.log(target / r))


@register("score")
class ATPScore(Score):
    name = "atp"
    description = ("ATP: channel and head gates from a trainable generator, learned with LoRA on the calibration "
                   "(domain) data under a sparsity regulariser and a LoRA-aware group lasso; the gated-off units removed")
    Config = ATPConfig
    works_with = {"structure": UNITS, "allocation": ("uniform",), "compensation": ()}
    hint = ("atp learns structured units (channels, heads, width); for unstructured or N:M sparsity use a weight "
            "score (wanda, sparsegpt, dpruner); ATP allocates the widths itself and merges its own LoRA (no "
            "--allocation, no compensation)")
    tunes = True  # the structured pipeline trains it (pipeline/tune.py) instead of a statistics pass

    def generator(self, channels: list[int], heads: list[int]) -> GateGenerator:
        c = self.config
        return GateGenerator(channels, heads, c.width, c.gen_scale, c.init_logit, c.seed)
