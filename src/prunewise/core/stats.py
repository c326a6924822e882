"""Statistics of a linear layer's inputs, and the typed request a part makes for them.

Parts (scores, compensations, allocations) say what they need with a :class:`Needs`; the engine
merges the requests of every part that runs on a linear (``a | b``) and collects one
:class:`LinearStats` per distinct input.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import torch

from ..errors import PrunewiseError


@dataclass(frozen=True)
class Needs:
    """Which statistics of a linear's inputs (and of the loss) a part needs.

    ``sq_norm``: per-input sums of squares (Wanda's ``||X_j||^2``); ``mean``: per-input sums as
    well (means and variances: FLAP); ``hessian``: ``X X^T`` (SparseGPT, OBS); ``samples``: a few
    kept input vectors per window (TRIM's row-wise allocation); ``window_variance``: each input's
    population variance within a window, averaged over windows (DSnoT); ``gradient``: gradients of the LM
    loss w.r.t. the weight, either ``"sum"`` over the calibration windows (Taylor) or
    ``"per_sample_l2"``, the root of the summed squared per-window gradients (GBLM-Pruner), or ``"folded"``: each
    batch's gradient folded into the score's own accumulation (``Score.fold``, D-Pruner). ``general``: the score's
    general importance (``Score.general_importance``) from Hessians of the general calibration set, given to the
    fold (D-Pruner). ``experts``: per routed
    expert of a mixture-of-experts layer, what the router sends it (:class:`ExpertStats`; asked of the block's
    experts, not of a linear).
    """

    sq_norm: bool = False
    mean: bool = False
    hessian: bool = False
    samples: bool = False
    window_variance: bool = False
    gradient: Literal["sum", "per_sample_l2", "folded"] | None = None
    general: bool = False
    experts: bool = False

    def __or__(self, other: Needs | None) -> Needs:
        if other is None:
            return self
        if self.gradient and other.gradient and self.gradient != other.gradient:
            raise PrunewiseError(f"parts need two kinds of gradients ({self.gradient}, {other.gradient}); "
                                 "combine parts that agree on one")
        return Needs(**{f.name: getattr(self, f.name) or getattr(other, f.name) for f in fields(self)})

    @property
    def inputs(self) -> bool:
        """Whether any statistic of the inputs is asked (a calibration pass through the block)."""
        return self.sq_norm or self.mean or self.hessian or self.samples or self.window_variance or self.experts

    @property
    def any(self) -> bool:
        return self.inputs or self.gradient is not None or self.general


NONE = Needs()


def merge(*needs: Needs | None) -> Needs:
    out = NONE
    for n in needs:
        out = out | n
    return out


class LinearStats:
    """Running statistics of a linear layer's inputs over calibration tokens.

    ``sq_norm[j]`` is the sum over tokens of ``x_j^2`` (Wanda's ``||X_j||_2^2``); ``hessian`` is
    ``sum_t x_t x_t^T`` (SparseGPT's ``X X^T``, up to a scale that dampening makes irrelevant);
    ``gradient`` is set by the engine when a part asked for gradients.
    """

    def __init__(self, in_features: int, hessian: bool = False, samples_per_window: int = 0,
                 mean: bool = False, device: torch.device | str = "cpu", window_variance: bool = False) -> None:
        wide = torch.float32 if torch.device(device).type == "mps" else torch.float64  # MPS has no float64
        self.sq_norm = torch.zeros(in_features, dtype=wide, device=device)
        self.sum = torch.zeros(in_features, dtype=wide, device=device) if mean else None
        # X^T X on and above the diagonal (see _add_upper); ``hessian`` mirrors it once it is read
        self._upper = torch.zeros(in_features, in_features, dtype=torch.float32, device=device) if hessian else None
        self._full: torch.Tensor | None = None
        # token-weighted sum of within-window population variances (DSnoT's ``var``)
        self.window_var = torch.zeros(in_features, dtype=wide, device=device) if window_variance else None
        self.tokens = 0
        self.windows = 0  # calibration windows seen (the reference codes average sums of squares over them)
        self.samples_per_window = samples_per_window
        self._samples: list[torch.Tensor] = []
        self.gradient: torch.Tensor | None = None
        self.cache: dict = {}  # what parts derive from the statistics once (SparseGPT's inverse-Hessian factor)
        self.reached = True  # False: no calibration token reached the linear (see :meth:`unreached`)

    @classmethod
    def for_needs(cls, in_features: int, needs: Needs, device: torch.device | str = "cpu") -> LinearStats:
        return cls(in_features, hessian=needs.hessian, samples_per_window=4 if needs.samples else 0,
                   mean=needs.mean or needs.window_variance, device=device, window_variance=needs.window_variance)

    @classmethod
    def unreached(cls, in_features: int, needs: Needs, device: torch.device | str = "cpu") -> LinearStats:
        """Statistics for a linear no calibration token reaches (a routed expert the router never chose): isotropic
        inputs, ``sum x_j^2 = 1`` and ``X X^T = I``, zero mean and variance within windows, no samples. Wanda, RIA and
        the other input-aware scores then rank its weights by magnitude, and an OBS/SparseGPT reconstruction, whose
        inverse Hessian is diagonal, leaves its kept weights unchanged. ``reached`` is False."""
        stats = cls.for_needs(in_features, needs, device=device)
        stats.sq_norm = torch.ones_like(stats.sq_norm)
        if stats._upper is not None:
            stats._upper = torch.eye(in_features, dtype=stats._upper.dtype, device=device)
        stats.reached = False
        return stats

    @property
    def hessian(self) -> torch.Tensor | None:
        """``sum_t x_t x_t^T`` (float32, symmetric), or None when not asked."""
        if self._upper is None:
            return None
        if self._full is None:
            self._full = self._upper.triu() + self._upper.triu(1).t()
        return self._full

    @hessian.setter
    def hessian(self, value: torch.Tensor | None) -> None:
        self._upper = self._full = value

    @property
    def mean(self) -> torch.Tensor:
        """Mean of each input over the calibration tokens (needs ``mean``)."""
        return self.sum / max(self.tokens, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance of each input over the calibration tokens (needs ``mean``): FLAP's fluctuation."""
        n = max(self.tokens, 2)
        return ((self.sq_norm - self.sum.pow(2) / n) / (n - 1)).clamp_min(0)

    @property
    def window_variance(self) -> torch.Tensor:
        """Each input's population variance within a window, averaged over windows by tokens (needs ``window_variance``)."""
        return self.window_var / max(self.tokens, 1)

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
        self.windows += x.shape[0] if x.dim() == 3 else 1
        if self.window_var is not None:
            xw = x.float() if x.dim() == 3 else x.float().unsqueeze(0)
            self.window_var += (xw.var(dim=1, unbiased=False) * xw.shape[1]).sum(0).to(self.window_var.dtype)
        x = x.reshape(-1, x.shape[-1]).float()
        self.tokens += x.shape[0]
        if self.sum is not None:
            self.sum += x.sum(0).to(self.sum.dtype)
        if self._upper is not None:
            _add_upper(self._upper, x)
            self._full = None
            self.sq_norm = self._upper.diagonal().to(self.sq_norm.dtype)
        else:
            self.sq_norm += _column_sq_sums(x).to(self.sq_norm.dtype)


    def check_finite(self, module: str) -> None:
        if not torch.isfinite(self.sq_norm).all():
            raise PrunewiseError(f"calibration activations entering {module} are NaN or infinite; "
                                 "check the model weights and use float32")


class ExpertStats:
    """What a MoE layer's router sent each routed expert over the calibration tokens.

    Per expert ``j`` (float64 sums over the tokens routed to it, ``X_j``): ``counts`` (|X_j|), ``gate`` (the
    routing weights ``g_j(x)`` the layer's forward applies: top-k, renormalised where the family does),
    ``norm`` (``||f_j(x)||``, the expert's output before its gate), ``gated_norm`` (``g_j(x) ||f_j(x)||``) and
    ``changed_norm`` (``g_j(x) ||f_j(x)|| s(x)``, ``s(x)`` how much the MoE sublayer turns the token's residual
    stream: :meth:`weigh_tokens`) and ``output_sum`` (``sum f_j(x)``, [E, H]: the expert's mean output, HC-SMoE's
    feature for which experts are alike); ``tokens`` counts every token of the layer.
    """

    def __init__(self, n_experts: int) -> None:
        self.counts = torch.zeros(n_experts, dtype=torch.float64)
        self.gate = torch.zeros(n_experts, dtype=torch.float64)
        self.norm = torch.zeros(n_experts, dtype=torch.float64)
        self.gated_norm = torch.zeros(n_experts, dtype=torch.float64)
        self.changed_norm = torch.zeros(n_experts, dtype=torch.float64)
        self.output_sum: torch.Tensor | None = None  # [E, H]: sum of f_j(x) over the tokens routed to j
        self.tokens = 0
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (j, tokens, g ||f||) of the last call

    @property
    def n_experts(self) -> int:
        return self.counts.numel()

    def add(self, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor, output) -> None:
        """Tokens ``x`` [T, H] routed by ``index`` / ``weights`` [T, k]; ``output(j, rows)`` is expert j's output."""
        self.tokens += x.shape[0]
        for j in index.unique().tolist():
            if not 0 <= j < self.n_experts:
                continue
            token, slot = torch.where(index == j)
            out = output(j, x[token]).double()
            # the sums live on the CPU whatever device computes (a GPU walk adds its per-expert results here)
            g = weights[token, slot].double().cpu()
            norm = out.norm(dim=-1).cpu()
            token = token.cpu()
            if self.output_sum is None:
                self.output_sum = torch.zeros(self.n_experts, out.shape[-1], dtype=torch.float64)
            self.output_sum[j] += out.sum(0).cpu()
            self.counts[j] += token.numel()
            self.gate[j] += g.sum()
            self.norm[j] += norm.sum()
            self.gated_norm[j] += (g * norm).sum()
            self._pending.append((j, token, g * norm))

    def weigh_tokens(self, change: torch.Tensor) -> None:
        """The last :meth:`add`'s tokens' ``s(x)`` [T] (EASY-EP's token contribution: ``max(1 - cos(h, h'), 0)``, ``h``
        the residual stream entering the MoE sublayer and ``h'`` leaving it): ``changed_norm[j] += sum g ||f|| s``."""
        change = change.double().cpu()
        for j, token, contribution in self._pending:
            self.changed_norm[j] += (contribution * change[token]).sum()
        self._pending = []

    def check_finite(self, where: str) -> None:
        if not (torch.isfinite(self.norm).all() and torch.isfinite(self.gated_norm).all()):
            raise PrunewiseError(f"expert outputs in {where} are NaN or infinite on the calibration data; check the "
                                 "model weights and use float32")


def _column_sq_sums(x: torch.Tensor, band: int = 4096) -> torch.Tensor:
    """Per-column sums of squares of a (tokens, in) matrix, ``band`` tokens at a time: each band stays in cache,
    an order of magnitude faster on a CPU than one ``vector_norm`` over all tokens (the last digits of the sums
    differ from it; they decide no mask in practice)."""
    out = x[:band].square().sum(0)
    for i in range(band, x.shape[0], band):
        out += x[i:i + band].square().sum(0)
    return out


def _add_upper(upper: torch.Tensor, x: torch.Tensor, band: int = 192) -> None:
    """``upper += x^T x`` on and above the diagonal, in bands of rows: about 0.55-0.65 of the full product's
    multiply-adds (its symmetric half), 0.65-0.75x its time on a CPU (smollm2's 576 and 1,536 inputs over 512-token
    windows). Every entry on and above the diagonal is bit-identical to the full product's (the sum over tokens
    runs in the same order); the mirrored matrix is symmetric by construction and equals the full product wherever
    that is exactly symmetric (on this CPU every width from 16 up)."""
    n = x.shape[1]
    band = max(band, -(-n // 32))
    for a in range(0, n, band):
        b = min(a + band, n)
        upper[a:b, a:].addmm_(x[:, a:b].t(), x[:, a:])


def wanda_metric(weight: torch.Tensor, stats: LinearStats) -> torch.Tensor:
    """Wanda's ``|W_ij| * ||X_j||_2`` (the Wanda score, and OWL's outlier measure)."""
    return weight.abs().float() * stats.sq_norm.sqrt().float().unsqueeze(0)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element of ``t`` is finite: one min/max reduction (NaN propagates through both), no
    temporary of ``t``'s size (an order of magnitude faster than ``torch.isfinite(t).all()`` on a CPU)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = t.aminmax()
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def check_weight(module: str, weight: torch.Tensor) -> None:
    if not all_finite(weight):
        from .dtypes import overflows

        why = overflows(weight)
        if why is not None:
            raise PrunewiseError(f"weights of {module} contain infinite values: {why} (if the checkpoint itself is "
                                 f"stored in {str(weight.dtype).removeprefix('torch.')}, it is corrupt)")
        raise PrunewiseError(f"weights of {module} contain NaN or infinite values; the source checkpoint is "
                             "corrupt: re-download or re-convert it")
