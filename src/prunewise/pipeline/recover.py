"""Recovery after pruning: the recipe's recovery parts train the pruned model on the recovery data, keeping
its masks (every pruned weight stays exactly zero, checked), with checkpoints a rerun resumes from."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from ..data.mixture import check_calibration_overlap
from ..data.recovery import recovery_windows
from ..engine.train import TrainSettings, train
from ..errors import PrunewiseError
from ..models.loading import load_model

log = logging.getLogger(__name__)


def checkpoint_folder(output: str | None) -> Path | None:
    """Where a run's recovery checkpoints live until it finishes: a hidden folder beside the output."""
    if not output:
        return None
    out = Path(output)
    return out.parent / f".{out.name}.recovery"


def run_key(recipe, windows: torch.Tensor, **extra) -> str:
    """What a training run's checkpoints must match to be resumed: the recipe (not where it writes), the first
    windows of its data and ``extra``."""
    return hashlib.sha256(json.dumps({"recipe": json.loads(recipe.model_dump_json(exclude={"output", "overwrite"})),
                                      **extra, "data": windows[:4].tolist()}).encode()).hexdigest()[:24]


def drop_checkpoint(folder: Path | None, ckpt: Path | None) -> None:
    """Remove a finished (or diverged) run's checkpoints, and the checkpoint folder once nothing else is in it."""
    if folder is None:
        return
    shutil.rmtree(ckpt, ignore_errors=True)
    if folder.exists() and not any(folder.iterdir()):
        folder.rmdir()


def _pruned_linears(model, masks) -> tuple[dict, dict]:
    """The linears recovery trains (those the prune targeted, as they are now) and their masks."""
    from ..models.adapters import prunable_weights

    weights = prunable_weights(model)
    linears = {n: m for n, m in model.named_modules() if n in weights}
    if masks is not None and masks.has_weight_masks:
        missing = [n for n in masks.weight_names() if n not in weights]
        if missing:
            raise PrunewiseError(f"the mask set names {missing[0]}, which this model does not have; use the mask set "
                                 "saved with this pruned model")
        keep = dict(masks.weight_masks())
        # a routed expert's matrices are slices of fused parameters, not linears: recovery leaves them frozen (their
        # zeros with them) and trains the linears; their zeros are checked here like the others'
        for name in [n for n in keep if n not in linears]:
            mask = keep.pop(name)
            if tuple(mask.shape) != tuple(weights[name].shape) or \
                    bool(weights[name].detach()[mask.to(weights[name].device)].ne(0).any()):
                raise PrunewiseError(f"{name} does not carry its mask (shape, or non-zero weights where it says pruned); "
                                     "use the mask set saved with this pruned model")
            log.info("%s: a routed expert's matrix, kept frozen by recovery", name)
        for name, mask in keep.items():
            if tuple(mask.shape) != tuple(linears[name].weight.shape):
                raise PrunewiseError(f"the mask of {name} is {tuple(mask.shape)} but the weight is "
                                     f"{tuple(linears[name].weight.shape)}; use the mask set saved with this model")
        return {n: linears[n] for n in keep}, keep
    return linears, {}


TOKEN_BYTES = 9  # a training token's id (int64) and its loss-mask entry (bool)


def check_token_memory(tokens: int, n_train: int, n_val: int, seqlen: int) -> None:
    """Refuse, before any window is cut, a recovery budget whose token ids alone would not fit in memory."""
    from .streamed import available_ram

    need = (n_train + n_val) * seqlen * TOKEN_BYTES
    have = available_ram() or (1 << 40)
    if need > have:
        raise PrunewiseError(f"recovery budget of {tokens:,} tokens ({n_train:,} windows of {seqlen}) needs about "
                             f"{need / 1e9:,.3g} GB for its token ids, more than the {have / 1e9:.1f} GB of memory "
                             "available; lower --recover-tokens (e.g. 65536)")


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
    n_train = cfg.windows
    if n_train < cfg.batch:
        raise PrunewiseError(f"recovery budget {cfg.tokens} tokens is {n_train} windows of {cfg.seqlen}, fewer than "
                             f"one step of {cfg.batch}; raise the tokens or lower batch/seqlen")
    drawn, clusters = cfg.drawn, cfg.paser_clusters  # the recipe refused a budget smaller than the clusters
    check_token_memory(drawn * cfg.seqlen, drawn, cfg.val_windows, cfg.seqlen)
    win = recovery_windows(tok, spec, drawn, cfg.val_windows, cfg.seqlen, cfg.seed, calibration=recipe.calibration,
                           cal_nsamples=recipe.nsamples, cal_seqlen=recipe.seqlen, cal_seed=recipe.seed)
    teacher = None
    if part.teacher:
        teacher, _ = load_model(recipe.model, recipe.dtype)
        teacher.eval().requires_grad_(False)
    selection = None
    if cfg.select != "none":  # PASER scores the candidates with the dense model too: the teacher when there is one
        index, selection = _select(model, teacher, win, n_train, cfg, clusters, recipe, progress)
        win = win._replace(train=win.train[index],
                           train_mask=None if win.train_mask is None else win.train_mask[index])
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

    key = run_key(recipe, win.train, part=part.key)
    folder = checkpoint_folder(recipe.output)
    ckpt = folder / part.key if folder is not None else None
    with torch.no_grad():
        before = val_loss()
    try:
        log = train(params, loss_of, win.train.shape[0], val_loss, settings, checkpoint=ckpt, key=key,
                    progress=progress, desc=f"recovery {part.name}")
    except PrunewiseError:  # diverged: its checkpoints would only resume the same divergence
        drop_checkpoint(folder, ckpt)
        raise
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
    drop_checkpoint(folder, ckpt)
    return {"part": part.key, "options": part.options(), "windows": int(win.train.shape[0]),
            "tokens": int(win.train.shape[0] * cfg.seqlen), "steps": settings.steps, "val_windows": int(win.val.shape[0]),
            "val_loss_before": before, "history": log.history, "seconds": log.seconds,
            "resumed_from": log.resumed_from, "trained_parameters": int(sum(p.numel() for p in params.values())),
            "adapter": adapter, "selection": selection}


