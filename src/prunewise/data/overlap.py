"""Refuse calibration data that shares text with the evaluation data."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import PrunewiseError

if TYPE_CHECKING:
    from .corpora import Corpus

logger = logging.getLogger(__name__)

SHINGLE_WORDS = 13
MAX_SHARED_FRACTION = 0.01


@dataclass(frozen=True)
class Overlap:
    """How much an evaluation corpus shares with a calibration corpus."""

    identical_documents: int
    shared_shingles: int
    eval_shingles: int

    @property
    def fraction(self) -> float:
        """Share of the evaluation corpus's distinct word 13-grams that also occur in the calibration corpus."""
        return self.shared_shingles / self.eval_shingles if self.eval_shingles else 0.0


def _normalise(doc: str) -> str:
    return " ".join(doc.split())


def shingles(documents: Iterable[str]) -> set[int]:
    """Hashes of every word 13-gram inside each document (documents shorter than that count as one shingle)."""
    out: set[int] = set()
    k = SHINGLE_WORDS
    for doc in documents:
        words = doc.split()
        if len(words) < k:
            if words:
                out.add(hash(tuple(words)))
            continue
        out.update(hash(tuple(words[i : i + k])) for i in range(len(words) - k + 1))
    return out


def measure_overlap(calibration: Corpus, evaluation: Corpus) -> Overlap:
    """Count identical (whitespace-normalised) documents and shared word 13-grams."""
    cal_docs = {_normalise(d) for d in calibration.documents}
    identical = sum(1 for d in {_normalise(d) for d in evaluation.documents} if d and d in cal_docs)
    eval_shingles = shingles(evaluation.documents)
    shared = len(eval_shingles & shingles(calibration.documents)) if eval_shingles else 0
    return Overlap(identical_documents=identical, shared_shingles=shared, eval_shingles=len(eval_shingles))


def check_no_overlap(calibration: Corpus, evaluation: Corpus) -> None:
    """Raise PrunewiseError if the calibration and evaluation corpora share text."""
    fix = "choose calibration data disjoint from the evaluation data, e.g. --calibration wiki with --eval wiki-test"
    if calibration.fingerprint == evaluation.fingerprint:
        raise PrunewiseError(
            f"calibration data '{calibration.name}' and evaluation data '{evaluation.name}' are the same text "
            f"(100% overlap); {fix}"
        )
    overlap = measure_overlap(calibration, evaluation)
    if overlap.identical_documents or overlap.fraction > MAX_SHARED_FRACTION:
        raise PrunewiseError(
            f"calibration data '{calibration.name}' overlaps evaluation data '{evaluation.name}': "
            f"{overlap.identical_documents} of {len(evaluation.documents)} evaluation documents are identical and "
            f"{overlap.fraction:.1%} of its {SHINGLE_WORDS}-word passages ({overlap.shared_shingles} of "
            f"{overlap.eval_shingles}) also occur in the calibration data; {fix}"
        )
    logger.info(
        "calibration '%s' vs evaluation '%s': no identical documents, %d of %d %d-word passages shared (%.3f%%)",
        calibration.name, evaluation.name, overlap.shared_shingles, overlap.eval_shingles, SHINGLE_WORDS,
        100 * overlap.fraction,
    )
