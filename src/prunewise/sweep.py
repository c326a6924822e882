"""A grid of scores x sparsities x allocations from one recipe, resumable, with one report of curves.

Layout of the output folder::

    dense.json            the dense model's perplexity, task accuracy and completions (computed once)
    cells/<cell>.json     one finished cell: its recipe, perplexity, tasks, completions, plan, timings, memory
    models/<cell>/        the pruned model (only with save_models)
    sweep.json            the summary of the finished cells
    report.html           self-contained page; report.md + figures/

A cell is written atomically when it is finished, so an interrupted sweep loses at most the cell in progress;
rerunning it skips every cell whose file exists and whose inputs are unchanged: the recipe, the weights of the
model (a fingerprint of its files) and the content of every local data file. A cell file or ``dense.json`` that
cannot be read (corrupt, truncated, not a JSON object) is recomputed with a warning.

The folder follows ``prune``'s output rules (``export/save.claimed_output``): never the source model, a filesystem
root, the current or home folder; a non-empty folder only when an earlier sweep wrote it (its
``.prunewise-output`` marker says sweep; older sweep folders have ``dense.json`` or ``cells/``); one process at
a time (a lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from .core.cluster import MAX_RETRIES, connect, error_line
from .errors import PrunewiseError
from .recipe import Recipe, make_recipe

logger = logging.getLogger(__name__)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _write_files(folder: Path, files: dict) -> None:
    for rel, content in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        if isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            tmp.write_text(content)
        os.replace(tmp, path)


def cell_name(score: str, allocation: str, sparsity: float) -> str:
    return f"{score}-{allocation}-{sparsity:g}"


def _data_files(recipe: Recipe) -> list[str]:
    """The local data files a recipe reads (calibration, evaluation, tasks, recovery data)."""
    from .recipe import DATA_SUFFIXES

    specs = [recipe.calibration] if isinstance(recipe.calibration, str) else [i.source for i in recipe.calibration]
    specs += [*recipe.evaluation, *recipe.tasks]
    for entry in recipe.recovery:
        data = entry.get("data")
        if isinstance(data, str):
            specs += [part.rpartition(":")[0] if ":" in part and not part.endswith(DATA_SUFFIXES) else part
                      for part in data.split(",")]
    return sorted({s.strip() for s in specs if s.strip().lower().endswith(DATA_SUFFIXES)})


def sweep_inputs(base: Recipe) -> dict:
    """What besides the recipe determines a cell: the model's weights (a fingerprint of its files: a folder replaced
    by another model with the same shapes is another model) and the content of each local data file."""
    from .cache import sha256_file
    from .models.loading import model_fingerprint

    data = {}
    for path in _data_files(base):
        try:
            data[path] = sha256_file(Path(path).expanduser())[:16]
        except OSError:
            data[path] = None  # missing: the run itself says so
    return {"weights": model_fingerprint(base.model), "data": data}


def _fingerprint(recipe: Recipe, inputs: dict | None = None) -> str:
    fields = recipe.model_dump()
    for name in ("output", "overwrite", "ray", "num_cpus", "num_gpus"):  # where a cell runs does not change it
        fields.pop(name, None)
    if inputs is not None:
        fields["inputs"] = inputs
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _unique(values: list, flag: str | None = None) -> list:
    """The values in order, each once (a repeated one is run once, with a warning naming ``flag``)."""
    out = []
    for v in values:
        if v in out:
            if flag:
                logger.warning("%s lists %s more than once; it is run once", flag, v)
        else:
            out.append(v)
    return out


def _read_json(path: Path, what: str):
    """A sweep file's JSON object, or None (with a warning) when it cannot be read or is not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        logger.warning("%s (%s) cannot be read (%s); computing it again", what, path, str(exc).splitlines()[0][:120])
        return None
    if not isinstance(data, dict):
        logger.warning("%s (%s) holds a %s, not a JSON object; computing it again", what, path, type(data).__name__)
        return None
    return data


