"""Out-of-core walks: blocks read from the checkpoint's shards when the engine reaches them, written out and released.

A :class:`Stream` sits between the engine and a model built on the meta device
(:func:`prunewise.models.lazy.empty_model`). Before a block's passes it gives the block its tensors
(read while the previous block computed: one block is prefetched by a reader thread); after them,
when the walk rewrote weights, it writes the block's tensors to an output shard, counts the zeros
of every pruned linear, and puts the block back on the meta device. The shell around the blocks
(embedding, final norm, head) is read when the engine needs it and written once at the end. Memory
holds about two blocks and the calibration activations, whatever the model's size.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from ..errors import PrunewiseError
from ..models.lazy import (
    INDEX,
    SAFETENSORS_DTYPES,
    CheckpointTensors,
    checkpoint_name,
    materialize,
    parameter_names,
    release,
    tensor_names,
)


def return_freed_memory() -> bool:
    """Make glibc give every freed allocation over 1 MB back to the system at once (``mallopt``).

    A streamed run allocates and frees block-sized tensors from two threads; with glibc's default
    (a dynamic mmap threshold up to 32 MB, per-thread arenas) freed blocks stay in the heap and the
    resident size creeps up with every block (measured: 1.69 GB -> 1.08 GB peak on 8 blocks of a
    1.5B-shaped model; in memory, Wanda 50% on smollm2-135m stored in bf16 with 8 x 512 windows:
    994 -> 619 MB above the baseline, evaluation included). Process-wide, so the command line sets it
    (the process is its own), not the library; a no-op where glibc is absent.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, 1 << 20))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


_SAFETENSORS_DTYPES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write ``tensors`` as one safetensors file, each tensor's bytes straight from its memory.

    ``safetensors.torch.save_file`` first copies every tensor into a ``bytes`` object, so writing a
    block costs the block twice; here the file gets the header, then each tensor's buffer (little-endian
    machines, as torch's CPU tensors are). The file is the format's: ``safe_open`` and ``from_pretrained`` read it.
    """
    import struct
    import sys

    if sys.byteorder != "little":
        from safetensors.torch import save_file

        save_file({n: t.detach().contiguous() for n, t in tensors.items()}, str(path), metadata=metadata)
        return
    header: dict = {"__metadata__": metadata}
    flat, offset = [], 0
    for name, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        flat.append(t)
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for t in flat:
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


class ShardWriter:
    """Writes modules' tensors as safetensors shards (one per call) and, at the end, their index."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.parts: list[tuple[Path, list[str]]] = []
        self.total_size = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return
        path = self.folder / f"part-{len(self.parts):05d}.safetensors"
        write_safetensors(path, tensors, {"format": "pt"})
        self.parts.append((path, list(tensors)))
        self.total_size += sum(t.numel() * t.element_size() for t in tensors.values())

    def finish(self) -> None:
        """Rename the parts ``model-0000i-of-0000n.safetensors`` and write the index ``from_pretrained`` reads."""
        n = len(self.parts)
        weight_map = {}
        for i, (path, names) in enumerate(self.parts):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.rename(path, self.folder / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2))


# A block with routed experts stored in more bytes than this is not read ahead: a MoE block (OLMoE-1B-7B's: 0.84 GB
# in bf16, 1.7 GB computing in float32 on a CPU) would otherwise have its successor's copy add half again to the peak;
# dense blocks are always prefetched, as before
PREFETCH_MAX_BYTES = 512 << 20


