"""Allocation benchmark: where the budget goes, calibrated on the user's data.

Cells are ``score/sparsity/allocation/calibration`` with score in {wanda, sparsegpt}, sparsity in
{0.6, 0.7}, allocation in {uniform, owl, profile, search, search+rowwise} and calibration in
{wiki, code, mix} (mix = code:0.5,wiki:0.5; mixNN = NN% code and the rest wiki, run on request). Each cell runs in its own process: it allocates
(timed), prunes with ``nsamples`` x ``seqlen`` calibration windows and reports perplexity on
``wiki-test`` and on the held-out ``code`` files beside the dense model. ``search+rowwise``
reuses the plan its ``search`` cell saved (under ``results/allocation_plans``) and adds TRIM's
row-wise allocation; its allocation time is the search's plus the pruning's extra. Results go to
JSON after every cell (an interrupted run resumes) and to a markdown table.

    python bench/allocation.py                                  # the whole grid: many hours on 2 CPU cores
    python bench/allocation.py --cells wanda/0.7/owl/wiki wanda/0.7/search/wiki
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_cell_args, dense_row, run_cell_process, start  # noqa: E402

HERE = Path(__file__).resolve().parent
CALIBRATIONS = {"wiki": "wiki", "code": "code", "mix": "code:0.5,wiki:0.5"}


def calibration_spec(name: str) -> str:
    """wiki, code, mix (= mix50), or mixNN: NN% code windows and the rest wiki (the mixture frontier)."""
    if name in CALIBRATIONS:
        return CALIBRATIONS[name]
    share = name.removeprefix("mix")
    if name.startswith("mix") and share.isdigit() and 0 < int(share) < 100:
        return f"code:{int(share) / 100},wiki:{(100 - int(share)) / 100}"
    raise SystemExit(f"unknown calibration {name!r}: use wiki, code, mix or mixNN (NN% code, the rest wiki)")
ALLOCATIONS = ("uniform", "owl", "profile", "search", "search+rowwise")
GRID = [f"{score}/{sparsity}/{allocation}/{calib}" for score in ("wanda", "sparsegpt") for sparsity in (0.6, 0.7)
        for calib in ("wiki", "code", "mix") for allocation in ALLOCATIONS]


def plan_path(args, cell: str) -> Path:
    return Path(args.out).parent / "allocation_plans" / (cell.replace("/", "_").replace("+rowwise", "") + ".json")


def run_cell(args, cell: str) -> dict:
    """Allocate, prune and evaluate one cell in this process; print its JSON on the last line."""
    from prunewise.allocation.plan import AllocationPlan
    from prunewise.api import evaluate, peak_rss_mb, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    score, sparsity, allocation, calib = cell.split("/")
    rowwise = allocation.endswith("+rowwise")
    base_alloc = allocation.removesuffix("+rowwise")
    fields = dict(model=args.model, score=score, sparsity=float(sparsity), allocation=base_alloc,
                  calibration=calibration_spec(calib), nsamples=args.nsamples, seqlen=args.seqlen, evaluation=[],
                  rowwise=rowwise, search_time_limit=args.search_time_limit, search_generations=args.search_generations)
    searched_s = 0.0
    if rowwise:
        source = plan_path(args, cell)
        if not source.exists():
            raise SystemExit(f"{cell} needs the plan of its search cell ({source}); run that cell first")
        fields["plan"] = str(source)
        searched_s = AllocationPlan.load(source).layer_stats.get("seconds", {}).get("total", 0.0)
    recipe = make_recipe(**fields)
    model, tok = load_model(recipe.model)
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    if base_alloc == "search" and not rowwise:
        path = plan_path(args, cell)
        path.parent.mkdir(parents=True, exist_ok=True)
        result.plan.save(path)
    t = result.report["timings"]
    ppl = evaluate(model, tok, args.eval, args.eval_tokens, 512, calibration=recipe.calibration, progress=False)
    plan = result.plan
    out = {"cell": cell, "score": score, "target": recipe.sparsity, "allocation": allocation, "calibration": calib,
           "achieved": result.report["achieved_sparsity"], "planned_removed": sum(plan.pruned_counts().values()),
           "budget_removed": round(recipe.sparsity * sum(plan.numels.values())),
           "allocation_s": t.get("allocation_s", 0.0) + searched_s, "prune_s": t.get("prune_s", 0.0),
           "total_s": seconds, "peak_rss_mb": peak_rss_mb(), "perplexity": ppl}
    if base_alloc == "search" and not rowwise:
        ls = plan.layer_stats
        out["search"] = {"start": ls["start"], "start_fitness": ls["start_fitness"],
                         "final_tracking_fitness": ls["final_tracking_fitness"],
                         "generations": ls["history"][-1]["generation"], "seconds": ls["seconds"],
                         "tracking": [(h["generation"], round(h["seconds"], 1), h["tracking_fitness"])
                                      for h in ls["history"] if h.get("tracking_fitness") is not None]}
    if rowwise:
        counts = plan.pruned_counts()
        out["rows_sum_to_module_counts"] = all(
            sum(int(round(x * (plan.numels[m] // len(v)))) for x in v) == counts[m] for m, v in plan.rows.items())
    return out


def table(results: dict, args) -> str:
    cols = args.eval
    head = ["score", "target", "calibration", "allocation"] + [f"ppl {c}" for c in cols] + \
           ["allocation s", "prune s", "removed = budget"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| dense | - | - | - | " + " | ".join(f"{results['dense'][c]:.2f}" for c in cols) + " | - | - | - |")
    keys = [k for k in GRID if k in results["cells"]] + [k for k in results["cells"] if k not in GRID]
    for key in keys:
        r = results["cells"][key]
        lines.append(f"| {r['score']} | {r['target']:.1f} | {r['calibration']} | {r['allocation']} | " +
                     " | ".join(f"{r['perplexity'][c]:.2f}" for c in cols) +
                     f" | {r['allocation_s']:.0f} | {r['prune_s']:.0f} | "
                     f"{'yes' if r['planned_removed'] == r['budget_removed'] else 'NO'} |")
    return "\n".join(lines)


def awareness(results: dict) -> str:
    """Per (score, target, allocation): how much code calibration lowers code perplexity against wiki
    calibration, and how far each mixture is from the best calibration on each test set."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in results["cells"].values():
        if {"wiki-test", "code"} <= set(r["perplexity"]):
            groups.setdefault((r["score"], r["target"], r["allocation"]), {})[r["calibration"]] = r["perplexity"]
    lines = ["| score | target | allocation | code ppl: code vs wiki calibration | mixture | wiki-test over best | code over best |",
             "|---|---|---|---|---|---|---|"]
    for (score, target, allocation), by_calib in sorted(groups.items()):
        if not {"wiki", "code"} <= set(by_calib):
            continue
        gain = 1 - by_calib["code"]["code"] / by_calib["wiki"]["code"]
        best = {c: min(p[c] for p in by_calib.values()) for c in ("wiki-test", "code")}
        mixes = sorted(c for c in by_calib if c.startswith("mix")) or ["-"]
        for mix in mixes:
            gaps = [f"{by_calib[mix][c] / best[c] - 1:+.1%}" if mix in by_calib else "-" for c in ("wiki-test", "code")]
            lines.append(f"| {score} | {target:.1f} | {allocation} | {gain:.1%} lower | {mix} | {gaps[0]} | {gaps[1]} |")
    if len(lines) == 2:
        return "(needs a wiki and a code cell with the same score, target and allocation)"
    return "\n".join(lines)


