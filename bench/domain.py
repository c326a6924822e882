"""Pruning for a domain, measured: the domain's own test perplexity beside general retention (wiki-test), one-shot.

A cell is DOMAIN/METHOD/SEED, e.g. ``code/wanda:code/0`` or ``legal/dpruner/0``. DOMAIN is the user's domain (code:
the standard library, its test files held out; legal: legal documents, legal-test held out). METHOD is
``SCORE:CALIBRATION`` with CALIBRATION ``wiki`` (general), ``domain`` (the domain's calibration split) or ``mix``
(half each, ``DOMAIN:0.5,wiki:0.5``), or ``dpruner[:OPTION=VALUE,...]`` (D-Pruner: general importance from wiki,
gradients from the domain; options are the score's, e.g. ``dpruner:loss_scale=1``). Every cell prunes
smollm2-135m to ``--sparsity`` unstructured in its own process with ``--nsamples`` x ``--seqlen`` windows drawn with
SEED and reports the perplexity on every ``--eval`` set and its prune seconds. The table marks, per domain, the
cells on the trade-off front (no other one-shot cell of that domain is better on both the domain's test set and
wiki-test) and each cell's domain perplexity against the domain-calibrated cell of its score; a PNG plots the
front. JSON after every cell (an interrupted run resumes), markdown beside it.

DOMAIN/METHOD/SEED/RECOVERY cells then recover the one-shot model on the domain's data with mask-preserving LoRA:
``all`` trains on ``--recover-tokens`` tokens of it, ``paser`` on 20% of them chosen by PASER from the same pool
(``--recover-select paser``: the clusters the pruning hurt most, their most degraded windows first), ``random`` on a
random 20% of the same pool (same seed, same steps per token); both the one-shot and the recovered perplexities are
kept, and the recovery table compares each selection with ``all``.

Structured cells (``--structured-sparsity`` of the targeted parameters, 30% by default) compare, with the same
``--tune-tokens`` of the domain: ``DOMAIN/atp/SEED`` (ATP: channels and heads learned while tuning LoRA on the
domain windows, then removed) and ``DOMAIN/flap+lora/SEED`` (FLAP's fluctuation, global widths, bias compensation,
calibrated on the domain, then mask-preserving LoRA on the domain's data).

    python bench/domain.py                                  # the default grid (~3 min a Wanda cell, ~8 a D-Pruner cell)
    python bench/domain.py --cells code/dpruner/0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_cell_args, dense_first, run_missing, start  # noqa: E402

HERE = Path(__file__).resolve().parent
DOMAIN_TEST = {"code": "code", "legal": "legal-test"}  # each domain's held-out test set
METHODS = ("wanda:wiki", "wanda:domain", "wanda:mix", "dpruner")
STRUCTURED = ("atp", "flap+lora")  # structured cells: learned while tuning vs chosen, then tuned


def calibration_of(domain: str, which: str) -> str:
    return {"wiki": "wiki", "domain": domain, "mix": f"{domain}:0.5,wiki:0.5"}[which]


def run_cell(args, cell: str) -> dict:
    from prunewise.api import evaluate, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    domain, method, seed, *recovery = cell.split("/")
    if method.partition(":")[0] in STRUCTURED:
        return structured_cell(args, cell, domain, method, int(seed))
    name, _, rest = method.partition(":")
    if name == "dpruner":
        options = dict(kv.split("=") for kv in rest.split(",") if kv)
        score = {"name": "dpruner", **{k: float(v) for k, v in options.items()}}
        calibration, general = domain, "wiki"
    else:
        score, calibration, general = name, calibration_of(domain, rest), None
    recipe = make_recipe(model=args.model, score=score, sparsity=args.sparsity, calibration=calibration,
                         general_calibration=general, nsamples=args.nsamples, seqlen=args.seqlen, seed=int(seed),
                         evaluation=args.eval, eval_tokens=args.eval_tokens)
    model, tok = load_model(recipe.model)
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    ppl = evaluate(model, tok, args.eval, args.eval_tokens, 512, progress=False)
    timings = {k: v for k, v in result.report["timings"].items() if not k.startswith("prune.")}
    row = {"cell": cell, "prune_s": seconds, "achieved": result.report["achieved_sparsity"], "perplexity": ppl,
           "timings": timings, "peak_rss_mb": result.report["peak_rss_mb"]}
    if recovery:
        from prunewise.pipeline.recover import recover

        select = {"all": "none", "paser": "paser", "random": "random"}[recovery[0]]
        tokens = args.recover_tokens if select == "none" else args.recover_tokens // 5
        part = {"name": "lora", "data": domain, "tokens": tokens, "select": select, "seed": int(seed)}
        t0 = time.perf_counter()
        section = recover(result, recipe.model_copy(update={"recovery": [part]}), progress=False)
        row["recovery_s"] = time.perf_counter() - t0
        for p in section["parts"]:
            p.pop("adapter", None)
        row["recovery"] = section
        row["one_shot"] = ppl
        row["perplexity"] = evaluate(model, tok, args.eval, args.eval_tokens, 512, progress=False)
    return row


def structured_cell(args, cell: str, domain: str, method: str, seed: int) -> dict:
    """ATP, or FLAP + bias then LoRA, at ``--structured-sparsity`` with ``--tune-tokens`` of the domain."""
    from prunewise.api import evaluate, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    common = {"model": args.model, "structure": "width", "sparsity": args.structured_sparsity, "calibration": domain,
              "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": seed, "evaluation": args.eval,
              "eval_tokens": args.eval_tokens}
    name, _, rest = method.partition(":")
    if name == "atp":  # atp[:OPTION=VALUE,...]
        options = {k: float(v) for k, v in (kv.split("=") for kv in rest.split(",") if kv)}
        recipe = make_recipe(score={"name": "atp", "tokens": args.tune_tokens, "seed": seed, **options}, **common)
    else:
        recipe = make_recipe(score="fluctuation", allocation="global", compensation=["bias"], **common)
    model, tok = load_model(recipe.model)
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    row = {"cell": cell, "prune_s": time.perf_counter() - t0, "achieved": result.report["achieved_sparsity"],
           "params_after": result.report["structured"]["params_after"], "atp": result.report["structured"].get("atp")}
    if row["atp"]:
        row["atp"].pop("history", None)
    if name != "atp":
        from prunewise.pipeline.recover import recover

        row["one_shot"] = evaluate(model, tok, args.eval, args.eval_tokens, 512, progress=False)
        part = {"name": "lora", "data": domain, "tokens": args.tune_tokens, "seed": seed}
        t0 = time.perf_counter()
        section = recover(result, recipe.model_copy(update={"recovery": [part]}), progress=False)
        row["recovery_s"] = time.perf_counter() - t0
        row["tokens"] = section["parts"][0]["tokens"]
    row["perplexity"] = evaluate(model, tok, args.eval, args.eval_tokens, 512, progress=False)
    return row


def analyse(results: dict) -> dict:
    """Per cell: on the front of its domain (wiki-test vs the domain's test set), and the domain perplexity against
    the domain-calibrated cell of the same score and seed (D-Pruner against Wanda's)."""
    out = {}
    cells = results["cells"]
    for key, r in cells.items():
        if "one_shot" in r or key.split("/")[1].partition(":")[0] in STRUCTURED:
            continue
        domain, method, seed = key.split("/")
        test = DOMAIN_TEST[domain]
        d, w = r["perplexity"][test], r["perplexity"]["wiki-test"]
        rivals = [o for k, o in cells.items() if k != key and k.split("/")[0] == domain and "one_shot" not in o
                  and k.split("/")[1].partition(":")[0] not in STRUCTURED]
        dominated_by = [o["cell"] for o in rivals if o["perplexity"][test] < d and o["perplexity"]["wiki-test"] < w]
        score = method.partition(":")[0]
        ref = cells.get(f"{domain}/{'wanda' if score == 'dpruner' else score}:domain/{seed}")
        out[key] = {"front": not dominated_by, "dominated_by": dominated_by,
                    "vs_domain_calibrated": None if ref is None else d / ref["perplexity"][test] - 1}
    return out


def table(results: dict, args) -> str:
    sets = args.eval
    notes = analyse(results)
    head = ["cell"] + [f"ppl {s}" for s in sets] + ["on the front", "domain ppl vs domain-calibrated", "prune s",
                                                   "peak RSS MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| dense | " + " | ".join(f"{results['dense'][s]:.2f}" for s in sets) + " | - | - | - | - |"]
    for key in sorted(k for k in results["cells"] if k in notes):
        r, n = results["cells"][key], notes[key]
        vs = "-" if n["vs_domain_calibrated"] is None else f"{100 * n['vs_domain_calibrated']:+.1f}%"
        front = "yes" if n["front"] else "no (" + ", ".join(n["dominated_by"]) + ")"
        lines.append(f"| {key} | " + " | ".join(f"{r['perplexity'][s]:.2f}" for s in sets) +
                     f" | {front} | {vs} | {r['prune_s']:.1f} | {r['peak_rss_mb']:.0f} |")
    recovered = sorted(k for k in results["cells"] if "one_shot" in results["cells"][k]
                       and k.split("/")[1].partition(":")[0] not in STRUCTURED)
    if recovered:
        head = ["cell", "recovery tokens", "windows trained"] + [f"ppl {s} one-shot -> recovered" for s in sets] + \
               ["domain ppl vs all tokens", "recovery s"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in recovered:
            r = results["cells"][key]
            domain = key.split("/")[0]
            test = DOMAIN_TEST[domain]
            part = r["recovery"]["parts"][0]
            full = results["cells"].get("/".join(key.split("/")[:3] + ["all"]))
            vs = "-" if full is None or key.endswith("/all") else \
                f"{100 * (r['perplexity'][test] / full['perplexity'][test] - 1):+.1f}%"
            lines.append(f"| {key} | {part.get('tokens', '-')} | {part.get('windows', '-')} | " +
                         " | ".join(f"{r['one_shot'][s]:.2f} -> {r['perplexity'][s]:.2f}" for s in sets) +
                         f" | {vs} | {r['recovery_s']:.0f} |")
    structured = sorted(k for k in results["cells"] if k.split("/")[1].partition(":")[0] in STRUCTURED)
    if structured:
        head = ["cell", "removed share of targeted", "parameters after"] + [f"ppl {s}" for s in sets] + \
               ["tuning tokens", "prune (+ tuning) s", "LoRA recovery s"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in structured:
            r = results["cells"][key]
            tokens = r["atp"]["tokens"] if r.get("atp") else r.get("tokens")
            lines.append(f"| {key} | {r['achieved']:.3f} | {r['params_after']['total']:,} | " +
                         " | ".join(f"{r['perplexity'][s]:.2f}" for s in sets) +
                         f" | {tokens} | {r['prune_s']:.0f} | {r.get('recovery_s', 0):.0f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = sorted({k.split("/")[0] for k in results["cells"]})
    fig, axes = plt.subplots(1, len(domains), figsize=(5.5 * len(domains), 4.5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        test = DOMAIN_TEST[domain]
        mine = {k: r for k, r in sorted(results["cells"].items()) if k.split("/")[0] == domain and "one_shot" not in r
                and k.split("/")[1].partition(":")[0] not in STRUCTURED}
        low = min(r["perplexity"]["wiki-test"] for r in mine.values())
        off = [k.split("/")[1] for k, r in mine.items() if r["perplexity"]["wiki-test"] > 1.6 * low]
        for key, r in mine.items():
            if key.split("/")[1] in off:  # far from the front: named in the title, not drawn
                continue
            x, y = r["perplexity"]["wiki-test"], r["perplexity"][test]
            ax.scatter(x, y, s=30)
            ax.annotate(key.split("/")[1], (x, y), fontsize=8, xytext=(4, 3), textcoords="offset points")
        if off:
            ax.text(0.02, 0.02, "not drawn (wiki-test > 1.6x the best): " + ", ".join(off), transform=ax.transAxes,
                    fontsize=7)
        ax.set_xlabel("wiki-test perplexity (general)")
        ax.set_ylabel(f"{test} perplexity (domain)")
        ax.set_title(f"{domain}: {args_sparsity(results)} unstructured, smollm2-135m")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def args_sparsity(results: dict) -> str:
    return f"{100 * results['settings']['sparsity']:.0f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--domains", nargs="+", default=["code", "legal"])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--seeds", nargs="+", default=["0"])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--eval", nargs="+", default=["wiki-test", "code", "legal-test"])
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--structured-sparsity", type=float, default=0.3, help="structured cells: share of the targeted "
                                                                          "parameters removed")
    ap.add_argument("--tune-tokens", type=int, default=32768, help="structured cells: tokens ATP tunes on, and FLAP's "
                                                                   "LoRA recovery")
    ap.add_argument("--recover-tokens", type=int, default=32768, help="recovery cells: the all-tokens budget (the "
                                                                      "selections train on a fifth of it)")
    add_cell_args(ap, HERE / "results" / "domain.json", "cells DOMAIN/METHOD/SEED")
    args = ap.parse_args()
    keys = ("model", "sparsity", "nsamples", "seqlen", "eval_tokens", "eval", "recover_tokens", "structured_sparsity",
            "tune_tokens")
    results = start(args, run_cell, keys)
    if results is None:
        return
    import json

    out = Path(args.out)
    dense_first(results, out, args)
    grid = [f"{d}/{m}/{s}" for d in args.domains for m in args.methods for s in args.seeds]
    run_missing(results, out, args.cells or grid, __file__, args, keys,
                lambda r: " ".join(f"{s} {v:.2f}" for s, v in r["perplexity"].items()) + f", {r['prune_s']:.1f} s")
    results["analysis"] = analyse(results)
    out.write_text(json.dumps(results, indent=1))
    plot(results, out.with_suffix(".png"))
    md = out.with_suffix(".md")
    md.write_text(f"# Pruning for a domain, one-shot\n\n`{results['command']}` ({results['threads']} threads; "
                  f"{args.nsamples} x {args.seqlen} calibration windows, {args.eval_tokens} evaluation tokens per set)"
                  f"\n\n{table(results, args)}\n\n![front]({out.with_suffix('.png').name})\n")
    print(md.read_text())


if __name__ == "__main__":
    main()