class Stream:
    """Reads blocks and the shell of ``model`` (on the meta device) from ``tensors``; writes rewritten blocks to ``sink``."""

    def __init__(self, model: nn.Module, adapter, tensors: CheckpointTensors, dtype: torch.dtype,
                 sink: ShardWriter | None = None, measured: set[str] | None = None) -> None:
        self.model, self.adapter, self.tensors, self.dtype, self.sink = model, adapter, tensors, dtype, sink
        self.names = tensor_names(model)
        self.measured = measured or set()      # full names of linears whose zeros are counted when written
        self.zeros: dict[str, tuple[int, int]] = {}
        self.mask_spill: Path | None = sink.folder.parent / f"{sink.folder.name}-masks" if sink is not None else None
        self.bytes_read = 0
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="prunewise-prefetch")
        self._pending: tuple[nn.Module, Future] | None = None
        decoder = adapter.decoder(model)
        blocks = adapter.blocks(model)
        self.shell = [m for m in decoder.children() if m is not blocks]
        self.shell += [m for m in model.children() if m is not decoder and not any(x is decoder for x in m.modules())]

    def _read(self, module: nn.Module) -> dict[str, torch.Tensor]:
        mapping, fused = {}, {}
        for full in parameter_names(module, self.names[id(module)]):
            source = None if full in self.tensors else self.adapter.disk_sources(full, self.tensors)
            if isinstance(source, list):  # a fused expert tensor, kept per expert on disk
                fused[full] = source
            else:
                mapping[full] = source or checkpoint_name(self.model, full, self.tensors)
        raw = self.tensors.read(sorted(set(mapping.values())))
        out = {full: raw[name] for full, name in mapping.items()}
        for full, per_expert in fused.items():  # expert by expert into one tensor: never all the pieces beside it
            whole = None
            for e, names in enumerate(per_expert):
                read = self.tensors.read(names)
                pieces = [read[n] for n in names]
                if whole is None:
                    whole = pieces[0].new_empty(len(per_expert), sum(p.shape[0] for p in pieces), *pieces[0].shape[1:])
                torch.cat(pieces, out=whole[e])  # gate rows, then up rows, straight into place
            out[full] = whole
        return out

    def load(self, module: nn.Module, prefetch: nn.Module | None = None) -> None:
        """Give ``module`` its tensors (the prefetched ones when it was announced), and start reading ``prefetch``."""
        if self._pending is not None and self._pending[0] is module:
            data = self._pending[1].result()
        else:
            if self._pending is not None:
                self._pending[1].result()  # never two reads at once
            data = self._read(module)
        if prefetch is not None and self.adapter.experts_of(prefetch) is not None and \
                self._stored_bytes(prefetch) > PREFETCH_MAX_BYTES:
            prefetch = None  # read when reached: its copy beside the computing block would be the peak's largest part
        self._pending = (prefetch, self._reader.submit(self._read, prefetch)) if prefetch is not None else None
        self.bytes_read += sum(t.numel() * t.element_size() for t in data.values())
        materialize(module, self.names[id(module)], data, self.dtype)

    def _stored_bytes(self, module: nn.Module) -> int:
        return sum(p.numel() for p in module.parameters()) * self.dtype.itemsize

    def done(self, module: nn.Module, write: bool) -> None:
        """After a module's passes: written out (``write``, with its zeros counted) and released."""
        if write and self.sink is not None:
            prefix = self.names[id(module)]
            out = {}
            for full, (_, p) in zip(parameter_names(module, prefix), module.named_parameters(remove_duplicate=False)):
                if full not in self.tensors and self._tied(full):
                    continue  # a tied output head: the input embedding's tensor is saved once
                out[full] = p.data
                linear = full.removesuffix(".weight")
                if linear in self.measured:
                    self.zeros[linear] = (int((p.data == 0).sum()), p.numel())
            self.sink.write(out)
        release(module)

    def measured_sparsity(self, model: nn.Module) -> dict:
        """Zeros of the pruned linears as they were written (the shape of ``measure_sparsity``'s answer)."""
        per = {n: {"zeros": z, "numel": t, "sparsity": z / t} for n, (z, t) in sorted(self.zeros.items())}
        zeros, total = sum(z for z, _ in self.zeros.values()), sum(t for _, t in self.zeros.values())
        all_params = sum(p.numel() for p in model.parameters())
        return {"modules": per, "zeros": zeros, "numel": total, "sparsity": zeros / total if total else 0.0,
                "all_parameters": all_params, "sparsity_of_all_parameters": zeros / all_params}

    def write_resident(self, modules: list[nn.Module]) -> None:
        """Write the tensors a run added to released modules afterwards (zero sibling biases of a stock config)."""
        out = {}
        for module in modules:
            prefix = self.names[id(module)]
            for full, (_, p) in zip(parameter_names(module, prefix), module.named_parameters(remove_duplicate=False)):
                if p.device.type != "meta":
                    out[full] = p.data
            release(module)
        if self.sink is not None:
            self.sink.write(out)

    def _tied(self, full: str) -> bool:
        """Whether ``full`` (absent from the checkpoint) is the output head tied to the input embedding; else it is
        a tensor the run created (e.g. a bias from FLAP's compensation), written under its own name."""
        try:
            return checkpoint_name(self.model, full, self.tensors) != full
        except PrunewiseError:
            return False

    def load_shell(self) -> None:
        for m in self.shell:
            if any(True for _ in m.parameters()):
                self.load(m)

    def release_shell(self) -> None:
        for m in self.shell:
            release(m)

    def finish(self) -> None:
        """Write the shell once (embedding, final norm, head) and the shard index."""
        if self.sink is None:
            return
        for m in self.shell:
            if any(True for _ in m.parameters()):
                self.load(m)
                self.done(m, write=True)
        self.sink.finish()

    def close(self) -> None:
        self._reader.shutdown(wait=True)
