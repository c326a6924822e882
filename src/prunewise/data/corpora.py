"""Text corpora for calibration and evaluation: named offline sets, local files, online sets."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import sysconfig
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_dir, fetch_distribution, sha256_file
from ..errors import PrunewiseError
from ..sources import SourceError, evals_sources, fingerprint, first_match, read_mirror_lines
from .overlap import shingles

logger = logging.getLogger(__name__)

ROLES = ("calibration", "evaluation")

# Legacy: the SQuAD-format Wikipedia paragraphs of the bigbench 1.0.0 sdist, the default data until that sdist left
# the package index (2026-12). Still loaded under their own names wherever an index or a mirror serves the sdist.
BIGBENCH_VERSION = "1.0.0"
_SQUAD_DIR = "bigbench/benchmark_tasks/squad_shifts"
# canonical name -> file inside the bigbench sdist (SQuAD format)
_BIGBENCH_FILES = {
    "squad-wiki": f"{_SQUAD_DIR}/new_wiki_v1.0.json",
    "squad-wiki-test": f"{_SQUAD_DIR}/squaddev_v1.1.json",
}

# The default prose corpora: 1,000 Wikipedia passages of the evals registry (field "0" of each line is the original
# passage; the other fields are shuffled variants of it and are never used). Passages 0-599 calibrate, 600-999
# evaluate: disjoint by passage, ~90,000 and ~60,000 tokens (64 x 512 calibration and 32,768 evaluation tokens fit
# without reuse).
_WIKI_MEMBER = "schelling_point/wikipedia_5.jsonl"
_WIKI_SPLIT = 600
# The legal domain: court opinions (Illinois), data-protection decisions (Singapore PDPC) and US tort-law questions
# with their answers, from the evals registry; split by document hash (sha1 % 5 < 2: evaluation), less the test
# documents that are near-copies of calibration ones (>10% shared 13-word passages).
_LEGAL_MEMBERS = (
    "illinois-law/samples.jsonl",
    "singapore_data_protection_decisions/samples.jsonl",
    "us_tort_law/samples.jsonl",
)
_LEGAL_TEST_MODULUS, _LEGAL_TEST_SHARE = 5, 2

# The sha256 of each pinned corpus's extracted documents (sources.fingerprint): any source yielding them is accepted.
PINNED: dict[str, str | None] = {
    "wiki": "b2181b38da3b12367ae72b376cbcf607dc3b015e63df3a02967d4df31415f63f",  # 600 passages, 93,285 tokens*
    "wiki-test": "c2fc312d6bbf1c81208162c1f042274d5f92dde6ae985aa9de28fa17efb61e1d",  # 400 passages, 59,852 tokens*
    "legal": "fd3149fe07a1d6695fc408019136913ec19f596153460b81a9488d8346182628",  # 267 documents, 103,174 tokens*
    "legal-test": "f2a4b60fa50b660ca94992b9f8aae119e7f24722c082e39d35bf1a0dc7a058d4",  # 150 documents, 49,270 tokens*
}  # * joined by blank lines, with the smollm2-135m tokenizer

_CODE_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
_CODE_TEST_MODULUS = 10
# a test file sharing more than this share of its 13-word passages with the calibration files is dropped
_CODE_NEAR_COPY = 0.10

# spec -> (canonical name for calibration, canonical name for evaluation)
_ROLE_NAMES = {
    "wiki": ("wiki", "wiki"),
    "wiki-test": ("wiki-test", "wiki-test"),
    "code": ("code", "code-test"),
    "code-train": ("code", "code"),
    "code-test": ("code-test", "code-test"),
    "legal": ("legal", "legal-test"),
    "legal-train": ("legal", "legal"),
    "legal-test": ("legal-test", "legal-test"),
    "squad-wiki": ("squad-wiki", "squad-wiki"),
    "squad-wiki-test": ("squad-wiki-test", "squad-wiki-test"),
    "wikitext2": ("wikitext2", "wikitext2-test"),
    "wikitext2-test": ("wikitext2-test", "wikitext2-test"),
    "c4": ("c4", "c4-validation"),
    "c4-validation": ("c4-validation", "c4-validation"),
}

_DESCRIPTIONS = {
    "wiki": "Wikipedia passages 0-599 (evals registry, schelling_point/wikipedia_5); default calibration set",
    "wiki-test": "Wikipedia passages 600-999 (evals registry, schelling_point/wikipedia_5); default evaluation set",
    "code": "Python standard library source, calibration files (or the test files when used for evaluation)",
    "code-train": "Python standard library source, calibration files (~90% of files, split by path hash)",
    "code-test": (
        "Python standard library source, held-out test files "
        "(~10% of files by path hash, near-copies of calibration files removed)"
    ),
    "legal": "Legal text: Illinois court opinions, Singapore PDPC decisions, US tort-law questions (evals registry); "
             "calibration documents (or the test documents when used for evaluation)",
    "legal-train": "Legal text, calibration documents (~60% of documents, split by text hash)",
    "legal-test": "Legal text, held-out test documents (~40% of documents by text hash, near-copies of calibration "
                  "documents removed)",
    "squad-wiki": "legacy: Wikipedia paragraphs (SQuAD-shifts new_wiki) of the bigbench 1.0.0 sdist, which the "
                  "package index no longer serves; loads from a mirror or an index that still has it",
    "squad-wiki-test": "legacy: Wikipedia paragraphs (SQuAD v1.1 dev) of the bigbench 1.0.0 sdist, which the "
                       "package index no longer serves; loads from a mirror or an index that still has it",
    "wikitext2": "wikitext-2-raw-v1 train split (test split for evaluation), joined as in Wanda/SparseGPT; online",
    "wikitext2-test": "wikitext-2-raw-v1 test split, lines joined as in Wanda/SparseGPT; online",
    "c4": "allenai/c4 en train shard 00000 (validation shard 00000 for evaluation), as in Wanda; online",
    "c4-validation": "allenai/c4 en validation shard 00000, first 1100 documents joined as in Wanda; online",
}

_ONLINE = frozenset({"wikitext2", "wikitext2-test", "c4", "c4-validation"})
_C4_CALIBRATION_DOCS = 20000  # the first documents of the train shard; plenty for calibration windows
_C4_EVALUATION_DOCS = 1100  # as in Wanda's C4 perplexity evaluation





def _unique(documents) -> tuple[str, ...]:
    """Drop empty and repeated documents, keeping the first occurrence's order."""
    seen: set[str] = set()
    out: list[str] = []
    for doc in documents:
        if doc and doc not in seen:
            seen.add(doc)
            out.append(doc)
    return tuple(out)