@torch.no_grad()
def _window_losses(model, ids: torch.Tensor, masks, desc: str, progress: bool, hidden: bool = False):
    """Per-window mean token loss of ``model`` (and its mean last hidden state with ``hidden``)."""
    from tqdm.auto import tqdm

    from ..recovery.base import token_loss

    device = next(model.parameters()).device
    losses, states = [], []
    for i in tqdm(range(ids.shape[0]), desc=desc, unit="window", disable=not progress, leave=False):
        row = ids[i:i + 1].to(device)
        out = model(input_ids=row, output_hidden_states=hidden)
        mask = masks[i:i + 1].to(device) if masks is not None else None
        losses.append(float(token_loss(out.logits, row, mask)))
        if hidden:
            states.append(out.hidden_states[-1][0].float().mean(0).cpu())
    return torch.tensor(losses), (torch.stack(states) if hidden else None)


def _select(model, dense_model, win, budget: int, cfg, clusters: int, recipe,
            progress: bool) -> tuple[torch.Tensor, dict]:
    """The ``budget`` training windows of the candidates in ``win``: PASER's or a random share (same pool, same seed).
    PASER scores every candidate with the pruned model (loss and embedding) and the dense one (loss)."""
    import time

    from ..data.selection import paser_select

    t0 = time.perf_counter()
    n = win.train.shape[0]
    if cfg.select == "random":
        index = torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(int(cfg.seed)))[:budget]).values
        return index, {"method": "random", "candidates": n, "selected": budget, "indices": index.tolist(),
                       "seconds": time.perf_counter() - t0}
    was_training = model.training
    model.eval()
    pruned, emb = _window_losses(model, win.train, win.train_mask, "selection: pruned model", progress, hidden=True)
    model.train(was_training)
    loaded = dense_model is None
    if loaded:
        dense_model, _ = load_model(recipe.model, recipe.dtype)
        dense_model.eval()
    dense, _ = _window_losses(dense_model, win.train, win.train_mask, "selection: dense model", progress)
    if loaded:
        del dense_model
    index, info = paser_select(emb, pruned - dense, budget, clusters, seed=cfg.seed)
    info.update({"indices": index.tolist(), "degradation": [round(float(d), 5) for d in (pruned - dense)],
                 "clustering": "cosine k-means on the pruned model's mean last hidden state",
                 "seconds": time.perf_counter() - t0})
    return index, info


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


KEPT_FILES = ("modeling_prunewise.py", "plan.json")  # beside the weights of a pruned folder, kept by its recovery


def _adapter_folders(src: Path) -> list[Path]:
    """The PEFT LoRA adapters saved beside a pruned folder's weights (eora/, an unmerged recovery's lora/, ...)."""
    return sorted(d for d in src.iterdir() if d.is_dir() and (d / "adapter_config.json").is_file())


