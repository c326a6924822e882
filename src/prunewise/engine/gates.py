"""Unit gates for structure learned while tuning (ATP): each block's MLP channels and query heads multiplied by
a gate in the forward, the gates set from outside before every forward.

A channel's gate multiplies the ``down_proj`` input (the channel's activation), a query head's gate the head's slice
of the ``o_proj`` input (its attention output): a gate at 0 is exactly the unit removed, so the loss a trainer sees
is the loss of the smaller model. Hooks live here, in the engine, like every other hook on a block.
"""

from __future__ import annotations

import torch


class UnitGates:
    """Forward pre-hooks on every block's ``o`` and ``down`` linears (by role), multiplying their inputs by
    ``values[i] = (channel_gates [I], head_gates [H])``; ``None`` for a block leaves it ungated."""

    def __init__(self, model, adapter, head_dim: int) -> None:
        self.values: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        self._handles = []
        for i, block in enumerate(adapter.blocks(model)):
            roles = adapter.roles_of(block)
            self.values.append(None)
            self._handles.append(roles["down"].register_forward_pre_hook(self._channel_hook(i)))
            self._handles.append(roles["o"].register_forward_pre_hook(self._head_hook(i, head_dim)))

    def _channel_hook(self, i: int):
        def hook(module, args):
            gates = self.values[i]
            if gates is None:
                return None
            return (args[0] * gates[0].to(args[0].device, args[0].dtype),) + tuple(args[1:])
        return hook

    def _head_hook(self, i: int, head_dim: int):
        def hook(module, args):
            gates = self.values[i]
            if gates is None:
                return None
            x = args[0]
            g = gates[1].to(x.device, x.dtype).repeat_interleave(head_dim)
            return (x * g,) + tuple(args[1:])
        return hook

    def set(self, values: list[tuple[torch.Tensor, torch.Tensor]] | None) -> None:
        self.values = list(values) if values is not None else [None] * len(self.values)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
