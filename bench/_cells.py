"""What the benchmark scripts share: resumable result files and one process per cell."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def load_results(out: Path, settings: dict, fresh: bool) -> dict:
    """Finished cells from ``out`` when they were measured with the same settings, else an empty result."""
    out.parent.mkdir(parents=True, exist_ok=True)
    results = json.loads(out.read_text()) if out.exists() and not fresh else {}
    if results.get("settings") != settings:
        results = {"settings": settings, "cells": {}}
    return results


def add_cell_args(ap, default_out: Path, cells_help: str) -> None:
    """The arguments every cell benchmark takes: --cells, --out, --fresh and the hidden --_cell of a child process."""
    import argparse

    ap.add_argument("--cells", nargs="*", help=cells_help)
    ap.add_argument("--out", default=str(default_out))
    ap.add_argument("--fresh", action="store_true", help="ignore finished cells in --out")
    ap.add_argument("--_cell", help=argparse.SUPPRESS)


def add_window_args(ap, nsamples: int = 64, seqlen: int = 512, eval_tokens: int = 16384) -> None:
    """Calibration windows and evaluation tokens: the settings of the perplexity benchmarks."""
    ap.add_argument("--nsamples", type=int, default=nsamples)
    ap.add_argument("--seqlen", type=int, default=seqlen)
    ap.add_argument("--eval-tokens", type=int, default=eval_tokens)


def start(args, run_cell, settings_keys: tuple[str, ...]) -> dict | None:
    """In a child (``--_cell``): run that cell, print its JSON and return None. Otherwise the results so far
    (kept only if measured with the same settings), stamped with the command line and thread count."""
    import torch

    torch.manual_seed(0)
    if args._cell:
        from prunewise.engine.streaming import return_freed_memory

        return_freed_memory()  # as the command line does
        print(json.dumps(run_cell(args, args._cell)))
        return None
    settings = {k: getattr(args, k) for k in settings_keys}
    results = load_results(Path(args.out), settings, args.fresh)
    results["command"] = " ".join([sys.executable.split("/")[-1]] + sys.argv)
    results["threads"] = torch.get_num_threads()
    return results


def run_cell_process(cmd: list[str], cell: str) -> dict:
    """Run one cell in its own process (its peak RSS is its own); its JSON is the last line of stdout."""
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"cell {cell} failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_missing(results: dict, out: Path, cells: list[str], script: str, args, keys: tuple[str, ...], describe) -> None:
    """Run every cell of ``cells`` not yet in ``results``, each in its own process (``script --_cell CELL`` with
    ``--KEY value`` for each of ``keys``), printing ``describe(row)`` and saving ``out`` after every cell."""
    for cell in cells:
        if cell in results["cells"]:
            continue
        print(f"{cell} ...", flush=True)
        cmd = [sys.executable, script, "--_cell", cell]
        for key in keys:
            value = getattr(args, key)
            cmd += [f"--{key.replace('_', '-')}", *(map(str, value) if isinstance(value, list) else [str(value)])]
        results["cells"][cell] = run_cell_process(cmd, cell)
        print(f"{cell}: {describe(results['cells'][cell])}", flush=True)
        out.write_text(json.dumps(results, indent=1))


def dense_row(args) -> dict:
    """The dense model's perplexity on every ``args.eval`` set (cached on disk by the model's fingerprint)."""
    from prunewise.api import evaluate
    from prunewise.models.loading import load_model

    model, tok = load_model(args.model)
    return evaluate(model, tok, args.eval, args.eval_tokens, 512, dense_spec=args.model, progress=False)


def dense_first(results: dict, out: Path, args) -> None:
    """Measure the dense row once, before any cell, and save it (a resumed run keeps the one it has)."""
    if "dense" not in results:
        results["dense"] = dense_row(args)
        out.write_text(json.dumps(results, indent=1))


def window_bench_main(script: str, doc: str, default_out: Path, cells: list[str], run_cell, write_table, describe,
                      nsamples: int = 64, extra_settings=None) -> None:
    """``main()`` of a perplexity benchmark: --cells (default ``cells``, after ``dense``), the window settings, one
    process per missing cell, then the table. ``extra_settings(ap)`` adds arguments and returns their keys (settings
    too: results measured with other values are not kept)."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_args(ap, default_out, f"cells to run (default dense and: {' '.join(cells)})")
    add_window_args(ap, nsamples=nsamples)
    extra = tuple(extra_settings(ap)) if extra_settings else ()
    args = ap.parse_args()
    keys = ("nsamples", "seqlen", "eval_tokens") + extra
    results = start(args, run_cell, keys)
    if results is None:
        return
    out = Path(args.out)
    run_missing(results, out, ["dense"] + (args.cells or cells), script, args, keys, describe)
    print(write_table(results, out.with_suffix(".md")))


def plain_forward_seconds(model, windows) -> float:
    """Seconds of one plain forward pass over ``windows`` (window by window, no hooks, no cache): the speed yardstick."""
    import time

    import torch

    t0 = time.perf_counter()
    with torch.inference_mode():
        for w in windows:
            model(input_ids=w[None], use_cache=False)
    return time.perf_counter() - t0
