"""What DSnoT's swaps do to a layer's output error: per linear, the Wanda mask against the DSnoT-refined one.

DSnoT (Zhang et al., 2024) swaps pruned and kept weights to cancel each row's *expected* reconstruction error
``sum_j M_ij W_ij E[x_j]``. A layer's output error on the calibration tokens is that mean (the bias) plus a
spread around it: ``MSE = |E[e]|^2 + Var(e)`` summed over the rows. This benchmark measures both, for the
selection alone (Wanda) and after DSnoT (every linear, the reference's defaults), on the dense model's inputs to
a few blocks (first, middle, last), so a perplexity that rises after DSnoT can be traced to the layers:

- ``bias share``: the part of the selection's output MSE that is the mean error (what DSnoT can remove);
- ``bias after / before``: how much of the mean error DSnoT removed;
- ``MSE after / before``: what the swaps did to the whole output error.

    python bench/dsnot_error.py --model smollm2-135m   # bench/results/dsnot_error.json + .md (the model's rows)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def block_inputs(model, adapter, windows: torch.Tensor, blocks: list[int]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Each chosen block's linears' inputs over the windows (dense model): which input each linear reads,
    ``{"B.name": key}`` (q/k/v read one, gate/up another), and each input once, ``{key: (windows, L, in)}``."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for b in blocks:
        for name, lin in adapter.linears(adapter.blocks(model)[b]).items():
            def grab(_m, inp, _out, key=f"{b}.{name}"):
                seen.setdefault(key, []).append(inp[0])
            hooks.append(lin.register_forward_hook(grab))
    try:
        with torch.no_grad():
            for w in windows:
                model(w.unsqueeze(0))
    finally:
        for h in hooks:
            h.remove()
    source: dict[str, str] = {}
    inputs: dict[str, torch.Tensor] = {}
    for key, parts in seen.items():
        same = next((k for k in inputs if all(a is c for a, c in zip(seen[k], parts, strict=True))), None)
        if same is None:
            inputs[key], same = torch.cat(parts).float(), key
        source[key] = same
    return source, inputs


def output_error(W: torch.Tensor, mask: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Summed over rows: the squared mean output error and the mean squared output error, over the tokens of ``x``."""
    err = x.reshape(-1, x.shape[-1]) @ (W * mask).t()  # what the removed weights contributed, (tokens, rows)
    return float(err.mean(0).pow(2).sum()), float(err.pow(2).mean(0).sum())


def run(model_name: str, sparsity: float, nsamples: int, seqlen: int, blocks: list[int] | None) -> dict:
    import prunewise.compensation  # noqa: F401  (parts registered)
    from prunewise.core.registry import REGISTRIES
    from prunewise.core.stats import LinearStats, wanda_metric
    from prunewise.data.corpora import get_corpus
    from prunewise.data.windows import calibration_windows
    from prunewise.models.adapters import get_adapter
    from prunewise.models.loading import load_model
    from prunewise.structures.masks import Unstructured

    model, tok = load_model(model_name)
    adapter = get_adapter(model)
    n = len(adapter.blocks(model))
    blocks = blocks if blocks is not None else sorted({0, n // 2, n - 1})
    windows = calibration_windows(tok, get_corpus("wiki"), nsamples, seqlen)
    source, inputs = block_inputs(model, adapter, windows, blocks)
    kinds = {name: kind for kind in ("attention", "mlp") for name in adapter.coupled(kind)}
    dsnot = REGISTRIES["compensation"].build("dsnot", skip="none")
    structure = Unstructured()
    rows = []
    shared: dict[str, LinearStats] = {}  # linears reading one input (q/k/v, gate/up) share its statistics
    for b in blocks:
        for name, lin in adapter.linears(adapter.blocks(model)[b]).items():
            key = source[f"{b}.{name}"]
            x = inputs[key]
            stats = shared.get(key)
            if stats is None:
                stats = shared[key] = LinearStats(x.shape[-1], mean=True, window_variance=True)
                for window in x:
                    stats.add(window.unsqueeze(0))
            W = lin.weight.detach().float()
            before = structure.mask(wanda_metric(W, stats), sparsity)
            t0 = time.perf_counter()
            after, notes = dsnot.refine(W, stats, structure, before, module=f"{b}.{name}")
            seconds = time.perf_counter() - t0
            (b0, m0), (b1, m1) = output_error(W, before, x), output_error(W, after, x)
            rows.append({"block": b, "linear": name, "kind": kinds.get(name, "?"), "bias_before": b0, "mse_before": m0,
                         "bias_after": b1, "mse_after": m1, "swaps": notes.get("dsnot_swaps", 0),
                         "kept_per_row_same": bool(((~before).sum(1) == (~after).sum(1)).all()), "dsnot_s": seconds})
    summary = {}
    for kind in ("attention", "mlp", "all"):
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        summary[kind] = {
            "bias_share": statistics.median(r["bias_before"] / r["mse_before"] for r in sel),
            "bias_ratio": statistics.median(r["bias_after"] / r["bias_before"] for r in sel),
            "mse_ratio": statistics.median(r["mse_after"] / r["mse_before"] for r in sel),
            "mse_up": sum(r["mse_after"] > r["mse_before"] for r in sel), "linears": len(sel)}
    return {"model": model_name, "sparsity": sparsity, "nsamples": nsamples, "seqlen": seqlen, "blocks": blocks,
            "rows": rows, "summary": summary}


def table(results: dict) -> str:
    out = ["What DSnoT (every linear, reference defaults) does to each layer's output error, from the Wanda mask; dense "
           "inputs to the blocks shown, wiki calibration windows. `bias` = squared mean output error summed over rows, "
           "`MSE` = mean squared output error summed over rows (MSE = bias + variance); `bias share` = bias / MSE of the "
           "Wanda mask (the part DSnoT targets). Written by `bench/dsnot_error.py`.", ""]
    for res in results.values():
        out += [f"## {res['model']}, Wanda {res['sparsity']:.0%}, {res['nsamples']} x {res['seqlen']} tokens", "",
                "| sublayer | linears | bias share (median) | bias after/before (median) | MSE after/before (median) | "
                "MSE up |", "|---|---|---|---|---|---|"]
        for kind, s in res["summary"].items():
            out.append(f"| {kind} | {s['linears']} | {s['bias_share']:.3f} | {s['bias_ratio']:.3f} | {s['mse_ratio']:.3f} | "
                       f"{s['mse_up']}/{s['linears']} |")
        out += ["", "| block.linear | bias before | bias after | MSE before | MSE after | after/before | swaps |",
                "|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            out.append(f"| {r['block']}.{r['linear']} | {r['bias_before']:.4g} | {r['bias_after']:.4g} | "
                       f"{r['mse_before']:.4g} | {r['mse_after']:.4g} | {r['mse_after'] / r['mse_before']:.3f} | "
                       f"{r['swaps']} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=0.6)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", default=None, help="comma-separated block indices (default: first, middle, last)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "dsnot_error.json")
    args = ap.parse_args()
    blocks = [int(b) for b in args.blocks.split(",")] if args.blocks else None
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    key = f"{args.model}@{args.sparsity}"
    results[key] = run(args.model, args.sparsity, args.nsamples, args.seqlen, blocks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    args.out.with_suffix(".md").write_text(table(results))
    print(table({key: results[key]}))


if __name__ == "__main__":
    main()
