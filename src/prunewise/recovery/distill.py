"""Distillation from the dense model (Minitron, Sreenivas et al. 2024): KL(teacher || student) on the logits at
temperature T (scaled by T^2), optionally plus the language-model loss; the teacher's logits are computed on
the fly for each window."""

from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from ..core.registry import register
from .base import Recovery, RecoveryConfig, token_loss


class DistillConfig(RecoveryConfig):
    temperature: float = Field(1.0, gt=0, description="softmax temperature of teacher and student")
    lm_weight: float = Field(0.0, ge=0, description="weight of the next-token loss added to the KL")


@register("recovery")
class DistillRecovery(Recovery):
    key = "distill"
    name = "distill"
    description = "distillation from the dense model: KL on the logits (+ optional LM loss), the masks kept"
    Config = DistillConfig
    teacher = True

    def loss(self, student_logits, ids, mask, teacher_logits):
        T = self.config.temperature
        s = F.log_softmax(student_logits[:, :-1].float() / T, dim=-1)
        t = F.log_softmax(teacher_logits[:, :-1].float() / T, dim=-1)
        kl = (t.exp() * (t - s)).sum(-1)
        if mask is not None:
            m = mask[:, 1:].float()
            kl = (kl * m).sum() / m.sum().clamp_min(1)
        else:
            kl = kl.mean()
        out = kl * T * T
        if self.config.lm_weight:
            out = out + self.config.lm_weight * token_loss(student_logits, ids, mask)
        return out
