"""Structures for weight-level sparsity: which weights a score's ranking removes.

A structure turns an importance matrix (higher = keep) and a sparsity into a boolean mask
(True = remove). Counts are exact: a module at sparsity ``s`` loses ``round(s * numel)`` weights,
spread over rows so that no two rows differ by more than one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..core.registry import PartConfig, register
from ..errors import PrunewiseError
from .base import Structure


def row_counts(rows: int, cols: int, sparsity: float | torch.Tensor) -> torch.Tensor:
    """How many weights each row loses.

    A scalar sparsity removes exactly ``round(s * rows * cols)`` weights in total, spread evenly
    over the rows (each row ``floor`` or ``ceil`` of ``s * cols``). A per-row vector gives each row
    ``round(s_r * cols)``.
    """
    if isinstance(sparsity, torch.Tensor) and sparsity.dim() == 1:
        return torch.round(sparsity.double() * cols).long().clamp_(0, cols)
    total = int(round(float(sparsity) * rows * cols))
    base, extra = divmod(total, rows)
    counts = torch.full((rows,), base, dtype=torch.long)
    if extra:
        # spread the remainder over rows evenly across the matrix (deterministic)
        idx = torch.div(torch.arange(extra) * rows, extra, rounding_mode="floor")
        counts[idx] += 1
    return counts


def smallest_per_row(importance: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mask of the ``counts[r]`` least important entries of each row ``r``."""
    rows, cols = importance.shape
    counts = counts.to(importance.device)
    mask = torch.empty(rows, cols, dtype=torch.bool, device=importance.device)
    positions = torch.arange(cols, device=importance.device)
    # a band of rows at a time: the sort's int64 indices and ranks of a whole MLP matrix would be 4x its
    # float32 scores (1.1 GB for a 13B model's), more than the block the engine holds
    step = max(1, (1 << 21) // max(cols, 1))
    for start in range(0, rows, step):
        band = importance[start:start + step]
        order = torch.argsort(band, dim=1, stable=True)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, positions.expand(band.shape[0], cols))
        mask[start:start + step] = rank < counts[start:start + step].unsqueeze(1)
    return mask


def smallest_overall(importance: torch.Tensor, count: int) -> torch.Tensor:
    """Mask of the ``count`` least important entries of the whole matrix."""
    mask = torch.zeros(importance.numel(), dtype=torch.bool, device=importance.device)
    if count > 0:
        idx = torch.topk(importance.flatten(), count, largest=False, sorted=False).indices
        mask[idx] = True
    return mask.view_as(importance)


class WarmSmallest:
    """:func:`smallest_overall` for a sequence of matrices whose k-th smallest entry moves little (ADMM's iterates),
    found from the last call's threshold: a count below a narrow band around it and an exact selection inside the
    band replace a selection over the whole layer (9 ms instead of 21 ms on a 576 x 1536 matrix). Ties at the
    threshold go by position; the count is always exact, and a band that misses falls back to the whole layer."""

    def __init__(self, count: int) -> None:
        self.count, self.threshold, self.width = count, None, 0.05

    def __call__(self, importance: torch.Tensor) -> torch.Tensor:
        flat = importance.reshape(-1)
        k = self.count
        if k <= 0 or k >= flat.numel():
            return torch.full_like(importance, k > 0, dtype=torch.bool)
        t = self._threshold(flat, k)
        mask = flat <= t
        extra = int(torch.count_nonzero(mask)) - k
        if extra > 0:  # ties at the threshold: the first positions are removed, the last kept
            ties = (flat == t).nonzero().squeeze(1)
            mask[ties[ties.numel() - extra:]] = False
        return mask.view_as(importance)

    def _threshold(self, flat: torch.Tensor, k: int) -> torch.Tensor:
        t = self.threshold
        if t is not None and float(t) > 0:
            lo, hi = t * (1 - self.width), t * (1 + self.width)
            below = int(torch.count_nonzero(flat < lo))
            if below < k:
                band = flat[(flat >= lo) & (flat <= hi)]
                if below + band.numel() >= k:
                    self.threshold = torch.kthvalue(band, k - below).values
                    if band.numel() > flat.numel() // 8:  # a band this wide gains little: narrow it
                        self.width /= 2
                    return self.threshold
            self.width = min(self.width * 4, 0.5)  # missed: widen for the next call
        self.threshold = torch.kthvalue(flat, k).values
        return self.threshold


