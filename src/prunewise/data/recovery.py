"""Recovery data: training and held-out windows of a corpus, a mixture or task records, disjoint from each
other and from the calibration windows the prune drew from the same text."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import PrunewiseError
from .corpora import Corpus, get_corpus
from .mixture import _as_spec, _mixture_corpora, calibration_corpora, mixture_counts, mixture_seed
from .windows import _check_int, tokenize_corpus


class RecoveryWindows(NamedTuple):
    train: torch.Tensor  # (n, L) token ids
    val: torch.Tensor    # (m, L)
    train_mask: torch.Tensor | None = None  # (n, L) bool: tokens whose prediction counts (task data: completions)
    val_mask: torch.Tensor | None = None


def _calibration_spans(calibration, nsamples: int, seqlen: int, seed: int) -> dict[str, list[tuple[int, int]]]:
    """Token spans of every calibration window, by corpus fingerprint (the same draws the prune made)."""
    spec = _as_spec(calibration)
    if isinstance(spec, str):
        sources = [(calibration_corpora(spec)[0], nsamples, seed)]
    else:
        counts = mixture_counts([item.weight for item in spec], nsamples)
        sources = [(c, n, mixture_seed(seed, i)) for i, (c, n) in enumerate(zip(_mixture_corpora(spec), counts))]
    spans: dict[str, list[tuple[int, int]]] = {}
    for corpus, count, s in sources:
        if count == 0:
            continue
        spans.setdefault(corpus.fingerprint, []).append((count, s))
    return spans


def _windows(tokenizer, corpus: Corpus, count: int, seqlen: int, seed: int, avoid: list[tuple[int, int]],
             cal_seqlen: int) -> torch.Tensor:
    """``count`` windows at seqlen-aligned positions that touch no calibration window, in a seeded order."""
    tokens = tokenize_corpus(tokenizer, corpus)
    n = tokens.numel()
    used = torch.zeros(n + 1, dtype=torch.int32)
    for cal_count, cal_seed in avoid:  # the calibration draw of windows.calibration_windows, replayed
        gen = torch.Generator().manual_seed(int(cal_seed))
        starts = torch.randint(0, n - cal_seqlen, (cal_count,), generator=gen)
        used.index_add_(0, starts, torch.ones_like(starts, dtype=torch.int32))
        used.index_add_(0, starts + cal_seqlen, -torch.ones_like(starts, dtype=torch.int32))
    covered = used.cumsum(0)[:n] > 0
    segments = n // seqlen
    free = ~covered[: segments * seqlen].reshape(segments, seqlen).any(1)
    candidates = torch.nonzero(free).flatten()
    if candidates.numel() < count:
        raise PrunewiseError(f"recovery data '{corpus.name}' has {candidates.numel()} windows of {seqlen} tokens outside "
                             f"the calibration windows, fewer than the {count} needed; use fewer recovery tokens, a "
                             "shorter recovery seqlen or more text")
    gen = torch.Generator().manual_seed(int(seed))
    chosen = candidates[torch.randperm(candidates.numel(), generator=gen)[:count]]
    index = chosen[:, None] * seqlen + torch.arange(seqlen)[None, :]
    return tokens[index].contiguous()


def recovery_windows(tokenizer, spec: str, train: int, val: int, seqlen: int, seed: int = 0, calibration=None,
                     cal_nsamples: int = 0, cal_seqlen: int = 0, cal_seed: int = 0) -> RecoveryWindows:
    """``train`` + ``val`` windows of ``seqlen`` tokens of the recovery data ``spec`` (a corpus, a mixture
    ``SOURCE:WEIGHT,...`` or a ``.jsonl`` of prompt/completion records, scored on completions only)."""
    train, val = _check_int(train, "recovery windows", 1), _check_int(val, "validation windows", 1)
    if str(spec).lower().endswith(".jsonl"):
        from .task import load_task_records, task_windows

        records = load_task_records(spec)
        if len(records) < 2:
            raise PrunewiseError(f"recovery data '{spec}' has {len(records)} record; give at least 2 (one is held out)")
        windows = task_windows(tokenizer, records, seqlen)
        n_val = max(1, min(val, len(records) // 10))
        gen = torch.Generator().manual_seed(int(seed))
        perm = torch.randperm(len(records), generator=gen)
        v, t = perm[:n_val], perm[n_val:]
        reps = (train + len(t) - 1) // len(t)  # a small task is repeated (epochs) up to the budget
        t = t.repeat(reps)[:train]
        return RecoveryWindows(windows.ids[t], windows.ids[v], windows.loss_mask[t], windows.loss_mask[v])
    avoid = _calibration_spans(calibration, cal_nsamples, cal_seqlen, cal_seed) if calibration and cal_nsamples else {}
    items = _as_spec(spec)
    if isinstance(items, str):
        sources = [(get_corpus(items, "calibration"), 1.0)]
    else:
        sources = list(zip(_mixture_corpora(items), [item.weight for item in items]))
    total = train + val
    counts = mixture_counts([w for _, w in sources], total)
    parts_t, parts_v = [], []
    val_counts = mixture_counts([w for _, w in sources], val) if len(sources) > 1 else [val]
    for i, ((corpus, _), count, n_val) in enumerate(zip(sources, counts, val_counts)):
        if count == 0:
            continue
        w = _windows(tokenizer, corpus, count, seqlen, mixture_seed(seed + 7919, i), avoid.get(corpus.fingerprint, []),
                     cal_seqlen)
        n_val = min(n_val, count - 1) if count > 1 else 0
        parts_v.append(w[:n_val])
        parts_t.append(w[n_val:])
    return RecoveryWindows(torch.cat(parts_t), torch.cat(parts_v))
