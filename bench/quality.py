"""Quality benchmark: {magnitude, wanda, sparsegpt} x {50% unstructured, 2:4, 70% uniform, 70% OWL}.

Each cell runs in its own process (so its peak RSS is its own), prunes the model with
``nsamples`` x ``seqlen`` calibration windows of ``--calibration``, and reports perplexity on the
evaluation corpora beside the dense model, the achieved sparsity, pruning seconds and peak RSS.
The same run times one plain forward pass over the calibration tokens, the yardstick for speed.
Results go to JSON (written after every cell, so an interrupted run resumes) and a markdown table.

    python bench/quality.py                 # full grid, ~1 hour on 2 CPU cores
    python bench/quality.py --cells wanda/unstructured/0.5/uniform
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_cell_args, run_cell_process, start  # noqa: E402
from _cells import plain_forward_seconds as window_forward_seconds  # noqa: E402

HERE = Path(__file__).resolve().parent
GRID = [(score, structure, sparsity, allocation)
        for score in ("magnitude", "wanda", "sparsegpt")
        for structure, sparsity, allocation in (("unstructured", 0.5, "uniform"), ("2:4", 0.5, "uniform"),
                                                ("unstructured", 0.7, "uniform"), ("unstructured", 0.7, "owl"))]


def cell_key(c) -> str:
    return "/".join(str(x) for x in c)


def run_cell(args, cell: str) -> dict:
    """Prune and evaluate one cell in this process; print its JSON on the last line."""
    from prunewise.api import evaluate, peak_rss_mb, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    score, structure, sparsity, allocation = cell.split("/")
    recipe = make_recipe(model=args.model, score=score, structure=structure, allocation=allocation,
                         sparsity=None if ":" in structure else float(sparsity), calibration=args.calibration,
                         nsamples=args.nsamples, seqlen=args.seqlen, evaluation=args.eval, eval_tokens=args.eval_tokens)
    model, tok = load_model(recipe.model)
    # the speed yardstick, measured in this process right before pruning (the machine is shared and noisy)
    fwd = plain_forward_seconds(model, tok, args) if score != "magnitude" and args.cell_forward else None
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    rss = peak_rss_mb()
    ppl = evaluate(model, tok, args.eval, args.eval_tokens, 512, calibration=args.calibration, progress=False)
    t = result.report["timings"]
    return {"cell": cell, "score": score, "structure": structure, "target": recipe.sparsity, "allocation": allocation,
            "achieved": result.report["achieved_sparsity"], "prune_s": seconds, "forward_s": fwd,
            "allocation_s": t.get("allocation_s", 0.0), "peak_rss_mb": rss, "perplexity": ppl,
            "cholesky_retries": len(result.report["cholesky_retries"])}


def plain_forward_seconds(model, tok, args) -> float:
    """Seconds of one plain forward pass (window by window, no hooks) over the calibration tokens."""
    from prunewise.data import calibration_windows, get_corpus

    return window_forward_seconds(
        model, calibration_windows(tok, get_corpus(args.calibration, "calibration"), args.nsamples, args.seqlen))


def forward_seconds(args) -> dict:
    """The forward-pass yardstick at the start of the run, and the dense row."""
    from prunewise.api import evaluate
    from prunewise.models.loading import load_model

    model, tok = load_model(args.model)
    fwd = plain_forward_seconds(model, tok, args)
    windows_tokens = args.nsamples * args.seqlen
    dense = evaluate(model, tok, args.eval, args.eval_tokens, 512, calibration=args.calibration,
                     dense_spec=args.model, progress=False)
    return {"forward_s": fwd, "tokens": windows_tokens, "perplexity": dense}


def ratio(r: dict, fwd: dict) -> str:
    """Pruning time over the forward pass measured in the same process (else the run's yardstick)."""
    base = r.get("forward_s") or fwd["forward_s"]
    return f"{r['prune_s'] / base:.2f} (fwd {base:.0f} s)"


def table(results: dict, args) -> str:
    dense = results["dense"]
    fwd = results["forward"]
    cols = args.eval
    head = ["score", "structure", "allocation", "target", "achieved"] + [f"ppl {c}" for c in cols] + \
           ["prune s", "x forward (same process)" if args.cell_forward else "x forward (the run's)", "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| dense | - | - | 0 | 0 | " + " | ".join(f"{dense['perplexity'][c]:.2f}" for c in cols) +
                 " | - | - | - |")
    for key in [cell_key(c) for c in GRID] + [k for k in results["cells"] if k not in {cell_key(c) for c in GRID}]:
        r = results["cells"].get(key)
        if not r:
            continue
        lines.append(f"| {r['score']} | {r['structure']} | {r['allocation']} | {r['target']:.2f} | {r['achieved']:.4f} | " +
                     " | ".join(f"{r['perplexity'][c]:.2f}" for c in cols) +
                     f" | {r['prune_s']:.1f} | {ratio(r, fwd)} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calibration", default="wiki")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval", nargs="+", default=["wiki-test", "code"])
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--no-cell-forward", dest="cell_forward", action="store_false",
                    help="skip the plain forward each cell times before pruning (x forward then uses the run's)")
    add_cell_args(ap, HERE / "results" / "quality.json", "score/structure/sparsity/allocation (default: the whole grid)")
    args = ap.parse_args()
    results = start(args, run_cell, ("model", "calibration", "nsamples", "seqlen", "eval", "eval_tokens"))
    if results is None:
        return
    out = Path(args.out)
    print("forward-pass yardstick and dense perplexity ...", flush=True)
    results["forward"] = results["dense"] = forward_seconds(args)
    print(f"  forward pass over {results['forward']['tokens']} tokens: {results['forward']['forward_s']:.1f} s", flush=True)
    cells = args.cells or [cell_key(c) for c in GRID]
    for cell in cells:
        if cell in results["cells"]:
            continue
        print(f"{cell} ...", flush=True)
        cmd = [sys.executable, __file__, "--_cell", cell, "--model", args.model, "--calibration", args.calibration,
               "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval-tokens", str(args.eval_tokens),
               "--eval", *args.eval] + ([] if args.cell_forward else ["--no-cell-forward"])
        results["cells"][cell] = run_cell_process(cmd, cell)
        r = results["cells"][cell]
        print(f"  achieved {r['achieved']:.4f}, ppl " + ", ".join(f"{k} {v:.2f}" for k, v in r["perplexity"].items()) +
              f", prune {r['prune_s']:.1f} s ({ratio(r, results['forward'])} x forward), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
        out.write_text(json.dumps(results, indent=1))
    out.write_text(json.dumps(results, indent=1))
    md = table(results, args)
    out.with_suffix(".md").write_text(f"# Quality benchmark\n\n`{results['command']}`\n\n"
                                      f"Forward pass over the {results['forward']['tokens']} calibration tokens: "
                                      f"{results['forward']['forward_s']:.1f} s ({results['threads']} threads).\n\n{md}\n")
    print(md)


if __name__ == "__main__":
    main()
