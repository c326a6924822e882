"""Where the named offline data comes from: ordered sources, each accepted by the content hash of what it yields.

A named corpus or task is pinned by the sha256 of its *extracted documents* (or items), not of an archive, so any
source that yields the same documents is as good as the first: the same file in another release of a package,
the file in the upstream repository online, or a team's own mirror folder made with ``prunewise data export``.
Sources are tried in order; one that is gone, unreachable or yields other documents is skipped with its reason,
and when every source fails the error names each one and what the user can do.

Order: the mirror folder named by ``PRUNEWISE_DATA_MIRROR`` first (a local copy the user chose, no network), then
the package releases on the index (pinned by sha256 in ``cache.DISTRIBUTIONS``), then the online copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .cache import MIRROR_ENV, fetch_distribution
from .errors import PrunewiseError

ONLINE_ENV = "PRUNEWISE_EVALS_URL"
# The evals registry's data files in the upstream repository (stored there with Git LFS; this is the media URL).
EVALS_ONLINE = "https://media.githubusercontent.com/media/openai/evals/main/"
# Releases of the evals wheel whose registry data holds the files prunewise uses, newest first (checked equal).
EVALS_RELEASES = ("3.0.1.post1", "3.0.0.post1", "2.0.0.post1")
_EVALS_DATA = "evals/registry/data/"
_ONLINE_TIMEOUT = float(os.environ.get("PRUNEWISE_FETCH_TIMEOUT", "60"))
logger = logging.getLogger(__name__)


class SourceError(Exception):
    """One source could not give the data; the message is the reason, shown beside the source's label."""


@dataclass(frozen=True)
class Source:
    label: str
    read: Callable[[], bytes]


def fingerprint(documents: Sequence[str]) -> str:
    """sha256 hex over the documents, each length-prefixed so boundaries count."""
    digest = hashlib.sha256()
    for doc in documents:
        data = doc.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def mirror_root() -> Path | None:
    value = os.environ.get(MIRROR_ENV, "").strip()
    return Path(value).expanduser() if value else None


def safe_name(name: str) -> str:
    """A corpus or task name as one file name."""
    return name.replace("/", "__")


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


# ---------------------------------------------------------------- the evals registry's files


def _wheel_member(version: str, member: str) -> bytes:
    try:
        archive = fetch_distribution("evals", version)
    except PrunewiseError as exc:
        raise SourceError(_first_line(exc)) from exc
    try:
        with zipfile.ZipFile(archive) as zf:
            return zf.read(member)
    except KeyError as exc:
        raise SourceError(f"the wheel has no {member}") from exc
    except (zipfile.BadZipFile, OSError) as exc:
        raise SourceError(f"cannot read {archive} ({_first_line(exc)}); delete it so it is fetched again") from exc


def _online_file(path: str) -> bytes:
    base = os.environ.get(ONLINE_ENV, "").strip() or EVALS_ONLINE
    url = base.rstrip("/") + "/" + urllib.parse.quote(path)
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "prunewise"}),
                                    timeout=_ONLINE_TIMEOUT) as resp:
            return resp.read()
    except urllib.error.HTTPError as exc:
        raise SourceError(f"HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SourceError(f"unreachable ({getattr(reason, 'strerror', None) or _first_line(reason)})") from exc


def evals_sources(member: str) -> list[Source]:
    """Every source of one file of the evals registry (``member`` relative to ``evals/registry/data/``)."""
    path = _EVALS_DATA + member
    sources = [Source(f"evals=={v} wheel", lambda v=v: _wheel_member(v, path)) for v in EVALS_RELEASES]
    sources.append(Source("the evals repository online", lambda: _online_file(path)))
    return sources


# ---------------------------------------------------------------- trying sources in order


def mirror_file(kind: str, name: str) -> Path | None:
    """The mirror's file for a corpus or task (``kind`` 'corpora' or 'tasks'), or None without a mirror."""
    root = mirror_root()
    return None if root is None else root / kind / f"{safe_name(name)}.jsonl"


def read_mirror_lines(kind: str, name: str) -> list[dict]:
    """The JSON records of a mirror file; SourceError when there is no mirror or the file is missing or bad."""
    path = mirror_file(kind, name)
    if path is None:
        raise SourceError(f"{MIRROR_ENV} is not set")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise SourceError(f"{path} does not exist") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SourceError(f"cannot read {path} ({_first_line(exc)})") from exc
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise SourceError(f"{path} line {number} is not JSON") from exc
    return records


def first_match(what: str, name: str, attempts: Sequence[tuple[str, Callable[[], object]]],
                digest: Callable[[object], str], expected: str | None):
    """The first attempt whose result hashes to ``expected`` (any result when None): (result, label).

    ``attempts`` are (label, thunk) pairs; a thunk raises SourceError when its source cannot give the data.
    When none matches: one PrunewiseError naming every source and why it failed, and what the user can do.
    """
    failures = []
    for label, thunk in attempts:
        try:
            result = thunk()
        except SourceError as exc:
            failures.append(f"{label}: {exc}")
            continue
        got = digest(result)
        if expected is not None and got != expected:
            failures.append(f"{label}: other content (sha256 {got[:12]}, pinned {expected[:12]})")
            continue
        if failures and failures[0].startswith("mirror:") and MIRROR_ENV not in failures[0]:
            logger.warning("%s '%s' came from %s: the mirror %s could not give it (%s)", what, name, label,
                           mirror_root(), failures[0].removeprefix("mirror: "))
        return result, label
    raise PrunewiseError(
        f"{what} '{name}' is unavailable from every source: " + "; ".join(failures)
        + f". Fix: on a machine that has it run `prunewise data export DIR`, copy DIR here and set {MIRROR_ENV}=DIR"
        + (", or give a .txt/.jsonl file instead" if what == "corpus" else ", or give a .jsonl task file instead")
    )
