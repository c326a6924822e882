"""The report's matplotlib figures, as PNG bytes."""

from __future__ import annotations

import io
import math
import re

import numpy as np

from ..allocation.plan import figure_png, pyplot
from ..tasks.suite import retention

COLORS = {"wanda": "#1f77b4", "sparsegpt": "#d62728", "magnitude": "#7f7f7f", "fluctuation": "#2ca02c",
          "taylor": "#9467bd"}


def _color(i: int, name: str) -> str:
    return COLORS.get(name.split(" ")[0], f"C{i % 10}")


def mean_metric(tasks: dict, metric: str = "acc") -> float:
    return sum(t[metric] for t in tasks.values()) / len(tasks)


def mean_retention(dense: dict, pruned: dict, metric: str = "acc") -> float | None:
    values = [r for name in dense if (r := retention(dense[name], pruned[name], metric)) is not None]
    return sum(values) / len(values) if values else None


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _log_scale_if_possible(ax, values) -> None:
    """Log scale when some value can be drawn on it (a NaN or infinite perplexity never crashes a plot)."""
    if any(_finite(v) for v in values):
        ax.set_yscale("log")


def perplexity_bars(perplexity: dict) -> bytes:
    """Dense vs pruned perplexity per corpus (log scale); a NaN or infinite value is written, not drawn."""
    plt = pyplot()
    names = list(perplexity)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(names) + 1.5), 3.0))
    try:
        xs = range(len(names))
        values = []
        for offset, key, color in ((-0.2, "dense", "#444"), (0.2, "pruned", "#1f77b4")):
            ys = [perplexity[n][key] for n in names]
            values += ys
            ax.bar([x + offset for x in xs], [y if _finite(y) else 0 for y in ys], 0.4, label=key, color=color)
            for x, y in zip(xs, ys):
                if not _finite(y):
                    ax.annotate(str(y), (x + offset, 0), xycoords=("data", "axes fraction"), ha="center",
                                va="bottom", color="#b00", fontsize=8)
        ax.set_xticks(list(xs), names)
        _log_scale_if_possible(ax, values)
        ax.set_ylabel("perplexity")
        ax.legend(fontsize=8)
        ax.set_title("perplexity, dense vs pruned", fontsize=9)
        return figure_png(fig)
    finally:
        plt.close(fig)


def task_bars(dense: dict, pruned: dict | None, metric: str = "acc") -> bytes:
    """Accuracy per task with 95% intervals, dense (and pruned), chance marked."""
    plt = pyplot()
    names = list(dense)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(names) + 2), 3.4))
    try:
        xs = list(range(len(names)))
        series = [("dense", dense, "#444")] + ([("pruned", pruned, "#1f77b4")] if pruned else [])
        width = 0.8 / len(series)
        for k, (label, data, color) in enumerate(series):
            ys = [data[n][metric] for n in names]
            ci = [data[n][f"{metric}_ci95"] for n in names]
            err = [[y - lo for y, (lo, _) in zip(ys, ci)], [hi - y for y, (_, hi) in zip(ys, ci)]]
            ax.bar([x - 0.4 + width * (k + 0.5) for x in xs], ys, width, yerr=err, label=label, color=color,
                   error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.scatter(xs, [dense[n]["chance"] for n in names], marker="_", s=400, color="black", zorder=3, label="chance")
        ax.set_xticks(xs, [n.split("/")[-1][:18] for n in names], rotation=25, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
        ax.set_title(f"zero-shot {metric} per task (95% Wilson intervals)", fontsize=9)
        return figure_png(fig)
    finally:
        plt.close(fig)


def retention_bars(dense: dict, pruned: dict, metric: str = "acc") -> bytes:
    """Share of the dense model's above-chance accuracy that the pruned model keeps, per task."""
    plt = pyplot()
    names = [n for n in dense if retention(dense[n], pruned[n], metric) is not None]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(names) + 2), 3.0))
    try:
        values = [retention(dense[n], pruned[n], metric) for n in names]
        ax.bar(range(len(names)), values, color=["#2ca02c" if v >= 0.8 else "#ff7f0e" if v >= 0.5 else "#d62728"
                                                  for v in values])
        ax.axhline(1.0, color="#444", linewidth=0.8, linestyle="--", label="dense")
        ax.axhline(0.0, color="black", linewidth=0.8, label="chance")
        ax.set_xticks(range(len(names)), [n.split("/")[-1][:18] for n in names], rotation=25, ha="right", fontsize=7)
        ax.set_ylabel(f"retention ({metric} above chance)")
        ax.legend(fontsize=7)
        ax.set_title("retention per task", fontsize=9)
        return figure_png(fig)
    finally:
        plt.close(fig)


