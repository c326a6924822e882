"""Where blocks compute and in which precision: one block resident on the device at a time.

A model is *stored* in one dtype on one device (the CPU for everything prunewise loads); a block is
*onloaded* to the compute device for its passes and *offloaded* afterwards. The compute dtype is
the storage dtype on an accelerator, and float32 on the CPU (no bf16/fp16 arithmetic there worth
the name), so a bf16 model pruned on the CPU costs bf16 memory and computes like the fp32 one.
Statistics (norms, means, Hessians) are always float32 or wider, whatever the compute dtype.

When the placement is *trivial* (the CPU, float32 storage) nothing is moved or cast: onloading
returns the module as it is, and results are bit-identical to a run without placement.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..core.dtypes import parse_dtype, torch_dtype  # noqa: F401  (re-exported for the fronts)
from ..errors import PrunewiseError


def parse_device(spec: str) -> str:
    """Check a device spelling without looking at the hardware: ``auto``, ``cpu``, ``cuda``, ``cuda:N``, ``mps``."""
    text = str(spec).strip().lower()
    if text in ("auto", "cpu", "cuda", "mps") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise PrunewiseError(f"unknown device {spec!r}; use auto, cpu, cuda, cuda:N or mps")


def resolve_device(spec: str) -> torch.device:
    """The device ``spec`` names on this machine; ``auto`` is the first GPU if there is one, else the CPU.

    A GPU that is not there is refused with one line, before any work.
    """
    text = parse_device(spec)
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", 0)
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise PrunewiseError("--device mps: this machine has no usable Apple GPU (torch.backends.mps.is_available() "
                                 "is False); use --device cpu or auto")
        return torch.device("mps")
    if not torch.cuda.is_available():
        raise PrunewiseError(f"--device {text}: torch sees no CUDA GPU on this machine (torch.cuda.is_available() is "
                             "False); use --device cpu or auto, or install a CUDA build of torch")
    index = int(text[5:]) if ":" in text else 0
    if index >= torch.cuda.device_count():
        raise PrunewiseError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered from 0")
    return torch.device("cuda", index)


def compute_dtype(device: torch.device, storage: torch.dtype) -> torch.dtype:
    """The storage dtype on an accelerator; float32 on the CPU."""
    return torch.float32 if device.type == "cpu" else storage


@dataclass(frozen=True)
class Placement:
    """Compute ``device`` for blocks; ``storage`` the dtype weights are kept in, on ``home`` (the CPU)."""

    device: torch.device
    storage: torch.dtype
    home: torch.device = torch.device("cpu")

    @classmethod
    def of(cls, model: nn.Module, device: str | torch.device | None = None) -> Placement:
        """The placement of a loaded model: its weights' dtype and device, computing on ``device`` (default: there)."""
        p = next(model.parameters())
        home = torch.device("cpu") if p.device.type == "meta" else p.device  # a streamed model lives on the CPU
        target = home if device is None else (resolve_device(device) if isinstance(device, str) else device)
        return cls(target, p.dtype, home)

    @property
    def compute(self) -> torch.dtype:
        return compute_dtype(self.device, self.storage)

    @property
    def trivial(self) -> bool:
        """Nothing to move or cast: compute where and in what the weights are stored."""
        return self.device == self.home and self.compute == self.storage

    def to_compute(self, t):
        """A tensor (or a nest of them) on the compute device; floating tensors in the compute dtype."""
        if self.trivial:
            return t
        if isinstance(t, torch.Tensor):
            return t.to(self.device, self.compute) if t.is_floating_point() else t.to(self.device)
        if isinstance(t, tuple):
            return tuple(self.to_compute(x) for x in t)
        if isinstance(t, list):
            return [self.to_compute(x) for x in t]
        if isinstance(t, dict):
            return {k: self.to_compute(v) for k, v in t.items()}
        return t

    def onload(self, module: nn.Module, keep_stored: bool = True, banded: bool = False) -> dict | None:
        """Move ``module``'s parameters to the device in the compute dtype (buffers: the device only).

        Returns what :meth:`offload` needs to put the stored tensors back (None when trivial). Without
        ``keep_stored`` (a streamed block, released after) the stored copies are dropped at once and
        offloading casts back (exact for unchanged weights: bf16/fp16 -> fp32 -> back is lossless).
        With ``banded`` (evaluation, which never rewrites weights) a plain linear whose weight would be cast
        stays in its storage dtype: :func:`placed` has it compute a band of output rows at a time, each band
        cast on the way (the head: no compute-dtype copy of a vocabulary-sized matrix).
        """
        if self.trivial:
            return None
        saved = {}
        for sub in module.modules():
            if (banded and type(sub) is nn.Linear and sub.weight.is_floating_point()
                    and sub.weight.dtype != self.compute):
                for name, p in list(sub._parameters.items()):
                    if p is not None and p.device != self.device:
                        saved[(id(sub), "p", name)] = p.data if keep_stored else (p.dtype, p.device)
                        p.data = p.data.to(self.device)
                continue
            # A plain embedding table stays in its storage dtype: the rows it looks up are cast on the way out,
            # which gives the same values as casting the whole table (a gather commutes with an elementwise cast)
            # without a compute-dtype copy of the vocabulary (the largest tensor of a small model).
            gather = type(sub) is nn.Embedding and sub.weight.is_floating_point() and sub.weight.dtype != self.compute
            if gather:
                saved[(id(sub), "h", "cast")] = sub.register_forward_hook(self._cast_output)
            for name, p in list(sub._parameters.items()):
                if p is None:
                    continue
                saved[(id(sub), "p", name)] = p.data if keep_stored else (p.dtype, p.device)
                keep_dtype = gather or not p.is_floating_point()
                p.data = p.data.to(self.device, p.dtype if keep_dtype else self.compute)
            for name, b in list(sub._buffers.items()):
                if b is None or b.device == self.device:
                    continue
                saved[(id(sub), "b", name)] = b
                sub._buffers[name] = b.to(self.device)
        return saved

    def _cast_output(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return output.to(self.compute)

    def _banded_linear(self, module: nn.Linear, x: torch.Tensor, band_elements: int = 1 << 22) -> torch.Tensor:
        """``module(x)`` in the compute dtype from a weight kept in storage: ~4M weights cast at a time."""
        weight, bias = module.weight, module.bias
        if weight.dtype == self.compute:
            return F.linear(x, weight, bias)
        rows = max(1, band_elements // max(1, weight.shape[1]))
        out = x.new_empty(*x.shape[:-1], weight.shape[0], dtype=self.compute)
        for r in range(0, weight.shape[0], rows):
            b = None if bias is None else bias[r:r + rows].to(self.compute)
            out[..., r:r + rows] = F.linear(x.to(self.compute), weight[r:r + rows].to(self.compute), b)
        return out

    def offload(self, module: nn.Module, saved: dict | None, write_back: bool) -> None:
        """Back to storage: the computed weights cast to the storage dtype (``write_back``), else the stored ones."""
        if saved is None:
            return
        for sub in module.modules():
            hook = saved.get((id(sub), "h", "cast"))
            if hook is not None:
                hook.remove()
            for name, p in list(sub._parameters.items()):
                key = (id(sub), "p", name)
                if p is None or key not in saved:
                    continue
                original = saved[key]
                if isinstance(original, tuple):  # not kept: cast back
                    p.data = p.data.to(original[1], original[0])
                    continue
                if write_back:
                    original.copy_(p.data)  # cast to the storage dtype, in the stored tensor (shared ties stay tied)
                p.data = original
            for name in list(sub._buffers):
                key = (id(sub), "b", name)
                if key in saved:
                    sub._buffers[name] = saved[key]


@contextlib.contextmanager
def placed(model: nn.Module, adapter, placement: Placement, stream=None) -> Iterator[nn.Module]:
    """Full forwards of ``model`` (evaluation) with one block at a time on the device, in the compute dtype.

    Forward pre-hooks onload each block and each part of the shell around the blocks (embedding,
    final norm, head) as it is called and move its inputs; forward hooks put the stored weights
    back. With a ``stream`` (a model on the meta device) each is read from the shards first and released
    after. Outputs are left on the device. With a trivial placement and no stream, or inside another
    ``placed``, this does nothing.
    """
    if (placement.trivial and stream is None) or getattr(model, "_prunewise_placed", False):  # nested: the outer hooks already place
        yield model
        return
    decoder = adapter.decoder(model)
    blocks = adapter.blocks(model)
    units = list(blocks)
    shell = [m for m in decoder.children() if m is not blocks]
    shell += [m for m in model.children() if m is not decoder and not _contains(m, decoder)]
    units += [m for m in shell if any(True for _ in m.parameters()) or any(True for _ in m.buffers())]
    around = {id(m) for m in shell}  # the head among them: computed in bands, never cast whole
    state: dict[int, dict | None] = {}

    def pre(module, args, kwargs):
        if stream is not None:  # out of core: read from the shards as it is called
            stream.load(module)
        state[id(module)] = placement.onload(module, keep_stored=stream is None, banded=id(module) in around)
        return placement.to_compute(args), placement.to_compute(kwargs)

    def post(module, args, kwargs, output):
        placement.offload(module, state.pop(id(module)), write_back=False)
        if stream is not None:
            stream.done(module, write=False)
        return output

    # The forward of a shell linear is replaced for the whole context: a pre-hook is too late for it (a module's
    # call has picked its forward before its pre-hooks run).
    banded = [lin for unit in shell for lin in unit.modules() if type(lin) is nn.Linear
              and lin.weight.is_floating_point() and lin.weight.dtype != placement.compute]
    handles = []
    model._prunewise_placed = True
    try:
        for m in banded:
            m.forward = lambda x, _m=m: placement._banded_linear(_m, x)
        for m in units:
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        yield model
    finally:
        for h in handles:
            h.remove()
        for m in banded:
            del m.forward
        del model._prunewise_placed


def _contains(root: nn.Module, target: nn.Module) -> bool:
    return any(m is target for m in root.modules())
