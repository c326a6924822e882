"""The report of a pruning run and of a sweep: sections for :mod:`prunewise.report.page`."""

from __future__ import annotations

from ..allocation.plan import AllocationPlan, plot_plan
from ..tasks.suite import retention
from . import figures
from .page import render_html, render_markdown


def _fmt(value, spec: str = ".3f") -> str:
    return "" if value is None else format(value, spec)


def _task_rows(dense: dict, pruned: dict | None) -> list[list]:
    rows = []
    for name, d in dense.items():
        lo, hi = d["acc_ci95"]
        row = [name, d["n"], f"{d['chance']:.3f}", f"{d['acc']:.3f} [{lo:.3f}, {hi:.3f}]", f"{d['acc_norm']:.3f}"]
        if pruned:
            p = pruned[name]
            r = retention(d, p)
            row += [f"{p['acc']:.3f}", f"{p['acc_norm']:.3f}", "" if r is None else f"{r:.0%}"]
        rows.append(row)
    return rows


def _pairs(dense: list[dict], pruned: list[dict]) -> list[dict]:
    return [{"prompt": d["prompt"], "dense": d["completion"], "pruned": p["completion"]} for d, p in zip(dense, pruned)]


def run_sections(report: dict, plan: AllocationPlan | None) -> tuple[str, str, list]:
    """Title, lead line and sections of one pruning run's report."""
    title = f"prunewise report: {report['model']}"
    lead = (f"{report['score']} + {report['allocation']} | {report['structure']} | target sparsity "
            f"{report['target_sparsity']:.4f}, achieved {report['achieved_sparsity']:.4f} "
            f"(of all parameters {report['sparsity_of_all_parameters']:.4f})")
    sections = []
    if report.get("recovery"):
        parts = report["recovery"]["parts"]
        rows = [[n, f"{r['dense']:.2f}", f"{r['one_shot']:.2f}", f"{r['pruned']:.2f}",
                 _fmt((r["one_shot"] - r["pruned"]) / (r["one_shot"] - r["dense"]) if r["one_shot"] != r["dense"]
                      else None, ".0%")]
                for n, r in report.get("perplexity", {}).items() if "one_shot" in r]
        sections.append(("Recovery", [
            ("text", "; ".join(f"{p['part']}: {p['tokens']:,} tokens in {p['steps']} steps, {p['trained_parameters']:,} "
                               f"parameters trained, held-out loss {p['val_loss_before']:.3f} -> "
                               f"{[h['val_loss'] for h in p['history'] if 'val_loss' in h][-1]:.3f}, "
                               f"{p['seconds']:.0f} s" for p in parts) + ". Every pruned weight stayed zero."),
            ("table", ["data", "dense", "one-shot", "recovered", "gap closed"], rows),
            ("figure", "recovery_loss", figures.loss_curves(parts), "recovery: training and held-out loss per step"),
        ]))
    if report.get("perplexity"):
        ppl = report["perplexity"]
        sections.append(("Perplexity", [
            ("table", ["data", "dense", "pruned", "ratio"],
             [[n, f"{r['dense']:.2f}", f"{r['pruned']:.2f}", f"{r['pruned'] / r['dense']:.2f}x"] for n, r in ppl.items()]),
            ("figure", "perplexity", figures.perplexity_bars(ppl), "perplexity per corpus, dense vs pruned (log scale)"),
        ]))
    tasks = report.get("tasks")
    if tasks:
        dense, pruned = tasks["dense"], tasks["pruned"]
        mr = figures.mean_retention(dense, pruned)
        sections.append(("Zero-shot multiple choice", [
            ("text", f"Mean accuracy {figures.mean_metric(dense):.3f} dense, {figures.mean_metric(pruned):.3f} pruned; "
                     f"mean retention of the above-chance accuracy {_fmt(mr, '.0%')}. Retention is "
                     "(pruned - chance) / (dense - chance); tasks where the dense model is at chance have none."),
            ("table", ["task", "n", "chance", "dense acc [95% CI]", "dense acc_norm", "pruned acc", "pruned acc_norm",
                       "retention"], _task_rows(dense, pruned)),
            ("figure", "tasks", figures.task_bars(dense, pruned), "accuracy per task, dense vs pruned, chance marked"),
            ("figure", "retention", figures.retention_bars(dense, pruned), "retention per task"),
        ]))
    experts = report.get("structured", {}).get("experts")
    if experts:
        unreached = sum(layer["unreached"] for layer in experts["layers"])
        sections.append(("Experts", [
            ("text", f"{experts['score']}: {experts['per_layer_before']} -> {experts['per_layer_after']} routed experts "
                     f"per MoE layer ({experts['per_token']} per token); {unreached} expert-layers the calibration data "
                     "never reached (score 0, removed first)."),
            ("table", ["block", "removed experts", "least used share", "most used share"],
             [[layer["block"], ", ".join(map(str, layer["removed"])), f"{min(layer['usage']):.3f}",
               f"{max(layer['usage']):.3f}"] for layer in experts["layers"]]),
            ("figure", "expert_usage", figures.expert_usage(experts["layers"]),
             "routing share of each expert on the calibration data per MoE layer; x: removed"),
        ]))
    if plan is not None and (png := plot_plan(plan)) is not None:
        sections.append(("What was removed where", [
            ("figure", "plan", png, f"allocation plan ({plan.method}): sparsity per block and module type"),
        ]))
    if report.get("completions"):
        c = report["completions"]
        sections.append(("Greedy completions", [("completions", _pairs(c["dense"], c["pruned"]), "pruned")]))
    t = report["timings"]
    sections.append(("Cost", [
        ("table", ["step", "seconds"], [[k.removesuffix("_s"), f"{v:.1f}"] for k, v in t.items()]),
        ("text", f"Peak resident memory {report['peak_rss_mb']:.0f} MB."),
    ]))
    return title, lead, sections


