"""Writing a pruned model folder safely: checked first, written to a temporary folder, then one rename.

The folder loads with stock ``AutoModelForCausalLM.from_pretrained``; the recipe, the allocation
plan and the report sit beside the weights. Before any work the output is checked: it must not
be, contain or lie inside the source model, nor be the current folder, a filesystem root or a
folder of someone else's files that ``--overwrite`` would delete; its filesystem must be writable
and have room. While a run writes an output it holds a lock on it, so a second run to the same
output fails at once. An interrupted or failed save leaves no half-written folder and no
temporary folder; every error from saving is one line naming the path and the cause.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from torch import nn

from ..errors import PrunewiseError

#: Written into every folder prunewise saves; ``--overwrite`` only ever replaces folders that have it.
OUTPUT_MARKER = ".prunewise-output"
#: The marker's text in a sweep folder: a later sweep resumes there (and nowhere else).
SWEEP_MARKER = "written by prunewise sweep\n"
# Files a sweep wrote before the marker existed: a folder with one of them resumes as a sweep folder.
_LEGACY_SWEEP = ("dense.json", "cells")
# Folders written by prunewise before the marker existed hold these files.
_LEGACY_FILES = ("recipe.yaml", "report.json")
_HELD: set[str] = set()


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def source_paths(source: str | Path | None) -> list[Path]:
    """The files and folders on disk that make up the source model ``source`` (resolved)."""
    if source is None:
        return []
    paths = []
    text = str(source)
    candidate = Path(text).expanduser()
    if candidate.exists():
        paths.append(candidate.resolve())
    else:
        from ..models.registry import DERIVED_MODELS, NAMED_MODELS

        if text in DERIVED_MODELS:  # a built model's cached folder
            from ..cache import cache_root

            paths.append((cache_root() / "models" / DERIVED_MODELS[text].folder_name).resolve())
        if text in NAMED_MODELS:  # the converted folder and the assembled GGUF in the cache
            from ..cache import cache_root

            entry = NAMED_MODELS[text]
            paths += [(cache_root() / "models" / entry.folder_name).resolve(),
                      (cache_root() / "gguf" / f"{entry.name}-{entry.version}-{entry.sha256[:12]}").resolve()]
    return paths


def _written_by_prunewise(folder: Path) -> bool:
    return (folder / OUTPUT_MARKER).is_file() or all((folder / name).is_file() for name in _LEGACY_FILES)


def _is_sweep_folder(folder: Path) -> bool:
    """A folder an earlier sweep wrote: its marker says so, or (older sweeps) it has no marker but dense.json or cells/."""
    marker = folder / OUTPUT_MARKER
    if marker.is_file():
        try:
            return marker.read_text() == SWEEP_MARKER
        except OSError:
            return False
    return any((folder / name).exists() for name in _LEGACY_SWEEP)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _cause(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


def check_output(out: str | Path, overwrite: bool, source: str | Path | list | None = None,
                 expected_bytes: int | None = None, resume: bool = False) -> Path:
    """Refuse, before any work, an output that is unsafe or cannot be written; return it as a Path.

    Refused: an empty path, a filesystem root, the current folder or one that contains it, the home
    folder or one that contains it; any path that equals, contains or lies inside the source model
    (symlinks followed); a file; a non-empty folder without ``overwrite``, or with it when the folder
    holds files prunewise did not write; a path whose filesystem is not writable; and, given
    ``expected_bytes``, a filesystem without room for them. With ``resume`` (a sweep, which finishes
    what an earlier run into the same folder left) a non-empty folder is taken only when an earlier
    sweep wrote it: never a user's folder, nor a pruned model's.
    """
    if not str(out).strip():
        raise PrunewiseError("empty --output; pass the folder to write the pruned model to, e.g. --output out/pruned")
    out = Path(out).expanduser()
    resolved = out.resolve()
    hint = "prunewise writes a new folder: choose one such as --output out/pruned"
    if resolved == Path(resolved.anchor):
        raise PrunewiseError(f"output {out} is a filesystem root; {hint}")
    for what, folder in (("the current folder", Path.cwd().resolve()), ("your home folder", Path.home().resolve())):
        if _inside(folder, resolved):
            raise PrunewiseError(f"output {out} is or contains {what} ({folder}); {hint}")
    sources = source if isinstance(source, (list, tuple)) else [source]  # the model, then any other input read
    for i, spec in enumerate(sources):
        for src in source_paths(spec):
            if _inside(resolved, src) or _inside(src, resolved):
                relation = "is" if resolved == src else ("lies inside" if _inside(resolved, src) else "contains")
                what = "the source model" if i == 0 else "an input of this command"
                raise PrunewiseError(f"output {out} {relation} {what} {src}; prunewise never modifies the source: "
                                     "choose an --output outside it")
    if out.exists() and not out.is_dir():
        raise PrunewiseError(f"output {out} exists and is not a folder; choose another --output")
    if resume and out.is_dir() and any(out.iterdir()) and not _is_sweep_folder(out):
        what = ("is a pruned model prunewise wrote, not a sweep folder" if _written_by_prunewise(out)
                else f"holds files prunewise did not write (no {OUTPUT_MARKER})")
        raise PrunewiseError(f"output folder {out} {what}; a sweep writes a new folder or resumes one an earlier sweep "
                             "wrote: choose another --output")
    if not resume and out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise PrunewiseError(f"output folder {out} exists and is not empty; pass --overwrite or choose another --output")
        if not _written_by_prunewise(out):
            raise PrunewiseError(f"output folder {out} holds files prunewise did not write (no {OUTPUT_MARKER}); "
                                 "--overwrite only replaces prunewise outputs: choose another --output")
    check_writable(out, expected_bytes)
    return out


def check_writable(out: Path, expected_bytes: int | None = None) -> None:
    """Refuse an output whose filesystem cannot take a new folder (or ``expected_bytes`` more)."""
    base = _nearest_existing(out.expanduser().resolve().parent)
    if not base.is_dir():
        raise PrunewiseError(f"cannot write {out}: {base} is not a folder; choose another --output")
    try:
        probe = Path(tempfile.mkdtemp(prefix=".prunewise-probe-", dir=base))
        probe.rmdir()
    except OSError as exc:
        raise PrunewiseError(f"cannot write {out}: {base} is not writable ({_cause(exc)}); choose another --output") from exc
    if expected_bytes:
        free = shutil.disk_usage(base).free
        if free < expected_bytes:
            raise PrunewiseError(f"cannot write {out}: it needs about {expected_bytes / 1e6:.0f} MB and {base} has "
                                 f"{free / 1e6:.0f} MB free; free some space or choose another --output")


@contextlib.contextmanager
def claimed_output(out: str | Path, overwrite: bool = False, source: str | Path | list | None = None, resume: bool = False):
    """The output rule of every command that writes a folder, in one place: ``check_output`` before any work, then
    the output's lock held until the command ends. A resumable output (a sweep) gets its marker at once."""
    path = check_output(out, overwrite, source, resume=resume)
    with output_lock(path):
        created = not path.exists()
        if resume:
            marker = path / OUTPUT_MARKER
            if not marker.is_file():
                try:
                    path.mkdir(parents=True, exist_ok=True)
                    marker.write_text(SWEEP_MARKER)
                except OSError as exc:
                    raise PrunewiseError(f"cannot write {path}: {_cause(exc)}; choose another --output") from exc
        try:
            yield path
        except BaseException:
            if created and path.is_dir() and [p.name for p in path.iterdir()] == [OUTPUT_MARKER]:
                shutil.rmtree(path, ignore_errors=True)  # a new folder that got nothing but its marker: no output
            raise


