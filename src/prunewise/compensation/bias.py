"""FLAP's bias compensation (An et al., 2024): the mean contribution of removed inputs of an output projection
is folded into its bias, ``b += W[:, removed] @ mean(x[removed])``; a removed sublayer keeps that constant."""

from __future__ import annotations

from ..core.registry import register
from ..core.stats import Needs
from .base import Compensation


@register("compensation")
class BiasCompensation(Compensation):
    key = "bias"
    name = "bias"
    description = "FLAP bias compensation: removed units' mean contribution folded into the output bias"
    needs = Needs(sq_norm=True, mean=True)
    works_with = {"structure": ("channels", "heads", "width", "sublayers", "blocks")}
    hint = "bias compensation applies to structured pruning (--structure channels, heads, width, sublayers or blocks)"
