"""Expert pruning on a real-weight mixture of experts: smollm2-135m-moe (smollm2-135m's own MLPs as a Qwen2-MoE,
built offline by MoEfication, see ``prunewise models list``).

Cells:
- ``build``: the MoE beside the dense model it came from: the largest logit difference with every expert selected
  (top-k = E), and per-layer routing on each domain's calibration text (the Jensen-Shannon divergence between
  the expert-usage distributions of two domains, averaged over layers, and the share of (layer, expert) whose usage
  differs by 2x or more between them);
- ``dense/MODEL``: perplexity of ``smollm2-135m`` or ``smollm2-135m-moe`` unpruned;
- ``SCORE/LEVEL/CALIBRATION``, e.g. ``reap/0.5/code``: ``--structure experts`` with that score removing LEVEL of the
  routed experts of every layer, calibrated on ``--nsamples`` x ``--seqlen`` windows of that corpus; perplexity on
  every evaluation set and prune seconds (``frequency+merge/...``: the removed experts merged into kept ones);
- ``inside/SCORE/STRUCTURE/CALIBRATION``, e.g. ``inside/wanda/0.5/code`` or ``inside/sparsegpt/2:4/wiki``: a
  weight-level prune of every linear, the routed experts' matrices included (each expert from the tokens routed to
  it), at 50% (N:M: its own share);
- ``stun/EXPERT_SCORE/E+W/CALIBRATION``, e.g. ``stun/frequency/0.25+0.5/code``: STUN's order, E of the routed experts
  removed first, then Wanda at W inside every remaining linear; the share of the original model's prunable weights
  removed is reported beside it.

Each cell runs in its own process; JSON after every cell (an interrupted run resumes), markdown table beside it.

    python bench/moe.py                                  # build, dense, 50% x {frequency, reap, ean} x {wiki, code, legal}
    python bench/moe.py --cells reap/0.25/code frequency/0.25/code
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import add_cell_args, add_window_args, run_missing, start  # noqa: E402

HERE = Path(__file__).resolve().parent
MOE = "smollm2-135m-moe"
DENSE = "smollm2-135m"
OWN_TEST = {"wiki": "wiki-test", "code": "code", "legal": "legal-test"}
DOMAINS = ("wiki", "code", "legal")


def grid(args) -> list[str]:
    cells = ["build", f"dense/{DENSE}", f"dense/{args.model}"]
    return cells + [f"{s}/{lv}/{c}" for lv in args.levels for c in args.calibrations for s in args.scores]


def _usage(model, tok, corpus: str, nsamples: int, seqlen: int):
    """Per MoE layer, the share of routing slots each expert gets on ``corpus``'s calibration windows."""
    import torch

    from prunewise.data.mixture import calibration_spec_windows
    from prunewise.engine.sequential import SequentialEngine
    from prunewise.models.adapters import get_adapter
    from prunewise.pipeline.structured import ExpertVisitor

    windows = calibration_spec_windows(tok, corpus, nsamples, seqlen, 0)
    visitor = ExpertVisitor()
    SequentialEngine(model, get_adapter(model), windows, None, False, sequential=False).run(visitor)
    return torch.stack([s.counts / s.counts.sum() for _, s in sorted(visitor.stats.items())])


