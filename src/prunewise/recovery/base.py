"""What every recovery part shares: its settings (data, token budget, schedule) and the trained parameter set."""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from ..core.registry import Part, PartConfig
from ..engine.lowrank import MaskedLoRA


class RecoveryConfig(PartConfig):
    data: str | None = Field(None, description="recovery data: a corpus, a mixture SOURCE:WEIGHT,... or a .jsonl of "
                                               "prompt/completion records (default: the calibration data)")
    tokens: int = Field(65536, ge=1, description="training tokens (windows x seqlen)")
    seqlen: int = Field(512, ge=8, description="tokens per training window")
    batch: int = Field(4, ge=1, description="windows per optimizer step")
    micro: int = Field(1, ge=1, description="windows per forward/backward (gradient accumulation within a step)")
    lr: float = Field(1e-3, gt=0, description="peak learning rate (warmup 10%, then cosine)")
    params: Literal["lora", "bias_norm", "lora+bias_norm"] = Field(
        "lora", description="what trains: mask-preserving LoRA on every pruned linear, biases + norms (PERP), or both")
    rank: int = Field(8, ge=1, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha (scale alpha / rank)")
    merge: bool = Field(True, description="merge LoRA into the weights (zeros stay zero) or keep it as a PEFT adapter")
    val_windows: int = Field(8, ge=1, description="held-out windows of the recovery data")
    eval_every: int = Field(8, ge=1, description="steps between held-out evaluations")
    checkpoint_every: int = Field(8, ge=1, description="steps between checkpoints")
    seed: int = Field(0, description="seed of the data order and the LoRA initialisation")
    select: Literal["none", "paser", "random"] = Field(
        "none", description="which windows the token budget trains on: all drawn (none), PASER's (the clusters the "
                            "pruning hurt most, their most degraded windows first), or a random share of the same pool")
    pool: int = Field(5, ge=1, description="with select: candidate windows drawn per budget window (5: the budget is "
                                           "20% of the pool)")
    clusters: int = Field(0, ge=0, description="PASER's clusters (0: round(sqrt(candidates / 2)))")

    @property
    def windows(self) -> int:
        """Training windows of the budget."""
        return max(1, self.tokens // self.seqlen)

    @property
    def drawn(self) -> int:
        """Candidate windows drawn: the budget's, or the pool the selection chooses the budget from."""
        return self.windows * (self.pool if self.select != "none" else 1)

    @property
    def paser_clusters(self) -> int:
        return (self.clusters or max(1, round(math.sqrt(self.drawn / 2)))) if self.select == "paser" else 0

    @model_validator(mode="after")
    def _budget_covers_the_clusters(self):
        if self.paser_clusters > self.windows:  # refused with the recipe, before any work
            raise ValueError(f"the budget of {self.windows} windows is smaller than the {self.paser_clusters} "
                             "clusters PASER splits it over; raise tokens or lower clusters")
        return self


def token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions ``mask`` marks (all without a mask)."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    if mask is None:
        return nll.mean()
    m = mask[:, 1:].float()
    return (nll * m).sum() / m.sum().clamp_min(1)


class Recovery(Part):
    """Training after pruning that keeps the masks. Subclasses define the loss."""

    teacher = False  # whether the loss needs the dense model's logits
    Config = RecoveryConfig

    def trainable(self, model: nn.Module, linears: dict[str, nn.Linear], masks: dict[str, torch.Tensor]):
        """The parameters that train, and the LoRA set (or None). ``linears``: the pruned linears by full name;
        ``masks``: their masks (True = pruned), absent for linears that have none (structured runs)."""
        cfg = self.config
        params: dict[str, nn.Parameter] = {}
        lora = None
        if "lora" in cfg.params:
            lora = MaskedLoRA(cfg.rank, cfg.alpha, cfg.seed)
            for name, linear in linears.items():
                mask = masks.get(name)
                lora.add(name, linear, None if (mask is None or not cfg.merge) else ~mask)
            params.update(lora.parameters())
        if "bias_norm" in cfg.params:
            for name, module in model.named_modules():
                if isinstance(module, nn.Linear) and module.bias is not None and name in linears:
                    params[f"{name}.bias"] = module.bias
                elif "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                    params[f"{name}.weight"] = module.weight
        return params, lora

    def loss(self, student_logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None,
             teacher_logits: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError
