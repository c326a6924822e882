"""Log-likelihood of continuations, batched, tokenized exactly as lm-evaluation-harness does for causal models.

lm-eval's rules, kept here so both tools score the same tokens:
- trailing whitespace of the context moves to the start of the continuation;
- the pair is encoded whole and the context alone (tokenizer defaults for special tokens, no BOS added again when
  the text already starts with it); the continuation is the whole encoding after the context's tokens;
- the input is (context + continuation)[-(max_length + 1):][:-1] and the continuation's tokens are scored on the last
  positions;
- accuracy is argmax of the summed log-likelihoods (first maximum on ties), length-normalised accuracy is argmax of
  log-likelihood / number of characters of the choice, and an item is right when the argmax is one of its golds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunewiseError
from .items import MCItem

SCORER_VERSION = 1


class PairEncoder:
    """(context, continuation) -> (context tokens, continuation tokens), lm-eval's _encode_pair for causal LMs."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        bos = tokenizer.bos_token
        self.bos_text = bos if isinstance(bos, str) and bos else None
        self.prefix_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id

    def encode(self, text: str) -> list[int]:
        if self.bos_text is not None and text.startswith(self.bos_text):
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(text)

    def __call__(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            return [self.prefix_id], self.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation = context[-spaces:] + continuation
            context = context[:-spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]


def max_length(model: nn.Module) -> int:
    config = model.config.get_text_config()
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _score_rows(logits: torch.Tensor, rows: list[tuple[int, list[int], int]], results: list) -> None:
    """rows: (request index, continuation tokens, first logit row predicting them) within one logits row each."""
    for r, (index, cont, first) in enumerate(rows):
        logprobs = F.log_softmax(logits[r, first:first + len(cont)].float(), dim=-1)
        target = torch.tensor(cont, device=logprobs.device)
        results[index] = (float(logprobs.gather(1, target[:, None]).sum()),
                          bool((logprobs.argmax(dim=-1) == target).all()))


def _flat(model, encoded, batch_tokens, results, bar, device) -> None:
    """Whole sequences, longest first, right-padded (lm-eval's way); only continuation positions reach the head."""
    encoded = sorted(encoded, key=lambda e: (-(len(e[1]) + 1), tuple(e[1])))
    start = 0
    while start < len(encoded):
        longest = len(encoded[start][1])
        batch = encoded[start:start + max(1, batch_tokens // max(longest, 1))]
        start += len(batch)
        ids = torch.zeros(len(batch), longest, dtype=torch.long)
        spans = []
        for r, (_, inp, cont) in enumerate(batch):
            ids[r, :len(inp)] = torch.tensor(inp)
            spans.append((len(inp) - len(cont), len(inp)))
        keep = sorted({p for a, b in spans for p in range(a, b)})
        where = {p: i for i, p in enumerate(keep)}
        logits = model(input_ids=ids.to(device), use_cache=False, logits_to_keep=torch.tensor(keep, device=device)).logits
        # kept positions are contiguous per row, so a row's continuation starts at where[a]
        _score_rows(logits, [(index, cont, where[a]) for (index, _, cont), (a, _) in zip(batch, spans)], results)
        bar.update(len(batch))


def _shared(model, context: list[int], group, results, bar, device) -> None:
    """Choices of one context: the context runs once, its KV cache is repeated for every choice."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([context[:-1]], device=device), past_key_values=cache, use_cache=True,
          logits_to_keep=1)
    cache.batch_repeat_interleave(len(group))
    longest = max(len(cont) for _, cont in group)
    ids = torch.zeros(len(group), longest, dtype=torch.long)
    for r, (_, cont) in enumerate(group):
        row = [context[-1]] + cont[:-1]
        ids[r, :len(row)] = torch.tensor(row)
    logits = model(input_ids=ids.to(device), past_key_values=cache, use_cache=True).logits
    _score_rows(logits, [(index, cont, 0) for index, cont in group], results)
    bar.update(len(group))


@torch.inference_mode()
def loglikelihoods(model: nn.Module, tokenizer, requests: Sequence[tuple[str, str]], batch_tokens: int = 6144,
                   progress: bool = False, desc: str = "loglikelihood", share_context: bool = True,
                   ) -> list[tuple[float, bool]]:
    """Summed log-probability of each continuation given its context, and whether it is the greedy continuation.

    Requests are deduplicated. With ``share_context``, the choices of a context reuse one pass over it (its KV
    cache, repeated) when that saves work (three or more choices, or a context of 256 tokens or more); the rest are sorted longest first and packed into
    right-padded batches of at most ``batch_tokens`` tokens, as lm-eval does. Either way only the positions that
    predict a continuation token reach the LM head.
    """
    encoder = PairEncoder(tokenizer)
    limit = max_length(model)
    unique: dict[tuple[str, str], int] = {}
    for request in requests:
        unique.setdefault(request, len(unique))
    flat, groups = [], {}
    for (context, continuation), index in unique.items():
        ctx, cont = encoder(context, continuation)
        if not cont:
            raise PrunewiseError(f"a choice encodes to no tokens after its context ({continuation!r}); "
                                 "give every choice some text")
        if share_context and len(ctx) >= 2 and len(ctx) + len(cont) <= limit + 1:
            groups.setdefault(tuple(ctx), []).append((index, cont))
        else:
            flat.append((index, (ctx + cont)[-(limit + 1):][:-1], cont))
    for ctx, group in list(groups.items()):
        if len(group) < 3 and len(ctx) < 256:  # sharing would not pay: batch them whole
            flat.extend((index, (list(ctx) + cont)[:-1], cont) for index, cont in group)
            del groups[ctx]
    results: list[tuple[float, bool] | None] = [None] * len(unique)
    device = next(model.parameters()).device
    bar = tqdm(total=len(unique), desc=desc, unit="req", disable=not progress)
    for ctx, group in groups.items():
        _shared(model, list(ctx), group, results, bar, device)
    _flat(model, flat, batch_tokens, results, bar, device)
    bar.close()
    return [results[unique[request]] for request in requests]  # type: ignore[misc]


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def score_items(model: nn.Module, tokenizer, items: Sequence[MCItem], batch_tokens: int = 6144,
                progress: bool = False, desc: str = "choices", share_context: bool = True) -> list[list[float]]:
    """Log-likelihood of every choice of every item."""
    requests = [(item.context, choice) for item in items for choice in item.choices]
    lls = loglikelihoods(model, tokenizer, requests, batch_tokens, progress, desc, share_context)
    out, i = [], 0
    for item in items:
        out.append([ll for ll, _ in lls[i:i + len(item.choices)]])
        i += len(item.choices)
    return out


def mc_metrics(items: Sequence[MCItem], lls: Sequence[Sequence[float]]) -> dict:
    """Accuracy and length-normalised accuracy (lm-eval's acc and acc_norm) from per-choice log-likelihoods."""
    correct = correct_norm = 0
    for item, ll in zip(items, lls):
        correct += _argmax(ll) in item.gold
        correct_norm += _argmax([v / len(c) for v, c in zip(ll, item.choices)]) in item.gold
    n = len(items)
    chance = sum(item.chance for item in items) / n
    return {"n": n, "correct": correct, "correct_norm": correct_norm, "acc": correct / n, "acc_norm": correct_norm / n,
            "chance": chance, "acc_ci95": wilson(correct, n), "acc_norm_ci95": wilson(correct_norm, n)}


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))

