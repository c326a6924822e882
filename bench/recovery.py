"""Compensation and recovery on smollm2-135m: one-shot prunes, then each compensation, side by side.

Cells are ``BASE/STEP``: BASE a one-shot setting (Wanda 50/60/70%, SparseGPT 50/60%, Wanda 2:4,
SparseGPT 70% OWL, FLAP 25/50% global widths + bias), STEP ``none`` or a compensation chain
(``dsnot`` as the reference defines it; ``dsnot-sign`` with its sign check; ``dsnot-mlp`` skipping the
MLP linears as the reference's default ``--skip_layer mlp`` does; ``dsnot-init``: on a SparseGPT base, the
reference's SparseGPT initialisation, no OBS update; ``eora16``: EoRA at rank 16). Every cell runs in its own process
with the same calibration (``nsamples`` x ``seqlen`` windows of ``wiki``) and reports wiki-test and
code perplexity beside the dense model measured in the same run, the sparsity counted in the pruned
weights, the prune time and the time the compensation itself took. Results go to JSON after every
cell (a run resumes) and to a markdown table.

    python bench/recovery.py --cells wanda-60/none wanda-60/dsnot
    python bench/recovery.py --out bench/results/recovery_mc.json --mc-limit 24 --cells wanda-50/lora flap-50/lora-wide
    python bench/recovery.py --model qwen2.5-coder-0.5b --out bench/results/recovery_qwen.json --cells wanda-60/none wanda-60/dsnot
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cells import window_bench_main  # noqa: E402

HERE = Path(__file__).resolve().parent
EVAL = ["wiki-test", "code"]
MIX = "code:0.5,wiki:0.5"
BASES = {
    "wanda-50": {"score": "wanda", "sparsity": 0.5},
    "wanda-60": {"score": "wanda", "sparsity": 0.6},
    "wanda-70": {"score": "wanda", "sparsity": 0.7},
    "sparsegpt-50": {"score": "sparsegpt", "sparsity": 0.5},
    "sparsegpt-60": {"score": "sparsegpt", "sparsity": 0.6},
    "wanda-2of4": {"score": "wanda", "structure": "2:4"},
    "sparsegpt-70-owl": {"score": "sparsegpt", "sparsity": 0.7, "allocation": "owl"},
    "flap-25": {"score": "fluctuation", "structure": "width", "sparsity": 0.25, "allocation": "global",
                "compensation": ["bias"]},
    "flap-50": {"score": "fluctuation", "structure": "width", "sparsity": 0.5, "allocation": "global",
                "compensation": ["bias"]},
    # the mixture point: calibrated on 50/50 code/wiki, recovered on the same mixture (the ``-mix`` recovery steps)
    "sparsegpt-60-owl-mix": {"score": "sparsegpt", "sparsity": 0.6, "allocation": "owl", "calibration": MIX},
}
STEPS = {
    "none": [],
    # every linear (skip none), as these cells have always run; the default skips the MLP as the reference does
    "dsnot": [{"name": "dsnot", "skip": "none"}],
    "dsnot-sign": [{"name": "dsnot", "same_sign": True, "skip": "none"}],
    "dsnot-mlp": [{"name": "dsnot", "skip": "mlp"}],
    # the reference's cycle limit (50) is for 4,096-wide rows: 50 swaps on a 576-wide smollm2 row replace up to 22%
    # of its kept weights, on LLaMA-7B 3%; the same share of the width is 7 cycles here
    "dsnot-c7": [{"name": "dsnot", "max_cycle_time": 7, "skip": "none"}],
    "dsnot-c7-mlp": [{"name": "dsnot", "max_cycle_time": 7, "skip": "mlp"}],
    "eora16": [{"name": "eora", "rank": 16}],
    # SparseGPT bases only: the reference's ``--initial_method sparsegpt`` (per-row mask from w^2/U_jj^2 on the dense
    # weights, DSnoT, no OBS update), with its default skip (mlp) and on every linear
    "dsnot-init": [{"name": "dsnot"}],
    "dsnot-init-all": [{"name": "dsnot", "skip": "none"}],
    "dsnot-init-off": [{"name": "dsnot", "max_cycle_time": 0}],  # the same mask unrefined (the reference's --without_DSnoT)
    "dsnot+eora16": [{"name": "dsnot", "skip": "none"}, {"name": "eora", "rank": 16}],
}
RECOVERY = {  # recovery steps: 65,536 tokens (128 x 512) of wiki, disjoint from the calibration windows
    "lora": [{"name": "lora", "data": "wiki", "tokens": 65536}],
    "distill": [{"name": "distill", "data": "wiki", "tokens": 65536}],
    "bias_norm": [{"name": "lora", "data": "wiki", "tokens": 65536, "params": "bias_norm"}],
    # more to train for a heavily pruned (structured) model: rank 32, biases and norms too, peak lr 3e-3
    "lora-wide": [{"name": "lora", "data": "wiki", "tokens": 65536, "params": "lora+bias_norm", "rank": 32, "lr": 3e-3}],
    "lora-mix": [{"name": "lora", "data": MIX, "tokens": 65536}],
    "distill-mix": [{"name": "distill", "data": MIX, "tokens": 65536}],
}
DEFAULT = ["wanda-60/none", "wanda-60/dsnot", "wanda-70/none", "wanda-70/dsnot", "sparsegpt-60/none",
           "sparsegpt-60/dsnot", "wanda-60/dsnot-sign", "wanda-60/dsnot-mlp", "wanda-2of4/none", "wanda-2of4/dsnot",
           "wanda-2of4/eora16", "wanda-50/none", "wanda-50/eora16", "sparsegpt-50/none", "sparsegpt-50/eora16"]


def recipe_fields(cell: str) -> dict:
    base, step = cell.split("/")
    fields = dict(BASES[base])
    chain = list(fields.pop("compensation", []))
    if step in RECOVERY:
        fields["recovery"] = RECOVERY[step]
    elif step.startswith("dsnot-init"):  # no obs: the score's saliency picks the mask outside any sweep
        fields["score"] = {"name": fields["score"], "saliency": "sweep"}
        chain += STEPS[step]
    else:
        if fields["score"] == "sparsegpt" and STEPS[step]:
            chain.append("obs")
        chain += STEPS[step]
    if chain:
        fields["compensation"] = chain
    return fields


def mc(args, model, tok) -> dict:
    """The default multiple-choice suite, each task cut to its first ``--mc-limit`` items (nothing when 0)."""
    if not args.mc_limit:
        return {}
    from prunewise.tasks.suite import evaluate_tasks, load_tasks

    results = evaluate_tasks(model, tok, load_tasks(None, args.mc_limit), progress=False)
    return {"mc": {name: {k: r[k] for k in ("acc", "acc_norm", "chance", "n")} for name, r in results.items()}}


def mc_retention(dense: dict | None, pruned: dict | None) -> tuple[float, float] | None:
    """Mean accuracy over the suite's tasks, and the share of the dense model's mean above chance it keeps."""
    if not dense or not pruned:
        return None
    chance = sum(d["chance"] for d in dense.values()) / len(dense)
    acc_d = sum(d["acc"] for d in dense.values()) / len(dense)
    acc_p = sum(pruned[n]["acc"] for n in dense) / len(dense)
    return acc_p, (acc_p - chance) / (acc_d - chance)


def run_cell(args, cell: str) -> dict:
    from prunewise.api import evaluate, prune
    from prunewise.models.loading import load_model
    from prunewise.recipe import make_recipe

    model, tok = load_model(args.model)
    if cell == "dense":
        return {"perplexity": evaluate(model, tok, EVAL, args.eval_tokens, 512, progress=False), **mc(args, model, tok)}
    fields = recipe_fields(cell)
    calibration = fields.pop("calibration", "wiki")
    recipe = make_recipe(model=args.model, calibration=calibration, nsamples=args.nsamples, seqlen=args.seqlen,
                         evaluation=EVAL, eval_tokens=args.eval_tokens, **fields)
    t0 = time.perf_counter()
    result = prune(recipe.model_copy(update={"recovery": []}), model, tok, progress=False)
    seconds = time.perf_counter() - t0
    from prunewise.evaluate.sparsity import measure_sparsity

    weight_level = recipe.structure["name"] in ("unstructured", "n:m")
    names = list(result.report["modules"])
    extra = {"zeros_one_shot": measure_sparsity(result.model, names)["zeros"] if weight_level else None}
    if fields.get("recovery"):
        from prunewise.pipeline.recover import recover

        extra["one_shot"] = evaluate(result.model, tok, EVAL, args.eval_tokens, 512, progress=False)
        extra["one_shot_mc"] = mc(args, result.model, tok).get("mc")
        section = recover(result, recipe, progress=False)
        for part in section["parts"]:
            part.pop("adapter", None)
        extra["recovery"] = section
    ppl = evaluate(result.model, tok, EVAL, args.eval_tokens, 512, progress=False)
    extra.update(mc(args, result.model, tok))
    extra["zeros"] = measure_sparsity(result.model, names)["zeros"] if weight_level else None
    modules = result.report["modules"].values()
    return {"perplexity": ppl, "achieved_sparsity": result.report["achieved_sparsity"], "prune_s": seconds, **extra,
            "dsnot_s": sum(m.get("dsnot_s", 0.0) for m in modules),
            "dsnot_swaps": sum(m.get("dsnot_swaps", 0) for m in modules), "adapter": result.report.get("adapter"),
            "timings": result.report["timings"], "recipe": json.loads(recipe.model_dump_json())}


def _mc_columns(dense_mc: dict | None, row: dict) -> str:
    after, before = mc_retention(dense_mc, row.get("mc")), mc_retention(dense_mc, row.get("one_shot_mc"))
    if after is None:
        return " - | - |"
    accs = (f"{before[0]:.3f} ({before[1]:.0%}) -> " if before else "") + f"{after[0]:.3f}"
    return f" {accs} | {after[1]:.0%} |"


def write_table(results: dict, path: Path) -> str:
    s = results["settings"]
    dense = results["cells"].get("dense", {}).get("perplexity", {})
    lines = [f"{s.get('model', 'smollm2-135m')}; calibration {s['nsamples']} x {s['seqlen']} wiki windows; perplexity on "
             f"{s['eval_tokens']} tokens of each corpus; dense " + ", ".join(f"{k} {v:.2f}" for k, v in dense.items()),
             "", "| cell | wiki-test | code | gap to dense closed (wiki-test) | sparsity | prune s | "
             "compensation s | swaps | recovery s | zeros unchanged |" + (" MC acc (one-shot -> after) | MC retention |"
                                                                       if s.get("mc_limit") else ""),
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if s.get("mc_limit") else "")]
    dense_mc = results["cells"].get("dense", {}).get("mc")
    for name, row in results["cells"].items():
        if name == "dense":
            continue
        base = results["cells"].get(name.split("/")[0] + "/none")
        closed = "-"
        if base and dense and name.split("/")[1] != "none":
            before, after, d = base["perplexity"]["wiki-test"], row["perplexity"]["wiki-test"], dense["wiki-test"]
            closed = f"{(before - after) / (before - d):+.1%}"
        comp = f"{row['dsnot_s']:.1f}" if row.get("dsnot_swaps") else "-"
        rec = row.get("recovery", {}).get("parts", [])
        rec_s = f"{sum(p['seconds'] for p in rec):.0f}" if rec else "-"
        kept = "-" if row.get("zeros") is None else ("yes" if row["zeros"] == row["zeros_one_shot"] else "NO")
        lines.append(f"| {name} | {row['perplexity']['wiki-test']:.2f} | {row['perplexity']['code']:.2f} | {closed} | "
                     f"{row['achieved_sparsity']:.4f} | {row['prune_s']:.0f} | {comp} | {row.get('dsnot_swaps') or '-'} | "
                     f"{rec_s} | {kept} |" + (_mc_columns(dense_mc, row) if s.get("mc_limit") else ""))
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def main() -> None:
    def mc_setting(ap):
        ap.add_argument("--mc-limit", type=int, default=0,
                        help="also the default multiple-choice suite, this many items per task (0: not run)")
        ap.add_argument("--model", default="smollm2-135m",
                        help="the model every cell prunes (default smollm2-135m; e.g. qwen2.5-coder-0.5b)")
        return ("mc_limit", "model")

    window_bench_main(__file__, __doc__, HERE / "results" / "recovery.json", DEFAULT, run_cell, write_table,
                      lambda row: f"ppl {row['perplexity']}", nsamples=32, extra_settings=mc_setting)


if __name__ == "__main__":
    main()
