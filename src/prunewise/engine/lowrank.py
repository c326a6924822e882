"""Low-rank corrections beside pruned linears (EoRA): ``y = W x + B (A x)``, added by a forward hook.

The sparse weight stays as it is (its zeros are the mask); the correction lives in ``A`` (r x in) and
``B`` (out x r). Once attached, every later forward of the model (the rest of the pruning walk, the
evaluation) computes with it. :meth:`LowRankSet.peft_files` writes the set as a PEFT LoRA adapter
(``lora_alpha = r``, so PEFT's scaling is 1) that ``PeftModel.from_pretrained`` loads onto the
saved sparse model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from torch import nn


class LowRankSet:
    """The corrections of one run: full linear name -> ``(A, B)``, each attached to its linear."""

    def __init__(self) -> None:
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self.factors)

    def attach(self, name: str, linear: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> None:
        """Add ``B (A x)`` to ``linear``'s output from now on (replacing an earlier correction of it)."""
        A, B = A.detach().to("cpu").contiguous(), B.detach().to("cpu").contiguous()
        self.factors[name] = (A, B)
        if name in self._handles:
            self._handles.pop(name).remove()
        placed: dict = {}

        def hook(module, args, output):
            x = args[0]
            key = (x.device, x.dtype)
            if key not in placed:  # the factors where the block computes, once per device and dtype
                placed.clear()
                placed[key] = (A.to(x.device, x.dtype), B.to(x.device, x.dtype))
            a, b = placed[key]
            return output + ((x @ a.t()) @ b.t()).to(output.dtype)

        self._handles[name] = linear.register_forward_hook(hook)

    def detach(self) -> None:
        """Remove every hook (the model computes with its sparse weights alone again)."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()

    @property
    def parameters(self) -> int:
        return sum(A.numel() + B.numel() for A, B in self.factors.values())

    def summary(self, dtype: torch.dtype) -> dict:
        ranks = sorted({A.shape[0] for A, _ in self.factors.values()})
        size = torch.tensor([], dtype=dtype).element_size()
        return {"modules": len(self), "ranks": ranks, "parameters": self.parameters, "bytes": self.parameters * size}

    def peft_files(self, folder: str, dtype: torch.dtype, base: str = "") -> dict[str, bytes | str]:
        """``{folder}/adapter_config.json`` and ``{folder}/adapter_model.safetensors`` of a PEFT LoRA adapter."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        ranks = {A.shape[0] for A, _ in self.factors.values()}
        r = max(ranks)
        pattern = {n: A.shape[0] for n, (A, _) in self.factors.items() if A.shape[0] != r}
        config = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                            target_modules=sorted(self.factors), rank_pattern=pattern,
                            alpha_pattern=dict(pattern), base_model_name_or_path=base or None)
        tensors = {}
        for name, (A, B) in self.factors.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).contiguous()
        with tempfile.TemporaryDirectory() as tmp:
            save_file(tensors, str(Path(tmp) / "adapter_model.safetensors"), metadata={"format": "pt"})
            weights = (Path(tmp) / "adapter_model.safetensors").read_bytes()
        cfg = config.to_dict()
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        return {f"{folder}/adapter_config.json": json.dumps(cfg, indent=1, default=str),
                f"{folder}/adapter_model.safetensors": weights}