def cell_label(cell: dict) -> str:
    return f"{cell['score']} {cell['allocation']}" + (f" {cell['structure']}" if cell.get("structure", "unstructured")
                                                        != "unstructured" else "")


def sweep_sections(sweep: dict) -> tuple[str, str, list]:
    """Title, lead line and sections of a sweep's report."""
    dense, cells = sweep["dense"], [dict(c, label=cell_label(c)) for c in sweep["cells"]]
    corpora = list(dense.get("perplexity", {}))
    tasks = dense.get("tasks") or {}
    title = f"prunewise sweep: {sweep['model']}"
    lead = (f"{len(cells)} of {sweep['grid_size']} cells: scores {', '.join(sweep['grid']['score'])}; sparsities "
            f"{', '.join(f'{s:g}' for s in sweep['grid']['sparsity'])}; allocations {', '.join(sweep['grid']['allocation'])}"
            f"; structure {sweep['structure']}; calibration {sweep['calibration']}.")
    if sweep.get("failed"):
        lead += " Failed (rerun the sweep to retry them): " + "; ".join(f"{k}: {v}" for k, v in sweep["failed"].items())
    header = ["method", "sparsity"] + [f"ppl {c}" for c in corpora]
    dense_row = ["dense", "0"] + [f"{dense['perplexity'][c]:.2f}" for c in corpora]
    if tasks:
        header += ["mean acc", "retention"]
        dense_row += [f"{figures.mean_metric(tasks):.3f}", "100%"]
    header += ["prune s", "peak RSS MB"]
    dense_row += ["", ""]
    rows = [dense_row]
    for c in sorted(cells, key=lambda c: (c["label"], c["sparsity"])):
        row = [c["label"], f"{c['sparsity']:g}"] + [f"{c['perplexity'][k]:.2f}" for k in corpora]
        if tasks:
            row += [f"{figures.mean_metric(c['tasks']):.3f}", _fmt(figures.mean_retention(tasks, c["tasks"]), ".0%")]
        row += [f"{c['timings'].get('allocation_s', 0) + c['timings'].get('prune_s', 0):.0f}", f"{c['peak_rss_mb']:.0f}"]
        rows.append(row)
    summary = [("table", header, rows)]
    if corpora:
        summary.append(("figure", "sweep_perplexity", figures.sweep_perplexity(dense, cells),
                        "perplexity vs sparsity; dashed: the dense model"))
    sections = [("Results", summary)]
    if tasks:
        per_task = [[name, f"{tasks[name]['chance']:.3f}", f"{tasks[name]['acc']:.3f}"] +
                    [f"{c['tasks'][name]['acc']:.3f}" for c in cells] for name in tasks]
        sections.append(("Zero-shot multiple choice", [
            ("figure", "sweep_accuracy", figures.sweep_accuracy(dense, cells),
             "mean accuracy and retention vs sparsity; dashed: dense, solid: chance"),
            ("figure", "sweep_task_retention", figures.sweep_task_retention(dense, cells),
             "retention per task vs sparsity (tasks where the dense model is above chance)"),
            ("table", ["task", "chance", "dense"] + [f"{c['label']} {c['sparsity']:g}" for c in cells], per_task),
        ]))
    plans = [(f"{c['label']} at {c['sparsity']:g} (achieved {AllocationPlan.model_validate(c['plan']).achieved():.4f})",
              c["plan"]["modules"]) for c in sorted(cells, key=lambda c: (c["label"], c["sparsity"])) if c.get("plan")]
    if plans:
        sections.append(("What was removed where", [
            ("figure", "plans", figures.plans_heatmap(plans), "allocation plans: sparsity per block and module type, "
                                                              "one panel per cell")]))
    shown = [c for c in cells if c.get("completions")]
    if dense.get("completions") and shown:
        mid = sorted({c["sparsity"] for c in shown})[len({c["sparsity"] for c in shown}) // 2]
        blocks = [("completions", _pairs(dense["completions"], c["completions"]), f"{c['label']} {c['sparsity']:g}")
                  for c in shown if c["sparsity"] == mid]
        sections.append((f"Greedy completions at sparsity {mid:g}", blocks))
    sections.append(("Cost", [("figure", "sweep_cost", figures.sweep_cost(cells), "allocation + pruning time and peak "
                                                                                   "resident memory per cell")]))
    return title, lead, sections


def report_files(title: str, lead: str, sections: list, stem: str = "report") -> dict[str, str | bytes]:
    """{relative path: content}: ``{stem}.html`` (self-contained), ``{stem}.md`` and its ``figures/``."""
    text, figs = render_markdown(title, lead, sections)
    return {f"{stem}.html": render_html(title, lead, sections), f"{stem}.md": text, **figs}