def no_space(exc: BaseException) -> bool:
    """Whether ``exc`` (an OSError, or a safetensors error that carries only the OS message) is a full disk."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


@contextlib.contextmanager
def space_for(folder: str | Path, needed_bytes: int | None = None):
    """Turn a full disk while writing under ``folder`` (weights, masks, any file) into one line naming the folder,
    the space the output needs and the space left."""
    try:
        yield
    except PrunewiseError:
        raise
    except Exception as exc:
        if not no_space(exc):
            raise
        raise PrunewiseError(f"cannot write {Path(folder).expanduser()}: {_space_line(folder, needed_bytes)}; nothing was "
                             "kept: free some space or choose another --output") from None


def _space_line(folder: str | Path, needed_bytes: int | None) -> str:
    """'No space left on device (it needs about N MB, BASE has M MB free)'."""
    base = _nearest_existing(Path(folder).expanduser().resolve())
    try:
        free = f"{shutil.disk_usage(base).free / 1e6:.0f} MB free"
    except OSError:
        free = "no room"
    need = f"it needs about {needed_bytes / 1e6:.0f} MB, " if needed_bytes else ""
    return f"No space left on device ({need}{base} has {free})"


@contextlib.contextmanager
def output_lock(out: str | Path):
    """Hold an exclusive lock on ``out`` for this process; a second process gets a one-line error at once.

    The lock is a hidden file beside the output (``.<name>.lock``), so it holds whatever cache each
    process uses; it is removed when the run ends (a killed run's stale file is taken over by the next).
    """
    out = Path(out).expanduser().resolve()
    key = str(out)
    if key in _HELD:  # this process already holds it (run -> save_pruned)
        yield
        return
    lock = out.with_name(f".{out.name}.lock")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fh = open(lock, "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                fh.close()
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                raise PrunewiseError(f"another prunewise process is writing {out}; wait for it to finish or "
                                     "choose another --output") from None
            try:
                if os.fstat(fh.fileno()).st_ino == os.stat(lock).st_ino:
                    break  # still the file at that path (another run did not remove it meanwhile)
            except FileNotFoundError:
                pass
            fh.close()
    except OSError as exc:
        raise PrunewiseError(f"cannot write {out}: {_cause(exc)}; choose another --output") from exc
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        with contextlib.suppress(OSError):
            lock.unlink()
        fh.close()


def _remove_leftovers(out: Path, keep: Path | None = None) -> None:
    """Remove temporary folders an interrupted save of ``out`` left (we hold the output's lock), except ``keep``."""
    if not out.parent.is_dir():
        return
    for stale in [*out.parent.glob(f".{out.name}.tmp-*"), *out.parent.glob(f".{out.name}.old-*"),
                  *out.parent.glob(f".{out.name}.stream-*")]:
        if keep is None or not str(stale.resolve()).startswith(str(keep.resolve())):  # the staging and its masks
            shutil.rmtree(stale, ignore_errors=True)


def staging_folder(out: str | Path) -> Path:
    """Where a streamed run writes its shards before the save: beside ``out`` (the same filesystem), removed on failure."""
    out = Path(out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.stream-", dir=out.parent))


def _write(model: nn.Module, tokenizer, tmp: Path, extra_files: dict[str, str | bytes], weights: Path | None) -> None:
    config = model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    if weights is None:
        model.save_pretrained(tmp, safe_serialization=True)
    else:  # shards and index already written by a streamed run: moved in, with the config
        for f in sorted(weights.iterdir()):
            os.rename(f, tmp / f.name)
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, content in {**extra_files, OUTPUT_MARKER: "written by prunewise\n"}.items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)


def save_pruned(model: nn.Module, tokenizer, out: str | Path, extra_files: dict[str, str | bytes],
                overwrite: bool = False, source: str | Path | None = None, weights: Path | None = None) -> Path:
    """Save weights, config, tokenizer and ``extra_files`` (name -> content) to ``out`` atomically.

    ``weights``: a staging folder of shards a streamed run wrote (the model itself is on the meta device).
    """
    out = check_output(out, overwrite, source)
    staged = sum(f.stat().st_size for f in weights.rglob("*") if f.is_file()) if weights is not None else 0
    with output_lock(out):
        _remove_leftovers(out, keep=weights)
        tmp = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            _write(model, tokenizer, tmp, extra_files, weights)
            old = None
            if out.exists():
                old = out.with_name(f".{out.name}.old-{os.getpid()}")
                os.rename(out, old)
            os.rename(tmp, out)
            tmp = None
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except PrunewiseError:
            raise
        except Exception as exc:
            if no_space(exc):
                need = staged + sum(p.numel() * p.element_size() for p in model.parameters()
                                    if p.device.type != "meta") + sum(len(c) for c in extra_files.values())
                raise PrunewiseError(f"could not save the pruned model to {out}: {_space_line(out, need)}; nothing "
                                     "was written: free some space or choose another --output") from exc
            raise PrunewiseError(f"could not save the pruned model to {out}: {_cause(exc)}; nothing was written, "
                                 "fix the cause (space, permissions) and rerun") from exc
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return out
