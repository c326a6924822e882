"""Register the pruned twins of each family with the Auto classes, so exported folders with per-block
widths load with plain ``from_pretrained`` (no ``trust_remote_code``) once prunewise is imported."""

from __future__ import annotations

from pathlib import Path

MODELING_FILE = Path(__file__).with_name("modeling_prunewise.py")


def register_pruned_classes() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .modeling_prunewise import PRUNED_CLASSES

    for config_cls, model_cls in PRUNED_CLASSES.values():
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
        AutoModelForCausalLM.register(config_cls, model_cls, exist_ok=True)
