"""Recovery after pruning: the recipe's recovery parts train the pruned model on the recovery data, keeping
its masks (every pruned weight stays exactly zero, checked), with checkpoints a rerun resumes from."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import torch

from ..data.mixture import check_calibration_overlap
from ..data.recovery import recovery_windows
from ..engine.train import TrainSettings, train
from ..errors import PrunewiseError
from ..models.loading import load_model


def checkpoint_folder(output: str | None) -> Path | None:
    """Where a run's recovery checkpoints live until it finishes: a hidden folder beside the output."""
    if not output:
        return None
    out = Path(output)
    return out.parent / f".{out.name}.recovery"


def _pruned_linears(model, masks) -> tuple[dict, dict]:
    """The linears recovery trains (those the prune targeted, as they are now) and their masks."""
    from ..models.adapters import prunable_weights

    weights = prunable_weights(model)
    linears = {n: m for n, m in model.named_modules() if n in weights}
    if masks is not None and masks.has_weight_masks:
        missing = [n for n in masks.weight_names() if n not in linears]
        if missing:
            raise PrunewiseError(f"the mask set names {missing[0]}, which this model does not have; use the mask set "
                                 "saved with this pruned model")
        keep = dict(masks.weight_masks())
        for name, mask in keep.items():
            if tuple(mask.shape) != tuple(linears[name].weight.shape):
                raise PrunewiseError(f"the mask of {name} is {tuple(mask.shape)} but the weight is "
                                     f"{tuple(linears[name].weight.shape)}; use the mask set saved with this model")
        return {n: linears[n] for n in keep}, keep
    return linears, {}


def recover(result, recipe, progress: bool = True) -> dict:
    """Run the recipe's recovery parts on ``result.model`` (in place). Returns the report section."""
    parts = recipe.parts().recovery
    if not parts:
        return {}
    model, tok = result.model, result.tokenizer
    linears, mask_of = _pruned_linears(model, result.masks)
    for name, mask in mask_of.items():
        if bool(linears[name].weight.detach()[mask.to(linears[name].weight.device)].ne(0).any()):
            raise PrunewiseError(f"{name} has non-zero weights where its mask says pruned; the mask set does not "
                                 "match this model")
    sections = []
    for part in parts:
        sections.append(_one(part, model, tok, recipe, linears, mask_of, progress))
    return {"parts": sections}


