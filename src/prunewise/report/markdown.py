"""Readable text of a pruning run: the details part of report.md, and the summary the command line prints."""

from __future__ import annotations

from ..allocation.plan import AllocationPlan


def report_markdown(report: dict, plan: AllocationPlan, details_only: bool = False) -> str:
    """A readable summary of a pruning run (``details_only``: the search, row-wise, structured and module parts)."""
    lines = [] if details_only else [f"# prunewise report: {report['model']}", "",
             f"- score: **{report['score']}**, structure: **{report['structure']}**, allocation: **{report['allocation']}**",
             f"- target sparsity {report['target_sparsity']:.4f}, achieved {report['achieved_sparsity']:.4f} "
             f"(of all parameters: {report['sparsity_of_all_parameters']:.4f})",
             "- timings: " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings"].items()),
             f"- peak RSS {report['peak_rss_mb']:.0f} MB", ""]
    if report.get("perplexity") and not details_only:
        lines += ["| data | dense | pruned | ratio |", "|---|---|---|---|"]
        for name, row in report["perplexity"].items():
            lines.append(f"| {name} | {row['dense']:.2f} | {row['pruned']:.2f} | {row['pruned'] / row['dense']:.2f}x |")
        lines.append("")
    if report.get("adapter"):
        a = report["adapter"]
        lines += [f"Low-rank adapter (EoRA, rank {', '.join(map(str, a['ranks']))}) on {a['modules']} modules: "
                  f"{a['parameters']:,} parameters, {a['bytes'] / 2**20:.1f} MB, a PEFT LoRA adapter in `{a['folder']}/` "
                  "(`PeftModel.from_pretrained(model, folder)`); the sparse weights keep their zeros.", ""]
    stats = plan.layer_stats if isinstance(plan.layer_stats, dict) else {}
    if stats.get("history"):
        tracked = [h for h in stats["history"] if h.get("tracking_fitness") is not None]
        lines += [f"Search: started from **{stats['start']}** (KL on the tracking windows: " +
                  ", ".join(f"{k} {v:.4f}" for k, v in stats["start_fitness"].items()) +
                  f"); {stats['history'][-1]['generation']} generations in {stats['seconds']['total']:.0f} s, "
                  f"{stats['variants_pruned']} pruned variants; tracking KL by generation: " +
                  ", ".join(f"{h['generation']}: {h['tracking_fitness']:.4f}" for h in tracked), ""]
    if plan.rows:
        spans = [max(v) - min(v) for v in plan.rows.values()]
        lines += [f"Row-wise (TRIM): {len(plan.rows)} modules with per-row sparsities; widest row range "
                  f"{max(spans):.3f}, median {sorted(spans)[len(spans) // 2]:.3f}.", ""]
    if report.get("structured"):
        lines += structured_markdown(report["structured"])
    if report.get("cholesky_retries"):
        lines += ["Cholesky needed more dampening for: " + ", ".join(f"{k} ({v:g})" for k, v in report["cholesky_retries"].items()), ""]
    lines += ["| module | planned | achieved |", "|---|---|---|"]
    for name, row in report["modules"].items():
        lines.append(f"| {name} | {row['planned']:.4f} | {row['sparsity']:.4f} |")
    return "\n".join(lines) + "\n"


def structured_markdown(info: dict) -> list[str]:
    """The structured part of report.md: parameters before and after, and each block's widths."""
    b, a = info["params_before"], info["params_after"]
    lines = [f"Structured: {info['removed_targeted_params']:,} of {info['targeted_params']:,} targeted parameters removed "
             f"({info['removed_share_of_targeted']:.2%}); all parameters {b['total']:,} -> {a['total']:,}, decoder "
             f"{b['decoder']:,} -> {a['decoder']:,} ({info['removed_share_of_decoder']:.2%} of it removed); ideal speedup "
             f"{info['ideal_speedup']:.3f}x; saved with a **{info['config']}** config"
             + (f"; removed blocks: {info['removed_blocks']}" if info.get("removed_blocks") else "") + ".", "",
             "| block | query heads | kv heads | MLP channels | o_proj bias | down_proj bias |", "|---|---|---|---|---|---|"]
    for row in info["layers"]:
        lines.append(f"| {row['block']} | {row['num_attention_heads']} | {row['num_key_value_heads']} | "
                     f"{row['intermediate_size']} | {'yes' if row['o_proj_bias'] else ''} | "
                     f"{'yes' if row['down_proj_bias'] else ''} |")
    return lines + [""]