def _js(p, q) -> float:
    m = (p + q) / 2
    kl = lambda a, b: float((a * ((a + 1e-12) / (b + 1e-12)).log()).sum())  # noqa: E731
    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def run_cell(args, cell: str) -> dict:
    import torch

    from prunewise.api import evaluate, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    if cell == "build":
        moe, tok = load_model(args.model)
        dense, _ = load_model(DENSE)
        ids = torch.randint(5, tok.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0))
        experts = moe.config.num_experts
        top_k = moe.config.num_experts_per_tok
        for block in moe.model.layers:  # every expert selected: the dense model, to the router's spread
            block.mlp.gate.top_k = experts
        with torch.no_grad():
            diff = float((moe(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max())
        for block in moe.model.layers:
            block.mlp.gate.top_k = top_k
        usage = {d: _usage(moe, tok, d, 8, 512) for d in DOMAINS}
        pairs = {}
        for a, b in (("wiki", "code"), ("wiki", "legal"), ("code", "legal")):
            js = [_js(usage[a][i], usage[b][i]) for i in range(usage[a].shape[0])]
            ratio = (usage[a] + 1e-9) / (usage[b] + 1e-9)
            pairs[f"{a}-{b}"] = {"js_mean": sum(js) / len(js), "js_max": max(js),
                                 "share_2x": float(((ratio >= 2) | (ratio <= 0.5)).float().mean())}
        return {"cell": cell, "max_logit_diff_all_experts": diff, "experts": experts, "top_k": top_k,
                "routing": pairs, "usage": {d: u.tolist() for d, u in usage.items()}}
    if cell.startswith("dense/"):
        model, tok = load_model(cell.split("/", 1)[1])
        return {"cell": cell, "perplexity": evaluate(model, tok, args.eval, args.eval_tokens, 512, progress=False)}
    if cell.startswith(("inside/", "stun/")):
        return _weight_level_cell(args, cell)
    score, level, calibration = cell.split("/")
    score, _, merge = score.partition("+")  # e.g. frequency+merge: removed experts merged into kept ones
    recipe = make_recipe(model=args.model, score=score, structure="experts", sparsity=float(level),
                         calibration=calibration, nsamples=args.nsamples, seqlen=args.seqlen, evaluation=args.eval,
                         eval_tokens=args.eval_tokens, compensation=[merge] if merge else [])
    model, tok = load_model(recipe.model)
    t0 = time.perf_counter()
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    ppl = evaluate(model, tok, args.eval, args.eval_tokens, 512, progress=False)
    experts = result.report["structured"]["experts"]
    return {"cell": cell, "prune_s": seconds, "perplexity": ppl, "achieved": result.report["achieved_sparsity"],
            "experts_after": experts["per_layer_after"], "unreached": sum(x["unreached"] for x in experts["layers"])}


def _weight_level_cell(args, cell: str) -> dict:
    """``inside/...`` (a weight-level prune reaching into the experts) or ``stun/...`` (experts, then inside)."""
    from prunewise.api import evaluate, prune
    from prunewise.models.adapters import prunable_weights
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    kind, score, what, calibration = cell.split("/")
    common = dict(model=args.model, calibration=calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                  evaluation=args.eval, eval_tokens=args.eval_tokens)
    model, tok = load_model(args.model)
    before = sum(w.numel() for w in prunable_weights(model).values())
    t0 = time.perf_counter()
    out = {"cell": cell}
    if kind == "stun":
        experts_level, inside_level = (float(x) for x in what.split("+"))
        first = prune(make_recipe(**common, score=score, structure="experts", sparsity=experts_level), model, tok,
                      progress=False)
        out["experts_after"] = first.report["structured"]["experts"]["per_layer_after"]
        recipe = make_recipe(**common, score="wanda", sparsity=inside_level)
    else:
        recipe = make_recipe(**common, score=score, structure=what, sparsity=0.5)
    result = prune(recipe, model, tok, progress=False)
    seconds = time.perf_counter() - t0
    weights = prunable_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    expert = [w for n, w in weights.items() if ".experts." in n]
    ppl = evaluate(model, tok, args.eval, args.eval_tokens, 512, progress=False)
    return {**out, "prune_s": seconds, "perplexity": ppl, "achieved": result.report["achieved_sparsity"],
            "removed_of_original": 1 - (sum(w.numel() for w in weights.values()) - zeros) / before,
            "expert_sparsity": sum(int((w == 0).sum()) for w in expert) / sum(w.numel() for w in expert),
            "unreached": len(result.report.get("walk", {}).get("unreached", [])),
            "passes": result.report.get("walk", {}).get("passes")}


def write_table(results: dict, out: Path, args) -> None:
    cells = results["cells"]
    lines = [f"# Expert pruning on {args.model}", "", f"`{results.get('command', '')}`", "",
             f"{args.nsamples} x {args.seqlen} calibration windows; perplexity on {args.eval_tokens} tokens of each "
             f"set ({', '.join(args.eval)}); {results.get('threads')} threads.", ""]
    build = cells.get("build")
    if build:
        lines += [f"Built MoE: {build['experts']} routed experts per layer, {build['top_k']} per token. With every "
                  f"expert selected the logits are the dense model's to {build['max_logit_diff_all_experts']:.2e} "
                  "(largest difference, 2 x 256 tokens).", "",
                  "| domains | mean JS divergence of per-layer routing | largest | (layer, expert) used 2x more in one |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['js_mean']:.4f} | {v['js_max']:.4f} | {v['share_2x']:.1%} |"
                  for k, v in build["routing"].items()]
        lines.append("")
    head = ["cell", "experts kept"] + [f"ppl {e}" for e in args.eval] + ["own test", "removed of prunable", "prune s"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in cells.items():
        if "perplexity" not in r:
            continue
        ppl = r["perplexity"]
        calib = name.split("/")[-1]
        own = ppl.get(OWN_TEST.get(calib, ""), float("nan"))
        lines.append(f"| {name} | {r.get('experts_after', '-')} | " + " | ".join(f"{ppl[e]:.2f}" for e in args.eval)
                     + f" | {own:.2f} | " + _removed(r) + " | "
                     + (f"{r['prune_s']:.0f}" if "prune_s" in r else "-") + " |")
    lines += ["", "Task-calibrated vs wiki-calibrated on the task's own test set, and REAP vs frequency:", ""]
    for level in args.levels:
        for score in args.scores:
            for domain in ("code", "legal"):
                a, b = cells.get(f"{score}/{level}/{domain}"), cells.get(f"{score}/{level}/wiki")
                if a and b:
                    t = OWN_TEST[domain]
                    gain = 1 - a["perplexity"][t] / b["perplexity"][t]
                    lines.append(f"- {score} {level}: {domain}-calibrated {a['perplexity'][t]:.2f} vs wiki-calibrated "
                                 f"{b['perplexity'][t]:.2f} on {t} ({gain:+.1%} lower)")
        for calib in args.calibrations:
            r, f = cells.get(f"reap/{level}/{calib}"), cells.get(f"frequency/{level}/{calib}")
            if r and f:
                t = OWN_TEST[calib]
                lines.append(f"- {level} {calib}: REAP {r['perplexity'][t]:.2f} vs frequency {f['perplexity'][t]:.2f} "
                             f"on {t}; mean log-ppl over all sets REAP "
                             f"{sum(math.log(v) for v in r['perplexity'].values()) / len(r['perplexity']):.4f}, frequency "
                             f"{sum(math.log(v) for v in f['perplexity'].values()) / len(f['perplexity']):.4f}")
    for name, a in cells.items():  # weight-level inside the experts, and STUN: the same comparison
        if not name.startswith(("inside/", "stun/")) or name.endswith("/wiki"):
            continue
        domain = name.rsplit("/", 1)[1]
        b = cells.get(name.rsplit("/", 1)[0] + "/wiki")
        if b and domain in OWN_TEST:
            t = OWN_TEST[domain]
            gain = 1 - a["perplexity"][t] / b["perplexity"][t]
            lines.append(f"- {name.rsplit('/', 1)[0]}: {domain}-calibrated {a['perplexity'][t]:.2f} vs wiki-calibrated "
                         f"{b['perplexity'][t]:.2f} on {t} ({gain:+.1%} lower)")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _removed(r: dict) -> str:
    """The share of the unpruned MoE's prunable weights (linears and expert matrices) a cell removed."""
    if "removed_of_original" in r:
        return f"{r['removed_of_original']:.1%}"
    return "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_window_args(ap, nsamples=32, eval_tokens=8192)
    ap.add_argument("--eval", nargs="+", default=["wiki-test", "code", "legal-test"])
    ap.add_argument("--scores", nargs="+", default=["frequency", "reap", "ean", "easyep"])
    ap.add_argument("--levels", nargs="+", default=["0.5"])
    ap.add_argument("--calibrations", nargs="+", default=list(DOMAINS))
    ap.add_argument("--model", default=MOE, help="the MoE to prune (smollm2-135m-moe16: 16 experts, 4 per token)")
    add_cell_args(ap, HERE / "results" / "moe.json", "build, dense/MODEL or SCORE/LEVEL/CALIBRATION")
    args = ap.parse_args()
    results = start(args, run_cell, ("nsamples", "seqlen", "eval_tokens", "eval"))
    if results is None:
        return
    out = Path(args.out)
    cells = args.cells or grid(args)
    keys = ("nsamples", "seqlen", "eval_tokens", "eval", "model")  # the children evaluate on the sets asked here
    run_missing(results, out, cells, __file__, args, keys, lambda r: r["cell"])
    write_table(results, out, args)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
