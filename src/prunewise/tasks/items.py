"""Multiple-choice tasks, offline: BIG-bench ``task.json`` files, OpenAI-evals JSONL, and the user's own JSONL.

Every task becomes a list of :class:`MCItem`: a context and the exact continuation strings that are scored after
it (a leading space included where the context does not end in whitespace), and the indices of the correct ones.
The same strings are what ``prunewise eval --harness`` exports for lm-evaluation-harness (with an empty target
delimiter), so both tools score identical token sequences.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import random
import re
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_dir, fetch_distribution, sha256_file
from ..errors import PrunewiseError
from ..sources import EVALS_RELEASES, SourceError, evals_sources, first_match, read_mirror_lines

logger = logging.getLogger(__name__)

BIGBENCH_VERSION = "1.0.0"
EVALS_VERSION = EVALS_RELEASES[0]
# The sha256 (MCTask.fingerprint) of each default-suite task's items: any source yielding them is accepted.
TASK_PINS: dict[str, str] = {
    "coherence/wiki-test": "f48f19a44318642b03746dccbb4ee66aef32c1fb406bfefb83b8780a28970293",  # 227 items
    "coherence/owt": "3f3b96fa7de4a2bbbff43604341afeca44cd69dbf21049ce6beca3ab2c109007",  # 653 items
}
_BB_TASKS = "bigbench/benchmark_tasks/"
_EVALS_DATA = "evals/registry/data/"


@dataclass(frozen=True)
class MCItem:
    context: str
    choices: tuple[str, ...]  # exact continuations scored after the context
    gold: tuple[int, ...]     # indices of the correct choices (usually one)

    @property
    def chance(self) -> float:
        return len(self.gold) / len(self.choices)


@dataclass(frozen=True)
class MCTask:
    name: str
    items: tuple[MCItem, ...]
    source: str

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random guess."""
        return sum(item.chance for item in self.items) / len(self.items)

    @property
    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for item in self.items:
            digest.update(json.dumps([item.context, item.choices, item.gold]).encode())
        return digest.hexdigest()

    def window(self, start: int, count: int | None) -> MCTask:
        """Items ``start`` to ``start + count`` of the fixed shuffled order (``count`` None: to the end)."""
        end = len(self.items) if count is None else min(len(self.items), start + count)
        if start >= end:
            raise PrunewiseError(f"task '{self.name}' has {len(self.items)} items, none from item {start}")
        return MCTask(self.name, self.items[start:end], self.source + f" (items {start}-{end - 1})")

    def head(self, limit: int | None) -> MCTask:
        """The first ``limit`` items (the items are already in a fixed shuffled order)."""
        if limit is None or limit >= len(self.items):
            return self
        if limit < 1:
            raise PrunewiseError(f"--limit must be at least 1, got {limit}")
        return MCTask(self.name, self.items[:limit], self.source + f" (first {limit})")


def _continuations(context: str, choices) -> tuple[str, ...]:
    """Choices as scored: after a space unless the context already ends in whitespace."""
    sep = "" if (not context or context[-1].isspace()) else " "
    return tuple(sep + str(c).strip() for c in choices)