def grid_recipes(base: Recipe, scores: list[str], sparsities: list[float], allocations: list[str]) -> dict[str, Recipe]:
    """The cells' recipes, validated before any work (a bad combination fails the whole sweep up front)."""
    if not scores or not sparsities or not allocations:
        raise PrunewiseError("a sweep needs at least one score, one sparsity and one allocation")
    scores, sparsities, allocations = _unique(scores), _unique(sparsities), _unique(allocations)
    fields = base.model_dump()
    fields.update(output=None, overwrite=False, plan=None, ray=None)
    implied = make_recipe(score=base.score).compensation  # what the base's score brings by itself (obs for sparsegpt)
    if [c["name"] for c in base.compensation] == [c["name"] for c in implied]:
        fields.pop("compensation")  # each cell's score brings its own (wanda none, sparsegpt obs)
    cells = {}
    for score in scores:
        for allocation in allocations:
            for sparsity in sparsities:
                name = cell_name(score, allocation, sparsity)
                if name in cells:
                    raise PrunewiseError(f"two sparsities of the grid both name the cell {name} (they agree to 6 "
                                         "significant digits); give sparsities that differ more, each once")
                cells[name] = make_recipe(**dict(fields, score=score, allocation=allocation, sparsity=sparsity))
    return cells


def _dense_key(base: Recipe, inputs: dict | None = None) -> dict:
    key = {"model": base.model, "dtype": base.dtype, "evaluation": base.evaluation, "eval_tokens": base.eval_tokens,
           "eval_seqlen": base.eval_seqlen, "tasks": base.tasks, "task_limit": base.task_limit,
           "completions": base.completions}
    if inputs is not None:  # the weights, and the evaluation and task files' content
        key["weights"] = inputs["weights"]
        key["data"] = {k: v for k, v in inputs["data"].items() if k in base.evaluation or k in base.tasks}
    return key


def _dense_data(base: Recipe, progress: bool, inputs: dict | None = None) -> dict:
    """The dense model's evaluation (in this process, or a Ray worker's)."""
    from .models.loading import load_model
    from .pipeline.run import evaluate_dense
    from .tasks.suite import load_tasks

    model, tokenizer = load_model(base.model, base.dtype)
    tasks = load_tasks(base.tasks, base.task_limit) if base.tasks else []
    return {"key": _dense_key(base, inputs), **evaluate_dense(model, tokenizer, base, tasks, progress)}


def _dense(base: Recipe, out: Path, progress: bool, ray=None, inputs: dict | None = None):
    """The dense model's evaluation, once per sweep folder (and its task scores cached across folders). On Ray
    it is a task: returns a callable that waits for it, so the cells start meanwhile."""
    path = out / "dense.json"
    if path.exists():
        data = _read_json(path, "the dense result")
        if data is not None:
            if data.get("key") == _dense_key(base, inputs) and isinstance(data.get("perplexity"), dict):
                return data
            logger.warning("dense.json was computed for other inputs (model weights, data or settings) or is "
                           "incomplete; computing it again")
    if ray is None:
        data = _dense_data(base, progress, inputs)
        _write_json(path, data)
        return data
    task = ray.remote(_dense_task).options(num_cpus=base.num_cpus, num_gpus=base.num_gpus, name="sweep_dense",
                                           max_retries=MAX_RETRIES, retry_exceptions=False)
    ref = task.remote(base, inputs)

    def wait() -> dict:
        try:
            data = ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise PrunewiseError(f"the dense evaluation failed on Ray: {error_line(exc)}") from None
        _write_json(path, data)
        return data

    return wait


def _threads(recipe: Recipe) -> None:
    """On a Ray worker: torch threads as the task's reserved CPUs."""
    import torch

    torch.set_num_threads(max(1, int(recipe.num_cpus)))


def _dense_task(base: Recipe, inputs: dict | None = None) -> dict:
    """A Ray task: the dense evaluation."""
    _threads(base)
    return _dense_data(base, False, inputs)


def _run_cell(recipe: Recipe, progress: bool, model_dir: Path | None, inputs: dict | None = None) -> dict:
    from .export.save import save_pruned
    from .pipeline.prune import prune
    from .pipeline.run import evaluate_pruned
    from .tasks.suite import load_tasks

    start = time.perf_counter()
    result = prune(recipe, progress=progress)
    cell = {"score": recipe.score["name"], "allocation": recipe.allocation["name"], "sparsity": recipe.sparsity,
            "structure": result.report["structure"], "recipe": json.loads(recipe.model_dump_json()),
            "fingerprint": _fingerprint(recipe, inputs),
            "achieved_sparsity": result.report["achieved_sparsity"], "timings": result.report["timings"],
            "peak_rss_mb": result.report["peak_rss_mb"], "plan": json.loads(result.plan.model_dump_json())}
    tasks = load_tasks(recipe.tasks, recipe.task_limit) if recipe.tasks else []
    if recipe.recovery:  # the one-shot perplexity, then the recovery the recipe asks for
        from .pipeline.recover import adapter_files, recover

        cell["one_shot"] = evaluate_pruned(result, recipe, [], progress)["perplexity"]
        section = recover(result, recipe, progress)
        result.files.update(adapter_files(section, next(result.model.parameters()).dtype))
        cell["recovery"] = section
    cell.update(evaluate_pruned(result, recipe, tasks, progress))
    if model_dir is not None:
        save_pruned(result.model, result.tokenizer, model_dir, {"recipe.yaml": recipe.to_yaml(), **result.files},
                    overwrite=True)
    cell["seconds"] = time.perf_counter() - start
    return cell


