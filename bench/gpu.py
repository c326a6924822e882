"""On a GPU: bf16 on the device against fp32 on the CPU, and the 7B shape streamed through the device.

One short script for a session that is lent a GPU (CI never has one; this machine has none, so it refuses
``--device cuda`` with one line). For each model (smollm2-135m, qwen2.5-coder-0.5b) and score (Wanda 50%,
SparseGPT 50%; and the real-weight MoE smollm2-135m-moe, every linear and every routed expert's matrices): the prune
on the device in bf16 and on the CPU in fp32 on the same calibration windows,
wiki-test perplexity of each, the share of mask entries that differ, and the seconds. Then the random
Llama-2-7B-shaped bf16 checkpoint (``bench/scale.py``'s fixture) pruned with Wanda 50% streamed from disk
through the device: peak device memory against one block's bytes, and seconds per block. JSON and a table.

    python bench/gpu.py                                  # everything (~10 min on an H200)
    python bench/gpu.py --models smollm2-135m --no-7b    # the short part
    python bench/gpu.py --device cpu --models smollm2-135m --scores wanda --nsamples 2 --no-7b   # smoke test here
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve().parent


def _prune(model_name: str, score: str, device: str, dtype: str, args):
    from prunewise.api import evaluate, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    recipe = make_recipe(model=model_name, calibration="wiki", nsamples=args.nsamples, seqlen=512, evaluation=[],
                         completions=False, score=score, sparsity=0.5, dtype=dtype, device=device)
    model, tok = load_model(recipe.model, recipe.dtype)
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    ppl = evaluate(result.model, tok, ["wiki-test"], args.eval_tokens, 512, progress=False, device=device)["wiki-test"]
    return {"perplexity": ppl, "prune_s": seconds, "masks": dict(result.masks.weight_masks())}


def compare(model_name: str, score: str, args) -> dict:
    import torch

    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    dev = _prune(model_name, score, args.device, "bfloat16", args)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    cpu = _prune(model_name, score, "cpu", "float32", args)
    differ = sum(int((dev["masks"][n] != cpu["masks"][n]).sum()) for n in cpu["masks"])
    total = sum(m.numel() for m in cpu["masks"].values())
    return {"model": model_name, "score": score, "device_ppl": dev["perplexity"], "cpu_ppl": cpu["perplexity"],
            "ppl_change": dev["perplexity"] / cpu["perplexity"] - 1, "masks_differing": differ / total,
            "device_s": dev["prune_s"], "cpu_s": cpu["prune_s"], "device_peak_bytes": peak}


def streamed_7b(args) -> dict:
    import torch

    from prunewise.api import run
    from prunewise.recipe import make_recipe
    from scale import SHAPES, fixture

    folder = fixture("7b")
    hidden, inter, layers, heads, kv = SHAPES["7b"]
    head_dim = hidden // heads
    block_bytes = 2 * (hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden + 3 * hidden * inter + 2 * hidden)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    out = Path(args.scratch) / "gpu-7b"
    recipe = make_recipe(model=str(folder), score="wanda", sparsity=0.5, calibration="wiki", nsamples=4, seqlen=128,
                         evaluation=[], completions=False, offload="disk", output=str(out), overwrite=True,
                         dtype="bfloat16", device=args.device)
    report = run(recipe, progress=False)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None
    return {"block_bytes": block_bytes, "device_peak_bytes": peak,
            "peak_over_block": peak / block_bytes if peak else None,
            "s_per_block": report["timings"]["prune_s"] / layers, "achieved_sparsity": report["achieved_sparsity"]}


def write_table(results: dict, path: Path) -> str:
    lines = [f"Device {results['device']} ({results.get('device_name')}) in bf16 vs CPU in fp32; "
             f"{results['settings']['nsamples']} x 512 wiki calibration, wiki-test on "
             f"{results['settings']['eval_tokens']} tokens.", "",
             "| model | score | device ppl | CPU ppl | change | masks differing | device s | CPU s | peak device GB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results["rows"]:
        peak = f"{r['device_peak_bytes'] / 1e9:.2f}" if r["device_peak_bytes"] else "-"
        lines.append(f"| {r['model']} | {r['score']} | {r['device_ppl']:.3f} | {r['cpu_ppl']:.3f} | "
                     f"{r['ppl_change']:+.2%} | {r['masks_differing']:.4%} | {r['device_s']:.0f} | {r['cpu_s']:.0f} | "
                     f"{peak} |")
    if results.get("7b"):
        r = results["7b"]
        lines += ["", f"7B shape streamed through the device: peak device memory {r['peak_over_block']} x one block's "
                      f"bytes ({r['block_bytes'] / 1e6:.0f} MB), {r['s_per_block']:.2f} s per block, sparsity "
                      f"{r['achieved_sparsity']:.4f}."]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    # smollm2-135m-moe: the real-weight MoE (built on first use), pruned inside its fused experts on the device
    ap.add_argument("--models", nargs="*", default=["smollm2-135m", "qwen2.5-coder-0.5b", "smollm2-135m-moe"])
    ap.add_argument("--scores", nargs="*", default=["wanda", "sparsegpt"])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--no-7b", action="store_true", help="skip the streamed 7B shape")
    ap.add_argument("--scratch", default=str(Path.home() / ".cache" / "prunewise-scale-out"))
    ap.add_argument("--out", default=str(HERE / "results" / "gpu.json"))
    args = ap.parse_args()

    import torch

    from prunewise.engine.placement import resolve_device
    from prunewise.errors import PrunewiseError

    try:
        device = resolve_device(args.device)  # one line, before any work, when the GPU is not there
    except PrunewiseError as exc:
        raise SystemExit(f"bench/gpu.py: {exc}") from None
    results = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "settings": {"nsamples": args.nsamples, "eval_tokens": args.eval_tokens}, "rows": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for model_name in args.models:
        for score in args.scores:
            row = compare(model_name, score, args)
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(results, indent=1))
    if not args.no_7b:
        results["7b"] = streamed_7b(args)
        out.write_text(json.dumps(results, indent=1))
    print(write_table(results, out.with_suffix(".md")))


if __name__ == "__main__":
    main()
