"""Reconstruction benchmark: one-shot masks and weight updates at the sparsities that save memory (issue 33).

Cells are ``METHOD/STRUCTURE/SPARSITY/ALLOCATION``. ``METHOD`` is a score with its compensation chain after ``+``:
``sparsegpt`` (its OBS sweep), ``wanda+alps``, ``wanda+admm``, ``wanda+admm:mask=final`` (the reference's
unstructured default: the final level at every mask step), ``ria+alps``, ``sparsegpt+obs+alps`` (SparseGPT's mask,
then ALPS from the dense weight), ``wanda``, ``ria``; ``STRUCTURE`` is ``unstructured`` or ``2:4``; ``ALLOCATION`` is
``uniform``, ``owl`` or ``plan=PATH`` (a saved plan, e.g. the allocation benchmark's searched one). Each cell runs
in its own process with ``nsamples`` x ``seqlen`` windows of ``--calibration`` and reports perplexity on the
evaluation sets beside the dense model, the sparsity counted in the weights, prune seconds and peak RSS. Results go
to JSON after every cell (an interrupted run resumes) and to a markdown table with each cell's ratio to the
SparseGPT cell of the same structure, sparsity and allocation.

    python bench/reconstruction.py --cells sparsegpt/unstructured/0.7/uniform wanda+alps/unstructured/0.7/uniform
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import window_bench_main  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT = [f"{method}/{structure}/{level}/uniform"
           for structure, level in (("unstructured", 0.7), ("unstructured", 0.8), ("2:4", 0.5))
           for method in ("sparsegpt", "wanda+alps")]


def recipe_fields(cell: str) -> dict:
    method, structure, level, allocation = cell.split("/", 3)
    score, *chain = method.split("+")
    fields: dict = {"score": score, "structure": structure}
    if structure == "unstructured":
        fields["sparsity"] = float(level)
    if allocation.startswith("plan="):
        fields["plan"] = allocation[len("plan="):]
    else:
        fields["allocation"] = allocation
    if chain:
        fields["compensation"] = chain
    return fields


def run_cell(args, cell: str) -> dict:
    from prunewise.api import evaluate, peak_rss_mb, prune
    from prunewise.evaluate.sparsity import measure_sparsity
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    model, tok = load_model(args.model)
    if cell == "dense":
        return {"perplexity": evaluate(model, tok, args.eval, args.eval_tokens, 512, calibration=args.calibration,
                                       progress=False)}
    recipe = make_recipe(model=args.model, calibration=args.calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                         evaluation=args.eval, eval_tokens=args.eval_tokens, **recipe_fields(cell))
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    names = list(result.report["modules"])
    zeros = measure_sparsity(result.model, names)["sparsity"]
    iters = [m["alps_iters"] for m in result.report["modules"].values() if "alps_iters" in m]
    return {"cell": cell, "perplexity": evaluate(result.model, tok, args.eval, args.eval_tokens, 512,
                                                 calibration=args.calibration, progress=False),
            "prune_s": seconds, "peak_rss_mb": peak_rss_mb(), "zeros": zeros,
            "alps_mean_iters": sum(iters) / len(iters) if iters else None,
            "linear_work_s": result.report["timings"].get("prune.linear_work_s")}


def describe(row: dict) -> str:
    ppl = " ".join(f"{k} {v:.2f}" for k, v in row["perplexity"].items())
    return ppl + (f", {row['prune_s']:.0f} s" if "prune_s" in row else "")


def write_table(results: dict, path: Path) -> str:
    cells = results["cells"]
    dense = cells.get("dense", {}).get("perplexity", {})
    sets = list(dense)
    lines = [f"`{results['command']}`", "",
             f"{results['threads']} threads; calibration {results['settings']['nsamples']} x "
             f"{results['settings']['seqlen']} windows of `{results['settings']['calibration']}`; perplexity on "
             f"{results['settings']['eval_tokens']} tokens of each set (512-token windows). Ratios are to the SparseGPT "
             "cell of the same structure, level and allocation in this run.", "",
             "| cell | " + " | ".join(sets) + " | " + " | ".join(f"x SparseGPT ({s})" for s in sets)
             + " | zeros | prune s | x SparseGPT time | peak RSS MB | ALPS iterations |",
             "|---" * (2 * len(sets) + 5) + "|---|"]
    lines.append("| dense | " + " | ".join(f"{dense[s]:.2f}" for s in sets) + " |" + " - |" * (len(sets) + 5))
    for cell, row in cells.items():
        if cell == "dense":
            continue
        method, rest = cell.split("/", 1)
        base = cells.get(f"sparsegpt/{rest}")
        ppl = [row["perplexity"][s] for s in sets]
        ratio = [f"{p / base['perplexity'][s]:.3f}" if base else "-" for p, s in zip(ppl, sets)]
        time_ratio = f"{row['prune_s'] / base['prune_s']:.2f}" if base else "-"
        iters = f"{row['alps_mean_iters']:.0f}" if row.get("alps_mean_iters") else "-"
        lines.append(f"| {cell} | " + " | ".join(f"{p:.2f}" for p in ppl) + " | " + " | ".join(ratio)
                     + f" | {row['zeros']:.4f} | {row['prune_s']:.0f} | {time_ratio} | "
                     f"{row['peak_rss_mb']:.0f} | {iters} |")
    text = "# Reconstruction benchmark\n\n" + "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def extra(ap):
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", default="wiki")
    ap.add_argument("--eval", nargs="+", default=["wiki-test", "code"])
    return ("model", "calibration", "eval")


if __name__ == "__main__":
    window_bench_main(__file__, __doc__, HERE / "results/reconstruction.json", DEFAULT, run_cell, write_table, describe,
                      extra_settings=extra)