def write_markdown(results: dict, args, out: Path) -> str:
    """Write the results table and the task-awareness table next to the JSON; return the results table."""
    md = table(results, args)
    out.with_suffix(".md").write_text(
        f"# Allocation benchmark\n\n`{results['command']}`\n\n{results['threads']} threads. Perplexity on "
        f"{args.eval_tokens} tokens per corpus (windows of 512); calibration {args.nsamples} x {args.seqlen}.\n\n"
        f"{md}\n\n## Task awareness\n\nBest = the lowest perplexity on that test set over every "
        f"calibration measured with the same score, target and allocation.\n\n{awareness(results)}\n")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval", nargs="+", default=["wiki-test", "code"])
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--search-time-limit", type=float, default=900.0)
    ap.add_argument("--search-generations", type=int, default=150)
    add_cell_args(ap, HERE / "results" / "allocation.json",
                  "score/sparsity/allocation/calibration (default: the whole grid)")
    args = ap.parse_args()
    results = start(args, run_cell, ("model", "nsamples", "seqlen", "eval", "eval_tokens",
                                     "search_time_limit", "search_generations"))
    if results is None:
        return
    out = Path(args.out)
    results["dense"] = dense_row(args)
    cells = args.cells or GRID
    for cell in cells:
        if cell in results["cells"]:
            continue
        print(f"{cell} ...", flush=True)
        cmd = [sys.executable, __file__, "--_cell", cell, "--model", args.model, "--nsamples", str(args.nsamples),
               "--seqlen", str(args.seqlen), "--eval-tokens", str(args.eval_tokens), "--eval", *args.eval,
               "--search-time-limit", str(args.search_time_limit), "--search-generations", str(args.search_generations),
               "--out", args.out]
        results["cells"][cell] = r = run_cell_process(cmd, cell)
        print("  ppl " + ", ".join(f"{k} {v:.2f}" for k, v in r["perplexity"].items()) +
              f", allocation {r['allocation_s']:.0f} s, prune {r['prune_s']:.0f} s", flush=True)
        out.write_text(json.dumps(results, indent=1))
    out.write_text(json.dumps(results, indent=1))
    print(write_markdown(results, args, out))


if __name__ == "__main__":
    main()