def _nan_if_none(value: float | None) -> float:
    """A gap in the curve (not a fake zero) where a value is undefined."""
    return float("nan") if value is None else value


def _series(cells: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for cell in cells:
        out.setdefault(cell["label"], []).append(cell)
    return {k: sorted(v, key=lambda c: c["sparsity"]) for k, v in out.items()}


def sweep_perplexity(dense: dict, cells: list[dict]) -> bytes:
    """Perplexity vs sparsity per method, one panel per corpus, the dense model as a line."""
    plt = pyplot()
    corpora = list(dense.get("perplexity", {}))
    fig, axes = plt.subplots(1, max(1, len(corpora)), figsize=(4.2 * max(1, len(corpora)), 3.2), squeeze=False)
    try:
        for ax, corpus in zip(axes[0], corpora):
            values: list[float] = []
            for i, (label, series) in enumerate(_series(cells).items()):
                pts = [(c["sparsity"], c["perplexity"][corpus]) for c in series
                       if _finite(c.get("perplexity", {}).get(corpus))]  # a NaN/inf cell is a gap in the curve
                values += [p[1] for p in pts]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label, color=_color(i, label))
            if _finite(dense["perplexity"][corpus]):
                values.append(dense["perplexity"][corpus])
                ax.axhline(dense["perplexity"][corpus], color="#444", linestyle="--", linewidth=1, label="dense")
            _log_scale_if_possible(ax, values)
            ax.set_xlabel("sparsity")
            ax.set_ylabel("perplexity")
            ax.set_title(corpus, fontsize=9)
            ax.legend(fontsize=7)
        return figure_png(fig)
    finally:
        plt.close(fig)


def sweep_accuracy(dense: dict, cells: list[dict], metric: str = "acc") -> bytes:
    """Mean accuracy over the suite and mean retention vs sparsity, with the dense model and chance as lines."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.2))
    try:
        tasks = dense["tasks"]
        ax, ax2 = axes
        for i, (label, series) in enumerate(_series(cells).items()):
            xs = [c["sparsity"] for c in series]
            ax.plot(xs, [mean_metric(c["tasks"], metric) for c in series], "o-", label=label, color=_color(i, label))
            ax2.plot(xs, [_nan_if_none(mean_retention(tasks, c["tasks"], metric)) for c in series], "o-", label=label,
                     color=_color(i, label))
        ax.axhline(mean_metric(tasks, metric), color="#444", linestyle="--", linewidth=1, label="dense")
        ax.axhline(sum(t["chance"] for t in tasks.values()) / len(tasks), color="black", linewidth=0.8, label="chance")
        ax.set_title(f"mean zero-shot {metric} over {len(tasks)} tasks", fontsize=9)
        ax2.axhline(1.0, color="#444", linestyle="--", linewidth=1, label="dense")
        ax2.axhline(0.0, color="black", linewidth=0.8, label="chance")
        ax2.set_title("mean retention of above-chance accuracy", fontsize=9)
        for a in axes:
            a.set_xlabel("sparsity")
            a.legend(fontsize=7)
        return figure_png(fig)
    finally:
        plt.close(fig)


def sweep_task_retention(dense: dict, cells: list[dict], metric: str = "acc") -> bytes:
    """Retention of each task vs sparsity, one panel per method."""
    plt = pyplot()
    series = _series(cells)
    tasks = [n for n in dense["tasks"] if dense["tasks"][n][metric] > dense["tasks"][n]["chance"]]
    fig, axes = plt.subplots(1, len(series), figsize=(4.4 * len(series), 3.3), squeeze=False, sharey=True)
    try:
        for ax, (label, cs) in zip(axes[0], series.items()):
            for i, name in enumerate(tasks):
                ax.plot([c["sparsity"] for c in cs], [retention(dense["tasks"][name], c["tasks"][name], metric)
                                                      for c in cs], "o-", markersize=3, label=name.split("/")[-1][:22],
                        color=f"C{i % 10}")
            ax.axhline(1.0, color="#444", linestyle="--", linewidth=1)
            ax.axhline(0.0, color="black", linewidth=0.8)
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("sparsity")
        axes[0][0].set_ylabel(f"retention ({metric} above chance)")
        axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        return figure_png(fig)
    finally:
        plt.close(fig)


def sweep_cost(cells: list[dict]) -> bytes:
    """Pruning time and peak memory of every cell."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9.0, 3.0))
    try:
        labels = [f"{c['label']} {c['sparsity']:g}" for c in cells]
        xs = range(len(cells))
        axes[0].bar(xs, [sum(c["timings"].get(k, 0.0) for k in ("allocation_s", "prune_s")) for c in cells], color="#1f77b4")
        axes[0].set_ylabel("allocation + pruning, s")
        axes[1].bar(xs, [c["peak_rss_mb"] for c in cells], color="#9467bd")
        axes[1].set_ylabel("peak RSS, MB")
        for a in axes:
            a.set_xticks(list(xs), labels, rotation=35, ha="right", fontsize=7)
        return figure_png(fig)
    finally:
        plt.close(fig)


