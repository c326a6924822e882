"""Writing a pruned model folder atomically: temporary folder first, then one rename.

The folder loads with stock ``AutoModelForCausalLM.from_pretrained``; the recipe, the allocation
plan and the report sit beside the weights. An interrupted save leaves no half-written folder.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..errors import PrunewiseError


def check_output(out: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """Refuse, before any work, an output folder that exists with content (unless overwrite) or is the source."""
    out = Path(out).expanduser()
    if source is not None and Path(source).expanduser().exists() and out.resolve() == Path(source).expanduser().resolve():
        raise PrunewiseError(f"output folder {out} is the source model; prunewise never modifies the source: choose another --output")
    if out.exists() and not out.is_dir():
        raise PrunewiseError(f"output {out} exists and is not a folder; choose another --output")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise PrunewiseError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --output")
    return out


def save_pruned(model: nn.Module, tokenizer, out: str | Path, extra_files: dict[str, str | bytes],
                overwrite: bool = False) -> Path:
    """Save weights, config, tokenizer and ``extra_files`` (name -> content) to ``out`` atomically."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        config = model.config
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, content in extra_files.items():
            path = tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
        os.rename(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