@dataclass(frozen=True)
class Corpus:
    """A named, fingerprinted sequence of unique documents."""

    name: str
    documents: tuple[str, ...]
    source: str
    fingerprint: str

    @classmethod
    def from_documents(cls, name: str, documents, source: str) -> Corpus:
        """Build a corpus from documents (empty and repeated ones dropped), computing its fingerprint."""
        docs = _unique(documents)
        return cls(name=name, documents=docs, source=source, fingerprint=fingerprint(docs))

    def text(self) -> str:
        """The documents joined by blank lines."""
        return "\n\n".join(self.documents)

    def __repr__(self) -> str:
        return (
            f"Corpus(name={self.name!r}, documents={len(self.documents)}, "
            f"source={self.source!r}, fingerprint={self.fingerprint[:12]!r})"
        )


# ---------------------------------------------------------------- legacy: bigbench (squad-wiki, squad-wiki-test)


def _bigbench_cache_dir() -> Path:
    return cache_dir("corpora", f"bigbench-{BIGBENCH_VERSION}")


def _bigbench_stem(member: str) -> str:
    return Path(member).name.removesuffix(".json")


def _read_cached_paragraphs(member: str) -> dict | None:
    """The newest valid extraction of `member` from the corpora cache, if any.

    The file name carries the archive's sha256 and the record its full value; a hit is trusted without re-hashing
    the 358 MB archive (PyPI files are immutable), so a cached load costs milliseconds.
    """
    stem = _bigbench_stem(member)
    candidates = sorted(_bigbench_cache_dir().glob(f"{stem}.*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            logger.warning("ignoring unreadable corpus cache file %s", path)
            continue
        docs = record.get("documents")
        if (
            record.get("version") == BIGBENCH_VERSION
            and record.get("member") == member
            and isinstance(docs, list)
            and record.get("fingerprint") == fingerprint(tuple(docs))
        ):
            return record
        logger.warning("ignoring stale corpus cache file %s", path)
    return None


def _squad_contexts(data: dict) -> list[str]:
    """Unique paragraph contexts of a SQuAD-format file, in file order."""
    contexts = (p["context"].strip() for article in data["data"] for p in article["paragraphs"])
    return list(_unique(contexts))


def _extract_bigbench() -> None:
    """Download the bigbench sdist once and cache the paragraphs of every file we use (one pass over the tar)."""
    archive = fetch_distribution("bigbench", BIGBENCH_VERSION)
    archive_sha = sha256_file(archive)
    prefix = f"bigbench-{BIGBENCH_VERSION}/"
    wanted = {prefix + member: member for member in _BIGBENCH_FILES.values()}
    found: dict[str, list[str]] = {}
    logger.info("reading %s from %s (once; the result is cached)", ", ".join(wanted.values()), archive.name)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                member = wanted.get(info.name)
                if member is None or not info.isfile():
                    continue
                fh = tar.extractfile(info)
                found[member] = _squad_contexts(json.load(fh))
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, OSError, ValueError, KeyError) as exc:
        raise PrunewiseError(
            f"could not read the bigbench {BIGBENCH_VERSION} sdist at {archive} ({exc}); "
            "delete it and retry so it is downloaded again"
        ) from exc
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise PrunewiseError(
            f"the bigbench {BIGBENCH_VERSION} sdist at {archive} lacks {', '.join(missing)}; "
            "delete it and retry so it is downloaded again"
        )
    out_dir = _bigbench_cache_dir()
    for member, docs in found.items():
        record = {
            "package": "bigbench",
            "version": BIGBENCH_VERSION,
            "archive": archive.name,
            "archive_sha256": archive_sha,
            "member": member,
            "fingerprint": fingerprint(tuple(docs)),
            "documents": docs,
        }
        path = out_dir / f"{_bigbench_stem(member)}.{archive_sha[:16]}.json"
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
        logger.info("cached %d paragraphs of %s in %s", len(docs), member, path)


@functools.cache
def _bigbench_corpus(name: str) -> Corpus:
    member = _BIGBENCH_FILES[name]
    record = _read_cached_paragraphs(member)
    if record is None:
        _extract_bigbench()
        record = _read_cached_paragraphs(member)
        if record is None:  # pragma: no cover - only if the cache folder is not writable
            raise PrunewiseError(
                f"could not cache the '{name}' corpus under {_bigbench_cache_dir()}; check permissions"
            )
    source = f"bigbench=={BIGBENCH_VERSION} sdist: {member} (archive sha256 {record['archive_sha256'][:16]})"
    return Corpus(name=name, documents=tuple(record["documents"]), source=source, fingerprint=record["fingerprint"])


# ---------------------------------------------------------------- the evals registry (wiki, wiki-test, legal)


def _jsonl_records(raw: bytes) -> list[dict]:
    records = []
    for line in raw.decode("utf-8").splitlines():
        if line.strip():
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def _wiki_documents(raw: bytes, name: str) -> tuple[str, ...]:
    """Field "0" (the original passage) of every line; passages 0-599 for 'wiki', 600-999 for 'wiki-test'."""
    passages = [str(r.get("0", "")).strip() for r in _jsonl_records(raw)]
    return _unique(passages[:_WIKI_SPLIT] if name == "wiki" else passages[_WIKI_SPLIT:])


def _message(record: dict, index: int) -> str:
    messages = record.get("input")
    if isinstance(messages, list) and len(messages) > index and isinstance(messages[index], dict):
        content = messages[index].get("content")
        if isinstance(content, str):
            return content
    return ""


def _legal_text(member: str, record: dict) -> str:
    if member.startswith("illinois-law/"):
        return _message(record, 1).strip()  # the case; message 0 is the instruction, message 2 the charge
    if member.startswith("singapore_data_protection_decisions/"):
        return _message(record, 1).split("\n\nQuery:", 1)[0].strip()  # the decision, without the query
    question = _message(record, 1).strip()  # a tort-law question with its options, ending in "Answer:"
    answer = record.get("ideal")
    return f"{question} {answer.strip()}" if question and isinstance(answer, str) else question


def near_copies(train: list[str], test: list[str], share: float = _CODE_NEAR_COPY) -> list[bool]:
    """For each test document: does it share more than ``share`` of its 13-word passages with the train documents?"""
    train_shingles = shingles(train)
    out = []
    for text in test:
        own = shingles([text])
        out.append(len(own & train_shingles) > share * len(own))
    return out


def legal_split(document: str) -> str:
    """'test' or 'train': the deterministic split of a legal document by the hash of its text."""
    h = int(hashlib.sha1(document.encode("utf-8")).hexdigest(), 16)
    return "test" if h % _LEGAL_TEST_MODULUS < _LEGAL_TEST_SHARE else "train"


def _legal_documents(raws: list[bytes], name: str) -> tuple[str, ...]:
    """The legal split asked for; test documents that are near-copies of calibration ones (tort-law questions on
    the same facts, repeated case texts) are dropped, as for the code corpus."""
    docs = []
    for member, raw in zip(_LEGAL_MEMBERS, raws):
        docs.extend(_legal_text(member, r) for r in _jsonl_records(raw))
    docs = _unique(docs)
    train = [d for d in docs if legal_split(d) == "train"]
    if name != "legal-test":
        return tuple(train)
    test = [d for d in docs if legal_split(d) == "test"]
    return tuple(d for d, copy in zip(test, near_copies(train, test)) if not copy)


def _mirror_documents(name: str) -> tuple[str, ...]:
    docs = []
    for record in read_mirror_lines("corpora", name):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SourceError(f"the mirror's {name}.jsonl needs one {{\"text\": ...}} object per line")
        docs.append(record["text"])
    return tuple(docs)


def _extract(name: str, raws: list[bytes]) -> tuple[str, ...]:
    try:
        return _wiki_documents(raws[0], name) if name.startswith("wiki") else _legal_documents(raws, name)
    except (UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"unreadable JSON lines ({exc.__class__.__name__})") from exc


def corpus_attempts(name: str):
    """(label, thunk) for each source of an evals-registry corpus: the mirror, then each release, then online."""
    members = [_WIKI_MEMBER] if name.startswith("wiki") else list(_LEGAL_MEMBERS)
    attempts = [("mirror", lambda: _mirror_documents(name))]
    for group in zip(*(evals_sources(m) for m in members)):  # the same source for every member, in order
        attempts.append((group[0].label, lambda group=group: _extract(name, [src.read() for src in group])))
    return attempts


def _evals_cache_path(name: str, digest: str) -> Path:
    return cache_dir("corpora", "evals") / f"{name}.{digest[:16]}.json"


@functools.cache
def _evals_corpus(name: str) -> Corpus:
    """A pinned corpus of the evals registry: from the cache, else from the first source whose documents match."""
    pinned = PINNED[name]
    if pinned is not None:
        path = _evals_cache_path(name, pinned)
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            docs = tuple(record["documents"])
            if fingerprint(docs) == pinned:
                return Corpus(name=name, documents=docs, source=record["source"], fingerprint=pinned)
            logger.warning("ignoring a corpus cache file whose documents changed: %s", path)
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("ignoring an unreadable corpus cache file: %s", path)
    docs, label = first_match("corpus", name, corpus_attempts(name), fingerprint, pinned)
    digest = fingerprint(docs)
    members = _WIKI_MEMBER if name.startswith("wiki") else ", ".join(_LEGAL_MEMBERS)
    source = f"{label}: evals/registry/data/{members} ({_DESCRIPTIONS[name]}; documents sha256 {digest[:16]})"
    path = _evals_cache_path(name, digest)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"source": source, "fingerprint": digest, "documents": list(docs)},
                                  ensure_ascii=False), encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return Corpus(name=name, documents=docs, source=source, fingerprint=digest)


