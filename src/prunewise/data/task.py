"""Task data: prompt/completion records, and windows of them with a mask that is 1 on completion tokens only."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..errors import PrunewiseError
from ..sources import fingerprint
from .corpora import iter_jsonl, read_local_file
from .windows import _check_int, _quiet_transformers

logger = logging.getLogger(__name__)

_FORMAT_HINT = "write one {\"prompt\": ..., \"completion\": ...} object per line"


@dataclass(frozen=True)
class TaskRecords:
    """A fingerprinted sequence of (prompt, completion) pairs, in file order (repeats kept)."""

    records: tuple[tuple[str, str], ...]
    fingerprint: str
    source: str
    name: str = "records"

    @classmethod
    def from_pairs(cls, pairs, source: str = "in-memory records", name: str = "records") -> TaskRecords:
        """Build task records from (prompt, completion) pairs, checking them and computing the fingerprint."""
        records = tuple((p, c) for p, c in pairs)
        if not records:
            raise PrunewiseError(f"task data '{name}' has no records; give at least one prompt/completion pair")
        for i, (prompt, completion) in enumerate(records, start=1):
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise PrunewiseError(f"task data '{name}' record {i}: prompt and completion must be strings")
            if not completion.strip():
                raise PrunewiseError(
                    f"task data '{name}' record {i} has an empty completion; give every record a non-empty completion"
                )
        flat = tuple(part for record in records for part in record)
        return cls(records=records, fingerprint=fingerprint(flat), source=source, name=name)

    def __len__(self) -> int:
        return len(self.records)

    def __repr__(self) -> str:
        return (
            f"TaskRecords(name={self.name!r}, records={len(self.records)}, "
            f"source={self.source!r}, fingerprint={self.fingerprint[:12]!r})"
        )


def load_task_records(path: str | os.PathLike) -> TaskRecords:
    """Read a .jsonl file of {"prompt": ..., "completion": ...} records (one-line errors for anything else)."""
    spec = os.fspath(path)
    if not spec.lower().endswith(".jsonl"):
        raise PrunewiseError(f"task data {spec} must be a .jsonl file; {_FORMAT_HINT}")
    file_path, raw = read_local_file(spec)
    first_line = {}  # format -> first line number that uses it
    pairs: list[tuple[str, str]] = []
    for lineno, obj in iter_jsonl(raw, spec):
        has_text = "text" in obj
        has_pair = "prompt" in obj or "completion" in obj
        if has_text and has_pair:
            raise PrunewiseError(
                f"{spec} line {lineno} has both 'text' and 'prompt'/'completion' fields; {_FORMAT_HINT}"
            )
        if not has_text and not has_pair:
            raise PrunewiseError(
                f"{spec} line {lineno} has neither 'text' nor 'prompt'/'completion' fields; {_FORMAT_HINT}"
            )
        fmt = "text" if has_text else "prompt/completion"
        first_line.setdefault(fmt, lineno)
        if len(first_line) > 1:
            raise PrunewiseError(
                f"{spec} mixes 'text' records (line {first_line['text']}) and 'prompt'/'completion' records "
                f"(line {first_line['prompt/completion']}); use one format per file"
            )
        if has_text:
            continue
        for key in ("prompt", "completion"):
            if key not in obj:
                raise PrunewiseError(
                    f"{spec} line {lineno} has no '{key}' field; give every record a 'prompt' (may be empty) "
                    "and a 'completion'"
                )
            if not isinstance(obj[key], str):
                raise PrunewiseError(f"{spec} line {lineno}: '{key}' must be a string; fix that line")
        if not obj["completion"].strip():
            raise PrunewiseError(
                f"{spec} line {lineno} has an empty completion; give every record a non-empty completion"
            )
        pairs.append((obj["prompt"], obj["completion"]))
    if "text" in first_line:
        raise PrunewiseError(
            f"{spec} holds 'text' records, not prompt/completion pairs; use it as a corpus "
            f"(--calibration / --data) or {_FORMAT_HINT}"
        )
    source = f"local JSON-lines file {file_path.resolve()} ({len(pairs)} prompt/completion records)"
    return TaskRecords.from_pairs(pairs, source=source, name=spec)


class TaskWindows(NamedTuple):
    """Token windows of task records and the mask of their completion tokens."""

    ids: torch.Tensor  # (n, L) int64
    loss_mask: torch.Tensor  # (n, L) bool: True exactly on completion tokens (and the appended eos)


def _token_lists(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens."""
    if not texts:
        return []
    with _quiet_transformers():
        encoded = tokenizer(texts, add_special_tokens=False)
    return [list(ids) for ids in encoded["input_ids"]]


def task_windows(tokenizer, records: TaskRecords | Sequence[tuple[str, str]], seqlen: int, *,
                 append_eos: bool = True, pad_to_seqlen: bool = True) -> TaskWindows:
    """One right-padded window per record, prompt + completion (+ eos); the mask is True on completion tokens only."""
    # A prompt too long for seqlen loses its leftmost tokens; a completion that leaves no room for one context token
    # is an error. An empty prompt becomes the bos token (if any), so the first completion token has context.
    # Padding (pad id, else eos, else 0) is masked out; with pad_to_seqlen=False windows fit the longest record.
    if not isinstance(records, TaskRecords):
        records = TaskRecords.from_pairs(records)
    seqlen = _check_int(seqlen, "seqlen", 2)
    prompts = _token_lists(tokenizer, [p for p, _ in records.records])
    completions = _token_lists(tokenizer, [c for _, c in records.records])
    eos = getattr(tokenizer, "eos_token_id", None)
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    if append_eos and eos is None:
        logger.info("task data '%s': the tokenizer has no eos token; completions end without one", records.name)

    rows: list[tuple[list[int], list[int]]] = []
    truncated = unconditioned = 0
    for i, (prompt, completion) in enumerate(zip(prompts, completions), start=1):
        if append_eos and eos is not None:
            completion = completion + [eos]
        if not completion:
            raise PrunewiseError(
                f"task data '{records.name}' record {i}: the completion has no tokens; give it some text"
            )
        if len(completion) > seqlen - 1:
            raise PrunewiseError(
                f"task data '{records.name}' record {i}: the completion has {len(completion)} tokens but seqlen "
                f"{seqlen} leaves room for at most {seqlen - 1} (one token of context); use a longer seqlen"
            )
        if not prompt and bos is not None:
            prompt = [bos]
        if not prompt:
            unconditioned += 1
        room = seqlen - len(completion)
        if len(prompt) > room:
            prompt = prompt[len(prompt) - room:]
            truncated += 1
        rows.append((prompt, completion))
    if truncated:
        logger.info("task data '%s': %d of %d prompts lost their leftmost tokens to fit seqlen %d",
                    records.name, truncated, len(rows), seqlen)
    if unconditioned:
        logger.warning("task data '%s': %d records have an empty prompt and the tokenizer has no bos token; "
                       "their first completion token is not scored", records.name, unconditioned)

    length = seqlen if pad_to_seqlen else max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.bool)
    for row, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        ids[row, :end] = torch.tensor(prompt + completion, dtype=torch.long)
        mask[row, len(prompt):end] = True
    return TaskWindows(ids, mask)
