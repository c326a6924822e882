"""Composed parts: GBLM-Pruner's score beside Wanda's, and OBS compensation after a Wanda selection.

Cells on ``smollm2-135m``, each in its own process, all with the same calibration (``nsamples`` x
``seqlen`` windows of ``wiki``) and the same wiki-test evaluation; the dense perplexity is measured
in the same run. Results go to JSON after every cell (a run resumes) and to a markdown table.

    python bench/compose.py                       # every cell
    python bench/compose.py --cells gblm-50 wanda-50
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import window_bench_main  # noqa: E402

HERE = Path(__file__).resolve().parent
CELLS = {  # the most telling comparisons first (a run can be stopped and resumed)
    "wanda-50": {"score": "wanda", "sparsity": 0.5},
    "gblm-50": {"score": "gblm", "sparsity": 0.5},
    "wanda+obs-50": {"score": "wanda", "sparsity": 0.5, "compensation": ["obs"]},
    "sparsegpt-50": {"score": "sparsegpt", "sparsity": 0.5},
    "wanda-2:4": {"score": "wanda", "structure": "2:4"},
    "wanda+obs-2:4": {"score": "wanda", "structure": "2:4", "compensation": ["obs"]},
    "sparsegpt-2:4": {"score": "sparsegpt", "structure": "2:4"},
    "wanda-70": {"score": "wanda", "sparsity": 0.7},
    "gblm-70": {"score": "gblm", "sparsity": 0.7},
    "wanda-70-owl": {"score": "wanda", "sparsity": 0.7, "allocation": "owl"},
    "gblm-70-owl": {"score": "gblm", "sparsity": 0.7, "allocation": "owl"},
    "wanda-50-owl": {"score": "wanda", "sparsity": 0.5, "allocation": "owl"},
    "gblm-50-owl": {"score": "gblm", "sparsity": 0.5, "allocation": "owl"},
}


def run_cell(args, cell: str) -> dict:
    from prunewise.api import evaluate, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    model, tok = load_model("smollm2-135m")
    if cell == "dense":
        return {"perplexity": evaluate(model, tok, ["wiki-test"], args.eval_tokens, 512, progress=False)["wiki-test"]}
    recipe = make_recipe(model="smollm2-135m", calibration="wiki", nsamples=args.nsamples, seqlen=args.seqlen,
                         evaluation=[], **CELLS[cell])
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    ppl = evaluate(result.model, tok, ["wiki-test"], args.eval_tokens, 512, progress=False)["wiki-test"]
    return {"perplexity": ppl, "achieved_sparsity": result.report["achieved_sparsity"], "prune_s": seconds,
            "timings": result.report["timings"], "recipe": json.loads(recipe.model_dump_json())}


def write_table(results: dict, path: Path) -> str:
    dense = results["cells"].get("dense", {}).get("perplexity")
    lines = [f"Calibration {results['settings']['nsamples']} x {results['settings']['seqlen']} wiki windows; wiki-test "
             f"perplexity on {results['settings']['eval_tokens']} tokens; dense {dense:.2f}." if dense else "",
             "", "| cell | score | compensation | allocation | structure | sparsity | wiki-test ppl | x dense | prune s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["cells"].items():
        if name == "dense":
            continue
        r = row["recipe"]
        comp = ",".join(c["name"] for c in r["compensation"]) or "-"
        struct = r["structure"]["name"] if r["structure"]["name"] != "n:m" else f"{r['structure']['n']}:{r['structure']['m']}"
        ratio = f"{row['perplexity'] / dense:.2f}" if dense else ""
        lines.append(f"| {name} | {r['score']['name']} | {comp} | {r['allocation']['name']} | {struct} | "
                     f"{row['achieved_sparsity']:.3f} | {row['perplexity']:.2f} | {ratio} | {row['prune_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    window_bench_main(__file__, __doc__, HERE / "results" / "compose.json", list(CELLS), run_cell, write_table,
                      lambda row: f"ppl {row['perplexity']:.3f}", nsamples=32)


if __name__ == "__main__":
    main()