# ---------------------------------------------------------------- code (Python standard library)


def code_split(relpath: str) -> str:
    """'test' or 'train': the deterministic split of a standard-library file by its relative path."""
    return "test" if int(hashlib.sha1(relpath.encode("utf-8")).hexdigest(), 16) % _CODE_TEST_MODULUS == 0 else "train"


def _stdlib_files(root: Path) -> list[str]:
    """Relative POSIX paths of the standard library's *.py files, sorted, tests and site-packages excluded."""
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _CODE_EXCLUDED_DIRS]
        for filename in filenames:
            if filename.endswith(".py"):
                rels.append(Path(dirpath, filename).relative_to(root).as_posix())
    return sorted(rels)


@functools.cache
def _code_corpora() -> dict[str, Corpus]:
    """Both splits of the standard-library corpus, built together so they can be made disjoint."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise PrunewiseError(f"the Python standard library folder {root} is missing; the 'code' corpus needs it")
    seen: set[str] = set()
    files: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    skipped = 0
    for rel in _stdlib_files(root):
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            skipped += 1
            logger.debug("code corpus: skipping %s (unreadable or not UTF-8)", rel)
            continue
        key = " ".join(text.split())
        # exact duplicates are dropped before splitting, so no file's text can land in both splits
        if not key or key in seen:
            continue
        seen.add(key)
        files[code_split(rel)].append((rel, text))
    # decontaminate: drop test files that are near-copies of calibration files (e.g. the generated codec tables)
    near = near_copies([text for _, text in files["train"]], [text for _, text in files["test"]])
    kept_test = [pair for pair, copy in zip(files["test"], near) if not copy]
    dropped = len(files["test"]) - len(kept_test)
    files["test"] = kept_test
    version = platform.python_version()
    rule = f"sha1(relpath) % {_CODE_TEST_MODULUS}"
    out = {}
    for split, name in (("train", "code"), ("test", "code-test")):
        if split == "train":
            detail = f"{rule} != 0"
        else:
            detail = (
                f"{rule} == 0, less {dropped} near-copies of calibration files "
                f"(>{_CODE_NEAR_COPY:.0%} shared 13-word passages)"
            )
        source = (
            f"Python {version} standard library {root}: {len(files[split])} *.py files, {split} split ({detail}); "
            f"unique files, tests and site-packages excluded, {skipped} non-UTF-8 skipped"
        )
        out[split] = Corpus.from_documents(name, (text for _, text in files[split]), source)
    return out


# ---------------------------------------------------------------- local files


def read_local_file(spec: str | os.PathLike) -> tuple[Path, str]:
    """The path and UTF-8 text of a local data file, with one-line errors for missing, unreadable or empty files."""
    spec = os.fspath(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise PrunewiseError(f"corpus file {spec} does not exist; give a path to an existing .txt or .jsonl file")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PrunewiseError(f"corpus file {spec} is not valid UTF-8 ({exc.reason}); save it as UTF-8") from exc
    except OSError as exc:
        raise PrunewiseError(
            f"cannot read corpus file {spec} ({exc.strerror}); check the path and permissions"
        ) from exc
    if not raw.strip():
        raise PrunewiseError(f"corpus file {spec} is empty; give a file with text in it")
    return path, raw


def _local_corpus(spec: str) -> Corpus:
    path, raw = read_local_file(spec)
    if path.suffix.lower() == ".txt":
        docs = _paragraphs(raw)
        source = f"local text file {path.resolve()} (paragraphs split on blank lines)"
    else:
        docs = _jsonl_documents(raw, spec)
        source = f"local JSON-lines file {path.resolve()}"
    corpus = Corpus.from_documents(spec, docs, source)
    if not corpus.documents:
        raise PrunewiseError(f"corpus file {spec} has no text; give a file with text in it")
    return corpus


def _paragraphs(raw: str) -> list[str]:
    """Paragraphs of a text: split on blank lines, stripped, empty ones dropped."""
    paragraphs: list[str] = []
    current: list[str] = []
    for line in raw.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current).strip())
            current = []
    if current:
        paragraphs.append("\n".join(current).strip())
    return [p for p in paragraphs if p]


def iter_jsonl(raw: str, spec: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON-lines text; one-line errors for bad lines."""
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise PrunewiseError(
                f"{spec} line {lineno} is not valid JSON ({exc}); write one JSON object per line"
            ) from exc
        if not isinstance(obj, dict):
            raise PrunewiseError(
                f"{spec} line {lineno} is not a JSON object; write one object per line with a 'text' field"
            )
        yield lineno, obj