def _attach_adapter(model, folder: Path):
    """A saved PEFT LoRA adapter (as prunewise writes them) attached to ``model``'s linears as low-rank hooks, so
    recovery trains with the correction the pruned folder computes with; a one-line error when it does not fit."""
    from safetensors.torch import load_file
    from torch import nn

    from ..engine.lowrank import LowRankSet

    where = f"the adapter {folder}"
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except Exception as exc:  # noqa: BLE001 - a missing or damaged adapter: one line
        raise PrunewiseError(f"{where} cannot be read ({type(exc).__name__}: {str(exc)[:120]}); restore it, or recover "
                             "a copy of the folder without it") from None
    if config.get("use_dora") or config.get("use_rslora"):
        raise PrunewiseError(f"{where} uses DoRA or rsLoRA, which recovery cannot keep; recover a folder without it")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    ranks, alphas = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    lowrank = LowRankSet()
    prefix, a_end, b_end = "base_model.model.", ".lora_A.weight", ".lora_B.weight"
    names = sorted(k[len(prefix):-len(a_end)] for k in tensors if k.startswith(prefix) and k.endswith(a_end))
    if not names:
        raise PrunewiseError(f"{where} holds no LoRA weights; restore it, or recover a copy of the folder without it")
    for name in names:
        A, B = tensors[f"{prefix}{name}{a_end}"], tensors.get(f"{prefix}{name}{b_end}")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            linear = None
        if not isinstance(linear, nn.Linear) or B is None or A.shape[1] != linear.in_features or \
                B.shape[0] != linear.out_features or A.shape[0] != B.shape[1]:
            raise PrunewiseError(f"{where} does not fit its model ({name}); recover the folder it was saved with")
        scale = alphas.get(name, alpha) / ranks.get(name, r)
        lowrank.attach(name, linear, A.float(), B.float() * scale)
    return lowrank


def attach_saved_adapters(model, folder) -> tuple[list[str], list]:
    """Every PEFT LoRA adapter saved beside a folder's weights attached to ``model`` (the model the folder computes);
    returns their names and the attached sets. A plain model folder has none."""
    src = Path(folder)
    if not src.is_dir():
        return [], []
    adapters = _adapter_folders(src)
    return [d.name for d in adapters], [_attach_adapter(model, d) for d in adapters]


def recover_folder(folder: str, recipe, masks_path: str | None = None, progress: bool = True) -> dict:
    """Recover a model pruned earlier (``folder`` holds its weights and ``masks.safetensors``) as ``recipe`` says
    (its recovery parts, evaluation and output): train keeping the saved masks, evaluate before and after, save.

    The mask set (the folder's, or ``masks_path``) is checked against the folder before any work (structure, blocks,
    names, shapes, and the weights' zeros). The folder's adapters (``eora/``, an unmerged LoRA) compute with the
    model during recovery, as they do when the folder is used, and are saved unchanged beside the recovered weights,
    with its masks, plan and modeling file."""
    from ..core.masks import MASKS_FILE, MaskSet
    from ..export.save import claimed_output, save_pruned
    from .prune import PruneResult
    from .reapply import RECOVER_FIX, check_masks
    from .run import evaluate

    src = Path(folder)
    output, overwrite = recipe.output, recipe.overwrite
    adapters = _adapter_folders(src)
    taken = {d.name for d in adapters}
    for i, part in enumerate(recipe.parts().recovery):
        name = part.key if i == 0 else f"{part.key}-{i}"
        if not part.config.merge and "lora" in part.config.params and name in taken:
            raise PrunewiseError(f"{src} already has a {name}/ adapter and this recovery would save another under the "
                                 f"same name; recover with merge (the default), or from a folder without {name}/")
    with claimed_output(output, overwrite, source=[folder, masks_path] if masks_path else folder):
        mask_file = Path(masks_path) if masks_path else src / MASKS_FILE
        mask_file = mask_file / MASKS_FILE if mask_file.is_dir() else mask_file
        masks = MaskSet.load(mask_file)
        model, tok = load_model(str(src), recipe.dtype)
        check_masks(model, masks, applied=True, structure=recipe.parts().structure.name, fix=RECOVER_FIX)
        kept = [_attach_adapter(model, d) for d in adapters]
        result = PruneResult(model, tok, recipe, None, {}, {}, masks)

        def ppl() -> dict:
            return evaluate(model, tok, recipe.evaluation, recipe.eval_tokens, recipe.eval_seqlen, progress=progress,
                            device=recipe.device) if recipe.evaluation else {}

        before = ppl()
        section = recover(result, recipe, progress)
        files = {MASKS_FILE: mask_file.read_bytes(), "recipe.yaml": recipe.to_yaml()}  # the checked file, as it is
        for name in KEPT_FILES:
            if (src / name).is_file():
                files[name] = (src / name).read_bytes()
        for d in adapters:  # the folder's adapters, unchanged: recovery trained with them computing
            files.update({f"{d.name}/{f.relative_to(d)}": f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()})
        files.update(adapter_files(section, next(model.parameters()).dtype))
        after = ppl()
        for lowrank in kept:
            lowrank.detach()
        report = {"model": str(src), "source": recipe.model, "recovery": section,
                  "adapters_kept": [d.name for d in adapters],
                  "perplexity": {n: {"one_shot": before[n], "pruned": after[n]} for n in before}}
        files["report.json"] = json.dumps(report, indent=1)
        save_pruned(model, tok, output, files, overwrite=overwrite, source=folder)
    return report
