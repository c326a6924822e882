"""Screen every offline multiple-choice task for the default suite (writes JSON and a markdown table).

Stage 1 scores the first items of every multiple-choice task of the evals 3.0.1.post1 wheel (and of the legacy
bigbench 1.0.0 sdist with --package all, where an index or a mirror still serves it) with the dense model (at most --stage1-items items and --stage1-tokens tokens per task). Tasks whose
stage-1 accuracy is at least --margin above chance, at most --stage2-max of them with the largest z-scores
((acc - chance) / standard error of a chance-level guesser), go to stage 2, which scores
*other* items (after the stage-1 ones, so the screening does not pick its own confirmation sample) up to
--stage2-items items or --stage2-tokens tokens, and reports Wilson 95% intervals. A task qualifies when the
lower end of its stage-2 accuracy interval is above chance -- a 99% interval, stricter than the 95% the README
reports, because dozens of candidates are tested -- above the accuracy the model reaches on the same items
*without their question* (every context replaced by "Answer:"): a task where the choices alone give the answer
(e.g. a "None of the other options are correct." choice that is usually right) measures priors, not ability --
and above always picking the most frequent gold answer (a classification set whose labels are unbalanced). The suite takes the qualifying tasks, most clearly above chance
first, while the whole suite scores within --suite-seconds on this machine; each suite task evaluates exactly
its stage-2 items.

    python bench/screen_tasks.py            # resumable: finished tasks are read back from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prunewise.models.loading import load_model  # noqa: E402
from prunewise.tasks.items import (  # noqa: E402
    MCItem,  # noqa: E402
    get_task,
    list_tasks,
)
from prunewise.tasks.scoring import PairEncoder, mc_metrics, score_items, wilson  # noqa: E402


def cost(encoder, item) -> int:
    """Tokens the shared-context scorer runs for one item."""
    ctx = len(encoder.encode(item.context))
    return ctx + sum(len(encoder.encode(item.context + c)) - ctx for c in item.choices)


def take(task, start, max_items, max_tokens, encoder):
    items, tokens = [], 0
    for item in task.items[start:]:
        c = cost(encoder, item)
        if items and (len(items) >= max_items or tokens + c > max_tokens):
            break
        items.append(item)
        tokens += c
        if len(items) >= max_items or tokens >= max_tokens:
            break
    return items, tokens


def _most_frequent(values: list) -> float:
    return max(values.count(v) for v in set(values)) / len(values)


def save(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--stage1-items", type=int, default=30)
    ap.add_argument("--stage1-tokens", type=int, default=4000)
    ap.add_argument("--max-item-tokens", type=int, default=1500, help="skip tasks whose first item costs more")
    ap.add_argument("--margin", type=float, default=0.1, help="stage-1 accuracy above chance to be a candidate")
    ap.add_argument("--stage2-max", type=int, default=30, help="at most this many candidates, highest stage-1 z first")
    ap.add_argument("--stage2-items", type=int, default=400)
    ap.add_argument("--stage2-tokens", type=int, default=40000)
    ap.add_argument("--suite-seconds", type=float, default=600)
    ap.add_argument("--include", nargs="*", default=[],
                    help="tasks sent to stage 2 whatever their stage-1 rank (tasks with long items, of which stage 1's "
                         "token budget sees only a few)")
    ap.add_argument("--package", choices=["evals", "bigbench", "all"], default="evals",
                    help="which tasks to screen (bigbench 1.0.0 is no longer served by the package index)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/screen_tasks.json"))
    args = ap.parse_args()
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"stage1": {}, "stage2": {}}
    data["settings"] = {k: v for k, v in vars(args).items() if k != "out"}
    model, tokenizer = load_model(args.model)
    encoder = PairEncoder(tokenizer)
    names = sorted(list_tasks(None if args.package == "all" else args.package))
    t0 = time.perf_counter()
    for i, name in enumerate(names, 1):
        if name in data["stage1"]:
            continue
        task = get_task(name)
        first = cost(encoder, task.items[0])
        if first > args.max_item_tokens:
            data["stage1"][name] = {"skipped": f"first item costs {first} tokens", "items_total": len(task.items)}
            save(out, data)
            continue
        items, tokens = take(task, 0, args.stage1_items, args.stage1_tokens, encoder)
        start = time.perf_counter()
        m = mc_metrics(items, score_items(model, tokenizer, items))
        m.update(items_total=len(task.items), tokens=tokens, seconds=time.perf_counter() - start)
        data["stage1"][name] = m
        save(out, data)
        print(f"[{i}/{len(names)} {time.perf_counter() - t0:.0f}s] {name}: n={m['n']} acc {m['acc']:.2f} "
              f"norm {m['acc_norm']:.2f} chance {m['chance']:.2f} ({m['seconds']:.1f}s)", flush=True)
    def z(m):  # stage-1 accuracy above chance, in standard errors of a chance-level guesser
        return (m["acc"] - m["chance"]) / max(1e-9, (m["chance"] * (1 - m["chance"]) / m["n"]) ** 0.5)

    candidates = [n for n, m in data["stage1"].items() if "skipped" not in m and m["acc"] - m["chance"] >= args.margin
                  and m["items_total"] > m["n"]]
    candidates = sorted(candidates, key=lambda n: z(data["stage1"][n]), reverse=True)[:args.stage2_max]
    candidates += [n for n in args.include if n not in candidates]
    for name in candidates:
        m = data["stage1"][name]
        if name in data["stage2"]:
            continue
        task = get_task(name)
        items, tokens = take(task, m["n"], args.stage2_items, args.stage2_tokens, encoder)
        start = time.perf_counter()
        s = mc_metrics(items, score_items(model, tokenizer, items))
        s.update(start=m["n"], tokens=tokens, seconds=time.perf_counter() - start)
        data["stage2"][name] = s
        save(out, data)
        print(f"stage 2 {name}: n={s['n']} acc {s['acc']:.3f} {s['acc_ci95']} norm {s['acc_norm']:.3f} "
              f"chance {s['chance']:.3f} ({s['seconds']:.0f}s)", flush=True)
    for name, s in data["stage2"].items():
        s["acc_ci99"] = wilson(s["correct"], s["n"], z=2.575829)
        if "no_question_acc" not in s and len({it.context for it in get_task(name).items}) == 1:
            s["no_question_acc"] = None  # no per-item question to remove (e.g. sentence order: the choices are it)
            save(out, data)
        if "no_question_acc" not in s:  # the same items with the question removed
            task = get_task(name)
            items = [MCItem("Answer:" if it.choices[0][:1].isspace() else "Answer: ", it.choices, it.gold)
                     for it in task.items[s["start"]:s["start"] + s["n"]]]
            s["no_question_acc"] = mc_metrics(items, score_items(model, tokenizer, items))["acc"]
            save(out, data)
        if "majority_acc" not in s:  # always giving the most frequent gold answer, or the most frequent position
            window = get_task(name).items[s["start"]:s["start"] + s["n"]]
            s["majority_acc"] = max(_most_frequent([it.choices[it.gold[0]] for it in window]),
                                    _most_frequent([it.gold[0] for it in window]))
            save(out, data)
    def floor(s):  # what the task's answers give without reading the question
        return max(s["chance"], s["no_question_acc"] or 0.0, s["majority_acc"])

    qualify = {n: s for n, s in data["stage2"].items() if s["acc_ci99"][0] > floor(s)}
    data["qualifying"] = sorted(qualify)
    suite, total = {}, 0.0
    def margin(s):
        return s["acc_ci99"][0] - floor(s)

    for name, s in sorted(qualify.items(), key=lambda kv: margin(kv[1]), reverse=True):
        if total + s["seconds"] <= args.suite_seconds:
            suite[name] = [s["start"], s["n"]]
            total += s["seconds"]
    data["suite"] = suite
    data["suite_seconds"] = total
    save(out, data)
    lines = ["# Screening of the offline multiple-choice tasks", "",
             f"Model {args.model}; stage 1: {len(data['stage1'])} tasks "
             f"({sum('skipped' in m for m in data['stage1'].values())} skipped as too long); stage 2: "
             f"{len(data['stage2'])} tasks at least {args.margin:.2f} above chance in stage 1 (the {args.stage2_max} "
             "largest z-scores); "
             f"{len(qualify)} qualify (the 99% interval of their stage-2 accuracy is above chance, above the accuracy "
             "without the question and above always picking the most frequent answer); the suite takes "
             f"{len(suite)} of them, {total:.0f} s of scoring here.", "",
             "| task | stage-1 n | stage-1 acc | stage-2 n | chance | acc without question | most frequent answer "
             "| acc [95% CI] | acc 99% CI low | acc_norm [95% CI] | s/item | suite |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def nq(s):
        return "-" if s["no_question_acc"] is None else f"{s['no_question_acc']:.3f}"

    for name, s in sorted(data["stage2"].items(), key=lambda kv: kv[1]["acc_ci99"][0] - kv[1]["chance"], reverse=True):
        m = data["stage1"][name]
        lines.append(f"| {name} | {m['n']} | {m['acc']:.2f} | {s['n']} | {s['chance']:.3f} | {nq(s)} "
                     f"| {s['majority_acc']:.3f} | {s['acc']:.3f} "
                     f"[{s['acc_ci95'][0]:.3f}, {s['acc_ci95'][1]:.3f}] | {s['acc_ci99'][0]:.3f} | {s['acc_norm']:.3f} "
                     f"[{s['acc_norm_ci95'][0]:.3f}, {s['acc_norm_ci95'][1]:.3f}] | {s['seconds'] / s['n']:.2f} | "
                     f"{'yes' if name in suite else 'qualifies' if name in qualify else ''} |")
    lines += ["", "## Stage 1 (every task)", "", "| task | n | acc | acc_norm | chance |", "|---|---|---|---|---|"]
    for name, m in sorted(data["stage1"].items()):
        if "skipped" in m:
            lines.append(f"| {name} | skipped: {m['skipped']} | | | |")
        else:
            lines.append(f"| {name} | {m['n']} | {m['acc']:.2f} | {m['acc_norm']:.2f} | {m['chance']:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:8 + len(data["stage2"])]))
    print("DEFAULT_SUITE = " + json.dumps({k: tuple(v) for k, v in suite.items()}, indent=4))


if __name__ == "__main__":
    main()
