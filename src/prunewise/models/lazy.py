"""Models that are never built in memory: a module tree on the meta device, tensors read from the shards on demand.

:func:`empty_model` builds the tree of a checkpoint folder with every parameter on the meta device
(buffers such as rotary frequencies are computed for real: they are small and not in checkpoints).
:class:`CheckpointTensors` reads named tensors from the folder's safetensors files (one file, or
shards with ``model.safetensors.index.json``), each file memory-mapped only while it is read.
:func:`materialize` gives a module its tensors, :func:`release` puts them back on the meta device.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..core.dtypes import narrows, overflows
from ..errors import PrunewiseError

INDEX = "model.safetensors.index.json"


class CheckpointTensors:
    """Where each tensor of a safetensors checkpoint lives, and reading them by name."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / INDEX
        single = self.folder / "model.safetensors"
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise PrunewiseError(f"{index} is not a safetensors index (no weight_map: {exc}); re-save the model") from None
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif single.exists():
            with open(single, "rb") as f:
                header, _ = _safetensors_header(f, single)
            self.files = dict.fromkeys((k for k in header if k != "__metadata__"), single)
        else:
            raise PrunewiseError(f"{self.folder} has no model.safetensors or {INDEX}; streaming from disk reads "
                                 "safetensors checkpoints (convert other formats with save_pretrained first)")
        missing = sorted({str(p.name) for p in self.files.values() if not p.exists()})
        if missing:
            raise PrunewiseError(f"{self.folder} lacks shard(s) {', '.join(missing[:3])} named in its index; "
                                 "the download is incomplete")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in set(self.files.values()))

    def read(self, names: list[str], narrow: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, each read from its file straight into memory of its own.

        Plain reads, not a memory map: pages a map has touched count in the process's resident size
        until it is closed, and ``get_tensor`` then ``clone`` held each tensor three times (map, tensor,
        clone: an 88 MB embedding cost 264 MB). With ``narrow`` (a floating dtype), every floating tensor
        stored wider comes back in ``narrow``, cast while it is read ``READ_BAND`` bytes at a time, so the
        wide copy never exists whole (the float32 vocabulary matrix of a 152k-token model is 545 MB); the
        values are those of ``Tensor.to``.
        """
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.files:
                raise PrunewiseError(f"tensor {name} is not in the checkpoint {self.folder}; the checkpoint does not "
                                     "match its config.json")
            by_file.setdefault(self.files[name], []).append(name)
        out = {}
        for path, group in by_file.items():
            with open(path, "rb") as f:
                header, start = _safetensors_header(f, path)
                for name in sorted(group, key=lambda n: header[n]["data_offsets"][0]):
                    out[name] = _read_tensor(f, start, header[name], path, name, narrow)
        return out


SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(f, path: Path) -> tuple[dict, int]:
    """The header of an open safetensors file and where its data starts."""
    import struct

    raw = f.read(8)
    try:
        (size,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(size))
    except (struct.error, ValueError) as exc:
        raise PrunewiseError(f"{path} is not a safetensors file ({exc}); re-download or re-save the model") from None
    return header, 8 + size


READ_BAND = 1 << 24  # bytes of a wide tensor read at a time when it is narrowed while read


def _truncated(path: Path, name: str) -> PrunewiseError:
    return PrunewiseError(f"{path} ends inside tensor {name}; the file is truncated: re-download or re-save it")


def _read_tensor(f, start: int, entry: dict, path: Path, name: str, narrow: torch.dtype | None = None) -> torch.Tensor:
    import sys

    dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
    if dtype is None or sys.byteorder != "little":
        from safetensors import safe_open

        with safe_open(path, "pt") as handle:  # a dtype this reader does not know: the library reads it
            return handle.get_tensor(name).clone()
    begin, end = entry["data_offsets"]
    f.seek(start + begin)
    if narrow is not None and narrows(dtype, narrow):
        return _read_narrowed(f, end - begin, dtype, narrow, entry["shape"], path, name)
    t = torch.empty(end - begin, dtype=torch.uint8)
    if end > begin and f.readinto(memoryview(t.numpy())) != end - begin:
        raise _truncated(path, name)
    return t.view(dtype).reshape(entry["shape"])


def _read_narrowed(f, nbytes: int, stored: torch.dtype, narrow: torch.dtype, shape, path: Path, name: str) -> torch.Tensor:
    """``nbytes`` of ``stored`` values from ``f``, read ``READ_BAND`` bytes at a time into one buffer and each band
    cast into the ``narrow`` result (the cast ``Tensor.to`` does, element by element)."""
    item = stored.itemsize
    numel = nbytes // item
    per_band = max(1, min(READ_BAND // item, numel))
    out = torch.empty(numel, dtype=narrow)
    band = torch.empty(per_band * item, dtype=torch.uint8)
    for at in range(0, numel, per_band):
        n = min(per_band, numel - at)
        if f.readinto(memoryview(band[:n * item].numpy())) != n * item:
            raise _truncated(path, name)
        out[at:at + n].copy_(band[:n * item].view(stored))
    return out.reshape(shape)


def empty_model(folder: str | Path, dtype: torch.dtype) -> nn.Module:
    """The checkpoint's CausalLM with parameters on the meta device (no memory), in eval mode."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except Exception as exc:
        raise PrunewiseError(f"could not build the model of {folder} from its config.json "
                             f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
    return model.eval()


def tensor_names(model: nn.Module) -> dict[int, str]:
    """id(module) -> its full name, for finding the checkpoint names of a module's parameters."""
    return {id(m): n for n, m in model.named_modules()}


def checkpoint_name(model: nn.Module, full: str, tensors: CheckpointTensors) -> str:
    """The checkpoint name of parameter ``full``: itself, or the input embedding a tied output head shares."""
    if full in tensors:
        return full
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = tensor_names(model)
    if head is not None and full == f"{names[id(head)]}.weight":
        embed = model.get_input_embeddings()
        tied = f"{names[id(embed)]}.weight"
        if tied in tensors and getattr(model.config.get_text_config(), "tie_word_embeddings", False):
            return tied
    raise PrunewiseError(f"tensor {full} is not in the checkpoint {tensors.folder}; the checkpoint does not match "
                         "its config.json")


def materialize(module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Give every parameter of ``module`` (full names ``prefix.name``) its tensor, cast to ``dtype``."""
    for sub_name, sub in module.named_modules():
        for leaf, p in list(sub._parameters.items()):
            if p is None:
                continue
            full = ".".join(x for x in (prefix, sub_name, leaf) if x)
            t = tensors[full]
            if tuple(t.shape) != tuple(p.shape):
                raise PrunewiseError(f"tensor {full} has shape {tuple(t.shape)} in the checkpoint but {tuple(p.shape)} "
                                     "in its config; the checkpoint does not match its config.json")
            cast = t.to(dtype)
            if dtype == torch.float16 and t.dtype != dtype and t.is_floating_point() and bool(torch.isinf(cast).any()):
                why = overflows(cast, t.dtype)  # read finite, infinite once narrowed: float16's range, not corruption
                if why is not None and bool(torch.isfinite(t).all()):
                    raise PrunewiseError(f"tensor {full} (stored as {str(t.dtype).removeprefix('torch.')}) becomes "
                                         f"infinite when read: {why}")
            sub._parameters[leaf] = nn.Parameter(cast, requires_grad=False)


def release(module: nn.Module) -> None:
    """Put every parameter of ``module`` back on the meta device (its memory is freed)."""
    for sub in module.modules():
        for leaf, p in list(sub._parameters.items()):
            if p is not None and p.device.type != "meta":
                sub._parameters[leaf] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                     requires_grad=False)


def parameter_names(module: nn.Module, prefix: str) -> list[str]:
    return [".".join(x for x in (prefix, n) if x) for n, _ in module.named_parameters(remove_duplicate=False)]


def load_narrowed(folder: str | Path, dtype: torch.dtype) -> nn.Module | None:
    """The checkpoint's CausalLM stored in ``dtype``, read one top-level part at a time (each block, the shell).

    For a checkpoint wider than ``dtype`` (float32 weights loaded as bfloat16): ``from_pretrained``
    maps whole files and keeps every page it has read resident until the end, so its peak holds the
    wide checkpoint beside the narrow model (a float32 135M model loaded as bf16 peaks at about 1.6x
    the fp32 model's size above the baseline). Here the peak is the narrow model plus one band read wide:
    each tensor is cast band by band as it is read (a float32 vocabulary matrix is never whole in memory).
    The values are the same: each element is cast once, as ``Tensor.to`` casts it. Returns None (the caller uses
    ``from_pretrained``) when the checkpoint's names are not exactly the model's, ties aside.
    """
    tensors = CheckpointTensors(folder)
    model = empty_model(folder, dtype)
    names = tensor_names(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False) and head is not None
    tied_head = f"{names[id(head)]}.weight" if tied else None
    # every parameter but a tied head the checkpoint leaves out (tied again below)
    wanted = [full for full, _ in model.named_parameters(remove_duplicate=False)
              if not (full == tied_head and full not in tensors)]
    if set(wanted) != set(tensors.files):
        return None
    units: dict[str, list[str]] = {}  # a block (``model.layers.3``) or a module of the shell, read at once
    for full in wanted:
        parts = full.split(".")
        cut = next((i + 1 for i, x in enumerate(parts[:-1]) if x.isdigit()), len(parts) - 1)
        units.setdefault(".".join(parts[:cut]), []).append(full)
    for group in units.values():
        data = tensors.read(group, narrow=dtype)  # a wide tensor is cast as it is read, never whole
        for full in group:
            owner_name, leaf = full.rsplit(".", 1)
            owner = model.get_submodule(owner_name)
            t = data.pop(full)
            if tuple(t.shape) != tuple(owner._parameters[leaf].shape):
                return None
            owner._parameters[leaf] = nn.Parameter(t.to(dtype) if t.is_floating_point() else t,
                                                   requires_grad=t.is_floating_point())
    if tied:
        model.tie_weights()
    if any(p.device.type == "meta" for p in model.parameters()):
        return None
    return model.eval()