class UnstructuredConfig(PartConfig):
    group: Literal["row", "layer"] | None = None  # comparison group; default per score


@register("structure")
@dataclass(frozen=True)
class Unstructured(Structure):
    """Unstructured sparsity; ``group`` is the comparison group: each output row, or the whole layer."""

    key = "unstructured"
    description = "single weights, compared per output row or per layer"
    Config = UnstructuredConfig
    group: str = "row"

    @property
    def name(self) -> str:
        return "unstructured"

    @classmethod
    def from_config(cls, config):
        return cls(config.group or "row")

    def options(self) -> dict:
        return {"group": self.group}

    def check(self, module_name: str, weight: torch.Tensor) -> None:
        return None

    def tiles(self, rows: int, cols: int, sparsity) -> TileSelector:
        per_row = self.group == "row" or (isinstance(sparsity, torch.Tensor) and sparsity.dim() == 1)
        return _UnstructuredTiles(row_counts(rows, cols, sparsity), cols, per_row)

    def selector(self, shape: tuple[int, int], sparsity):
        if self.group == "layer" and not (isinstance(sparsity, torch.Tensor) and sparsity.dim() == 1):
            return WarmSmallest(int(round(float(sparsity) * shape[0] * shape[1])))
        return super().selector(shape, sparsity)

    def mask(self, importance: torch.Tensor, sparsity: float | torch.Tensor) -> torch.Tensor:
        rows, cols = importance.shape
        if self.group == "layer" and not (isinstance(sparsity, torch.Tensor) and sparsity.dim() == 1):
            return smallest_overall(importance, int(round(float(sparsity) * rows * cols)))
        return smallest_per_row(importance, row_counts(rows, cols, sparsity))


class NMConfig(PartConfig):
    n: int = 2
    m: int = 4


