"""Behaviour pins: the sha256 of every saved tensor for ten reference cells, and their wiki-test perplexity.

Run it before and after a change that must not change what prunewise computes (a refactor), then
compare the two files: every tensor hash equal, or the perplexity moved by less than ``--tolerance``.

    python bench/identity.py --out bench/results/identity-before.json
    python bench/identity.py --out bench/results/identity-after.json
    python bench/identity.py --compare bench/results/identity-before.json bench/results/identity-after.json

Each cell runs in its own process on ``smollm2-135m`` with ``nsamples`` x ``seqlen`` windows of ``wiki``
(64 x 512 by default). Allocation profiles and dense evaluations are computed afresh (a private cache
folder for them), so a cached profile cannot hide a change.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_cell_args, add_window_args, run_missing, start  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS = ("nsamples", "seqlen", "eval_tokens")
CELLS = {
    "magnitude-50": {"score": "magnitude", "sparsity": 0.5},
    "wanda-50": {"score": "wanda", "sparsity": 0.5},
    "wanda-2of4": {"score": "wanda", "structure": "2:4"},
    "sparsegpt-50": {"score": "sparsegpt", "sparsity": 0.5},
    "wanda-70-owl": {"score": "wanda", "sparsity": 0.7, "allocation": "owl"},
    "sparsegpt-70-profile": {"score": "sparsegpt", "sparsity": 0.7, "allocation": "profile"},
    "wanda-70-profile": {"score": "wanda", "sparsity": 0.7, "allocation": "profile"},
    "flap-20-global-bias": {"score": "fluctuation", "structure": "width", "sparsity": 0.2, "allocation": "global",
                            "bias_compensation": True},
    "blocks-25": {"score": "wanda", "structure": "blocks", "sparsity": 0.25},
    "sublayers-25": {"score": "wanda", "structure": "sublayers", "sparsity": 0.25},
    "taylor-channels-20": {"score": "taylor", "structure": "channels", "sparsity": 0.2},
}


def private_cache() -> Path:
    """A cache root sharing the models, packages and corpora of the real one, with empty profiles and evals."""
    from prunewise.cache import cache_root

    real = cache_root()
    tmp = Path(tempfile.mkdtemp(prefix="pw-identity-"))
    for entry in real.iterdir() if real.exists() else []:
        if entry.name not in ("profiles", "evals", "locks"):
            (tmp / entry.name).symlink_to(entry)
    return tmp


def run_cell(args, cell: str) -> dict:
    import torch

    from prunewise.api import evaluate, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    model, tok = load_model("smollm2-135m")
    recipe = make_recipe(model="smollm2-135m", calibration="wiki", nsamples=args.nsamples, seqlen=args.seqlen,
                         evaluation=[], **CELLS[cell])
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    hashes = {}
    for name, tensor in sorted(result.model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        hashes[name] = hashlib.sha256(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"").hexdigest() \
            + f":{list(t.shape)}:{t.dtype}"
    ppl = evaluate(result.model, tok, ["wiki-test"], args.eval_tokens, 512, progress=False)["wiki-test"]
    return {"prune_s": seconds, "perplexity": ppl, "achieved_sparsity": result.report["achieved_sparsity"],
            "tensors": len(hashes), "sha256": hashes}


def compare(a_path: str, b_path: str, tolerance: float) -> int:
    a, b = (json.loads(Path(p).read_text())["cells"] for p in (a_path, b_path))
    bad = 0
    print("| cell | tensors | differing | ppl before | ppl after | change |\n|---|---|---|---|---|---|")
    for cell in CELLS:
        if cell not in a or cell not in b:
            print(f"| {cell} | missing | | | | |")
            bad += 1
            continue
        ha, hb = a[cell]["sha256"], b[cell]["sha256"]
        diff = sorted(k for k in set(ha) | set(hb) if ha.get(k) != hb.get(k))
        pa, pb = a[cell]["perplexity"], b[cell]["perplexity"]
        change = (pb - pa) / pa
        print(f"| {cell} | {len(ha)} | {len(diff)} | {pa:.4f} | {pb:.4f} | {change:+.4%} |")
        if diff and abs(change) >= tolerance:
            bad += 1
    return 1 if bad else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cell_args(ap, HERE / "results" / "identity.json", f"cells to run (default all: {', '.join(CELLS)})")
    add_window_args(ap)
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest relative perplexity change when tensors differ")
    args = ap.parse_args()
    if args.compare:
        raise SystemExit(compare(*args.compare, args.tolerance))
    results = start(args, run_cell, SETTINGS)
    if results is None:
        return
    out = Path(args.out)
    if "PRUNEWISE_CACHE_PRIVATE" not in os.environ:
        os.environ["PRUNEWISE_CACHE"] = str(private_cache())
        os.environ["PRUNEWISE_CACHE_PRIVATE"] = "1"
    run_missing(results, out, args.cells or list(CELLS), __file__, args, SETTINGS,
                lambda row: f"ppl {row['perplexity']:.4f}, sparsity {row['achieved_sparsity']:.4f}, "
                            f"{row['prune_s']:.0f} s")


if __name__ == "__main__":
    main()