REPORT_EVERY_S = 30.0  # the shortest time between two partial reports of a running sweep


def write_sweep_report(out: Path, sweep: dict) -> None:
    from .report.build import report_files, sweep_sections

    title, lead, sections = sweep_sections(sweep)
    _write_files(out, report_files(title, lead, sections))


def run_sweep(base: Recipe, scores: list[str], sparsities: list[float], allocations: list[str], output: str | Path,
              save_models: bool = False, progress: bool = True, on_cell=None) -> dict:
    """Run (or finish) the grid into ``output``; returns the sweep summary. ``on_cell(name, status)`` reports.

    With ``base.ray`` every missing cell is a Ray task (``base.num_cpus``/``num_gpus`` each), retried when its
    worker dies; this process writes each cell as it comes back, so workers need no shared filesystem.
    """
    from .export.save import check_output, claimed_output
    from .pipeline.run import check_data

    out = Path(output).expanduser()
    scores, sparsities, allocations = (_unique(scores, "--scores"), _unique(sparsities, "--sparsities"),
                                       _unique(allocations, "--allocations"))
    if base.budget is not None:
        raise PrunewiseError(f"a sweep's --sparsities set how much each cell removes; leave --budget "
                             f"({base.budget}) out of a sweep")
    cells = grid_recipes(base, scores, sparsities, allocations)
    check_output(out, False, source=base.model, resume=True)  # before any work
    check_layout(out, cells, save_models)
    check_data(base)  # refuse overlapping data before any work
    inputs = sweep_inputs(base)
    with claimed_output(out, source=base.model, resume=True):
        return _run_sweep(base, cells, scores, sparsities, allocations, out, save_models, progress, on_cell, inputs)


def check_layout(out: Path, cells: dict, save_models: bool) -> None:
    """A sweep folder whose parts are of the wrong kind (a file where a folder belongs, or the reverse) is refused in
    one line before any work, rather than failing when the first result is written."""
    folders = [out / "cells", out / "figures"] + ([out / "models"] if save_models else [])
    files = [out / "dense.json", out / "sweep.json", out / "report.md", out / "report.html"]
    files += [out / "cells" / f"{name}{suffix}" for name in cells for suffix in (".json", ".failed.json")]
    for path in folders:
        if path.exists() and not path.is_dir():
            raise PrunewiseError(f"the sweep folder {out} is damaged: {path.name} should be a folder but is a file; "
                                 "remove it, or choose another --output")
    for path in files:
        if path.exists() and not path.is_file():
            raise PrunewiseError(f"the sweep folder {out} is damaged: {path.relative_to(out)} should be a file but is "
                                 "not; remove it, or choose another --output")


