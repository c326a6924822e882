"""Storage precision: smollm2-135m (or ``--model``) pruned stored in bfloat16 vs float32 (Wanda 50%, SparseGPT 50%).

Each cell runs in its own process (its peak RSS is its own): load in the cell's dtype, prune with
``nsamples`` x ``seqlen`` windows of ``wiki``, measure wiki-test perplexity (computed in float32 on
the CPU, one block at a time, whatever the storage dtype). The bf16 and fp32 runs of a score are
compared: perplexity change, and the share of mask entries that differ. Peak RSS is reported whole
and above the process's baseline once torch and transformers are imported (the part the model's
storage can change). Results go to JSON after every cell and to a markdown table.

    python bench/precision.py
    python bench/precision.py --model qwen2.5-coder-0.5b --nsamples 8 --eval-tokens 4096 --out /tmp/precision_qwen.json
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_cell_args, add_window_args, run_missing, start  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS = ("nsamples", "seqlen", "eval_tokens", "model")
CELLS = {f"{score}-50-{dtype}": {"score": score, "dtype": dtype}
         for score in ("wanda", "sparsegpt") for dtype in ("float32", "bfloat16")}


def _rss_now_mb() -> float:
    """Resident set now (MB; Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def run_cell(args, cell: str) -> dict:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from prunewise.api import evaluate, prune
    from prunewise.models.loading import load_model
    from prunewise.pipeline.prune import peak_rss_mb
    from prunewise.recipe import make_recipe

    baseline = peak_rss_mb()
    spec = CELLS[cell]
    recipe = make_recipe(model=args.model, calibration="wiki", nsamples=args.nsamples, seqlen=args.seqlen,
                         evaluation=[], score=spec["score"], sparsity=0.5, dtype=spec["dtype"], device="cpu")
    model, tok = load_model(recipe.model, recipe.dtype)
    loaded, peak_load = _rss_now_mb(), peak_rss_mb()  # the stored model resident, before any calibration work
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    peak_prune = peak_rss_mb()
    ppl = evaluate(result.model, tok, ["wiki-test"], args.eval_tokens, 512, progress=False, device="cpu")["wiki-test"]
    masks = HERE / "results" / "precision_masks" / args.model / f"{cell}.safetensors"
    masks.parent.mkdir(parents=True, exist_ok=True)
    result.masks.save(masks)
    return {"perplexity": ppl, "achieved_sparsity": result.report["achieved_sparsity"], "prune_s": seconds,
            "dtype": str(next(result.model.parameters()).dtype), "baseline_rss_mb": baseline,
            "rss_after_load_mb": loaded, "peak_rss_load_mb": peak_load,
            "peak_rss_prune_mb": peak_prune, "peak_rss_mb": peak_rss_mb(), "masks": str(masks)}


def mask_difference(a: str, b: str) -> float:
    from prunewise.core.masks import MaskSet

    ma, mb = MaskSet.load(a).weights, MaskSet.load(b).weights
    return sum(int((ma[n] != mb[n]).sum()) for n in ma) / sum(m.numel() for m in ma.values())


def write_table(results: dict, path: Path) -> str:
    s = results["settings"]
    lines = [f"{s.get('model', 'smollm2-135m')}, calibration {s['nsamples']} x {s['seqlen']} wiki windows, wiki-test perplexity on "
             f"{s['eval_tokens']} tokens; CPU (blocks compute in float32 whatever the storage dtype). Peak RSS "
             "above baseline = peak minus the RSS once torch and transformers are imported; loaded = the RSS above that "
             "baseline once the model is loaded (the stored model); work = peak minus loaded (calibration, block "
             "passes, evaluation: float32 in both runs on a CPU).", "",
             "| score | fp32 ppl | bf16 ppl | ppl change | masks differing | fp32 peak RSS MB | bf16 peak RSS MB | "
             "ratio | above baseline fp32 / bf16 MB | ratio | loaded fp32 / bf16 MB | work fp32 / bf16 MB | "
             "fp32 prune s | bf16 prune s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cells = results["cells"]
    for score in ("wanda", "sparsegpt"):
        a, b = cells.get(f"{score}-50-float32"), cells.get(f"{score}-50-bfloat16")
        if not a or not b:
            continue
        above_a = a["peak_rss_mb"] - a["baseline_rss_mb"]
        above_b = b["peak_rss_mb"] - b["baseline_rss_mb"]
        if "rss_after_load_mb" in a and "rss_after_load_mb" in b:
            loaded = (a["rss_after_load_mb"] - a["baseline_rss_mb"], b["rss_after_load_mb"] - b["baseline_rss_mb"])
            split = (f"{loaded[0]:.0f} / {loaded[1]:.0f} | {a['peak_rss_mb'] - a['rss_after_load_mb']:.0f} / "
                     f"{b['peak_rss_mb'] - b['rss_after_load_mb']:.0f}")
        else:
            split = "- | -"
        lines.append(f"| {score} 50% | {a['perplexity']:.3f} | {b['perplexity']:.3f} | "
                     f"{(b['perplexity'] - a['perplexity']) / a['perplexity']:+.2%} | {b['mask_difference']:.4%} | "
                     f"{a['peak_rss_mb']:.0f} | {b['peak_rss_mb']:.0f} | {b['peak_rss_mb'] / a['peak_rss_mb']:.2f} | "
                     f"{above_a:.0f} / {above_b:.0f} | {above_b / above_a:.2f} | {split} | {a['prune_s']:.0f} | "
                     f"{b['prune_s']:.0f} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_args(ap, HERE / "results" / "precision.json", f"cells to run (default all: {', '.join(CELLS)})")
    add_window_args(ap)
    ap.add_argument("--model", default="smollm2-135m", help="the model every cell prunes (default smollm2-135m)")
    args = ap.parse_args()
    results = start(args, run_cell, SETTINGS)
    if results is None:
        return
    out = Path(args.out)
    run_missing(results, out, args.cells or list(CELLS), __file__, args, SETTINGS,
                lambda row: f"ppl {row['perplexity']:.4f}, peak RSS {row['peak_rss_mb']:.0f} MB, {row['prune_s']:.0f} s")
    for score in ("wanda", "sparsegpt"):
        a, b = (results["cells"].get(f"{score}-50-{d}") for d in ("float32", "bfloat16"))
        if a and b:
            b["mask_difference"] = mask_difference(a["masks"], b["masks"])
    out.write_text(json.dumps(results, indent=1))
    print(write_table(results, out.with_suffix(".md")))


if __name__ == "__main__":
    main()
