"""Reports: ``results.json``, a Markdown table (``results.md``) and a bar chart (``results.png``).

``results`` maps checkpoint label -> task -> metric -> value (a fraction in [0, 1], or ``None`` where a
metric is undefined, e.g. top-5 with fewer than 5 classes). The Markdown and the chart show percentages,
checkpoints side by side, and the difference second minus first in percentage points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from softclip.pipeline.io import atomic_path, atomic_write_json, atomic_write_text

__all__ = ["METRIC_TITLES", "Results", "format_markdown", "metric_title", "plot_results", "write_report"]

Results = dict[str, dict[str, dict[str, float | None]]]

METRIC_TITLES = {
    "top1": "top-1",
    "top5": "top-5",
    "mean_per_class_recall": "mean per-class recall",
}


def metric_title(metric: str) -> str:
    """Human-readable metric name: ``image_to_text_R@1`` -> ``image→text R@1``."""
    if metric in METRIC_TITLES:
        return METRIC_TITLES[metric]
    return metric.replace("image_to_text_", "image→text ").replace("text_to_image_", "text→image ")


def _metrics_of(results: Results, labels: Sequence[str], task: str) -> list[str]:
    metrics: list[str] = []
    for label in labels:
        for metric in results[label].get(task, {}):
            if metric not in metrics:
                metrics.append(metric)
    return metrics


def _percent(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _delta(first: float | None, second: float | None) -> str:
    if first is None or second is None:
        return "n/a"
    return f"{100 * (second - first):+.2f}"


def format_markdown(
    results: Results, labels: Sequence[str], tasks: Sequence[str], task_notes: dict[str, str] | None = None
) -> str:
    """One Markdown table per task: a row per checkpoint, a column per metric (in %), and with two or
    more checkpoints a last row ``Δ (second − first)`` in percentage points."""
    lines = ["# Zero-shot evaluation", "", "All numbers are percentages; Δ is in percentage points.", ""]
    for task in tasks:
        metrics = _metrics_of(results, labels, task)
        if not metrics:
            continue
        note = (task_notes or {}).get(task)
        lines += [f"## {task}" + (f" ({note})" if note else ""), ""]
        lines.append("| checkpoint | " + " | ".join(metric_title(m) for m in metrics) + " |")
        lines.append("|---|" + "---:|" * len(metrics))
        for label in labels:
            row = results[label].get(task, {})
            lines.append(f"| {label} | " + " | ".join(_percent(row.get(m)) for m in metrics) + " |")
        if len(labels) >= 2:
            first, second = results[labels[0]].get(task, {}), results[labels[1]].get(task, {})
            cells = " | ".join(_delta(first.get(m), second.get(m)) for m in metrics)
            lines.append(f"| Δ ({labels[1]} − {labels[0]}) | {cells} |")
        lines.append("")
    return "\n".join(lines)


def plot_results(results: Results, labels: Sequence[str], tasks: Sequence[str], path: str | Path,
                 chance: Results | None = None) -> Path:
    """Grouped bar chart, one panel per task, one bar colour per checkpoint, a dashed line at each metric's
    chance level (``chance``: task -> metric -> fraction, optional); written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in tasks if _metrics_of(results, labels, t)]
    num_cols = min(3, max(1, len(tasks)))
    num_rows = math.ceil(len(tasks) / num_cols) if tasks else 1
    fig, axes = plt.subplots(num_rows, num_cols, figsize=(5.2 * num_cols, 3.8 * num_rows), squeeze=False)
    width = 0.8 / max(1, len(labels))
    for ax, task in zip(axes.flat, tasks):
        metrics = _metrics_of(results, labels, task)
        for i, label in enumerate(labels):
            row = results[label].get(task, {})
            values = [100 * (row.get(m) if row.get(m) is not None else math.nan) for m in metrics]
            xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(metrics))]
            bars = ax.bar(xs, values, width, label=label, color=f"C{i}")
            ax.bar_label(bars, labels=["n/a" if math.isnan(v) else f"{v:.1f}" for v in values], fontsize=7, padding=1)
        for j, metric in enumerate(metrics):
            level = (chance or {}).get(task, {}).get(metric)
            if level is not None:
                ax.hlines(100 * level, j - 0.45, j + 0.45, colors="black", linestyles="--", linewidth=1,
                          label="chance" if j == 0 else None)
        ax.set_title(task, fontsize=11)
        ax.set_xticks(range(len(metrics)), [metric_title(m).replace(" R@", "\nR@") for m in metrics],
                      fontsize=8, rotation=0)
        ax.set_ylim(0, 109)
        ax.set_ylabel("%")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    handles, names = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper right", ncol=max(1, len(names)), frameon=False)
    fig.suptitle("Zero-shot evaluation (%, higher is better)", x=0.01, ha="left", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


def write_report(out_dir: str | Path, payload: dict[str, Any]) -> dict[str, Path]:
    """Write ``results.json`` (``payload`` as is), ``results.md`` and ``results.png`` into ``out_dir``.

    ``payload`` needs ``"labels"`` (ordered checkpoint labels), ``"tasks"`` (ordered task names) and
    ``"results"`` (:data:`Results`); ``"task_notes"`` (task -> short description) and ``"chance"`` (task ->
    metric -> chance level, drawn on the chart) are optional.
    """
    out_dir = Path(out_dir)
    labels, tasks, results = payload["labels"], payload["tasks"], payload["results"]
    paths = {
        "json": atomic_write_json(out_dir / "results.json", payload),
        "markdown": atomic_write_text(
            out_dir / "results.md", format_markdown(results, labels, tasks, payload.get("task_notes"))
        ),
        "chart": plot_results(results, labels, tasks, out_dir / "results.png", payload.get("chance")),
    }
    return paths