def _jsonl_documents(raw: str, spec: str) -> list[str]:
    """Documents of a JSON-lines file: the 'text' field, or prompt + completion."""
    docs: list[str] = []
    for lineno, obj in iter_jsonl(raw, spec):
        if "prompt" in obj or "completion" in obj:
            parts = [obj.get("prompt"), obj.get("completion")]
        else:
            parts = [obj.get("text")]
        for part in parts:
            if part is not None and not isinstance(part, str):
                raise PrunewiseError(f"{spec} line {lineno}: text fields must be strings; fix that line")
        doc = "".join(p for p in parts if p)
        if doc.strip():
            docs.append(doc.strip())
    return docs


# ---------------------------------------------------------------- online (datasets)


def _load_dataset(name: str, *args, **kwargs):
    """datasets.load_dataset with clean errors when the package or the network is missing."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as exc:
        raise PrunewiseError(
            f"corpus '{name}' needs the 'datasets' package; run: pip install 'prunewise[online]' "
            "(or use the offline corpora 'wiki' / 'wiki-test')"
        ) from exc
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any failure here is a download failure for the user
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PrunewiseError(
            f"corpus '{name}' needs internet to download ({type(exc).__name__}: {detail}); "
            "offline, use --calibration wiki and --data wiki-test instead"
        ) from exc


def _online_corpus(name: str) -> Corpus:
    if name in ("wikitext2", "wikitext2-test"):
        split = "train" if name == "wikitext2" else "test"
        data = _load_dataset(name, "Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
        # one document, so text() is exactly "\n\n".join(lines) as in the Wanda / SparseGPT evaluations
        text = "\n\n".join(data["text"])
        source = f"datasets: Salesforce/wikitext wikitext-2-raw-v1 {split} split, lines joined by blank lines"
        return Corpus.from_documents(name, [text], source)
    if name == "c4":
        shard = "en/c4-train.00000-of-01024.json.gz"
        data = _load_dataset(name, "allenai/c4", data_files={"train": shard}, split="train")
        n = min(_C4_CALIBRATION_DOCS, len(data))
        return Corpus.from_documents(name, data[:n]["text"], f"datasets: allenai/c4 {shard} (first {n} documents)")
    shard = "en/c4-validation.00000-of-00008.json.gz"
    data = _load_dataset(name, "allenai/c4", data_files={"validation": shard}, split="validation")
    n = min(_C4_EVALUATION_DOCS, len(data))
    text = " ".join(data[:n]["text"])  # as in Wanda's C4 evaluation
    return Corpus.from_documents(name, [text], f"datasets: allenai/c4 {shard} (first {n} documents joined by spaces)")


# ---------------------------------------------------------------- public entry points


def _is_local_spec(spec: str) -> bool:
    return spec.lower().endswith((".txt", ".jsonl"))


def list_corpora() -> list[dict]:
    """One dict per named corpus: name, description, offline, cached."""
    rows = []
    for name in _ROLE_NAMES:
        if name in _BIGBENCH_FILES:
            cached = any(_bigbench_cache_dir().glob(f"{_bigbench_stem(_BIGBENCH_FILES[name])}.*.json"))
        elif name in ("legal-train",):
            cached = PINNED["legal"] is not None and _evals_cache_path("legal", PINNED["legal"]).exists()
        elif name in PINNED:
            cached = PINNED[name] is not None and _evals_cache_path(name, PINNED[name]).exists()
        else:
            cached = name not in _ONLINE  # the stdlib is always on disk; online sets live in the datasets cache
        offline = name not in _ONLINE
        rows.append({"name": name, "description": _DESCRIPTIONS[name], "offline": offline, "cached": cached})
    return rows


def get_corpus(spec: str | os.PathLike, role: str = "calibration") -> Corpus:
    """Load a named corpus or a local .txt/.jsonl file for the given role ('calibration' or 'evaluation')."""
    if role not in ROLES:
        raise PrunewiseError(f"corpus role must be one of {', '.join(ROLES)}, not {role!r}")
    spec = os.fspath(spec)
    if _is_local_spec(spec):
        return _local_corpus(spec)
    key = spec.strip().lower()
    if key not in _ROLE_NAMES:
        if Path(spec).expanduser().is_file():
            raise PrunewiseError(
                f"corpus file {spec} must end in .txt (paragraphs) or .jsonl (a 'text' field per line)"
            )
        raise PrunewiseError(
            f"unknown corpus {spec!r}; choose one of {', '.join(_ROLE_NAMES)}, or give a path to a .txt or .jsonl file"
        )
    name = _ROLE_NAMES[key][ROLES.index(role)]
    if name in PINNED:
        return _evals_corpus(name)
    if name in _BIGBENCH_FILES:
        return _bigbench_corpus(name)
    if name in ("code", "code-test"):
        return _code_corpora()["test" if name == "code-test" else "train"]
    return _online_corpus(name)
