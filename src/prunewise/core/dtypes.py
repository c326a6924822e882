"""Storage dtypes by name: what ``--dtype`` accepts."""

from __future__ import annotations

import torch

from ..errors import PrunewiseError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def parse_dtype(spec: str) -> str:
    """The canonical name of a storage dtype (``auto``, ``float32``, ``bfloat16``, ``float16``), or a one-line error."""
    text = str(spec).strip().lower().removeprefix("torch.")
    if text == "auto":
        return "auto"
    if text not in DTYPES:
        raise PrunewiseError(f"unknown dtype {spec!r}; use one of {', '.join(DTYPE_NAMES)} (or bf16, fp16, fp32)")
    return str(DTYPES[text]).removeprefix("torch.")


def narrows(stored: torch.dtype, wanted: torch.dtype) -> bool:
    """Whether a floating tensor stored in ``stored`` becomes smaller as ``wanted`` (float32 read as bfloat16)."""
    return (stored.is_floating_point and wanted.is_floating_point
            and torch.finfo(wanted).bits < torch.finfo(stored).bits)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a concrete name (not ``auto``)."""
    canonical = parse_dtype(name)
    if canonical == "auto":
        raise PrunewiseError("dtype 'auto' has no torch dtype of its own; resolve it against a checkpoint first")
    return DTYPES[canonical]


def overflows(tensor: torch.Tensor, stored: torch.dtype | None = None) -> str | None:
    """Why a non-finite ``tensor`` is an overflow of its narrow dtype rather than a corrupt checkpoint (one clause),
    or None: it holds infinities but no NaN, its dtype is narrower than float32 (``stored``, the checkpoint's
    dtype, when known, is wider than it)."""
    if not tensor.is_floating_point() or torch.finfo(tensor.dtype).bits >= 32:
        return None
    if stored is not None and not narrows(stored, tensor.dtype):
        return None
    if bool(torch.isnan(tensor).any()):
        return None
    name = str(tensor.dtype).removeprefix("torch.")
    wider = " or ".join(n for n in ("bfloat16", "float32") if n != name)
    return (f"its values overflow {name} (beyond +-{torch.finfo(tensor.dtype).max:g}), which is not a corrupt "
            f"checkpoint: load it with --dtype {wider}")
