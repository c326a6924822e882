"""Pruning a model that is never built in memory: blocks streamed from the source shards to the output shards.

The module tree is built on the meta device; the engine reads each block from the source's
safetensors (memory-mapped only while read, the next block prefetched), prunes it, writes it to an
output shard and releases it. Dense and pruned perplexity stream the same way, one block at a time.
The saved folder is sharded safetensors with an index, loadable by stock ``from_pretrained``.
Weight-level and width structures (unstructured, N:M, channels, heads, width) with the allocations
that only walk the blocks (uniform, OWL, global) and scores without gradients; anything else is
refused before any work.
"""

from __future__ import annotations

import shutil

import torch

from ..core.masks import MASKS_FILE
from ..data import check_calibration_overlap, evaluation_windows, get_corpus
from ..engine.placement import Placement, placed
from ..engine.streaming import ShardWriter, Stream, return_freed_memory
from ..errors import PrunewiseError
from ..evaluate.perplexity import perplexity
from ..export.save import check_output, save_pruned, space_for, staging_folder
from ..models.adapters import get_adapter
from ..models.lazy import CheckpointTensors, empty_model
from ..models.loading import checkpoint_dtype, fetch_model
from .prune import prune, targeted_numels
from .run import check_model_fits

STREAMED_ALLOCATIONS = ("uniform", "owl", "global")


def check_streamable(recipe) -> None:
    parts = recipe.parts()
    if getattr(parts.structure, "depth", False):
        raise PrunewiseError(f"--offload disk prunes weights and widths (unstructured, N:M, channels, heads, width); "
                             f"{parts.structure.name} measures whole-model outputs in memory (use --offload none)")
    if parts.score.needs.gradient:
        raise PrunewiseError(f"--offload disk: the {parts.score.name} score's gradient pass needs the model in memory; "
                             "use wanda, sparsegpt or magnitude, or --offload none")
    if recipe.plan is None and parts.allocation.key not in STREAMED_ALLOCATIONS:
        raise PrunewiseError(f"--offload disk: the {parts.allocation.key} allocation needs the model in memory; use "
                             f"{', '.join(STREAMED_ALLOCATIONS)} or a --plan, or --offload none")
    if any(c.adds_lowrank for c in parts.compensation):
        raise PrunewiseError("--offload disk: the eora adapter is computed and saved in memory; use --offload none")
    if recipe.tasks or recipe.completions:
        raise PrunewiseError("--offload disk evaluates perplexity only; add --no-completions and leave --tasks out")


def available_ram() -> int:
    """Bytes of memory available to new allocations (MemAvailable), or 0 when unknown."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def should_stream(recipe) -> bool:
    """``--offload disk``, or ``auto`` when the model in its storage dtype would take over 70% of the available memory."""
    if recipe.offload != "auto":
        return recipe.offload == "disk"
    folder = fetch_model(recipe.model)
    try:
        on_disk = CheckpointTensors(folder).nbytes()
    except PrunewiseError:
        return False  # not safetensors: loaded in memory as before
    stored = checkpoint_dtype(folder)
    size = on_disk * torch.empty(0, dtype=source_dtype(recipe, folder)).element_size() // torch.empty(0, dtype=stored).element_size()
    ram = available_ram()
    return bool(ram) and size > 0.7 * ram


def source_dtype(recipe, folder) -> torch.dtype:
    from ..core.dtypes import torch_dtype

    return checkpoint_dtype(folder) if recipe.dtype == "auto" else torch_dtype(recipe.dtype)


def streamed_perplexity(model, adapter, tensors: CheckpointTensors, dtype, recipe, tokenizer, progress: bool,
                        window_nll: dict | None = None) -> dict:
    out = {}
    stream = Stream(model, adapter, tensors, dtype)
    try:
        with placed(model, adapter, Placement.of(model, recipe.device), stream=stream):
            for name in recipe.evaluation:
                corpus = get_corpus(name, "evaluation")
                check_calibration_overlap(recipe.calibration, corpus)
                windows = evaluation_windows(tokenizer, corpus, recipe.eval_seqlen, recipe.eval_tokens)
                # every batch reads the whole model from disk: batches of ~400 MB of logits, not one window
                nll: list[float] = []
                out[name] = perplexity(model, windows, progress=progress, desc=f"ppl {name} (streamed)",
                                       logit_budget=1e8, per_window=nll)
                if window_nll is not None:
                    window_nll[name] = nll
    finally:
        stream.close()
    return out


def run_streamed(recipe, progress: bool = True) -> dict:
    """Prune ``recipe.model`` out of core into ``recipe.output``; returns the report (dense and pruned perplexity)."""
    from transformers import AutoTokenizer

    if not recipe.output:
        raise PrunewiseError("--offload disk writes the pruned model as it goes; give --output")
    check_streamable(recipe)
    return_freed_memory()
    folder = fetch_model(recipe.model)
    tensors = CheckpointTensors(folder)
    dtype = source_dtype(recipe, folder)
    model = empty_model(folder, dtype)
    adapter = get_adapter(model)
    check_model_fits(recipe, model, streamed=True)  # shapes, expert counts, what cannot stream: before any work
    itemsize = torch.empty(0, dtype=dtype).element_size()
    expected = sum(p.numel() for p in model.parameters()) * itemsize
    check_output(recipe.output, recipe.overwrite, source=recipe.model, expected_bytes=int(expected * 1.05) + (16 << 20))
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    dense_nll: dict = {}
    dense = streamed_perplexity(model, adapter, tensors, dtype, recipe, tokenizer, progress, dense_nll) \
        if recipe.evaluation else {}
    staging = staging_folder(recipe.output)
    try:
        with space_for(recipe.output, int(expected * 1.05) + (16 << 20)):  # a full disk: one line, nothing kept
            return _prune_streamed(recipe, model, adapter, tensors, dtype, tokenizer, staging, dense, dense_nll,
                                   progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(f"{staging}-masks", ignore_errors=True)


def _prune_streamed(recipe, model, adapter, tensors, dtype, tokenizer, staging, dense: dict, dense_nll: dict,
                    progress: bool) -> dict:
    """The streamed prune into ``staging``, then the evaluation and the save."""
    from .run import add_intervals, output_files

    stream = Stream(model, adapter, tensors, dtype, ShardWriter(staging), measured=set(targeted_numels(model, recipe)))
    try:
        result = prune(recipe, model, tokenizer, progress, stream=stream)
        stream.finish()
    finally:
        stream.close()
    result.masks.write(staging / MASKS_FILE)  # tensor by tensor from the per-block files: memory stays flat
    result.masks = None  # already beside the shards
    report = result.report
    report["offload"] = {"mode": "disk", "bytes_read": stream.bytes_read, "bytes_written": stream.sink.total_size}
    if recipe.evaluation:
        pruned_nll: dict = {}
        pruned = streamed_perplexity(model, adapter, CheckpointTensors(staging), dtype, recipe, tokenizer, progress,
                                     pruned_nll)
        report["perplexity"] = {n: {"dense": dense[n], "pruned": pruned[n]} for n in recipe.evaluation}
        add_intervals(report["perplexity"], dense_nll, pruned_nll)
    save_pruned(model, tokenizer, recipe.output, output_files(result, report), overwrite=recipe.overwrite,
                source=recipe.model, weights=staging)
    return report
