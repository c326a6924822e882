"""The routed experts of one mixture-of-experts layer as ordinary linears, for weight-level pruning inside them.

transformers 5.x keeps a layer's experts fused: ``gate_up_proj`` [E, 2I, H] (expert e's gate rows, then its up
rows) and ``down_proj`` [E, H, I]. Every weight-level part of prunewise works on ``nn.Linear`` modules (the engine
hooks their inputs, scores and reconstructions rewrite their weights), so for the prune the fused module is swapped
for an :class:`UnfusedExperts`: expert e becomes three linears ``{e}.gate_proj``, ``{e}.up_proj``, ``{e}.down_proj``
holding its slices, called as the stock forward calls them, on exactly the tokens the router sends it. Afterwards the
linears are stacked back into the fused parameters of the original module (:func:`refuse`), so the model saves and
loads as the stock class. The names are those of :func:`expert_views` on the fused module, so a mask set made
unfused applies to the fused tensors and back.
"""

from __future__ import annotations

import torch
from torch import nn

EXPERT_LINEARS = ("gate_proj", "up_proj", "down_proj")  # one expert's linears, in forward order


class _Expert(nn.Module):
    def __init__(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_proj = _linear(gate)
        self.up_proj = _linear(up)
        self.down_proj = _linear(down)


def _linear(weight: torch.Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    linear = nn.Linear(in_f, out_f, bias=False, device="meta", dtype=weight.dtype)
    linear.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    return linear


def expert_matrices(fused: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Expert ``e``'s gate, up and down matrices as views of the fused tensors, [out, in] as linears hold them: gate
    and up [I, H] (the first and second half of ``gate_up_proj[e]``'s rows), down [H, I]."""
    gate, up = fused.gate_up_proj[e].chunk(2, dim=0)
    return gate, up, fused.down_proj[e]


class UnfusedExperts(nn.ModuleList):
    """A fused experts module's experts as linears (``self[e].gate_proj`` ...), with the stock forward's arithmetic:
    ``experts(hidden_states, top_k_index, top_k_weights)``, each routed token through its experts' SwiGLU, scaled by
    its routing weight and summed. The gate and up linears of an expert read the same tensor (their input statistics
    are shared)."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__(_Expert(*expert_matrices(fused, e)) for e in range(fused.gate_up_proj.shape[0]))
        self.num_experts = len(self)
        # the stock module to restore and its activation (in lists: not children, the list holds the experts only)
        self.fused = [fused]
        self.act = [fused.act_fn]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            experts = torch.greater(hit.sum(dim=(-1, -2)), 0).nonzero()
        for e in experts[:, 0].tolist():
            if e == self.num_experts:  # the padding index some routers use
                continue
            slot, token = torch.where(hit[e])
            x = hidden_states[token]
            expert = self[e]
            h = self.act[0](expert.gate_proj(x)) * expert.up_proj(x)
            h = expert.down_proj(h) * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out


def unfuse(fused: nn.Module) -> UnfusedExperts:
    """The experts as linears; the fused module keeps empty tensors until :func:`refuse` (memory is not doubled)."""
    unfused = UnfusedExperts(fused)
    for name in ("gate_up_proj", "down_proj"):
        t = getattr(fused, name)
        setattr(fused, name, nn.Parameter(t.detach().new_empty(0, *t.shape[1:]), requires_grad=t.requires_grad))
    return unfused


@torch.no_grad()
def refuse(unfused: UnfusedExperts) -> nn.Module:
    """The stock module again, its fused parameters stacked from the linears as they are now."""
    fused = unfused.fused[0]
    gate_up = torch.stack([torch.cat([e.gate_proj.weight, e.up_proj.weight]) for e in unfused])
    down = torch.stack([e.down_proj.weight for e in unfused])
    for name, t in (("gate_up_proj", gate_up), ("down_proj", down)):
        setattr(fused, name, nn.Parameter(t, requires_grad=getattr(fused, name).requires_grad))
    return fused


def expert_views(fused: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """``{prefix}.{e}.gate_proj`` ... -> views of the fused tensors, [out, in] as the linears hold them (a mask filled
    in place into a view lands in the fused parameter)."""
    return {f"{prefix}.{e}.{part}": matrix for e in range(fused.gate_up_proj.shape[0])
            for part, matrix in zip(EXPERT_LINEARS, expert_matrices(fused, e))}
