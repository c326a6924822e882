"""EoRA (Liu et al., 2024; NVIDIA): a rank-r correction of the pruning error in the eigenspace of the inputs.

With ``C = X X^T`` the layer's input covariance over the calibration tokens, ``C = Q diag(L) Q^T`` and
``S = Q diag(sqrt(L))``, the error ``dW = W_dense - W_pruned`` is projected, ``dW S = U Sigma V^T``,
truncated to rank r, and projected back: ``B = U_r sqrt(Sigma_r)``, ``A = sqrt(Sigma_r) V_r^T S^-1``.
``B A`` is then the rank-r matrix closest to ``dW`` in the activation-weighted norm
``||(dW - B A) X||_F``, which is what the layer's output error measures (plain SVD of ``dW`` treats
every input direction alike). Negative eigenvalues (round-off) are raised to the smallest positive
one, as the reference does; eigenvalues under 1e-12 of the largest are raised to that floor, so that
``S^-1`` stays finite where inputs are dead.

The pruned weight keeps its zeros: the correction is a LoRA adapter beside it (saved in PEFT's
format), and computing with it is ``y = W_pruned x + B (A x)``.
"""

from __future__ import annotations

import torch
from pydantic import Field

from ..core.registry import PartConfig, register
from ..core.stats import Needs
from ..errors import PrunewiseError
from .base import Compensation


class EoRAConfig(PartConfig):
    rank: int = Field(16, ge=1, description="rank of the correction of each pruned linear")


@register("compensation")
class EoRACompensation(Compensation):
    key = "eora"
    name = "eora"
    description = "EoRA: rank-r correction of the pruning error in the inputs' eigenspace, saved as a PEFT LoRA adapter"
    Config = EoRAConfig
    shorthand = "rank"
    needs = Needs(hessian=True)
    adds_lowrank = True
    works_with = {"structure": ("unstructured", "n:m"), "allocation": ("uniform", "global", "owl")}
    hint = "EoRA corrects weights pruned in place, after a uniform, global or OWL allocation"

    def check(self, module_name: str, weight) -> None:
        """The rank must stay below the layer's full rank: a correction of full rank is the whole pruning error,
        so ``W_pruned + B A`` would be the dense weight again (the pruning undone)."""
        full = min(weight.shape)
        if self.config.rank >= full:
            raise PrunewiseError(f"eora rank {self.config.rank} is not below the rank of {module_name} "
                                 f"({tuple(weight.shape)}, at most {full}): the correction would undo the pruning; "
                                 f"use a rank below {full} (e.g. eora:{max(1, min(16, full // 4))}) or --ignore that module")

    def factors(self, dense: torch.Tensor, pruned: torch.Tensor, stats, module: str = "?"):
        """``(A, B)`` with ``B @ A`` the rank-r EoRA correction of ``dense - pruned`` (float32)."""
        if stats is None or stats.hessian is None:
            raise PrunewiseError(f"eora on {module} needs the input covariance from calibration data")
        delta = dense.detach().double() - pruned.detach().double()
        rank = min(self.config.rank, *delta.shape)
        cov = stats.cache.get("eora_eigh")
        if cov is None:  # siblings sharing one input (q, k, v) decompose it once
            H = stats.hessian.double()
            try:
                L, Q = torch.linalg.eigh(H)
            except RuntimeError as exc:
                raise PrunewiseError(f"eora on {module}: the input covariance could not be decomposed ({exc}); "
                                     "use more calibration samples") from None
            if not bool((L > 0).any()):
                raise PrunewiseError(f"eora on {module}: the inputs are all zero; use other calibration data")
            L = torch.where(L < 0, L[L > 0].min(), L).clamp_min(float(L.max()) * 1e-12)
            root = L.sqrt()
            cov = stats.cache["eora_eigh"] = (Q * root, (Q / root).t())  # S and S^-1
        S, S_inv = cov
        U, sigma, Vh = torch.linalg.svd(delta @ S, full_matrices=False)
        half = sigma[:rank].sqrt()
        B = U[:, :rank] * half
        A = (half.unsqueeze(1) * Vh[:rank]) @ S_inv
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise PrunewiseError(f"eora on {module} produced non-finite factors; use more calibration samples")
        return A.float(), B.float()