def _one(part, model, tok, recipe, linears, mask_of, progress) -> dict:
    cfg = part.config
    spec = cfg.data or recipe.calibration
    for name in recipe.evaluation:  # recovery text that is also evaluation text would make the numbers a lie
        from ..data.corpora import get_corpus

        if not str(spec).lower().endswith(".jsonl"):
            check_calibration_overlap(spec, get_corpus(name, "evaluation"))
    n_train = max(1, cfg.tokens // cfg.seqlen)
    if n_train < cfg.batch:
        raise PrunewiseError(f"recovery budget {cfg.tokens} tokens is {n_train} windows of {cfg.seqlen}, fewer than "
                             f"one step of {cfg.batch}; raise the tokens or lower batch/seqlen")
    win = recovery_windows(tok, spec, n_train, cfg.val_windows, cfg.seqlen, cfg.seed, calibration=recipe.calibration,
                           cal_nsamples=recipe.nsamples, cal_seqlen=recipe.seqlen, cal_seed=recipe.seed)
    teacher = None
    if part.teacher:
        teacher, _ = load_model(recipe.model, recipe.dtype)
        teacher.eval().requires_grad_(False)
    settings = TrainSettings(steps=n_train // cfg.batch, batch=cfg.batch, lr=cfg.lr, micro=cfg.micro,
                             eval_every=cfg.eval_every, checkpoint_every=cfg.checkpoint_every, seed=cfg.seed)
    model.requires_grad_(False)
    params, lora = part.trainable(model, linears, mask_of)
    device = next(model.parameters()).device

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        ids = win.train[rows].to(device)
        mask = win.train_mask[rows].to(device) if win.train_mask is not None else None
        t_logits = None
        if teacher is not None:
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
        return part.loss(model(input_ids=ids).logits, ids, mask, t_logits)

    def val_loss() -> float:
        from ..recovery.base import token_loss

        total = 0.0
        for i in range(win.val.shape[0]):
            ids = win.val[i:i + 1].to(device)
            mask = win.val_mask[i:i + 1].to(device) if win.val_mask is not None else None
            total += float(token_loss(model(input_ids=ids).logits, ids, mask))
        return total / win.val.shape[0]

    key = hashlib.sha256(json.dumps({"recipe": json.loads(recipe.model_dump_json(exclude={"output", "overwrite"})),
                                     "part": part.key, "data": win.train[:4].tolist()}).encode()).hexdigest()[:24]
    folder = checkpoint_folder(recipe.output)
    ckpt = folder / part.key if folder is not None else None
    with torch.no_grad():
        before = val_loss()
    try:
        log = train(params, loss_of, win.train.shape[0], val_loss, settings, checkpoint=ckpt, key=key,
                    progress=progress, desc=f"recovery {part.name}")
    finally:
        if teacher is not None:
            del teacher
    adapter = None
    if lora is not None:
        if cfg.merge:
            lora.merge()
        else:
            adapter = lora.as_lowrank()
    for name, mask in mask_of.items():  # the masks are kept, to the weight
        w = linears[name].weight.detach()
        if bool(w[mask.to(w.device)].ne(0).any()):
            raise PrunewiseError(f"recovery changed pruned weights of {name}; the sparsity was not kept (a bug)")
    if folder is not None:
        shutil.rmtree(ckpt, ignore_errors=True)
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()
    return {"part": part.key, "options": part.options(), "windows": int(win.train.shape[0]),
            "tokens": int(win.train.shape[0] * cfg.seqlen), "steps": settings.steps, "val_windows": int(win.val.shape[0]),
            "val_loss_before": before, "history": log.history, "seconds": log.seconds,
            "resumed_from": log.resumed_from, "trained_parameters": int(sum(p.numel() for p in params.values())),
            "adapter": adapter}


def adapter_files(section: dict, dtype) -> dict:
    """The PEFT adapters of recovery parts that kept LoRA unmerged (each in a folder named after its part); their
    report entries become summaries."""
    files = {}
    for i, part in enumerate(section.get("parts", [])):
        adapter = part.pop("adapter", None)
        if adapter is not None:
            name = part["part"] if i == 0 else f"{part['part']}-{i}"
            part["adapter"] = {"folder": name, **adapter.summary(dtype)}
            files.update(adapter.peft_files(name, dtype))
    return files


def recover_folder(folder: str, recipe, masks_path: str | None = None, progress: bool = True) -> dict:
    """Recover a model pruned earlier (``folder`` holds its weights and ``masks.safetensors``) as ``recipe`` says
    (its recovery parts, evaluation and output): train keeping the saved masks, evaluate before and after, save."""
    from ..core.masks import MASKS_FILE, MaskSet
    from ..export.save import check_output, output_lock, save_pruned
    from .prune import PruneResult
    from .run import evaluate

    src = Path(folder)
    output, overwrite = recipe.output, recipe.overwrite
    check_output(output, overwrite, source=folder)
    masks = MaskSet.load(masks_path or src / MASKS_FILE)
    with output_lock(output):
        model, tok = load_model(str(src), recipe.dtype)
        result = PruneResult(model, tok, recipe, None, {}, {}, masks)

        def ppl() -> dict:
            return evaluate(model, tok, recipe.evaluation, recipe.eval_tokens, recipe.eval_seqlen, progress=progress,
                            device=recipe.device) if recipe.evaluation else {}

        before = ppl()
        section = recover(result, recipe, progress)
        files = {MASKS_FILE: masks.to_bytes(), "recipe.yaml": recipe.to_yaml()}
        files.update(adapter_files(section, next(model.parameters()).dtype))
        after = ppl()
        report = {"model": str(src), "source": recipe.model, "recovery": section,
                  "perplexity": {n: {"one_shot": before[n], "pruned": after[n]} for n in before}}
        files["report.json"] = json.dumps(report, indent=1)
        save_pruned(model, tok, output, files, overwrite=overwrite, source=folder)
    return report
