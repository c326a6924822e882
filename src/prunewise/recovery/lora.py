"""LoRA recovery (PERP, Zimmer et al. 2024: MaskLoRA, W + s (B A * M)): the language-model loss on the recovery data."""

from __future__ import annotations

from ..core.registry import register
from .base import Recovery, token_loss


@register("recovery")
class LoRARecovery(Recovery):
    key = "lora"
    name = "lora"
    description = "mask-preserving LoRA (or biases + norms) trained on the recovery data's next-token loss"

    def loss(self, student_logits, ids, mask, teacher_logits):
        return token_loss(student_logits, ids, mask)
