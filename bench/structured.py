"""Structured pruning benchmark: quality of each variant, physical size, and reload by stock transformers.

Cells are ``model/variant/share``: ``share`` is the fraction of decoder parameters removed (for
``sublayers``, the parameter count of ``round(share * blocks)`` whole blocks, so it matches the
``blocks`` cell of the same share). Each cell runs in its own process: prune with ``nsamples`` x
``seqlen`` calibration windows of ``wiki``, report perplexity on ``wiki-test`` beside the dense
model, save the folder, reload it in a fresh process *without prunewise imported* (stock
``from_pretrained``; ``trust_remote_code=True`` only for per-block widths) and compare logits.
Results go to JSON after every cell (a run resumes) and to a markdown table.

    python bench/structured.py --cells smollm2-135m/magnitude-uniform/0.2 smollm2-135m/fluctuation-global-bias/0.2
    python bench/structured.py --keep-folders ~/.cache/prunewise/bench-structured   # keep the saved folders
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_cell_args, run_cell_process, start  # noqa: E402

HERE = Path(__file__).resolve().parent
WIDTH = {"structure": "width"}
VARIANTS = {
    "magnitude-uniform": {**WIDTH, "score": "magnitude", "allocation": "uniform"},
    "wanda-uniform": {**WIDTH, "score": "wanda", "allocation": "uniform"},
    "taylor-uniform": {**WIDTH, "score": "taylor", "allocation": "uniform"},
    "fluctuation-uniform": {**WIDTH, "score": "fluctuation", "allocation": "uniform"},
    "fluctuation-uniform-bias": {**WIDTH, "score": "fluctuation", "allocation": "uniform", "bias_compensation": True},
    "fluctuation-global": {**WIDTH, "score": "fluctuation", "allocation": "global"},
    "fluctuation-global-bias": {**WIDTH, "score": "fluctuation", "allocation": "global", "bias_compensation": True},
    "wanda-global-bias": {**WIDTH, "score": "wanda", "allocation": "global", "bias_compensation": True},
    # structured reconstruction (issue 33): FLAP's widths, then o_proj/down_proj refit by least squares; with
    # select=obs the MLP channels each block loses are chosen by structured OBS
    "fluctuation-global-refit": {**WIDTH, "score": "fluctuation", "allocation": "global", "compensation": ["refit"]},
    "fluctuation-global-refit-obs": {**WIDTH, "score": "fluctuation", "allocation": "global",
                                     "compensation": [{"name": "refit", "select": "obs"}]},
    "fluctuation-global-refit-swaps": {**WIDTH, "score": "fluctuation", "allocation": "global",
                                       "compensation": [{"name": "refit", "swaps": 64}]},
    "fluctuation-global-nystrom": {**WIDTH, "score": "fluctuation", "allocation": "global",
                                   "compensation": [{"name": "refit", "select": "leverage"}]},
    "blocks": {"structure": "blocks", "score": "wanda"},
    "sublayers": {"structure": "sublayers", "score": "wanda"},
}
GRID = [f"smollm2-135m/{v}/0.2" for v in VARIANTS if v not in ("blocks", "sublayers")] + \
       ["smollm2-135m/blocks/0.25", "smollm2-135m/sublayers/0.25"]

RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
path, custom = sys.argv[1], sys.argv[2] == "custom"
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=custom, dtype=torch.float32).eval()
assert "prunewise" not in sys.modules
ids = torch.load(path + "/check_ids.pt")
with torch.no_grad():
    logits = model(input_ids=ids).logits
print(float((logits - torch.load(path + "/check_logits.pt")).abs().max()), type(model).__name__)
"""