def _shuffled(items: list[MCItem], name: str) -> tuple[MCItem, ...]:
    """A fixed order that does not depend on file order: items are reproducible prefixes of it (seeded by name)."""
    rng = random.Random(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    items = list(items)
    rng.shuffle(items)
    return tuple(items)


# ---------------------------------------------------------------- BIG-bench


def _bigbench_item(task: dict, example: dict) -> MCItem | None:
    """One BIG-bench example in the package's zero-shot multiple-choice format (json_task defaults)."""
    scores = example.get("target_scores")
    if not isinstance(scores, dict) or len(scores) < 2 or not isinstance(example.get("input"), str):
        return None
    choices = [str(c) for c in scores]
    values = [float(v) for v in scores.values()]
    best = max(values)
    if best <= 0 or values.count(best) == len(values):
        return None
    gold = tuple(i for i, v in enumerate(values) if v == best)
    prefix = task.get("task_prefix") or ""
    in_prefix = task.get("example_input_prefix")
    out_prefix = task.get("example_output_prefix")
    in_prefix = "\nQ: " if in_prefix is None else in_prefix
    out_prefix = "\nA: " if out_prefix is None else out_prefix
    text = prefix + in_prefix + example["input"]
    if task.get("append_choices_to_input", True):
        choice_prefix = task.get("choice_prefix", "\n  choice: ")
        text += "".join(choice_prefix + c for c in choices)
    context = (text + out_prefix).lstrip("\n")
    return MCItem(context, _continuations(context, choices), gold)


def _bigbench_task_name(member: str) -> str:
    return "bigbench/" + member[len(_BB_TASKS):].removesuffix("/task.json")


def _bigbench_cache() -> Path:
    return cache_dir("tasks", f"bigbench-{BIGBENCH_VERSION}")


def _slim_file(name: str) -> Path:
    return _bigbench_cache() / (name.replace("/", "__") + ".json")


def _slim(task: dict) -> dict | None:
    """The fields of a task.json that scoring needs, with its multiple-choice examples; None when it has none."""
    examples = [ex for ex in task.get("examples") or [] if _bigbench_item(task, ex) is not None]
    if not examples:
        return None
    slim = {k: task.get(k) for k in ("task_prefix", "example_input_prefix", "example_output_prefix",
                                        "append_choices_to_input", "choice_prefix") if k in task}
    slim["examples"] = [{"input": ex["input"], "target_scores": ex["target_scores"]} for ex in examples]
    return slim


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _scan_bigbench(wanted: set[str] | None) -> dict[str, dict]:
    """One pass over the sdist: extract the multiple-choice tasks named in ``wanted`` (every one when None).

    Each task is cached as a slim JSON file; the pass stops as soon as every wanted task is found.
    Returns name -> {file, items, chance} for the tasks extracted.
    """
    archive = fetch_distribution("bigbench", BIGBENCH_VERSION)
    prefix = f"bigbench-{BIGBENCH_VERSION}/"
    found: dict[str, dict] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for info in tar:
                if not (info.isfile() and info.name.endswith("/task.json") and info.name.startswith(prefix + _BB_TASKS)):
                    continue
                name = _bigbench_task_name(info.name[len(prefix):])
                if wanted is not None and name not in wanted:
                    continue
                seen.add(name)
                slim = _slim(json.load(tar.extractfile(info)))
                if slim is not None:
                    _write_atomic(_slim_file(name), json.dumps(slim, ensure_ascii=False))
                    items = [_bigbench_item(slim, ex) for ex in slim["examples"]]
                    found[name] = {"file": _slim_file(name).name, "items": len(items),
                                   "chance": sum(it.chance for it in items) / len(items)}
                if wanted is not None and seen >= wanted:
                    break
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise PrunewiseError(f"could not read the bigbench {BIGBENCH_VERSION} sdist at {archive} ({exc}); "
                             "delete it and retry so it is downloaded again") from exc
    return found


@functools.lru_cache(maxsize=1)
def _bigbench_index() -> dict[str, dict]:
    """name -> {file, items, chance}: every multiple-choice task.json of the sdist, extracted once (one pass)."""
    index_path = _bigbench_cache() / "index.json"
    if index_path.exists():
        try:
            return json.loads(index_path.read_text())["tasks"]
        except (ValueError, KeyError):
            logger.warning("ignoring unreadable task index %s", index_path)
    index = _scan_bigbench(None)
    archive = fetch_distribution("bigbench", BIGBENCH_VERSION)
    _write_atomic(index_path, json.dumps({"archive_sha256": sha256_file(archive), "tasks": index}))
    return index


def prefetch_bigbench(names) -> None:
    """Extract the named bigbench tasks that are not cached yet, all in one pass over the sdist.

    Loading a few tasks (a suite, a test) this way costs one partial pass instead of indexing all 320.
    """
    missing = {n for n in names if n.startswith("bigbench/") and not _slim_file(n).exists()}
    if missing and not (_bigbench_cache() / "index.json").exists():
        _scan_bigbench(missing)


def _bigbench_task(name: str) -> MCTask | None:
    """A bigbench task from its cached slim file (extracted on first use), or None when there is no such task."""
    prefetch_bigbench([name])
    if not _slim_file(name).exists():
        return None
    task = json.loads(_slim_file(name).read_text(encoding="utf-8"))
    items = [it for ex in task["examples"] if (it := _bigbench_item(task, ex)) is not None]
    return MCTask(name, _shuffled(items, name), f"bigbench=={BIGBENCH_VERSION} sdist, {name[9:]}/task.json")


# ---------------------------------------------------------------- OpenAI evals

_OPTION = re.compile(r"(?:^|(?<=[\s(]))\(?([A-E])[\.\):]\s+")


def _split_options(text: str) -> tuple[str, list[str]] | None:
    """'stem A. x B. y ...' -> (stem, [x, y, ...]) when the options A, B, ... appear in order, else None."""
    marks, want = [], "A"
    for m in _OPTION.finditer(text):
        if m.group(1) == want:
            marks.append(m)
            want = chr(ord(want) + 1)
    if len(marks) < 2:
        return None
    stem = text[:marks[0].start()].strip()
    options = [text[a.end():(b.start() if b is not None else len(text))].strip()
               for a, b in zip(marks, marks[1:] + [None])]
    options[-1] = re.sub(r"\s*(Answer|Reply|Respond)\b.*$", "", options[-1], flags=re.S | re.I).strip()
    if not stem or any(not o for o in options):
        return None
    return stem, options


def _evals_item(record: dict) -> MCItem | None:
    """An MMLU-style evals record (options A-E in the prompt, a letter as answer) as a cloze item."""
    if "question" in record and "answer" in record:
        prompt, ideal = record["question"], record["answer"]
    elif "input" in record and "ideal" in record:
        prompt, ideal = record["input"], record["ideal"]
        if isinstance(prompt, list):
            user = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
            if len(user) != 1:
                return None
            prompt = user[0]
    else:
        return None
    if isinstance(ideal, list):
        ideal = ideal[0] if len(ideal) == 1 else None
    if not isinstance(prompt, str) or not isinstance(ideal, str):
        return None
    letter = re.fullmatch(r"\s*\(?([A-E])\)?\.?\s*", ideal)
    split = _split_options(prompt)
    if letter is None or split is None:
        return None
    stem, options = split
    gold = ord(letter.group(1)) - ord("A")
    if gold >= len(options):
        return None
    context = stem.removesuffix("Answer:").strip() + "\nAnswer:"
    return MCItem(context, _continuations(context, options), (gold,))


@functools.lru_cache(maxsize=1)
def _evals_archive() -> Path:
    """The first evals release the index (or the mirror) serves, for listing its tasks."""
    failures = []
    for version in EVALS_RELEASES:
        try:
            return fetch_distribution("evals", version)
        except PrunewiseError as exc:
            failures.append(str(exc))
    raise PrunewiseError("no release of the evals wheel can be fetched to list its tasks: " + "; ".join(failures))


@functools.lru_cache(maxsize=1)
def _evals_index() -> dict[str, dict]:
    """name -> {items, chance}: every evals JSONL whose records are mostly multiple choice."""
    index = {}
    with zipfile.ZipFile(_evals_archive()) as zf:
        for member in zf.namelist():
            if not (member.startswith(_EVALS_DATA) and member.endswith(".jsonl")):
                continue
            items = _evals_items(zf, member)
            if len(items) >= 10:
                index["evals/" + member[len(_EVALS_DATA):].removesuffix(".jsonl")] = {
                    "items": len(items), "chance": sum(it.chance for it in items) / len(items)}
    return index


# A classification task of the evals registry (every answer one of a few short labels) is scored as multiple choice
# over its label set, as lm-eval scores such tasks: at most this many labels, each at most this many characters, and
# every label the answer of at least this share of the records (so a label set is the task's, not a typo's).
_LABELS_MAX = 5
_LABEL_CHARS = 24
_LABEL_MIN_SHARE = 0.05


def _chat_prompt(record: dict) -> str | None:
    """The prompt of an evals chat record: its system and user messages joined by blank lines (None if not chat)."""
    messages = record.get("input")
    if not isinstance(messages, list) or not messages:
        return None
    parts = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user") or "name" in m:
            return None  # few-shot examples carry names; such records are not one question
        content = m.get("content")
        if not isinstance(content, str):
            return None
        parts.append(content.strip())
    text = "\n\n".join(p for p in parts if p)
    return text or None


def _label_items(records: list[dict]) -> list[MCItem]:
    """A classification task's records as multiple choice over its label set (empty when it is not one)."""
    rows = []
    for record in records:
        prompt = _chat_prompt(record)
        ideal = record.get("ideal")
        if isinstance(ideal, list):
            ideal = ideal[0] if len(ideal) == 1 else None
        if prompt is None or not isinstance(ideal, str) or not ideal.strip():
            continue
        rows.append((prompt, ideal.strip()))
    if not rows or len(rows) < 0.9 * len(records):
        return []
    counts: dict[str, int] = {}
    for _, label in rows:
        counts[label] = counts.get(label, 0) + 1
    labels = sorted(counts)
    if not 2 <= len(labels) <= _LABELS_MAX or any(len(label) > _LABEL_CHARS for label in labels) \
            or min(counts.values()) < _LABEL_MIN_SHARE * len(rows):
        return []
    items = []
    for prompt, label in rows:
        context = prompt + "\nAnswer:"
        items.append(MCItem(context, _continuations(context, labels), (labels.index(label),)))
    return items


def _evals_items(zf: zipfile.ZipFile, member: str) -> list[MCItem]:
    try:
        lines = zf.read(member).decode("utf-8").splitlines()
    except (UnicodeDecodeError, KeyError):
        return []
    return _evals_records_items(lines)


def _evals_records_items(lines: list[str]) -> list[MCItem]:
    """Items of an evals JSONL: lettered options (MMLU style) when 90% of records have them, else its label set."""
    items, records = [], []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            records.append(None)
            continue
        records.append(record)
        if isinstance(record, dict) and (item := _evals_item(record)) is not None:
            items.append(item)
    if records and len(items) >= 0.9 * len(records):
        return items
    dicts = [r for r in records if isinstance(r, dict)]
    if records and len(dicts) >= 0.9 * len(records):
        return _label_items(dicts)
    return []


def _mirror_items(name: str) -> list[MCItem]:
    items = []
    for record in read_mirror_lines("tasks", name):
        try:
            items.append(MCItem(record["context"], tuple(record["choices"]), tuple(record["gold"])))
        except (KeyError, TypeError) as exc:
            raise SourceError(f"the mirror's task {name} needs context, choices and gold in every line") from exc
    return items


def _member_items(raw: bytes) -> list[MCItem]:
    try:
        return _evals_records_items(raw.decode("utf-8").splitlines())
    except UnicodeDecodeError as exc:
        raise SourceError("not UTF-8") from exc


def _attempts(name: str, member: str, items_of):
    """(label, thunk) for each source of a task built from one evals file: the mirror (items as exported), then each
    release of the wheel and the copy online (``items_of(raw bytes)``, in the task's fixed shuffled order)."""
    attempts = [("mirror", lambda: MCTask(name, tuple(_mirror_items(name)), "mirror"))]
    for src in evals_sources(member):
        attempts.append((src.label, lambda src=src: MCTask(name, _shuffled(items_of(src.read()), name), src.label)))
    return attempts


def task_attempts(name: str):
    """The sources of an evals task (its JSONL file)."""
    return _attempts(name, name[len("evals/"):] + ".jsonl", _member_items)


@functools.cache
def _evals_task(name: str) -> MCTask:
    """An evals task from the first source that has it (the mirror, each release, online); pinned ones by hash."""
    member = name[len("evals/"):] + ".jsonl"
    attempts = task_attempts(name)
    try:
        task, label = first_match("task", name, attempts, lambda t: t.fingerprint, TASK_PINS.get(name))
    except PrunewiseError as exc:
        if "the wheel has no" in str(exc):  # a release was read and lacks it: a name that does not exist
            raise PrunewiseError(f"unknown task '{name}'; see `prunewise tasks list` for the offline tasks, "
                                 "or give a .jsonl file of multiple-choice items") from exc
        raise
    return MCTask(name, task.items, f"{label}, {_EVALS_DATA}{member}")


# ---------------------------------------------------------------- sentence order (coherence) from passages

# Sentence-order discrimination: the schelling_point files of the evals registry hold each passage (field "0") with
# sentence-shuffled variants of it (fields "1".."10", the same sentences in another order). An item offers the
# passage and three variants that differ from it; the model should find the text in its written order. Every choice
# has the same words, so neither length nor vocabulary gives the answer away, and the gold position is drawn per
# item. name -> (evals member, first passage, end passage): the Wikipedia items use only passages 600-999, which the
# `wiki` calibration corpus never contains.
COHERENCE_TASKS = {
    "coherence/owt": ("schelling_point/owt_5.jsonl", 0, None),
    "coherence/wiki-test": ("schelling_point/wikipedia_5.jsonl", 600, None),
}
_COHERENCE_CONTEXT = "A passage, its sentences in their original order:\n"
_COHERENCE_CHOICES = 4


def _coherence_items(raw: bytes, name: str) -> list[MCItem]:
    _, first, end = COHERENCE_TASKS[name]
    records = [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()][first:end]
    items = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not isinstance(record.get("0"), str):
            continue
        original = record["0"].strip()
        words = sorted(original.split())
        seen, variants = {" ".join(original.split())}, []
        for key in sorted((k for k in record if k != "0" and k.isdigit()), key=int):
            text = str(record[key]).strip()
            norm = " ".join(text.split())
            if sorted(norm.split()) != words and original[-1:] not in ".!?\"" \
                    and sorted(norm.split()) == sorted((original + ".").split()):
                # a passage cut before its last full stop: the shuffles end that sentence with one, so the original
                # gets it too (else the missing stop alone would tell the original apart)
                original, words = original + ".", sorted((original + ".").split())
            if norm not in seen and sorted(norm.split()) == words:
                seen.add(norm)
                variants.append(text)
        if len(variants) < _COHERENCE_CHOICES - 1:
            continue
        choices = [original, *variants[:_COHERENCE_CHOICES - 1]]
        order = list(range(len(choices)))
        random.Random(f"{name}/{first + index}").shuffle(order)
        items.append(MCItem(_COHERENCE_CONTEXT, tuple(choices[i] for i in order), (order.index(0),)))
    return items


def coherence_attempts(name: str):
    """The sources of a sentence-order task (the passages file it is built from)."""
    return _attempts(name, COHERENCE_TASKS[name][0], lambda raw: _coherence_items(raw, name))


@functools.cache
def _coherence_task(name: str) -> MCTask:
    task, label = first_match("task", name, coherence_attempts(name), lambda t: t.fingerprint, TASK_PINS.get(name))
    return MCTask(name, task.items, f"{label}, {_EVALS_DATA}{COHERENCE_TASKS[name][0]} (sentence order)")


# ---------------------------------------------------------------- the user's own JSONL


def load_mc_jsonl(path: str | os.PathLike) -> MCTask:
    """A local multiple-choice task: one {"question" (or "context"), "choices": [...], "answer"} object per line.

    ``answer`` is the index of the correct choice, its text, or a list of either; items keep file order.
    """
    spec = os.fspath(path)
    hint = 'write one {"question": ..., "choices": [...], "answer": index or text} object per line'
    try:
        lines = Path(spec).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PrunewiseError(f"cannot read multiple-choice task file {spec} ({exc.__class__.__name__}); check the path") from exc
    items = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise PrunewiseError(f"{spec} line {number} is not JSON; {hint}") from exc
        context = record.get("question", record.get("context")) if isinstance(record, dict) else None
        choices = record.get("choices") if isinstance(record, dict) else None
        if not isinstance(context, str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) and c.strip() for c in choices) or "answer" not in record:
            raise PrunewiseError(f"{spec} line {number} needs a question, at least two non-empty choices and an answer; {hint}")
        answers = record["answer"] if isinstance(record["answer"], list) else [record["answer"]]
        gold = []
        for answer in answers:
            if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
                gold.append(answer)
            elif isinstance(answer, str) and answer in choices:
                gold.append(choices.index(answer))
            else:
                raise PrunewiseError(f"{spec} line {number}: answer {answer!r} is neither a choice index nor a choice; {hint}")
        items.append(MCItem(context, _continuations(context, choices), tuple(sorted(set(gold)))))
    if not items:
        raise PrunewiseError(f"multiple-choice task file {spec} has no items; {hint}")
    return MCTask(Path(spec).stem, tuple(items), f"local file {spec}")


