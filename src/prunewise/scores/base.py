"""What every score shares: input statistics of a linear layer and the score interface."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..errors import PrunewiseError


class LinearStats:
    """Running statistics of a linear layer's inputs over calibration tokens.

    ``sq_norm[j]`` is the sum over tokens of ``x_j^2`` (Wanda's ``||X_j||_2^2``); ``hessian`` is
    ``sum_t x_t x_t^T`` (SparseGPT's ``X X^T``, up to a scale that dampening makes irrelevant).
    """

    def __init__(self, in_features: int, hessian: bool = False, samples_per_window: int = 0,
                 mean: bool = False) -> None:
        self.sq_norm = torch.zeros(in_features, dtype=torch.float64)
        self.sum = torch.zeros(in_features, dtype=torch.float64) if mean else None
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32) if hessian else None
        self.tokens = 0
        self.samples_per_window = samples_per_window
        self._samples: list[torch.Tensor] = []

    @classmethod
    def for_need(cls, in_features: int, need: str) -> "LinearStats":
        """Statistics for a visitor's need: 'sq_norm' or 'hessian', optionally '+samples' (row-wise allocation)
        or '+mean' (per-input sums: mean and variance, for structured scores and bias compensation)."""
        return cls(in_features, hessian=need.startswith("hessian"), samples_per_window=4 if need.endswith("+samples") else 0,
                   mean="+mean" in need)

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each input over the calibration tokens (needs '+mean')."""
        return self.sum / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance of each input over the calibration tokens (needs '+mean'): FLAP's fluctuation."""
        n = max(self.tokens, 2)
        return ((self.sq_norm - self.sum.pow(2) / n) / (n - 1)).clamp_min(0)

    @property
    def samples(self) -> torch.Tensor:
        """Kept input vectors (S, in): ``samples_per_window`` evenly spaced positions of every window."""
        return torch.cat(self._samples) if self._samples else torch.zeros(0, self.sq_norm.shape[0])

    def add(self, x: torch.Tensor) -> None:
        if self.samples_per_window and x.dim() == 3:
            L = x.shape[1]
            k = min(self.samples_per_window, L)
            pos = torch.linspace(L - 1, 0, k).round().long().flip(0)  # always includes the last token (TRIM's choice)
            self._samples.append(x[:, pos].reshape(-1, x.shape[-1]).float().clone())
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.sum is not None:
            self.sum += x.sum(0).double()
        if self.hessian is not None:
            self.hessian.addmm_(x.t(), x)
            self.sq_norm = self.hessian.diagonal().double()
        else:
            self.sq_norm += torch.linalg.vector_norm(x, dim=0).double().pow(2)

    def check_finite(self, module: str) -> None:
        if not torch.isfinite(self.sq_norm).all():
            raise PrunewiseError(f"calibration activations entering {module} are NaN or infinite; "
                                 "check the model weights and use float32")


@dataclass
class PruneOutcome:
    """A pruned weight and what happened while pruning it (for the report)."""

    weight: torch.Tensor
    mask: torch.Tensor
    notes: dict = field(default_factory=dict)


class Score(Protocol):
    """A pruning criterion: ranks weights and prunes a linear layer to a sparsity."""

    name: str
    needs: str | None  # statistics needed: None, "sq_norm" or "hessian"
    default_group: str  # comparison group for unstructured sparsity: "row" or "layer"

    def importance(self, weight: torch.Tensor, stats: LinearStats | None, module: str = "?") -> torch.Tensor: ...

    def prune(self, weight: torch.Tensor, stats: LinearStats | None, structure, sparsity,
              module: str = "?") -> PruneOutcome: ...


def check_weight(module: str, weight: torch.Tensor) -> None:
    if not torch.isfinite(weight).all():
        raise PrunewiseError(f"weights of {module} contain NaN or infinite values; the source checkpoint is "
                             "corrupt: re-download or re-convert it")