def plans_heatmap(plans: list[tuple[str, dict]]) -> bytes:
    """Sparsity per block (columns) and module type (rows), one panel per plan: the allocation of every cell."""
    plt = pyplot()
    fig, axes = plt.subplots(len(plans), 1, figsize=(9.0, 0.5 + 1.25 * len(plans)), squeeze=False, sharex=True)
    fig.subplots_adjust(hspace=0.45)
    try:
        image = None
        for ax, (label, modules) in zip(axes[:, 0], plans):
            grid: dict[str, dict[int, float]] = {}
            for name, level in modules.items():
                found = re.search(r"\.(\d+)\.(.+)$", name)
                block, kind = (int(found.group(1)), found.group(2).split(".")[-1]) if found else (0, name)
                grid.setdefault(kind, {})[block] = level
            kinds = list(grid)
            blocks = sorted({b for row in grid.values() for b in row})
            matrix = np.array([[grid[k].get(b, np.nan) for b in blocks] for k in kinds])
            image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
            ax.set_yticks(range(len(kinds)), kinds, fontsize=6)
            ax.set_xticks(range(0, len(blocks), max(1, len(blocks) // 15)),
                          [str(b) for b in blocks[::max(1, len(blocks) // 15)]], fontsize=6)
            ax.set_title(label, fontsize=8, loc="left", pad=2)
        axes[-1, 0].set_xlabel("block", fontsize=7)
        if image is not None:
            fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.02, pad=0.01, label="sparsity")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def expert_usage(layers: list[dict]) -> bytes:
    """Share of each MoE layer's routing slots (rows: layers, columns: experts) on the calibration data; the
    removed experts crossed out."""
    plt = pyplot()
    usage = np.array([layer["usage"] for layer in layers])
    fig, ax = plt.subplots(figsize=(min(12.0, 2.0 + 0.18 * usage.shape[1]), 0.8 + 0.22 * usage.shape[0]))
    try:
        image = ax.imshow(usage, aspect="auto", cmap="magma", interpolation="nearest")
        for row, layer in enumerate(layers):
            for j in layer["removed"]:
                ax.plot(j, row, marker="x", color="cyan", markersize=4, linewidth=0)
        ax.set_yticks(range(len(layers)), [str(layer["block"]) for layer in layers], fontsize=6)
        ax.set_xlabel("expert", fontsize=7)
        ax.set_ylabel("block", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01, label="routing share")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        return buffer.getvalue()
    finally:
        plt.close(fig)


def loss_curves(parts: list[dict]) -> bytes:
    """Training loss per step and held-out loss at each evaluation, one colour per recovery part."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 3.0))
    try:
        for i, part in enumerate(parts):
            color = _color(i, part["part"])
            steps = [h["step"] for h in part["history"] if "loss" in h]
            ax.plot(steps, [h["loss"] for h in part["history"] if "loss" in h], color=color, alpha=0.5, lw=1,
                    label=f"{part['part']} train")
            val = [(0, part["val_loss_before"])] + [(h["step"], h["val_loss"]) for h in part["history"] if "val_loss" in h]
            ax.plot([s for s, _ in val], [v for _, v in val], "o-", color=color, lw=2, ms=3, label=f"{part['part']} held out")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend(fontsize=8)
        ax.set_title("recovery: training and held-out loss", fontsize=9)
        return figure_png(fig)
    finally:
        plt.close(fig)
