"""Calibration specs: one corpus, or a mixture of corpora by weight (general plus domain data, as in D-Pruner)."""

# A spec is a corpus spec ("wiki", a file) or a list of {source, weight} items; "code:0.7,wiki:0.3" spells a mixture.

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field

from ..errors import PrunewiseError
from .corpora import Corpus, _is_local_spec, get_corpus
from .overlap import check_no_overlap
from .windows import _check_int, calibration_windows

logger = logging.getLogger(__name__)

_COMPACT_HINT = "write SOURCE:WEIGHT pairs separated by commas, e.g. code:0.7,wiki:0.3"
_LOOKS_LIKE_MIXTURE = re.compile(r":\s*[-+]?(\d|\.\d)")


class MixtureItem(BaseModel):
    """One part of a calibration mixture: a corpus spec and its (unnormalised) weight."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(min_length=1)
    weight: float = Field(gt=0, allow_inf_nan=False)


CalibrationSpec = str | os.PathLike | Sequence[MixtureItem | Mapping | tuple]


def _item(raw, index: int) -> MixtureItem:
    """One validated mixture item from a MixtureItem, a {source, weight} mapping or a (source, weight) pair."""
    where = f"calibration mixture item {index}"
    if isinstance(raw, MixtureItem):
        return raw
    if isinstance(raw, tuple) and len(raw) == 2:
        raw = {"source": raw[0], "weight": raw[1]}
    if not isinstance(raw, Mapping):
        raise PrunewiseError(f"{where} is {raw!r}; write each item as {{source: NAME_OR_FILE, weight: NUMBER}}")
    extra = sorted(set(raw) - {"source", "weight"})
    if extra:
        raise PrunewiseError(
            f"{where} has unknown keys {', '.join(map(str, extra))}; only 'source' and 'weight' are allowed"
        )
    source, weight = raw.get("source"), raw.get("weight")
    if not isinstance(source, str) or not source.strip():
        raise PrunewiseError(f"{where} needs a 'source' (a corpus name or a .txt/.jsonl file), got {source!r}")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
        raise PrunewiseError(f"{where} ('{source}') has weight {weight!r}; give every source a finite weight > 0")
    return MixtureItem(source=source.strip(), weight=float(weight))


def _source_key(source: str) -> str:
    """What makes two sources the same: the resolved path of a file, the lower-cased name of a named corpus."""
    if _is_local_spec(source):
        return str(Path(source).expanduser().resolve())
    return source.strip().lower()


def mixture_items(items) -> list[MixtureItem]:
    """Validate a mixture: a non-empty list of items with distinct sources and finite weights > 0."""
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Sequence):
        raise PrunewiseError(
            f"a calibration mixture must be a list of {{source, weight}} items, not {type(items).__name__}"
        )
    if not items:
        raise PrunewiseError("the calibration mixture is empty; give at least one {source, weight} item")
    out = [_item(raw, i) for i, raw in enumerate(items, start=1)]
    seen: dict[str, int] = {}
    for i, item in enumerate(out, start=1):
        first = seen.setdefault(_source_key(item.source), i)
        if first != i:
            raise PrunewiseError(
                f"calibration mixture items {first} and {i} are both '{item.source}'; list each source once "
                "and add up their weights"
            )
    return out


def parse_calibration(value: str) -> str | list[MixtureItem]:
    """A calibration string as given, or the mixture it spells when it reads SOURCE:WEIGHT,... and is no file."""
    if not _LOOKS_LIKE_MIXTURE.search(value) or Path(value).expanduser().exists():
        return value
    pairs = []
    for part in value.split(","):
        source, sep, weight = part.strip().rpartition(":")
        try:
            number = float(weight)
        except ValueError:
            number = None
        if not sep or not source.strip() or number is None:
            raise PrunewiseError(
                f"calibration {value!r} looks like a mixture but {part.strip()!r} is not SOURCE:WEIGHT "
                f"(and no such file exists); {_COMPACT_HINT}"
            )
        pairs.append((source.strip(), number))
    return mixture_items(pairs)


def _as_spec(spec) -> str | list[MixtureItem]:
    """A validated calibration spec: a corpus spec string or a list of mixture items."""
    if isinstance(spec, os.PathLike):
        spec = os.fspath(spec)
    if isinstance(spec, str):
        return parse_calibration(spec)
    return mixture_items(spec)


def mixture_counts(weights: Sequence[float], nsamples: int) -> list[int]:
    """Windows per source: largest-remainder rounding of nsamples * weight / sum(weights) (ties to the earlier)."""
    nsamples = _check_int(nsamples, "nsamples", 1)
    total = float(sum(weights))
    quotas = [nsamples * w / total for w in weights]
    counts = [math.floor(q) for q in quotas]
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in order[: nsamples - sum(counts)]:
        counts[i] += 1
    return counts


def mixture_seed(seed: int, index: int) -> int:
    """The seed of the index-th mixture item: the seed itself for the first, a hash of (seed, index) after that."""
    if index == 0:
        return int(seed)
    digest = hashlib.sha256(f"prunewise-mixture:{int(seed)}:{index}".encode()).hexdigest()
    return int(digest[:15], 16)


def _mixture_corpora(items: list[MixtureItem]) -> list[Corpus]:
    """The calibration corpus of each item; two items resolving to the same text are an error."""
    corpora = [get_corpus(item.source, "calibration") for item in items]
    seen: dict[str, int] = {}
    for i, corpus in enumerate(corpora, start=1):
        first = seen.setdefault(corpus.fingerprint, i)
        if first != i:
            raise PrunewiseError(
                f"calibration mixture items {first} ('{items[first - 1].source}') and {i} ('{items[i - 1].source}') "
                "are the same text; list each source once and add up their weights"
            )
    return corpora


def mixture_windows(tokenizer, items, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` calibration windows split across the mixture's sources by weight, concatenated in item order."""
    items = mixture_items(items)
    counts = mixture_counts([item.weight for item in items], nsamples)
    corpora = _mixture_corpora(items)
    parts = []
    for index, (item, corpus, count) in enumerate(zip(items, corpora, counts)):
        if count == 0:
            logger.warning("calibration mixture: '%s' (weight %g) gets 0 of %d windows; raise nsamples or its weight",
                           item.source, item.weight, nsamples)
            continue
        parts.append(calibration_windows(tokenizer, corpus, count, seqlen, mixture_seed(seed, index)))
    logger.info("calibration mixture: %s", ", ".join(f"{item.source} {count}" for item, count in zip(items, counts)))
    return torch.cat(parts)


def calibration_corpora(spec: CalibrationSpec) -> list[Corpus]:
    """The calibration corpora a spec names: one for a corpus spec, one per item of a mixture."""
    spec = _as_spec(spec)
    if isinstance(spec, str):
        return [get_corpus(spec, "calibration")]
    return _mixture_corpora(spec)


def calibration_spec_windows(tokenizer, spec: CalibrationSpec, nsamples: int, seqlen: int,
                             seed: int = 0) -> torch.Tensor:
    """Calibration windows of a corpus spec or of a mixture: (nsamples, seqlen) LongTensor."""
    spec = _as_spec(spec)
    if isinstance(spec, str):
        return calibration_windows(tokenizer, get_corpus(spec, "calibration"), nsamples, seqlen, seed)
    return mixture_windows(tokenizer, spec, nsamples, seqlen, seed)


def check_calibration_overlap(spec: CalibrationSpec, evaluation: Corpus) -> None:
    """Raise PrunewiseError if any calibration corpus of the spec shares text with the evaluation corpus."""
    for corpus in calibration_corpora(spec):
        check_no_overlap(corpus, evaluation)
