"""Recovery: training after pruning that keeps the masks (mask-preserving LoRA, biases + norms, distillation).
One file per part, registered here."""

from . import distill, lora  # noqa: F401  (registration)
from .base import Recovery, RecoveryConfig

__all__ = ["Recovery", "RecoveryConfig"]