def _run_sweep(base: Recipe, cells: dict[str, Recipe], scores, sparsities, allocations, out: Path, save_models: bool,
               progress: bool, on_cell, inputs: dict) -> dict:
    ray = connect(base.ray) if base.ray else None
    dense = _dense(base, out, progress, ray, inputs)
    done: dict[str, dict] = {}
    failed: dict[str, str] = {}
    todo: dict[str, Recipe] = {}
    for name, recipe in cells.items():
        path = out / "cells" / f"{name}.json"
        if path.exists():
            cell = _read_json(path, f"cell {name}")
            if cell is not None and cell.get("fingerprint") == _fingerprint(recipe, inputs) and \
                    isinstance(cell.get("perplexity"), dict) and \
                    (not save_models or (out / "models" / name / "config.json").is_file()):  # its model, if asked
                done[name] = cell
                if on_cell:
                    on_cell(name, "done before")
                continue
            if cell is not None:
                logger.warning("cell %s was computed with other inputs (recipe, model weights or data); recomputing "
                               "it", name)
        todo[name] = recipe

    def summary() -> dict:
        return _summary(base, scores, sparsities, allocations, dense, [done[n] for n in cells if n in done], failed)

    last_report = -float("inf")

    def finished(name: str, cell: dict, files: dict | None = None) -> None:
        nonlocal last_report
        if files:
            _write_model(out / "models" / name, files)
        _write_json(out / "cells" / f"{name}.json", cell)
        (out / "cells" / f"{name}.failed.json").unlink(missing_ok=True)
        done[name] = cell
        # a partial report after a cell, at most every REPORT_EVERY_S: a real model's cell takes minutes, so each one
        # refreshes it; a grid of second-long cells does not spend most of its time drawing figures
        if time.monotonic() - last_report >= REPORT_EVERY_S:
            write_sweep_report(out, summary())
            last_report = time.monotonic()
        if on_cell:
            on_cell(name, f"finished in {cell['seconds']:.0f} s")

    def fail(name: str, error: str) -> None:
        failed[name] = error
        _write_json(out / "cells" / f"{name}.failed.json", {"cell": name, "error": error})
        if on_cell:
            on_cell(name, f"failed: {error}")

    if ray is not None:
        pending = _submit(ray, todo, save_models, on_cell, inputs)
        if callable(dense):  # the dense evaluation ran beside the first cells
            dense = dense()
        _collect(ray, pending, progress, finished, fail)
    else:
        for name, recipe in todo.items():
            if on_cell:
                on_cell(name, "running")
            cell = _run_cell(recipe, progress, out / "models" / name if save_models else None, inputs)
            finished(name, cell)
    result = summary()
    _write_json(out / "sweep.json", {k: v for k, v in result.items() if k != "cells"} |
                {"cells": [{k: v for k, v in c.items() if k != "plan"} for c in result["cells"]]})
    write_sweep_report(out, result)
    return result


def sweep_cell(recipe: Recipe, save_models: bool, inputs: dict | None = None) -> dict:
    """A Ray task: one cell, and the saved model's files as bytes (the driver writes them)."""
    import tempfile

    _threads(recipe)
    with tempfile.TemporaryDirectory(prefix="prunewise-cell-") as tmp:
        folder = Path(tmp) / "model" if save_models else None
        cell = _run_cell(recipe, False, folder, inputs)
        files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} \
            if folder is not None else {}
    return {"cell": cell, "files": files}


def _submit(ray, todo: dict[str, Recipe], save_models: bool, on_cell, inputs: dict | None = None) -> dict:
    """Every missing cell a Ray task (its recipe's num_cpus/num_gpus), run again if its worker dies."""
    task = ray.remote(sweep_cell)
    pending = {}
    for name, recipe in todo.items():
        ref = task.options(num_cpus=recipe.num_cpus, num_gpus=recipe.num_gpus, max_retries=MAX_RETRIES,
                           retry_exceptions=False, name=f"sweep_cell:{name}").remote(recipe, save_models, inputs)
        pending[ref] = name
        if on_cell:
            on_cell(name, "submitted")
    return pending


def _collect(ray, pending: dict, progress: bool, finished, fail) -> None:
    """Write each cell as it returns; Ctrl-C cancels the running ones (finished cells stay)."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), desc="sweep on ray", unit="cell", disable=not progress)
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                name = pending[ref]
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the cell raised, or its worker died more than MAX_RETRIES times
                    del pending[ref]
                    fail(name, error_line(exc))
                else:
                    del pending[ref]
                    finished(name, result["cell"], result["files"])
                bar.update(1)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()


def _write_model(folder: Path, files: dict[str, bytes]) -> None:
    """A cell's saved model, written beside and renamed into place (never a half-written folder)."""
    import shutil

    tmp = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_files(tmp, files)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _summary(base, scores, sparsities, allocations, dense, cells: list[dict], failed: dict[str, str]) -> dict:
    calibration = base.calibration if isinstance(base.calibration, str) else \
        ",".join(f"{m.source}:{m.weight:g}" for m in base.calibration)
    return {"model": base.model, "structure": base.structure_obj.name, "calibration": calibration,
            "grid": {"score": list(scores), "sparsity": list(sparsities), "allocation": list(allocations)},
            "grid_size": len(scores) * len(sparsities) * len(allocations),
            "dense": dense, "cells": cells, **({"failed": dict(failed)} if failed else {})}
