"""Command line: ``prunewise prune | sweep | eval | tasks | models | data``, a thin front over the recipe and the API."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import PrunewiseError

PRUNE_FLAGS = {  # flag -> (recipe field, type, help)
    "--model": ("model", str, "named model (see `prunewise models`), HF folder or id, or a .gguf file"),
    "--score": ("score", str, "how weights (or structured units) are ranked, options as NAME:OPTION=VALUE"),
    "--compensate": ("compensation", str, "compensation parts after selection, comma-separated, options as "
                                          "NAME:OPTION=VALUE (obs: OBS reconstruction after any mask; dsnot: DSnoT "
                                          "mask refinement; bias: FLAP, structured)"),
    "--recover": ("recovery", str, "recovery parts after pruning, comma-separated, options as NAME:OPTION=VALUE "
                                   "(lora: mask-preserving LoRA; distill: from the dense model)"),
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
    "--search-actors": ("search_actors", int, "search allocation with --ray: Ray actors scoring offspring "
                                              "(default: as many as the cluster's CPUs hold, at most the offspring)"),
    "--plan": ("plan", str, "reuse an allocation plan (plan.json) instead of allocating"),
    "--owl-m": ("owl_m", float, "OWL outlier threshold M (times the mean score)"),
    "--owl-lambda": ("owl_lambda", float, "OWL spread lambda around the target"),
    "--min-density": ("min_density", float, "global allocation: share every module keeps at least"),
    "--profile-unit": ("profile_unit", str, "profile allocation: block (one level per block, default) | module"),
    "--calibration": ("calibration", str, "calibration data: wiki, code, a .txt/.jsonl file, ..., "
                                          "or a mixture SOURCE:WEIGHT,... (e.g. code:0.7,wiki:0.3)"),
    "--general-calibration": ("general_calibration", str, "dpruner: general (open-domain) calibration data, any "
                                                          "--calibration spec (default wiki); --calibration is the domain"),
    "--nsamples": ("nsamples", int, "calibration windows"),
    "--seqlen": ("seqlen", int, "tokens per calibration window"),
    "--seed": ("seed", int, "seed of the calibration windows"),
    "--damp": ("damp", float, "SparseGPT dampening (share of the mean Hessian diagonal)"),
    "--within-block": ("within_block", str, "sequential (one pass per block; default with obs and for unstructured up to 0.5) | parallel (statistics from the dense block, as the reference code; two passes; the default otherwise)"),
    "--propagate": ("propagate", str, "pruned (default: the pruned block's outputs feed the next block) | dense (one "
                                      "dense pass: every statistic from the dense model)"),
    "--chunk-size": ("chunk_size", int, "calibration windows per forward chunk (lower = less memory)"),
    "--device": ("device", str, "where blocks compute, one at a time: auto (first GPU, else CPU) | cpu | cuda | cuda:N | mps"),
    "--offload": ("offload", str, "disk: stream blocks from the source shards to the output shards, never the whole "
                                  "model in memory | auto (disk when it would not fit, default) | none"),
    "--dtype": ("dtype", str, "storage dtype, loaded and saved: auto (the checkpoint's; named models float32) | "
                              "float32 | bfloat16 | float16 (on a CPU, blocks compute in float32)"),
    "--num-cpus": ("num_cpus", float, "with --ray: CPUs per sweep cell or search actor (default 1)"),
    "--num-gpus": ("num_gpus", float, "with --ray: GPUs per sweep cell or search actor (default 0)"),
    "--targets": ("targets", str, "regex of module names to prune"),
    "--ignore": ("ignore", str, "regex of module names never pruned"),
    "--eval-tokens": ("eval_tokens", int, "evaluation tokens per corpus"),
    "--eval-seqlen": ("eval_seqlen", int, "tokens per perplexity window (default 512)"),
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


def _data_list(names: list[str] | None) -> list[str]:
    """Evaluation sets from the command line: `none` (alone) or no name skips the evaluation."""
    names = list(names or [])
    if [n.strip().lower() for n in names] == ["none"]:
        return []
    if any(n.strip().lower() == "none" for n in names):
        raise PrunewiseError("`none` skips the evaluation on its own; give either none or the data sets")
    return names


def _recipe_from_args(args, **extra):
    from .recipe import Recipe, make_recipe

    fields = Recipe.from_yaml(args.recipe).model_dump(exclude_unset=True) if args.recipe else {}
    if getattr(args, "budget", None) is not None and getattr(args, "sparsity", None) is not None:
        raise PrunewiseError(f"--budget {args.budget} and --sparsity {args.sparsity:g} both say how much to remove; "
                             "give one of them")
    if getattr(args, "budget", None) is not None:
        fields.pop("sparsity", None)  # a recipe's sparsity (saved from an earlier budget) yields to the new budget
    elif getattr(args, "sparsity", None) is not None:
        fields.pop("budget", None)  # and a new sparsity replaces the recipe's budget
    for field, _, _ in PRUNE_FLAGS.values():
        value = getattr(args, field, None)
        if value is not None:
            fields[field] = value
    if args.eval is not None:
        fields["evaluation"] = _data_list(args.eval)
    if args.tasks is not None:
        fields["tasks"] = args.tasks
    if args.task_limit is not None:
        fields["task_limit"] = args.task_limit
    if args.no_completions:
        fields["completions"] = False
    if isinstance(fields.get("compensation"), str):
        fields["compensation"] = [c for c in fields["compensation"].split(",") if c.strip()]
    if isinstance(fields.get("recovery"), str):
        fields["recovery"] = _recovery_entries(fields["recovery"], args)
    elif any(getattr(args, f"recover_{k}", None) is not None for k in ("data", "tokens", "lr", "select")):
        raise PrunewiseError("--recover-data/--recover-tokens/--recover-lr/--recover-select set a recovery part's options; "
                             "name the part with --recover lora or --recover distill")
    if getattr(args, "ray", None):
        fields["ray"] = args.ray
    for flag in ("overwrite", "rowwise", "bias_compensation"):
        if getattr(args, flag, None):
            fields[flag] = True
    fields.update(extra)
    return make_recipe(**fields)


def _cmd_prune(args) -> int:
    from .api import run

    recipe = _recipe_from_args(args)
    report = run(recipe, progress=not args.no_progress)
    from .report.markdown import format_prune_report

    print(format_prune_report(report, recipe))
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise PrunewiseError(f"--sparsities {text!r} must be numbers, e.g. 0.3,0.5,0.7") from None


def _cmd_sweep(args) -> int:
    from .sweep import run_sweep

    if not args.output:
        raise PrunewiseError("`prunewise sweep` needs --output FOLDER (rerun with the same folder to resume)")
    base = _recipe_from_args(args, output=None)
    sparsities = [v for text in args.sparsities for v in _floats(text)]
    scores = [v for text in args.scores for v in text.replace(",", " ").split()]
    allocations = [v for text in args.allocations for v in text.replace(",", " ").split()]
    summary = run_sweep(base, scores, sparsities, allocations, args.output, save_models=args.save_models,
                        progress=not args.no_progress,
                        on_cell=lambda name, status: print(f"sweep: {name}: {status}", flush=True))
    print(f"sweep: {len(summary['cells'])}/{summary['grid_size']} cells; report: {args.output}/report.html")
    if summary.get("failed"):
        print(f"prunewise: {len(summary['failed'])} cell(s) failed (errors in {args.output}/cells/*.failed.json); "
              "rerun the same command to retry them", file=sys.stderr)
        return 1
    return 0


def _cmd_eval(args) -> int:
    from .api import evaluate
    from .models.loading import load_model
    from .pipeline.recover import attach_saved_adapters

    model, tokenizer = load_model(args.model)
    attached, _ = attach_saved_adapters(model, args.model)  # evaluate the model the folder computes, adapters too
    if attached:
        print(f"adapters beside the weights, applied: {', '.join(f'{a}/' for a in attached)}")
    progress = not args.no_progress
    args.data = _data_list(args.data)
    if args.data:
        results = evaluate(model, tokenizer, args.data, args.eval_tokens, args.seqlen, calibration=args.calibration,
                           dense_spec=None, progress=progress)
        print(f"{'data':<14}{'perplexity':>12}")
        for name, ppl in results.items():
            print(f"{name:<14}{ppl:>12.3f}")
    for path in args.task_loss or []:
        from .data.task import load_task_records, task_windows
        from .evaluate.task_loss import task_loss

        ids, mask = task_windows(tokenizer, load_task_records(path), args.seqlen)
        r = task_loss(model, ids, mask, progress=progress)
        print(f"task loss {path}: {r['nll']:.4f} nats/token over {r['tokens']} completion tokens "
              f"(perplexity {r['perplexity']:.3f})")
    if args.tasks or args.harness:
        _eval_tasks(model, tokenizer, args, progress)
    return 0


def _eval_tasks(model, tokenizer, args, progress: bool) -> None:
    import tempfile

    from .tasks.suite import evaluate_tasks, format_task_table, load_tasks

    offline = [t for t in (args.tasks or ["default"]) if not t.startswith("harness:")]
    named = [t.removeprefix("harness:") for t in (args.tasks or []) if t.startswith("harness:")]
    tasks = load_tasks(offline, args.limit) if offline else []
    ours = evaluate_tasks(model, tokenizer, tasks, progress=progress) if tasks else {}
    if ours:
        print("\n".join(format_task_table(ours)))
    if not args.harness:
        return
    from .tasks.harness import run_harness

    with tempfile.TemporaryDirectory(prefix="prunewise-harness-") as folder:
        theirs = run_harness(model, tokenizer, folder, tasks, named, batch_size=args.harness_batch_size)
    def count(row, key):
        if not row:
            return ""
        return f"{row[key]}/{row['n']}" if key in row else f"{row.get('acc' if key == 'correct' else 'acc_norm', 0):.3f}"

    print(f"{'task':<48}{'prunewise acc':>15}{'lm-eval acc':>13}{'prunewise norm':>16}{'lm-eval norm':>14}")
    for name, row in theirs.items():
        mine = ours.get(name)
        print(f"{name:<48}{count(mine, 'correct'):>15}{count(row, 'correct'):>13}"
              f"{count(mine, 'correct_norm'):>16}{count(row, 'correct_norm'):>14}")


def _cmd_tasks(args) -> int:
    from .tasks.items import list_tasks
    from .tasks.suite import DEFAULT_SUITE, TASK_ALIASES

    if args.action == "suite":
        reverse = {v: k for k, v in TASK_ALIASES.items()}
        for name, (start, n) in DEFAULT_SUITE.items():
            print(f"{reverse.get(name, ''):<26}{name:<56}items {start}-{start + n - 1}")
        return 0
    for name, row in sorted(list_tasks(args.package).items()):
        print(f"{name:<64}{row['items']:>7} items  chance {row['chance']:.3f}")
    return 0


def _cmd_models(args) -> int:
    from .models.loading import fetch_model, list_models
    from .pipeline import moefy

    moefy.register()  # the builder of the derived MoE models, for `models fetch smollm2-135m-moe`

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

    if args.action == "export":
        from .mirror import export_data

        if not args.name:
            raise PrunewiseError("`prunewise data export` needs a folder: prunewise data export DIR")
        manifest = export_data(args.name, packages=args.packages)
        print(f"{args.name}: {len(manifest['corpora'])} corpora, {len(manifest['tasks'])} tasks, "
              f"{len(manifest['packages'])} package files; elsewhere set PRUNEWISE_DATA_MIRROR={args.name}")
        return 0
    if args.action == "check":
        from .mirror import check_sources

        rows = check_sources([args.name] if args.name else None)
        for row in rows:
            print(f"{row['set']:<44}{row['source']:<30}{row['status']:<13}{row['detail']}")
        return 0 if all(any(r["status"] == "match" for r in rows if r["set"] == s) for s in {r["set"] for r in rows}) \
            else 2
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


def _task_flags(p) -> None:
    p.add_argument("--tasks", nargs="*", default=None, help="zero-shot multiple-choice tasks evaluated dense and "
                   "pruned: default (the suite), bigbench/..., evals/..., a .jsonl file")
    p.add_argument("--task-limit", type=int, default=None, help="at most this many items per task")
    p.add_argument("--no-completions", action="store_true", help="skip the greedy completions of fixed prompts")


AXIS_FLAGS = {"score": "score", "structure": "structure", "allocation": "allocation", "compensation": "compensation"}


def _flag_help(field: str, text: str) -> str:
    """Help of an axis flag names the parts its registry holds (the registry is the one list)."""
    if field not in AXIS_FLAGS:
        return text
    from .core.registry import REGISTRIES
    from .recipe import Recipe  # noqa: F401  (registers every part)

    names = REGISTRIES[AXIS_FLAGS[field]].names()
    return f"{text} [parts: {', '.join(n if n != 'n:m' else 'N:M' for n in names)}; see `prunewise parts`]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prunewise", description="Prune LLMs for the task you care about.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model (and evaluate it beside the dense one)")
    p.add_argument("--recipe", help="YAML recipe; flags given on the command line override it")
    for flag, (field, typ, text) in PRUNE_FLAGS.items():
        p.add_argument(flag, dest=field, type=typ, default=None, help=_flag_help(field, text))
    p.add_argument("--recover-data", dest="recover_data", default=None,
                   help="recovery data: corpus, mixture SOURCE:WEIGHT,... or prompt/completion .jsonl (default: calibration)")
    p.add_argument("--recover-tokens", dest="recover_tokens", type=int, default=None, help="recovery training tokens")
    p.add_argument("--recover-lr", dest="recover_lr", type=float, default=None, help="recovery peak learning rate")
    p.add_argument("--recover-select", dest="recover_select", default=None, choices=["none", "paser", "random"],
                   help="which windows the budget trains on: PASER's (the clusters pruning hurt most, from a pool 5x "
                        "the budget), a random share of the same pool, or all drawn (none, default)")
    p.add_argument("--eval", nargs="*", default=None, help="evaluation data (default wiki-test); none (or no name) to skip")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output folder")
    p.add_argument("--rowwise", action="store_true", default=None,
                   help="row-wise allocation (TRIM): per-output-row sparsities around each module's level")
    p.add_argument("--bias-compensation", action="store_true", default=None,
                   help="structured: fold the removed units' mean contribution into output biases (FLAP)")
    p.add_argument("--no-progress", action="store_true")
    _ray_flag(p, "allocation search scores each generation's offspring on Ray actors")
    _task_flags(p)
    p.set_defaults(func=_cmd_prune)

    w = sub.add_parser("sweep", help="a grid of scores x sparsities (x allocations) from one recipe, resumable, "
                                     "with a report of curves")
    w.add_argument("--recipe", help="YAML recipe for everything the grid does not vary")
    for flag, (field, typ, text) in PRUNE_FLAGS.items():
        if field not in ("score", "sparsity", "allocation", "plan"):
            w.add_argument(flag, dest=field, type=typ, default=None, help=_flag_help(field, text))
    w.add_argument("--scores", nargs="+", default=["wanda", "sparsegpt"], help=_flag_help("score", "scores of the grid"))
    w.add_argument("--sparsities", nargs="+", default=["0.3,0.5,0.6,0.7"], help="sparsities of the grid")
    w.add_argument("--allocations", nargs="+", default=["uniform"],
                   help=_flag_help("allocation", "allocations of the grid"))
    w.add_argument("--eval", nargs="*", default=None, help="perplexity data (default wiki-test)")
    w.add_argument("--save-models", action="store_true", help="also save every pruned model under OUTPUT/models/")
    _ray_flag(w, "every cell a Ray task, retried if its worker dies")
    w.add_argument("--rowwise", action="store_true", default=None)
    w.add_argument("--no-progress", action="store_true")
    _task_flags(w)
    w.set_defaults(func=_cmd_sweep)

    t = sub.add_parser("tasks", help="list the offline multiple-choice tasks, or the default suite")
    t.add_argument("action", nargs="?", choices=["list", "suite"], default="list")
    t.add_argument("--package", choices=["bigbench", "evals"], default=None)
    t.set_defaults(func=_cmd_tasks)

    e = sub.add_parser("eval", help="perplexity, zero-shot tasks (and lm-eval agreement) of a model or pruned folder")
    e.add_argument("--model", required=True)
    e.add_argument("--data", nargs="*", default=["wiki-test"], help="perplexity data; none to skip")
    e.add_argument("--tasks", nargs="*", default=None, help="multiple-choice tasks: default (the suite), "
                   "bigbench/..., evals/..., a .jsonl file; harness:NAME for an lm-eval task (online)")
    e.add_argument("--limit", type=int, default=None, help="at most this many items per task")
    e.add_argument("--harness", action="store_true", help="also run lm-evaluation-harness on the same items "
                   "(pip install 'prunewise[harness]') and print both counts")
    e.add_argument("--harness-batch-size", type=int, default=16)
    e.add_argument("--task-loss", nargs="*", default=None, help="JSONL files of {prompt, completion}: mean loss on "
                   "the completions")
    e.add_argument("--calibration", default=None, help="refuse evaluation data overlapping this calibration data "
                                                             "(a corpus or a mixture SOURCE:WEIGHT,...)")
    e.add_argument("--eval-tokens", type=int, default=32768)
    e.add_argument("--seqlen", type=int, default=512)
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_eval)

    pt = sub.add_parser("parts", help="every part per axis (score, structure, allocation, compensation, recovery)")
    pt.set_defaults(func=_cmd_parts)

    rc = sub.add_parser("recover", help="recover a model pruned earlier: train it keeping its saved masks")
    rc.add_argument("--model", required=True, help="a folder written by prunewise prune (weights, recipe, masks)")
    rc.add_argument("--masks", default=None, help="the mask set to keep (default: the folder's masks.safetensors)")
    rc.add_argument("--recover", required=True, help=PRUNE_FLAGS["--recover"][2])
    rc.add_argument("--recover-data", dest="recover_data", default=None, help="recovery data (default: calibration)")
    rc.add_argument("--recover-tokens", dest="recover_tokens", type=int, default=None, help="training tokens")
    rc.add_argument("--recover-lr", dest="recover_lr", type=float, default=None, help="peak learning rate")
    rc.add_argument("--recover-select", dest="recover_select", default=None, choices=["none", "paser", "random"],
                    help="which windows the budget trains on (PASER, random, none)")
    rc.add_argument("--eval", nargs="*", default=None, help="perplexity data before and after (default: the recipe's)")
    rc.add_argument("--eval-tokens", type=int, default=None)
    rc.add_argument("--output", required=True, help="folder for the recovered model")
    rc.add_argument("--overwrite", action="store_true")
    rc.add_argument("--no-progress", action="store_true")
    rc.set_defaults(func=_cmd_recover)

    am = sub.add_parser("apply-masks", help="re-apply a saved mask set (masks.safetensors) to a model and save it")
    am.add_argument("--model", required=True, help="the model to mask (named, folder, id or .gguf)")
    am.add_argument("--masks", required=True, help="a pruned folder or its masks.safetensors")
    am.add_argument("--output", required=True, help="folder for the masked model")
    am.add_argument("--overwrite", action="store_true")
    am.set_defaults(func=_cmd_apply_masks)

    for name, func, what in (("models", _cmd_models, "model"), ("data", _cmd_data, "corpus")):
        s = sub.add_parser(name, help=f"list or fetch named {what}s (offline packages)"
                           + ("; `data export DIR` writes a mirror for PRUNEWISE_DATA_MIRROR; `data check [NAME]` tries every "
                              "source of the pinned sets" if name == "data" else ""))
        s.add_argument("action", nargs="?", choices=["list", "fetch"] + (["export", "check"] if name == "data" else []),
                       default="list")
        s.add_argument("name", nargs="?", help="a name to fetch" + (", or the folder to export to" if name == "data"
                                                                      else ""))
        if name == "data":
            s.add_argument("--packages", action="store_true",
                           help="with export: also copy the pinned package files in the cache (wheels) to DIR/packages")
        s.set_defaults(func=func)
    return parser


def _cmd_parts(args) -> int:
    from .core.registry import listing
    from .recipe import Recipe  # noqa: F401  (registers every part)

    print(listing())
    return 0


def _recovery_entries(text: str, args) -> list:
    entries = [c for c in text.split(",") if c.strip()]
    shared = {k: getattr(args, f"recover_{k}", None) for k in ("data", "tokens", "lr", "select")}
    if any(v is not None for v in shared.values()):
        from .recipe import _choice

        entries = [{**_choice(e, "recovery"), **{k: v for k, v in shared.items() if v is not None}} for e in entries]
    return entries


def _cmd_recover(args) -> int:
    from .api import recover

    report = recover(args.model, _recovery_entries(args.recover, args), args.output, args.masks,
                     None if args.eval is None else _data_list(args.eval),
                     args.eval_tokens, args.overwrite, progress=not args.no_progress)
    for name, row in report["perplexity"].items():
        print(f"{name}: one-shot {row['one_shot']:.2f} -> recovered {row['pruned']:.2f}")
    for part in report["recovery"]["parts"]:
        val = [h["val_loss"] for h in part["history"] if "val_loss" in h]
        print(f"recovery {part['part']}: {part['tokens']:,} tokens, held-out loss {part['val_loss_before']:.3f} -> "
              f"{val[-1]:.3f}, {part['seconds']:.0f} s")
    print(f"saved: {args.output}")
    return 0


def _cmd_apply_masks(args) -> int:
    from .api import MaskSet, apply_masks
    from .export.save import claimed_output, save_pruned
    from .models.loading import load_model

    adapters = sorted(p.parent.name for p in Path(args.model).glob("*/adapter_config.json"))
    if adapters:
        raise PrunewiseError(f"{args.model} carries the adapter(s) {', '.join(a + '/' for a in adapters)} beside its "
                             "weights, which apply-masks would drop; apply the masks to the model it was pruned from, "
                             "or recover with the adapter merged (--recover lora:merge=true)")
    with claimed_output(args.output, args.overwrite, source=[args.model, args.masks]):  # neither input replaced
        masks = MaskSet.load(args.masks)  # checked against its checksum, then against the model before any change
        model, tokenizer = load_model(args.model)
        apply_masks(model, masks)
        save_pruned(model, tokenizer, args.output, {"masks.safetensors": masks.to_bytes()}, overwrite=args.overwrite,
                    source=args.model)
    print(f"saved: {args.output} ({masks.removed():,} masked weights" +
          (f", {len(masks.units)} blocks sliced" if masks.units else "") + ")")
    return 0


def _ray_flag(parser, what: str) -> None:
    parser.add_argument("--ray", nargs="?", const="default", default=None, metavar="ADDRESS",
                        help=f"run on Ray ({what}): alone, the cluster RAY_ADDRESS names or else a local instance on "
                             "this machine's cores; local (always a new local instance), auto (the cluster `ray start` "
                             "runs here) or an address (ray://HEAD:10001); needs pip install 'prunewise[ray]'")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None:  # the command line: a TERM (or an INT that a background shell ignores) stops cleanly too
        import signal

        if args.command == "sweep":  # the report's figures import pyplot after the first cell: an interrupt inside
            from .allocation.plan import pyplot  # that import leaves matplotlib half-imported, so import it first

            pyplot()

        signal.signal(signal.SIGTERM, _interrupt)
        signal.signal(signal.SIGINT, _interrupt)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _quiet_libraries()
    if argv is None:  # this process is ours: freed block-sized tensors go back to the system (no creeping peak)
        from .engine.streaming import return_freed_memory

        return_freed_memory()
    try:
        return args.func(args)
    except PrunewiseError as exc:
        print(f"prunewise: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "sweep":
            print(f"prunewise: interrupted; finished cells are kept in {args.output}/cells, rerun the same command "
                  "to finish only the missing ones", file=sys.stderr)
        else:
            print("prunewise: interrupted; no output was written and the source model is untouched", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