def run_cell(args, cell: str) -> dict:
    """Prune, evaluate, save and reload one cell in this process; print its JSON on the last line."""
    from prunewise.api import evaluate, peak_rss_mb, prune
    from prunewise.export.save import save_pruned
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    model_name, variant, share = cell.split("/")
    fields = dict(VARIANTS[variant])
    model, tok = load_model(model_name)
    sparsity = float(share)
    if variant == "sublayers":  # the parameter count of the blocks cell with the same share
        n = len(model.model.layers)
        sparsity = round(sparsity * n) / n
    recipe = make_recipe(model=model_name, sparsity=sparsity, calibration="wiki", nsamples=args.nsamples,
                         seqlen=args.seqlen, evaluation=[], **fields)
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    info = result.report["structured"]
    ppl = evaluate(model, tok, args.eval, args.eval_tokens, 512, calibration=recipe.calibration, progress=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    root = Path(args.keep_folders).expanduser() if args.keep_folders else Path(tempfile.mkdtemp(prefix="pw-structured-"))
    folder = root / cell.replace("/", "_")
    save_pruned(model, tok, folder, {"report.json": json.dumps(result.report, indent=1), **result.files}, overwrite=True)
    torch.save(ids, folder / "check_ids.pt")
    torch.save(logits, folder / "check_logits.pt")
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(folder), info["config"]], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{cell}: reload failed: {proc.stderr[-2000:]}")
    diff, cls = proc.stdout.split()[-2:]
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if not args.keep_folders:
        shutil.rmtree(root, ignore_errors=True)
    return {"cell": cell, "model": model_name, "variant": variant, "target": sparsity, "score": result.report["score"],
            "structure": result.report["structure"], "allocation": result.report["allocation"],
            "bias_compensation": any(c["name"] == "bias" for c in recipe.compensation),
            "compensation": [c["name"] for c in recipe.compensation], "removed_share_of_decoder": info["removed_share_of_decoder"],
            "removed_share_of_targeted": info["removed_share_of_targeted"], "params_before": info["params_before"],
            "params_after": info["params_after"], "ideal_speedup": info["ideal_speedup"], "config": info["config"],
            "removed_blocks": info.get("removed_blocks", []), "layers": info["layers"],
            "reload_class": cls, "reload_max_abs_diff": float(diff), "folder_bytes": size,
            "folder": str(folder) if args.keep_folders else None,
            "prune_s": seconds, "timings": result.report["timings"], "peak_rss_mb": peak_rss_mb(), "perplexity": ppl}


def dense_row(args, model_name: str) -> dict:
    from prunewise.api import evaluate
    from prunewise.models.loading import load_model

    model, tok = load_model(model_name)
    return evaluate(model, tok, args.eval, args.eval_tokens, 512, dense_spec=model_name, progress=False)


def table(results: dict, args) -> str:
    cols = args.eval
    head = ["model", "variant", "target", "decoder removed", "params (M)", "ideal speedup", "config",
            "reload max diff"] + [f"ppl {c}" for c in cols] + [f"vs dense {c}" for c in cols] + ["prune s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results["cells"].values():
        dense = results["dense"][r["model"]]
        lines.append(f"| {r['model']} | {r['variant']} | {r['target']:.3f} | {r['removed_share_of_decoder']:.1%} | "
                     f"{r['params_after']['total'] / 1e6:.1f} | {r['ideal_speedup']:.3f}x | {r['config']} | "
                     f"{r['reload_max_abs_diff']:.1e} | " +
                     " | ".join(f"{r['perplexity'][c]:.2f}" for c in cols) + " | " +
                     " | ".join(f"{r['perplexity'][c] / dense[c]:.2f}x" for c in cols) + f" | {r['prune_s']:.0f} |")
    dense = " ".join(f"{m}: " + ", ".join(f"{c} {v:.2f}" for c, v in d.items()) for m, d in results["dense"].items())
    return "\n".join(lines) + f"\n\nDense perplexity: {dense}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval", nargs="+", default=["wiki-test"])
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--keep-folders", help="save the pruned folders here (default: a temporary folder, deleted)")
    add_cell_args(ap, HERE / "results" / "structured.json", "model/variant/share (default: the smollm2-135m grid)")
    args = ap.parse_args()
    results = start(args, run_cell, ("nsamples", "seqlen", "eval", "eval_tokens"))
    if results is None:
        return
    out = Path(args.out)
    results.setdefault("dense", {})
    for cell in args.cells or GRID:
        model_name = cell.split("/")[0]
        if model_name not in results["dense"]:
            results["dense"][model_name] = dense_row(args, model_name)
        if cell in results["cells"]:
            continue
        print(f"{cell} ...", flush=True)
        cmd = [sys.executable, __file__, "--_cell", cell, "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen),
               "--eval", *args.eval, "--eval-tokens", str(args.eval_tokens)]
        if args.keep_folders:
            cmd += ["--keep-folders", args.keep_folders]
        r = run_cell_process(cmd, cell)
        results["cells"][cell] = r
        print("  ppl " + ", ".join(f"{c} {v:.2f}" for c, v in r["perplexity"].items()) +
              f"; decoder removed {r['removed_share_of_decoder']:.1%}, {r['config']} config, reload diff "
              f"{r['reload_max_abs_diff']:.1e}", flush=True)
        out.write_text(json.dumps(results, indent=1))
        out.with_suffix(".md").write_text(table(results, args) + f"\nCommand: `{results['command']}`\n")
    print(table(results, args))
    print(f"Command: {results['command']}")


if __name__ == "__main__":
    main()