@register("structure")
@dataclass(frozen=True)
class NM(Structure):
    """N:M sparsity: exactly ``n`` zeros in every group of ``m`` consecutive inputs of a row."""

    key = "n:m"
    description = "N zeros in every M consecutive weights of a row (written N:M, e.g. 2:4)"
    Config = NMConfig
    fixed_sparsity = True
    n: int
    m: int

    @classmethod
    def from_config(cls, config):
        return cls(config.n, config.m)

    def options(self) -> dict:
        return {"n": self.n, "m": self.m}

    @property
    def level_quantum(self) -> int:
        return self.m

    def tile_width(self, blocksize: int) -> int:
        return blocksize if blocksize % self.m == 0 else self.m * max(1, blocksize // self.m)

    def tiles(self, rows: int, cols: int, sparsity) -> TileSelector:
        return _NMTiles(self.m, self.zeros_for(float(sparsity)))

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @property
    def sparsity(self) -> float:
        return self.n / self.m

    def check(self, module_name: str, weight: torch.Tensor) -> None:
        if weight.shape[1] % self.m:
            raise PrunewiseError(f"{self.name} sparsity needs input width divisible by {self.m}, but {module_name} has "
                                 f"{weight.shape[1]} inputs; choose an M that divides it or exclude the module")

    def zeros_for(self, sparsity: float) -> int:
        """N for a layer at ``sparsity`` (mixed N:M under non-uniform allocation)."""
        n = sparsity * self.m
        if abs(n - round(n)) > 1e-6:
            raise PrunewiseError(f"sparsity {sparsity:.4f} is not a multiple of 1/{self.m}; N:M plans must use levels k/{self.m}")
        return int(round(n))

    def mask(self, importance: torch.Tensor, sparsity: float | torch.Tensor | None = None) -> torch.Tensor:
        n = self.n if sparsity is None else self.zeros_for(float(sparsity))
        rows, cols = importance.shape
        groups = importance.reshape(rows, cols // self.m, self.m)
        mask = torch.zeros_like(groups, dtype=torch.bool)
        if n:
            idx = torch.topk(groups, n, dim=2, largest=False).indices
            mask.scatter_(2, idx, True)
        return mask.reshape(rows, cols)


class TileSelector:
    """How a structure chooses its mask inside a reconstruction sweep (SparseGPT), tile by tile.

    ``begin`` returns the mask of a new tile of columns ``[c0, c1)`` from the tile's saliency. A selector whose
    mask is chosen as the sweep goes (N:M groups, from the weights updated so far) sets ``every`` to its period
    ``k``: the sweep then calls ``at_column`` as it reaches columns ``0, k, 2k, ...`` of the tile, and that call
    sets the mask of columns ``[i, i + k)``.
    """

    every = 0

    def begin(self, saliency, W1: torch.Tensor, d1: torch.Tensor, c0: int, c1: int) -> torch.Tensor:
        raise NotImplementedError

    def at_column(self, saliency, i: int, W1: torch.Tensor, d1: torch.Tensor, mask1: torch.Tensor) -> None:
        return None


class _UnstructuredTiles(TileSelector):
    """Each tile removes its share of the layer's (or each row's) count, by the saliency within the tile."""

    def __init__(self, counts: torch.Tensor, cols: int, per_row: bool) -> None:
        self.counts, self.cols, self.per_row = counts, cols, per_row
        self.total = int(counts.sum())

    def begin(self, saliency, W1, d1, c0, c1):
        sal = saliency(W1, d1)
        if self.per_row:
            k = torch.round(self.counts.double() * c1 / self.cols) - torch.round(self.counts.double() * c0 / self.cols)
            return smallest_per_row(sal, k.long())
        k = round(self.total * c1 / self.cols) - round(self.total * c0 / self.cols)
        return smallest_overall(sal, k)


class _NMTiles(TileSelector):
    """N:M groups are chosen when the sweep reaches their first column, from the weights updated so far."""

    def __init__(self, m: int, n_zero: int) -> None:
        self.m, self.n_zero = m, n_zero
        self.every = m

    def begin(self, saliency, W1, d1, c0, c1):
        return torch.zeros_like(W1, dtype=torch.bool)

    def at_column(self, saliency, i, W1, d1, mask1):
        if self.n_zero:
            sal = saliency(W1[:, i:i + self.m], d1[i:i + self.m])
            idx = torch.topk(sal, self.n_zero, dim=1, largest=False).indices
            mask1.scatter_(1, i + idx, True)


def parse_structure(text: str, group: str = "row", **options):
    """``unstructured``, ``N:M`` (N zeros in every M consecutive weights, 0 < N < M), or a structured unit:
    ``channels``, ``heads``, ``width``, ``sublayers``, ``blocks`` (``options``: their part options)."""
    from .units import STRUCTURES, structured

    text = text.strip().lower()
    if text in STRUCTURES:
        return structured(text, **options)
    if text == "unstructured":
        if group not in ("row", "layer"):
            raise PrunewiseError(f"unknown comparison group '{group}'; use 'row' or 'layer'")
        return Unstructured(group)
    parts = text.split(":")
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        n, m = int(parts[0]), int(parts[1])
        if 0 < n < m:
            return NM(n, m)
        raise PrunewiseError(f"N:M structure '{text}' needs 0 < N < M (N zeros in every M weights), e.g. 2:4")
    raise PrunewiseError(f"unknown structure '{text}'; use 'unstructured', 'N:M' such as 2:4, or one of "
                         "channels, heads, width, sublayers, blocks")
