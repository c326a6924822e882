"""Low-rank corrections beside pruned linears (EoRA): ``y = W x + B (A x)``, added by a forward hook.

The sparse weight stays as it is (its zeros are the mask); the correction lives in ``A`` (r x in) and
``B`` (out x r). Once attached, every later forward of the model (the rest of the pruning walk, the
evaluation) computes with it. :meth:`LowRankSet.peft_files` writes the set as a PEFT LoRA adapter
(``lora_alpha = r``, so PEFT's scaling is 1) that ``PeftModel.from_pretrained`` loads onto the
saved sparse model.
"""

from __future__ import annotations

import json

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
        from safetensors.torch import save

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
        weights = save(tensors, metadata={"format": "pt"})
        cfg = config.to_dict()
        cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
        return {f"{folder}/adapter_config.json": json.dumps(cfg, indent=1, default=str),
                f"{folder}/adapter_model.safetensors": weights}


class MaskedLoRA:
    """Trainable low-rank updates that keep a mask: ``y = W x + s ((B A) * keep) x`` (PERP's MaskLoRA).

    ``keep`` is the linear's kept entries (all of them for a linear without a mask), so merging
    (``W += s (B A) * keep``) leaves every pruned weight exactly zero. ``A`` starts as PEFT's
    (Kaiming-uniform), ``B`` at zero: the model starts exactly where pruning left it.
    """

    def __init__(self, rank: int, alpha: float, seed: int = 0) -> None:
        self.rank, self.scale, self.seed = rank, alpha / rank, seed
        self.modules: dict[str, tuple[nn.Linear, torch.Tensor | None]] = {}
        self.A: dict[str, nn.Parameter] = {}
        self.B: dict[str, nn.Parameter] = {}
        self._handles: list = []

    def add(self, name: str, linear: nn.Linear, keep: torch.Tensor | None) -> None:
        import math

        gen = torch.Generator().manual_seed(self.seed + len(self.A))
        bound = 1 / math.sqrt(linear.in_features)  # kaiming_uniform_(a=sqrt(5)) on (rank, in)
        A = (torch.rand(self.rank, linear.in_features, generator=gen) * 2 - 1) * bound
        self.A[name] = nn.Parameter(A.to(linear.weight.device, linear.weight.dtype))
        self.B[name] = nn.Parameter(torch.zeros(linear.out_features, self.rank, dtype=linear.weight.dtype,
                                                device=linear.weight.device))
        self.modules[name] = (linear, None if keep is None else keep.to(linear.weight.device))
        A_, B_, s = self.A[name], self.B[name], self.scale

        def hook(module, args, output, _keep=self.modules[name][1]):
            delta = B_ @ A_
            if _keep is not None:
                delta = delta * _keep
            return output + s * (args[0] @ delta.t().to(args[0].dtype)).to(output.dtype)

        self._handles.append(linear.register_forward_hook(hook))

    def parameters(self) -> dict[str, nn.Parameter]:
        out = {f"{n}.lora_A": p for n, p in self.A.items()}
        out.update({f"{n}.lora_B": p for n, p in self.B.items()})
        return out

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the updates into the weights (pruned entries stay exactly zero) and remove the hooks."""
        self.detach()
        for name, (linear, keep) in self.modules.items():
            delta = self.scale * (self.B[name] @ self.A[name]).to(linear.weight.dtype)
            if keep is not None:
                delta = delta * keep
            linear.weight.add_(delta)

    def as_lowrank(self) -> LowRankSet:
        """The updates as a plain adapter (no mask: ``B A`` is dense), to save in PEFT's format unmerged."""
        out = LowRankSet()
        for name in self.modules:
            out.factors[name] = (self.A[name].detach().clone(), (self.scale * self.B[name]).detach().clone())
        return out
