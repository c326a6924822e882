"""Structure learned while tuning (ATP, ``scores/atp.py``): gates, LoRA and the generator trained together on the
calibration (domain) windows by the project's training loop; returns unit scores and per-block shares for
``choose_widths``, with LoRA merged into the weights the structured export then slices."""

from __future__ import annotations

import logging
import time

import torch

from ..engine.gates import UnitGates
from ..engine.lowrank import MaskedLoRA
from ..engine.train import TrainSettings, train
from ..errors import PrunewiseError
from ..scores.atp import hard_gumbel_gate, ratio_penalty
from .recover import checkpoint_folder, drop_checkpoint, run_key

log = logging.getLogger(__name__)


def _group_norms(W: torch.Tensor, lora: MaskedLoRA, name: str, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Squared norms of rows (``dim`` 0) or columns (1) ``idx`` of ``W + s B A``, differentiable in LoRA."""
    A, B = lora.A[name], lora.B[name]
    if dim == 0:
        part = W[idx].float() + lora.scale * (B[idx].float() @ A.float())
        return part.pow(2).sum(1)
    part = W[:, idx].float() + lora.scale * (B.float() @ A[:, idx].float())
    return part.pow(2).sum(0)


def tune_units(model, adapter, recipe, score, geoms, budget: int, structure, windows: torch.Tensor,
               progress: bool, timings: dict) -> tuple[list[dict], list[dict], dict]:
    """Train ATP's generator and LoRA; returns (unit scores per block, shares per block, a report section)."""
    cfg = score.config
    if windows is None:
        raise PrunewiseError("atp trains on the calibration windows; give --calibration data")
    t0 = time.perf_counter()
    blocks = adapter.blocks(model)
    head_dim = adapter.heads(model.config)[2]
    mlp, heads = structure.prunes_mlp, structure.prunes_heads
    gateable = sum((g.intermediate * g.channel_cost if mlp else 0) + (g.heads * g.query_cost if heads else 0)
                   for g in geoms)
    target = 1 - budget / gateable
    if not 0 < target < 1:
        raise PrunewiseError(f"--sparsity {recipe.sparsity} removes {budget} of the {gateable} parameters the gates "
                             f"hold; atp needs a target they can reach")
    steps = cfg.tokens // (cfg.batch * windows.shape[1])
    if steps < 1:
        raise PrunewiseError(f"atp: {cfg.tokens} tokens are less than one step of {cfg.batch} windows of "
                             f"{windows.shape[1]}; raise tokens")
    generator = score.generator([g.intermediate for g in geoms], [g.heads for g in geoms])
    roles = [adapter.roles_of(b) for b in blocks]
    lora = MaskedLoRA(cfg.rank, cfg.alpha, cfg.seed)
    for i, r in enumerate(roles):
        for role, linear in r.items():
            lora.add(f"{i}.{role}", linear, None)
    gates = UnitGates(model, adapter, head_dim)
    noise = torch.Generator().manual_seed(cfg.seed)
    device = next(model.parameters()).device
    was = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)
    ones = [(torch.ones(g.intermediate, device=device), torch.ones(g.heads, device=device)) for g in geoms]

    def sample(deterministic: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for (zc, zh), (oc, oh) in zip(generator(), ones):
            if deterministic:
                c, h = (zc > 0).float(), (zh > 0).float()
            else:
                c, h = hard_gumbel_gate(zc, cfg.tau, noise), hard_gumbel_gate(zh, cfg.tau, noise)
            out.append((c.to(device) if mlp else oc, h.to(device) if heads else oh))
        return out

    def kept_share(values) -> torch.Tensor:
        kept = sum((c.sum() * g.channel_cost if mlp else 0) + (h.sum() * g.query_cost if heads else 0)
                   for (c, h), g in zip(values, geoms))
        return kept / gateable

    def lasso(values) -> torch.Tensor:
        total, count = torch.zeros((), device=device), 0
        for i, (c, h) in enumerate(values):
            r = roles[i]
            if mlp:
                off = torch.nonzero(c.detach() < 0.5).flatten()
                if off.numel():
                    sq = (_group_norms(r["gate"].weight, lora, f"{i}.gate", off, 0)
                          + _group_norms(r["up"].weight, lora, f"{i}.up", off, 0)
                          + _group_norms(r["down"].weight, lora, f"{i}.down", off, 1))
                    total, count = total + sq.sqrt().sum(), count + off.numel()
            if heads:
                off = torch.nonzero(h.detach() < 0.5).flatten()
                if off.numel():
                    cols = (off[:, None] * head_dim + torch.arange(head_dim, device=off.device)).flatten()
                    sq = (_group_norms(r["q"].weight, lora, f"{i}.q", cols, 0).view(-1, head_dim).sum(1)
                          + _group_norms(r["o"].weight, lora, f"{i}.o", cols, 1).view(-1, head_dim).sum(1))
                    total, count = total + sq.sqrt().sum(), count + off.numel()
        return total / max(count, 1)

    last: dict = {}

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        values = sample()
        gates.set(values)
        ids = windows[rows].to(device)
        lm = model(input_ids=ids, labels=ids, use_cache=False).loss
        share = kept_share(values)
        loss = lm + cfg.lam_sparsity * ratio_penalty(share, target) + cfg.lam_group * lasso(values)
        last.update(lm=float(lm.detach()), kept=float(share.detach()))
        return loss

    def val_loss() -> float:
        with torch.no_grad():
            gates.set(sample(deterministic=True))
            ids = windows[: min(4, windows.shape[0])].to(device)
            return float(model(input_ids=ids, labels=ids, use_cache=False).loss)

    params = {f"generator.{n}": p for n, p in generator.named_parameters()}
    params.update({f"lora.{n}": p for n, p in lora.parameters().items()})
    settings = TrainSettings(steps=steps, batch=cfg.batch, lr=cfg.lr, seed=cfg.seed,
                             eval_every=max(1, steps // 4), checkpoint_every=max(1, steps // 4))
    key = run_key(recipe, windows)
    folder = checkpoint_folder(recipe.output)
    ckpt = folder / "atp" if folder is not None else None
    try:
        history = train(params, loss_of, windows.shape[0], val_loss, settings, checkpoint=ckpt, key=key,
                        progress=progress, desc="atp tuning")
        with torch.no_grad():
            logits = [(zc.detach().cpu(), zh.detach().cpu()) for zc, zh in generator()]
    finally:
        gates.detach()
        lora.detach()
        for p, flag in was.items():
            p.requires_grad_(flag)
    lora.merge()  # hooks already gone: merge only folds the updates into the weights
    drop_checkpoint(folder, ckpt)
    scores, shares = _scores_and_shares(logits, geoms, budget, mlp, heads)
    gate_share = sum((int((zc > 0).sum()) * g.channel_cost if mlp else 0) +
                     (int((zh > 0).sum()) * g.query_cost if heads else 0) for (zc, zh), g in zip(logits, geoms))
    timings["tune_s"] = time.perf_counter() - t0
    section = {"steps": steps, "tokens": steps * cfg.batch * windows.shape[1], "target_kept_share": target,
               "gates_kept_share": gate_share / gateable, "last_lm_loss": last.get("lm"),
               "history": history.history, "resumed_from": history.resumed_from}
    log.info("atp: %d steps, gates keep %.3f of the gateable parameters (target %.3f)", steps,
             section["gates_kept_share"], target)
    return scores, shares, section


def _scores_and_shares(logits, geoms, budget: int, mlp: bool, heads: bool):
    """Units ranked by logit across every block, removed lowest first until the budget; per-block shares."""
    units = []
    for i, ((zc, zh), g) in enumerate(zip(logits, geoms)):
        if mlp:
            units += [(float(z), g.channel_cost, i, "mlp") for z in zc]
        if heads:
            units += [(float(z), g.query_cost, i, "attention") for z in zh]
    units.sort(key=lambda u: u[0])
    removed = [{"attention": 0, "mlp": 0} for _ in geoms]
    spent = 0
    for _, cost, i, kind in units:
        if spent + cost > budget:
            break
        removed[i][kind] += 1
        spent += cost
    shares = [{"attention": r["attention"] / g.heads, "mlp": r["mlp"] / g.intermediate}
              for r, g in zip(removed, geoms)]
    scores = [{"channels": zc.double(), "query": zh.double(),
               "kv": torch.zeros(g.kv_heads, dtype=torch.float64)} for (zc, zh), g in zip(logits, geoms)]
    return scores, shares
