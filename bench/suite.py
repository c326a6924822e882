"""Evaluate the default task suite on one model and time it (writes JSON and a markdown table).

    python bench/suite.py                      # dense smollm2-135m, every suite item
    python bench/suite.py --model out/demo     # a pruned folder
    python bench/suite.py --pruned out/w50     # the dense model and a pruned folder side by side, with retention
    python bench/suite.py --table-only         # rewrite the markdown table from the JSON of the last run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from prunewise.models.loading import load_model  # noqa: E402
from prunewise.tasks.suite import DEFAULT_SUITE, evaluate_tasks, format_task_table, load_tasks  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--pruned", default=None, help="a pruned folder scored after --model, with retention")
    ap.add_argument("--out", default=str(ROOT / "bench/results/suite.json"))
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from --out's JSON, scoring nothing")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table_only:
        write_table(out, json.loads(out.read_text()))
        return
    model, tokenizer = load_model(args.model)
    start = time.perf_counter()
    tasks = load_tasks(["default"])
    loaded = time.perf_counter() - start
    results = evaluate_tasks(model, tokenizer, tasks, progress=True)  # no cache: this run is the measurement
    seconds = time.perf_counter() - start
    pruned = None
    if args.pruned:
        del model
        pmodel, ptok = load_model(args.pruned)
        pruned = evaluate_tasks(pmodel, ptok, tasks, progress=True)
    recipe = _pruned_recipe(args.pruned)
    excl = [n for n, r in results.items() if r["acc_ci95"][0] > r["chance"]]
    data = {"model": args.model, "threads": torch.get_num_threads(), "suite": {k: list(v) for k, v in DEFAULT_SUITE.items()},
            "seconds_total": seconds, "seconds_loading_tasks": loaded, "results": results,
            "tasks_whose_95ci_excludes_chance": excl, "pruned_model": args.pruned, "pruned_recipe": recipe,
            "pruned_results": pruned}
    out.write_text(json.dumps(data, indent=1))
    write_table(out, data)


def _pruned_recipe(folder: str | None) -> dict | None:
    """What made the pruned folder (its recipe.yaml): score, structure, allocation, sparsity, calibration."""
    path = Path(folder) / "recipe.yaml" if folder else None
    if path is None or not path.is_file():
        return None
    import yaml

    r = yaml.safe_load(path.read_text())
    return {k: r.get(k) for k in ("model", "score", "structure", "allocation", "compensation", "sparsity", "calibration",
                                  "nsamples", "seqlen")}


def write_table(out: Path, data: dict) -> None:
    results, pruned, excl = data["results"], data.get("pruned_results"), data["tasks_whose_95ci_excludes_chance"]
    seconds, loaded, model = data["seconds_total"], data["seconds_loading_tasks"], data["model"]
    lines = [f"# Default suite on {model}", "",
             f"{len(results)} tasks, {sum(r['n'] for r in results.values())} items, {seconds:.0f} s in all on "
             f"{data['threads']} threads ({loaded:.0f} s of it loading the tasks); {len(excl)} tasks have a "
             "95% Wilson interval of accuracy above chance.", "",
             f"Command: `python bench/suite.py --model {model}"
             + (f" --pruned {data['pruned_model']}`" if data.get("pruned_model") else "`"), ""]
    if data.get("note"):
        lines += [data["note"], ""]
    recipe = data.get("pruned_recipe")
    if recipe:
        parts = [f"{k} {v['name'] if isinstance(v, dict) else v}" for k, v in recipe.items() if v not in (None, [])]
        lines += [f"The pruned folder's recipe: {', '.join(parts)}.", ""]
    lines += format_task_table(results, pruned)
    lines[-len(results) - 2] += " seconds |"
    lines[-len(results) - 1] += "---|"
    for i, r in enumerate(results.values()):
        lines[-len(results) + i] += f" {r['seconds']:.0f} |"
    if pruned:
        from prunewise.report.figures import mean_metric, mean_retention

        lines += ["", f"Mean accuracy: dense {mean_metric(results):.3f}, pruned {mean_metric(pruned):.3f}; mean retention "
                      f"of above-chance accuracy {(mean_retention(results, pruned) or 0):.0%}."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