# ---------------------------------------------------------------- names


def list_tasks(package: str | None = None) -> dict[str, dict]:
    """Every offline multiple-choice task: name -> {items, chance}."""
    out = {}
    if package == "bigbench":
        out.update({k: {"items": v["items"], "chance": v["chance"]} for k, v in _bigbench_index().items()})
    elif package is None:  # the legacy sdist is listed where an index or a mirror still serves it
        try:
            out.update({k: {"items": v["items"], "chance": v["chance"]} for k, v in _bigbench_index().items()})
        except PrunewiseError as exc:
            logger.warning("legacy bigbench tasks not listed: %s", exc)
    if package in (None, "evals"):
        out.update(_evals_index())
        for name in COHERENCE_TASKS:
            items = _coherence_task(name).items
            out[name] = {"items": len(items), "chance": sum(it.chance for it in items) / len(items)}
    return out


def get_task(name: str) -> MCTask:
    """A task by name (``bigbench/...``, ``evals/...``, a suite alias) or a local ``.jsonl`` file."""
    from .suite import TASK_ALIASES

    name = TASK_ALIASES.get(name, name)
    if name.lower().endswith(".jsonl"):
        return load_mc_jsonl(name)
    if name.startswith("bigbench/") and (task := _bigbench_task(name)) is not None:
        return task
    if name.startswith("evals/") and len((task := _evals_task(name)).items) >= 10:  # as the index counts tasks
        return task
    if name in COHERENCE_TASKS:
        return _coherence_task(name)
    raise PrunewiseError(f"unknown task '{name}'; see `prunewise tasks list` for the offline tasks, "
                         "or give a .jsonl file of multiple-choice items")
