"""Structures: what a pruning step removes (single weights, N:M groups, channels, heads, sublayers, blocks)."""

from . import masks, units  # noqa: F401  (registration)
from .masks import NM, Unstructured, parse_structure
from .units import Structured

__all__ = ["NM", "Unstructured", "Structured", "parse_structure"]
