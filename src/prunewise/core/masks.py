"""Masks as data: what a pruning run removed, kept until the end and saved beside the model.

A :class:`MaskSet` holds, per pruned linear, a boolean mask (True = removed) for weight-level
runs, and per block the kept units for structured runs (``channels``, ``query_heads``,
``kv_heads``, and the blocks removed outright). It is saved as ``masks.safetensors``: boolean
masks bit-packed (8 per byte, with their shapes in the metadata), kept units as index tensors. The
metadata also holds what the set was made for (``made_for``: the model's block count, and for
structured sets each block's widths) and a sha256 of every tensor's bytes (``sha256``), checked on
load: a file whose data was damaged (zeroed, truncated) is refused. Files written before the
checksum existed load without that check (their shapes, names and structure are still checked
against the model they are applied to, ``pipeline/reapply.check_masks``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import PrunewiseError

MASKS_FILE = "masks.safetensors"
FORMAT = "prunewise-masks-v1"


def data_digest(items: Iterable[tuple[str, bytes]]) -> str:
    """sha256 of a mask file's tensors: each key and its bytes, in the order given (the file's sorted keys)."""
    digest = hashlib.sha256()
    for key, data in items:
        digest.update(f"{key}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().numpy().tobytes()


def unpack_mask(bits: torch.Tensor, shape: list[int]) -> torch.Tensor:
    """A boolean mask of ``shape`` from its bits packed 8 per byte (little bit order)."""
    flat = np.unpackbits(bits.numpy(), bitorder="little", count=int(np.prod(shape)))
    return torch.from_numpy(flat.view(bool)).view(*shape)


def _check_metadata(masks: MaskSet, shapes) -> None:
    """The metadata's types (it is not covered by the checksum): a damaged header is a one-line error, not a crash."""
    made = masks.made_for
    ints = (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0)
    ok = (isinstance(shapes, dict) and all(isinstance(v, list) and all(ints(x) for x in v) for v in shapes.values())
          and isinstance(masks.structure, str) and isinstance(masks.removed_blocks, list)
          and all(ints(b) for b in masks.removed_blocks) and isinstance(made, dict)
          and ints(made.get("blocks", 0))
          and (made.get("widths") is None or (isinstance(made["widths"], list) and all(
              isinstance(w, list) and len(w) == 3 and all(ints(x) for x in w) for w in made["widths"]))))
    if not ok:
        raise ValueError("its metadata (shapes, structure, removed_blocks or made_for) is malformed")


@dataclass
class PruneOutcome:
    """A pruned weight, its mask (True = removed) and what happened while pruning it (for the report)."""

    weight: torch.Tensor
    mask: torch.Tensor
    notes: dict = field(default_factory=dict)
    lowrank: tuple[torch.Tensor, torch.Tensor] | None = None  # (A, B): a correction B A kept beside the weight