def format_prune_report(report: dict, recipe) -> str:
    lines = [f"prunewise: {recipe.model} | {report['score']} + {report['allocation']} | {report['structure']} | "
             f"target {report['target_sparsity']:.4f}, achieved {report['achieved_sparsity']:.4f}"]
    if report.get("perplexity"):
        recovered = any("one_shot" in row for row in report["perplexity"].values())
        spread = all(row.get("ratio_ci95") for row in report["perplexity"].values())
        lines.append(f"{'perplexity':<14}{'dense':>10}" + (f"{'one-shot':>10}{'recovered':>11}" if recovered else
                                                            f"{'pruned':>10}") + f"{'ratio':>8}"
                     + (f"{'ratio 95% CI':>18}{'dense ±':>9}{'pruned ±':>10}" if spread else ""))
        for name, row in report["perplexity"].items():
            mid = f"{row['one_shot']:>10.2f}{row['pruned']:>11.2f}" if recovered else f"{row['pruned']:>10.2f}"
            line = f"{name:<14}{row['dense']:>10.2f}{mid}{row['pruned'] / row['dense']:>7.2f}x"
            if spread:
                lo, hi = row["ratio_ci95"]

                def half(ci, value):
                    return f"{100 * (ci[1] - ci[0]) / 2 / value:.1f}%" if ci else "-"

                line += (f"{f'[{lo:.2f}, {hi:.2f}]':>18}{half(row.get('dense_ci95'), row['dense']):>9}"
                         f"{half(row.get('pruned_ci95'), row['pruned']):>10}")
            lines.append(line)
        if spread:
            windows = sorted({row["windows"] for row in report["perplexity"].values()})
            lines.append(f"(95% intervals from the spread between the {'/'.join(map(str, windows))} evaluation "
                         "windows of each set, the ratio's paired window by window; more --eval-tokens narrow them)")
    for part in (report.get("recovery") or {}).get("parts", []):
        val = [h["val_loss"] for h in part["history"] if "val_loss" in h]
        lines.append(f"recovery {part['part']}: {part['tokens']:,} tokens, {part['steps']} steps, held-out loss "
                     f"{part['val_loss_before']:.3f} -> {val[-1]:.3f}, {part['seconds']:.0f} s"
                     + (f", adapter in {part['adapter']['folder']}/" if part.get("adapter") else ", merged"))
    t = report["timings"]
    lines.append(f"allocation {t.get('allocation_s', 0):.1f} s, pruning {t.get('prune_s', 0):.1f} s, "
                 f"peak RSS {report['peak_rss_mb']:.0f} MB")
    if report.get("cholesky_retries"):
        lines.append(f"Cholesky needed more dampening in {len(report['cholesky_retries'])} modules (see report.json)")
    if report.get("tasks"):
        from .figures import mean_metric, mean_retention

        dense, pruned = report["tasks"]["dense"], report["tasks"]["pruned"]
        lines.append(f"zero-shot mean acc over {len(dense)} tasks: dense {mean_metric(dense):.3f}, pruned "
                     f"{mean_metric(pruned):.3f}, retention {(mean_retention(dense, pruned) or 0):.0%}")
    if report.get("adapter"):
        a = report["adapter"]
        lines.append(f"low-rank adapter (rank {', '.join(map(str, a['ranks']))}) on {a['modules']} modules: "
                     f"{a['parameters']:,} parameters, {a['bytes'] / 2**20:.1f} MB, PEFT LoRA in {a['folder']}/")
    if recipe.output:
        lines.append(f"saved: {recipe.output} (model, masks.safetensors, recipe.yaml, plan.json, report.html, report.md, report.json)")
    return "\n".join(lines)
