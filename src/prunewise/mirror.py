"""A team's own copy of prunewise's named data: ``prunewise data export DIR``, read back through PRUNEWISE_DATA_MIRROR.

The folder holds ``corpora/NAME.jsonl`` ({"text": ...} per document), ``tasks/NAME.jsonl`` ({"context", "choices",
"gold"} per item, in the task's fixed order), optionally ``packages/`` (the pinned distribution files found in the
cache: the evals wheel, the model wheels) and ``manifest.json`` (each set's content hash and source). A machine
without the package index sets ``PRUNEWISE_DATA_MIRROR=DIR``; every set read from it is checked against the same
pinned hash as from any other source, so a mirror cannot silently change the data.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from .cache import DISTRIBUTIONS, cache_dir
from .data.corpora import PINNED, corpus_attempts, get_corpus
from .errors import PrunewiseError
from .sources import SourceError, fingerprint, safe_name
from .tasks.items import COHERENCE_TASKS, TASK_PINS, coherence_attempts, get_task, task_attempts
from .tasks.suite import DEFAULT_SUITE

MANIFEST = "manifest.json"
FORMAT = "prunewise-data-export-v1"


def _write_jsonl(path: Path, records) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for record in records:
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_export(path: Path) -> bool:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def export_data(folder: str | os.PathLike, corpora_names: list[str] | None = None, tasks: list[str] | None = None,
                packages: bool = False) -> dict:
    """Write the named corpora (default: every pinned one), tasks (default: the default suite) and, with
    ``packages``, the cached pinned distribution files into ``folder``; returns the manifest."""
    root = Path(folder).expanduser()
    if root.exists() and not root.is_dir():
        raise PrunewiseError(f"{root} is a file; give a folder for the data export")
    if root.is_dir() and any(root.iterdir()) and not _is_export(root / MANIFEST):
        raise PrunewiseError(f"{root} is not empty and holds no prunewise data export ({MANIFEST} written by "
                             "prunewise); give an empty or new folder")
    names = list(PINNED) if corpora_names is None else corpora_names
    task_names = list(DEFAULT_SUITE) if tasks is None else tasks
    # everything is read before anything is written: a source that fails leaves no half-made export
    sets = {name: get_corpus(name, "evaluation" if name.endswith("-test") else "calibration") for name in names}
    task_sets = {name: get_task(name) for name in task_names}
    for sub in ("corpora", "tasks") + (("packages",) if packages else ()):
        (root / sub).mkdir(parents=True, exist_ok=True)
    manifest = {"format": FORMAT, "corpora": {}, "tasks": {}, "packages": []}
    if (root / MANIFEST).is_file():
        try:
            old = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
            manifest.update({k: old.get(k, manifest[k]) for k in manifest if k != "format"})
        except (OSError, ValueError):
            pass
    for name, corpus in sets.items():
        _write_jsonl(root / "corpora" / f"{safe_name(name)}.jsonl", ({"text": d} for d in corpus.documents))
        manifest["corpora"][name] = corpus.fingerprint
    for name, task in task_sets.items():
        _write_jsonl(root / "tasks" / f"{safe_name(name)}.jsonl",
                     ({"context": it.context, "choices": list(it.choices), "gold": list(it.gold)} for it in task.items))
        manifest["tasks"][name] = task.fingerprint
    if packages:
        for dist in DISTRIBUTIONS.values():
            cached = cache_dir("packages", f"{dist.package}-{dist.version}") / dist.filename
            target = root / "packages" / dist.filename
            if cached.is_file() and cached.stat().st_size == dist.size and not target.exists():
                fd, tmp = tempfile.mkstemp(prefix=f".{dist.filename}.", dir=root / "packages")
                os.close(fd)
                try:
                    shutil.copyfile(cached, tmp)
                    os.replace(tmp, target)
                finally:
                    Path(tmp).unlink(missing_ok=True)
            if target.exists() and dist.filename not in manifest["packages"]:
                manifest["packages"].append(dist.filename)
    tmp = root / f".{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    os.replace(tmp, root / MANIFEST)
    return manifest


def check_sources(names: list[str] | None = None) -> list[dict]:
    """Every source of every pinned set (default: all corpora and suite tasks), each tried: what it yields.

    One row per (set, source): ``status`` is ``match`` (the pinned content), ``other`` (different content) or
    ``unavailable`` (with the reason). A team runs it to see which sources still serve its data.
    """
    wanted = names or [*PINNED, *TASK_PINS]
    rows = []
    for name in wanted:
        if name in PINNED:
            attempts, digest, pinned = corpus_attempts(name), fingerprint, PINNED[name]
        elif name.startswith("evals/") or name in COHERENCE_TASKS:
            attempts = task_attempts(name) if name.startswith("evals/") else coherence_attempts(name)
            digest, pinned = (lambda t: t.fingerprint), TASK_PINS.get(name)
        else:
            raise PrunewiseError(f"'{name}' is neither a pinned corpus ({', '.join(PINNED)}) nor an offline task "
                                 f"({', '.join(COHERENCE_TASKS)}, evals/...)")
        for label, thunk in attempts:
            try:
                got = digest(thunk())
            except SourceError as exc:
                rows.append({"set": name, "source": label, "status": "unavailable", "detail": str(exc)})
                continue
            status = "match" if pinned is None or got == pinned else "other"
            rows.append({"set": name, "source": label, "status": status, "detail": got[:16]})
    return rows
