"""Token streams of corpora (tokenized once, cached on disk) and the windows cut from them."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from ..cache import cache_dir
from ..errors import PrunewiseError
from .corpora import Corpus

logger = logging.getLogger(__name__)

_TOKENS_FORMAT = "v1"  # bump when the way token streams are produced changes


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 hex identifying a tokenizer: its serialized fast backend, else its sorted vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        payload = "backend:" + backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        payload = "vocab:" + json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    else:
        raise PrunewiseError(
            f"cannot fingerprint tokenizer of type {type(tokenizer).__name__} (no backend_tokenizer or get_vocab); "
            "use a Hugging Face tokenizer"
        )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' 'sequence longer than the model maximum' warning: we cut windows ourselves."""
    log = logging.getLogger("transformers")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(old)


def _token_cache_path(tokenizer, corpus: Corpus) -> Path:
    key = f"{_TOKENS_FORMAT}-{tokenizer_fingerprint(tokenizer)[:32]}-{corpus.fingerprint[:32]}"
    return cache_dir("tokens") / f"{key}.npy"


def tokenize_corpus(tokenizer, corpus: Corpus) -> torch.Tensor:
    """The corpus's whole text tokenized once (no special tokens) as a 1-D LongTensor, cached on disk."""
    path = _token_cache_path(tokenizer, corpus)
    if path.exists():
        try:
            ids = np.load(path, allow_pickle=False)
            if ids.ndim == 1:
                return torch.from_numpy(ids.astype(np.int64))
        except (OSError, ValueError) as exc:
            logger.warning("ignoring unreadable token cache %s (%s)", path, exc)
    start = time.perf_counter()
    text = corpus.text()
    with _quiet_transformers():
        encoded = tokenizer(text, add_special_tokens=False)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise PrunewiseError(
            f"tokenizer returned ids outside the int32 range for corpus '{corpus.name}'; check the tokenizer"
        )
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, ids.astype(np.int32), allow_pickle=False)
    os.replace(tmp, path)
    logger.info(
        "tokenized corpus '%s': %d characters -> %d tokens in %.1f s (cached at %s)",
        corpus.name, len(text), ids.size, time.perf_counter() - start, path,
    )
    return torch.from_numpy(ids)


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise PrunewiseError(f"{name} must be an integer >= {minimum}, not {value!r}")
    return int(value)


def calibration_windows(tokenizer, corpus: Corpus, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """`nsamples` windows of `seqlen` consecutive tokens at seeded random positions: (nsamples, seqlen) LongTensor."""
    nsamples = _check_int(nsamples, "nsamples", 1)
    seqlen = _check_int(seqlen, "seqlen", 2)
    tokens = tokenize_corpus(tokenizer, corpus)
    n = tokens.numel()
    if n < seqlen + 1:
        raise PrunewiseError(
            f"calibration data '{corpus.name}' has only {n} tokens; need at least seqlen+1={seqlen + 1}; "
            "use a shorter --seqlen or more text"
        )
    generator = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=generator)
    index = starts[:, None] + torch.arange(seqlen)[None, :]
    return tokens[index].contiguous()


def evaluation_windows(tokenizer, corpus: Corpus, seqlen: int, max_tokens: int | None = None) -> torch.Tensor:
    """The first `max_tokens` tokens (all if None) cut into non-overlapping `seqlen` windows: (n, seqlen)."""
    seqlen = _check_int(seqlen, "seqlen", 2)
    if max_tokens is not None:
        max_tokens = _check_int(max_tokens, "max_tokens", 1)
    tokens = tokenize_corpus(tokenizer, corpus)
    if max_tokens is not None:
        tokens = tokens[:max_tokens]
    count = tokens.numel() // seqlen
    if count < 1:
        limit = f" (limited to max_tokens={max_tokens})" if max_tokens is not None else ""
        raise PrunewiseError(
            f"evaluation data '{corpus.name}' has only {tokens.numel()} tokens{limit}; need at least seqlen={seqlen} "
            "for one window; " + ("raise --eval-tokens to at least the window length, or shorten the window "
                                  "(--eval-seqlen; `prunewise eval`: --seqlen)" if max_tokens is not None and
                                  max_tokens < seqlen else "use a shorter window (--eval-seqlen) or more text")
        )
    return tokens[: count * seqlen].reshape(count, seqlen).clone()