@dataclass
class MaskSet:
    """The masks of one run: ``weights`` (full linear name -> bool mask) or ``units`` (block -> kept indices)."""

    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    units: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    removed_blocks: list[int] = field(default_factory=list)
    structure: str = "unstructured"
    # masks already bit-packed (name -> (packed bits, shape)): a streamed run keeps one bit per weight in memory
    packed: dict[str, tuple[torch.Tensor, list[int]]] = field(default_factory=dict)
    # with ``spill``, packed masks go to files there instead (name -> (file, shape)): memory stays flat out of core
    spill: Path | None = None
    spilled: dict[str, tuple[Path, list[int]]] = field(default_factory=dict)
    # what the set was made for: {"blocks": N} and, structured, {"widths": [[intermediate, heads, kv_heads], ...]}
    made_for: dict = field(default_factory=dict)

    @property
    def has_weight_masks(self) -> bool:
        """Whether the set holds weight-level masks (in memory, bit-packed or spilled)."""
        return bool(self.weights or self.packed or self.spilled)

    def weight_names(self) -> list[str]:
        return [*self.weights, *self.packed, *self.spilled]

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every weight mask's shape, without unpacking it."""
        out = {n: tuple(m.shape) for n, m in self.weights.items()}
        out.update({n: tuple(shape) for n, (_, shape) in [*self.packed.items(), *self.spilled.items()]})
        return out

    def weight_masks(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every weight mask as a boolean tensor (True = removed), unpacking packed and spilled ones one at a time."""
        yield from self.weights.items()
        for name, (bits, shape) in self.packed.items():
            yield name, unpack_mask(bits, shape)
        if self.spilled:
            from safetensors import safe_open

            for file in sorted({f for f, _ in self.spilled.values()}):
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        yield name, unpack_mask(handle.get_tensor(name), self.spilled[name][1])

    def removed(self) -> int:
        """Weights masked (spilled masks are not counted: read them back with ``load``)."""
        return (sum(int(m.sum()) for m in self.weights.values())
                + sum(int(np.unpackbits(bits.numpy(), bitorder="little").sum()) for bits, _ in self.packed.values()))

    def pack(self) -> None:
        """Move every boolean mask into ``packed`` (8 weights per byte), or into a file under ``spill``."""
        from safetensors.torch import save_file

        batch = {}
        for name, mask in self.weights.items():
            flat = mask.detach().to("cpu", torch.bool).flatten().numpy()
            batch[name] = (torch.from_numpy(np.packbits(flat, bitorder="little")), list(mask.shape))
        self.weights.clear()
        if self.spill is None or not batch:
            self.packed.update(batch)
            return
        self.spill.mkdir(parents=True, exist_ok=True)
        path = self.spill / f"part-{len(set(f for f, _ in self.spilled.values())):05d}.safetensors"
        save_file({n: bits for n, (bits, _) in batch.items()}, str(path))
        self.spilled.update({n: (path, shape) for n, (_, shape) in batch.items()})

    def write(self, path: str | Path) -> None:
        """Write the mask file tensor by tensor (spilled masks are read one part file at a time)."""
        from safetensors import safe_open

        tensors, meta = self.to_tensors(include_spilled=False)
        entries = {n: (t.numel() * t.element_size(), {"dtype": {torch.uint8: "U8", torch.int64: "I64"}[t.dtype],
                                                     "shape": list(t.shape)}) for n, t in tensors.items()}
        shapes = json.loads(meta["shapes"])
        for name, (_, shape) in self.spilled.items():
            nbytes = (int(np.prod(shape)) + 7) // 8
            entries[f"weight/{name}"] = (nbytes, {"dtype": "U8", "shape": [nbytes]})
            shapes[name] = shape
        meta["shapes"] = json.dumps(shapes)
        header, offset = {"__metadata__": meta}, 0
        for key in sorted(entries):
            nbytes, info = entries[key]
            header[key] = {**info, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        handles: dict = {}

        def data(key: str) -> bytes:
            if key in tensors:
                return _bytes(tensors[key])
            name = key.removeprefix("weight/")
            file = self.spilled[name][0]
            if file not in handles:
                handles[file] = safe_open(str(file), framework="pt")
            return handles[file].get_tensor(name).numpy().tobytes()

        try:
            meta["sha256"] = data_digest((key, data(key)) for key in sorted(entries))  # a first pass: the checksum
            header["__metadata__"] = meta
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)
            with open(path, "wb") as out:
                out.write(len(text).to_bytes(8, "little") + text)
                for key in sorted(entries):
                    out.write(data(key))
        finally:
            handles.clear()

    def to_tensors(self, include_spilled: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        tensors, shapes = {}, {}
        if include_spilled and self.spilled:
            from safetensors.torch import load_file

            for file in sorted({f for f, _ in self.spilled.values()}):
                for name, bits in load_file(str(file)).items():
                    tensors[f"weight/{name}"] = bits
                    shapes[name] = self.spilled[name][1]
        for name, mask in self.weights.items():
            flat = mask.detach().to("cpu", torch.bool).flatten().numpy()
            tensors[f"weight/{name}"] = torch.from_numpy(np.packbits(flat, bitorder="little"))
            shapes[name] = list(mask.shape)
        for name, (bits, shape) in self.packed.items():
            tensors[f"weight/{name}"] = bits
            shapes[name] = shape
        for block, keep in self.units.items():
            for kind, idx in keep.items():
                tensors[f"units/{block}/{kind}"] = idx.detach().to("cpu", torch.long).contiguous()
        meta = {"format": FORMAT, "structure": self.structure, "shapes": json.dumps(shapes),
                "removed_blocks": json.dumps(self.removed_blocks), "made_for": json.dumps(self.made_for)}
        if include_spilled or not self.spilled:
            meta["sha256"] = data_digest((key, _bytes(tensors[key])) for key in sorted(tensors))
        return tensors, meta

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors, meta = self.to_tensors()
        save_file(tensors, str(path), metadata=meta)

    def to_bytes(self) -> bytes:
        from safetensors.torch import save

        tensors, meta = self.to_tensors()
        return save(tensors, metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> MaskSet:
        from safetensors import safe_open

        path = Path(path)
        if path.is_dir():
            path = path / MASKS_FILE
        if not path.exists():
            raise PrunewiseError(f"no mask set at {path}; prune with --output to save {MASKS_FILE} beside the model")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT:
                    raise PrunewiseError(f"{path} is not a prunewise mask set (format {meta.get('format')!r})")
                shapes = json.loads(meta["shapes"])
                out = cls(structure=meta.get("structure", "unstructured"),
                          removed_blocks=json.loads(meta.get("removed_blocks", "[]")),
                          made_for=json.loads(meta.get("made_for", "{}")))
                _check_metadata(out, shapes)
                raw = {key: f.get_tensor(key) for key in sorted(f.keys())}
            if "sha256" in meta and data_digest((k, _bytes(t)) for k, t in raw.items()) != meta["sha256"]:
                raise PrunewiseError(f"the mask set {path} is damaged: its data does not match the checksum saved with "
                                     "it; use an intact copy, or prune again to write it anew")
            # the tensors must be exactly those the metadata lists, each with the bytes its shape needs (a file
            # written before the checksum is checked this way too: no mask is applied in part)
            stored = {key.split("/", 1)[1] for key in raw if key.startswith("weight/")}
            if stored != set(shapes):
                missing, extra = sorted(set(shapes) - stored), sorted(stored - set(shapes))
                raise PrunewiseError(
                    f"the mask set {path} is damaged: " + "; ".join(
                        x for x in (f"{len(missing)} masks its metadata lists are missing (e.g. {missing[0]})"
                                    if missing else "", f"{len(extra)} masks have no shape in its metadata (e.g. "
                                    f"{extra[0]})" if extra else "") if x) + "; use an intact copy or prune again")
            for key, t in raw.items():
                kind, rest = key.split("/", 1)
                if kind == "weight":
                    need = (int(np.prod(shapes[rest])) + 7) // 8
                    if t.dtype != torch.uint8 or t.numel() != need:
                        raise PrunewiseError(f"the mask set {path} is damaged: the mask of {rest} has {t.numel()} "
                                             f"bytes, its shape {shapes[rest]} needs {need}; use an intact copy or "
                                             "prune again")
                    out.weights[rest] = unpack_mask(t, shapes[rest])
                else:
                    block, unit = rest.split("/")
                    out.units.setdefault(int(block), {})[unit] = t
        except PrunewiseError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file: name it in one line
            raise PrunewiseError(f"cannot read the mask set {path} ({type(exc).__name__}: {exc}); re-save it") from None
        return out
