"""The training loop of recovery: AdamW over a given set of parameters, a token budget, warmup + cosine
learning rate, gradient accumulation, held-out evaluation every N steps, checkpoints, resume, divergence stop.

The run stops, with the parameters rolled back to the last good step and a line naming the learning rate,
when the loss is not finite or blows up (above ``LOSS_BLOWUP`` times the first step's loss and 10 nats more),
or when a trained parameter is not finite or grows past ``GROWTH`` times its starting scale (at least 1).

A checkpoint (``state.pt`` in the checkpoint folder, written to a temporary file and renamed) holds the
trained parameters, the optimizer's state, the step and the history; the order of the training
windows is a permutation drawn from the seed, so a run resumed from step k continues with exactly
the batches and the state an uninterrupted run has at step k, and ends with the same weights.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import PrunewiseError

STATE = "state.pt"
GROWTH = 1e3  # a trained parameter past GROWTH x max(1, its largest starting magnitude) has diverged
LOSS_BLOWUP = 4.0  # a loss past LOSS_BLOWUP x the first step's (and 10 nats more) has diverged


@dataclass
class TrainSettings:
    steps: int
    batch: int  # windows per optimizer step (split into micro-batches of ``micro``)
    lr: float
    micro: int = 1
    warmup: float = 0.1  # share of the steps with a linear warmup
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    eval_every: int = 8
    checkpoint_every: int = 8
    seed: int = 0


@dataclass
class TrainLog:
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"} and {"step", "val_loss"}
    resumed_from: int = 0
    seconds: float = 0.0
    tokens: int = 0


def lr_at(step: int, s: TrainSettings) -> float:
    """Linear warmup over ``warmup * steps`` steps, then cosine to zero (``step`` counts from 0)."""
    warm = max(1, round(s.warmup * s.steps))
    if step < warm:
        return s.lr * (step + 1) / warm
    progress = (step - warm) / max(1, s.steps - warm)
    return s.lr * 0.5 * (1 + math.cos(math.pi * progress))


def _order(n: int, steps: int, batch: int, seed: int) -> torch.Tensor:
    """Window indices for every step (epochs of seeded permutations, as many as the steps need)."""
    gen = torch.Generator().manual_seed(seed)
    need = steps * batch
    parts = [torch.randperm(n, generator=gen) for _ in range((need + n - 1) // n)]
    return torch.cat(parts)[:need].reshape(steps, batch)


def _save(folder: Path, params: dict[str, nn.Parameter], opt, step: int, log: TrainLog, key: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{STATE}.tmp-{os.getpid()}"
    torch.save({"key": key, "step": step, "params": {n: p.detach().clone() for n, p in params.items()},
                "optimizer": opt.state_dict(), "log": asdict(log)}, tmp)
    os.replace(tmp, folder / STATE)


def train(params: dict[str, nn.Parameter], loss_of, batches, val_loss, settings: TrainSettings,
          checkpoint: Path | None = None, key: str = "", progress: bool = True, desc: str = "recovery") -> TrainLog:
    """Train ``params`` for ``settings.steps`` steps. ``loss_of(indices)`` is the mean loss of those training
    windows (it runs the forward); ``val_loss()`` the held-out loss; ``batches`` the number of training windows.

    With ``checkpoint`` a saved state with the same ``key`` (the run's settings and data) is resumed.
    A non-finite loss stops the run: the parameters go back to the last finite step and the error says so.
    """
    s = settings
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(params.values()), lr=s.lr, weight_decay=s.weight_decay, betas=(0.9, 0.999),
                            eps=1e-8, foreach=False)
    order = _order(batches, s.steps, s.batch, s.seed)
    log, start = TrainLog(), 0
    state_file = checkpoint / STATE if checkpoint is not None else None
    if state_file is not None and state_file.exists():
        state = torch.load(state_file, weights_only=False)
        if state.get("key") == key:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(state["params"][n])
            opt.load_state_dict(state["optimizer"])
            start = state["step"]
            log = TrainLog(**state["log"])
            log.resumed_from = start
    good = {n: p.detach().clone() for n, p in params.items()}
    limits = {n: GROWTH * max(1.0, float(p.detach().abs().max())) if p.numel() else math.inf for n, p in params.items()}
    first = next((h["loss"] for h in log.history if "loss" in h), None)

    def diverged(step: int, lr: float, what: str) -> PrunewiseError:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(good[n])
        last = max((h["step"] for h in log.history), default=start)
        return PrunewiseError(f"recovery diverged at step {step + 1}: {what} (learning rate {lr:.2g}, peak {s.lr:.2g}); "
                              f"the weights were rolled back to step {last} and nothing was saved; lower the recovery "
                              f"learning rate (--recover-lr, e.g. {s.lr / 10:.2g})")

    t0 = time.perf_counter()
    bar = tqdm(range(start, s.steps), desc=desc, unit="step", disable=not progress, initial=start, total=s.steps)
    for step in bar:
        lr = lr_at(step, s)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        rows = order[step]
        total = 0.0
        for m in range(0, len(rows), s.micro):
            part = rows[m:m + s.micro]
            loss = loss_of(part) * (len(part) / len(rows))
            loss.backward()
            total += float(loss.detach())
        if not math.isfinite(total):
            raise diverged(step, lr, f"the recovery loss became {total}")
        if first is None:
            first = total
        elif total > max(LOSS_BLOWUP * first, first + 10):
            raise diverged(step, lr, f"the recovery loss blew up from {first:.3g} to {total:.3g}")
        if s.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(list(params.values()), s.max_grad_norm, foreach=False)
        opt.step()
        with torch.no_grad():
            for n, p in params.items():
                top = float(p.detach().abs().max()) if p.numel() else 0.0
                if not math.isfinite(top) or top > limits[n]:
                    raise diverged(step, lr, f"the trained weights reached |w| = {top:.2g} ({n})")
        log.tokens += int(len(rows))
        log.history.append({"step": step + 1, "loss": total, "lr": lr})
        bar.set_postfix(loss=f"{total:.3f}")
        if (step + 1) % s.eval_every == 0 or step + 1 == s.steps:
            with torch.no_grad():
                log.history.append({"step": step + 1, "val_loss": float(val_loss())})
        good = {n: p.detach().clone() for n, p in params.items()}
        if state_file is not None and ((step + 1) % s.checkpoint_every == 0 or step + 1 == s.steps):
            _save(checkpoint, params, opt, step + 1, log, key)
    log.seconds += time.perf_counter() - t0
    for p in params.values():
        p.requires_grad_(False)
    return log
