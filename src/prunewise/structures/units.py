"""Structured units as parts: MLP ``channels``, attention ``heads``, ``width`` (both), ``sublayers``, ``blocks``,
and the routed ``experts`` of mixture-of-experts layers.

Width structures remove units inside every block (their scores summed from a score's per-weight
quantity over the rows and columns a unit owns, or the score's own unit scores), so the model gets
narrower; depth structures remove whole sublayers or blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from ..core.registry import REGISTRIES, PartConfig, register
from ..errors import PrunewiseError
from .base import Structure
from .geometry import BlockGeometry

STRUCTURES = ("channels", "heads", "width", "sublayers", "blocks", "experts")


class WidthConfig(PartConfig):
    heads_mode: Literal["query", "group"] = Field(
        "query", description="remove query heads evenly within key/value groups, or whole groups")
    width_multiple: int = Field(8, ge=1, description="MLP widths change in multiples of this many channels")


@dataclass(frozen=True)
class Structured(Structure):
    """A structured pruning unit; the model that comes out is physically smaller."""

    kind: str
    heads_mode: str = "query"
    width_multiple: int = 8
    nsamples: int = 8       # sublayers: calibration windows (and tokens each) the output damage is measured on
    seqlen: int = 256
    weight_level = False

    @property
    def name(self) -> str:
        return self.kind

    @property
    def prunes_mlp(self) -> bool:
        return self.kind in ("channels", "width")

    @property
    def prunes_heads(self) -> bool:
        return self.kind in ("heads", "width")

    @property
    def depth(self) -> bool:
        """Whole sublayers or blocks go (ranked by how little they change their input), not units inside blocks."""
        return self.kind in ("sublayers", "blocks")

    @classmethod
    def from_config(cls, config):
        return cls(cls.key, **config.model_dump())

    def options(self) -> dict:
        if self.kind == "sublayers":
            return {"nsamples": self.nsamples, "seqlen": self.seqlen}
        return {"heads_mode": self.heads_mode, "width_multiple": self.width_multiple} if not self.depth else {}

    def check(self, module_name: str, weight: torch.Tensor) -> None:
        return None


@register("structure")
class Channels(Structured):
    key = "channels"
    description = "MLP channels (a gate row, an up row, a down column each): a narrower MLP"
    Config = WidthConfig


@register("structure")
class Heads(Structured):
    key = "heads"
    description = "attention heads, GQA-aware (query heads within key/value groups, or whole groups)"
    Config = WidthConfig


@register("structure")
class Width(Structured):
    key = "width"
    description = "MLP channels and attention heads together"
    Config = WidthConfig


class SublayersConfig(PartConfig):
    nsamples: int = Field(8, ge=1, description="calibration windows the output damage is measured on")
    seqlen: int = Field(256, ge=2, description="tokens per damage window")


@register("structure")
class Sublayers(Structured):
    key = "sublayers"
    description = "whole attention or MLP sublayers, least output damage per parameter first (FinerCut)"
    Config = SublayersConfig
    works_with = {"allocation": ("uniform",)}
    hint = "sublayers are ranked by how little they change the output; leave --allocation at uniform"


@register("structure")
class Blocks(Structured):
    key = "blocks"
    description = "whole decoder blocks, least block influence first (ShortGPT)"
    works_with = {"allocation": ("uniform",)}
    hint = "blocks are ranked by how little they change their input; leave --allocation at uniform"


@register("structure")
class Experts(Structured):
    key = "experts"
    description = ("whole routed experts of every mixture-of-experts layer (--sparsity: the share of them), ranked by "
                   "an expert score on the calibration data: frequency, reap, ean")
    works_with = {"score": ("frequency", "reap", "ean", "easyep"), "allocation": ("uniform",), "compensation": ("merge",)}
    hint = ("experts are ranked by an expert score (frequency, reap, ean), the same count removed from every MoE "
            "layer (one count in a stock config)")

    def options(self) -> dict:
        return {}


def structured(kind: str, **options) -> Structured:
    return REGISTRIES["structure"].build(kind, **options)


def unit_scores(score, lin: dict, g: BlockGeometry, stats: dict) -> dict[str, torch.Tensor]:
    """Scores of a block's units: ``channels`` (I,), ``query`` (H,), ``kv`` (KV,); higher = keep.

    ``lin`` and ``stats`` are keyed by role (q, k, v, o, gate, up, down). ``query`` holds what a
    query head owns (q rows, o columns); ``kv`` what a key/value head owns beyond its query heads
    (k, v rows). A score with its own ``unit_scores`` (FLAP's fluctuation) decides alone; otherwise
    the score's per-weight ``unit_element`` is summed over each unit and ``unit_finish`` is applied
    by the caller after any grouping (group magnitude is a root of summed squares).
    """
    if score.unit_scores is not None:
        return score.unit_scores(lin, g, stats)
    hd = g.head_dim

    def el(role: str) -> torch.Tensor:
        s = stats.get(role)
        if score.needs.gradient and (s is None or s.gradient is None):
            raise PrunewiseError(f"no gradient for the {role} projection; the {score.name} score needs gradients of "
                                 "every targeted linear")
        return score.unit_element(lin[role].weight, s)

    channels = el("gate").sum(1) + el("up").sum(1) + el("down").sum(0)
    query = el("q").sum(1).view(g.heads, hd).sum(1) + el("o").sum(0).view(g.heads, hd).sum(1)
    kv = el("k").sum(1).view(g.kv_heads, hd).sum(1) + el("v").sum(1).view(g.kv_heads, hd).sum(1)
    return {"channels": channels, "query": query, "kv": kv}
