"""Charts with matplotlib (the optional `plot` extra: pip install 'dynllava[plot]'): quality vs keep ratio for
an evaluation sweep, the calibration curve, and stacked timelines for the benchmarks. Each function returns the
PNG's path, or None (with a log line saying how to get charts) when matplotlib is not installed."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when the `plot` extra is not installed."""
    try:
        import matplotlib
    except ImportError:
        log.warning("no chart: matplotlib is not installed (pip install 'dynllava[plot]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _only_on(result: dict[str, Any], axis: str) -> bool:
    """A point belongs on an axis' curve when it is sparse on that axis only."""
    other = result["sparsity"]["text_keep" if axis == "vision" else "vision_keep"]
    return other is not None and other >= 1.0 and result["label"] != "dense"


def plot_eval_sweep(results: list[dict[str, Any]], path: str | Path, metrics: dict[str, str], title: str,
                    ) -> Path | None:
    """A row of panels per metric (`metrics`: result key -> axis label): the metric vs vision_keep (a line per
    vision scorer, text dense) and vs text_keep (a line per text scorer, vision dense), each panel only when
    some setting varies that axis alone; the dense point closes every line at keep 1.0 and is drawn as a dotted
    level. `results`: dicts with label, sparsity
    (SparsityConfig.to_dict()) and the metrics (None where a metric does not apply)."""
    plt = _pyplot()
    if plt is None:
        return None
    dense = next((r for r in results if r["label"] == "dense"), None)
    axes_with_points = [a for a in ("vision", "text") if any(_only_on(r, a) for r in results)] or ["vision"]
    fig, axes = plt.subplots(len(metrics), len(axes_with_points), figsize=(5.5 * len(axes_with_points),
                                                                           3.6 * len(metrics)), squeeze=False)
    for row, (metric, metric_label) in enumerate(metrics.items()):
        for ax, axis in zip(axes[row], axes_with_points):
            level = dense[metric] if dense else None
            scorers = list(dict.fromkeys(r["sparsity"][f"{axis}_scorer"] for r in results if _only_on(r, axis)))
            keeps = {1.0}
            for c, scorer in enumerate(scorers):
                points = {(r["sparsity"][f"{axis}_keep"], r[metric]) for r in results if _only_on(r, axis)
                          and r["sparsity"][f"{axis}_scorer"] == scorer and r[metric] is not None}
                if level is not None:
                    points.add((1.0, level))
                if points:
                    xs, ys = zip(*sorted(points))
                    keeps.update(xs)
                    ax.plot(xs, ys, marker="o", color=COLOURS[c % len(COLOURS)], label=scorer)
            if level is not None:
                ax.axhline(level, color="grey", linestyle=":", linewidth=1, label="dense")
            ax.set_xscale("log")
            ax.set_xticks(sorted(keeps), [f"{k:g}" for k in sorted(keeps)])
            ax.minorticks_off()
            ax.set_xlabel(f"{axis}_keep (fraction of {'image' if axis == 'vision' else 'generated'} tokens kept, "
                          "log scale)")
            ax.set_ylabel(metric_label)
            ax.set_title(f"{metric_label}: {axis} sparsity only", fontsize=10)
            ax.grid(True, alpha=0.3)
            if scorers or level is not None:
                ax.legend(loc="best", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_calibration(points: list[dict[str, Any]], path: str | Path, tolerance: float, title: str) -> Path | None:
    """Quality loss against dense (points, with its confidence interval as error bars) vs each setting's cost
    (the mean of the FLOPs and KV bytes spent, as fractions of dense); the tolerance as a line, the chosen
    ladder joined. `points`: dicts with label (or a shorter `short`, drawn beside the point), cost, loss,
    loss_low, loss_high (points of score x 100) and on_ladder."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for on_ladder, colour, name in ((False, "#999999", "measured"), (True, COLOURS[0], "ladder")):
        chosen = [p for p in points if p["on_ladder"] == on_ladder]
        if not chosen:
            continue
        xs = [p["cost"] for p in chosen]
        ys = [p["loss"] for p in chosen]
        err = [[p["loss"] - p["loss_low"] for p in chosen], [p["loss_high"] - p["loss"] for p in chosen]]
        ax.errorbar(xs, ys, yerr=err, fmt="o", color=colour, capsize=3, label=name)
        ordered = sorted(chosen, key=lambda p: p["cost"])
        if on_ladder:
            ax.plot([p["cost"] for p in ordered], [p["loss"] for p in ordered], color=colour)
        for i, p in enumerate(ordered):  # short names, alternately above and below, so neighbours do not collide
            ax.annotate(p.get("short") or p["label"], (p["cost"], p["loss"]), fontsize=7, color=colour,
                        xytext=(4, 5 if i % 2 == 0 else -11), textcoords="offset points")
    unit = "point" if tolerance == 1 else "points"
    ax.axhline(tolerance, color=COLOURS[1], linestyle="--", label=f"tolerance {tolerance:g} {unit}")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("cost: mean of FLOPs and KV bytes spent (fraction of dense)")
    ax.set_title(title + "\n(labels: vision_keep/text_keep)", fontsize=10)
    ax.set_ylabel("quality loss vs dense (points of score x 100)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    return _save(fig, path)


@dataclass
class Panel:
    """One chart of a timeline: a y label with its unit, named series of (x, y) points, horizontal reference
    lines (label -> y), the y range (y_max None: the data's), whether the series are step functions, and named
    events drawn as markers at (x, y) (e.g. a controller's orders)."""

    y_label: str
    series: dict[str, list[tuple[float, float]]]
    references: dict[str, float] = field(default_factory=dict)
    y_min: float = 0.0
    y_max: float | None = None
    steps: bool = False
    events: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def save_panels(path: str | Path, title: str, panels: list[Panel], x_label: str = "seconds",
                marks: dict[str, float] | None = None) -> Path | None:
    """Panels one above the other on a shared x axis; `marks` are labelled vertical lines at x. Legends sit
    outside the axes so they never cover a line."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.6 * len(panels)), sharex=True, squeeze=False)
    names = list(dict.fromkeys(name for p in panels for name in p.series))
    colour = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(names)}
    for ax, panel in zip(axes[:, 0], panels):
        for name, points in panel.series.items():
            if points:
                xs, ys = zip(*points)
                draw = ax.step if panel.steps else ax.plot
                kwargs = {"where": "post"} if panel.steps else {}
                draw(xs, ys, color=colour[name], label=name, **kwargs)
        for name, points in panel.events.items():
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, linestyle="none", marker="v", markersize=5, color="black", label=name)
        for label, y in panel.references.items():
            ax.axhline(y, color="grey", linestyle="--", linewidth=1, label=label)
        for label, x in (marks or {}).items():
            ax.axvline(x, color="#999999", linewidth=0.8)
            ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                        va="top", ha="right")
        ax.set_ylim(panel.y_min, panel.y_max)
        ax.set_ylabel(panel.y_label)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    axes[-1, 0].set_xlabel(x_label)
    fig.suptitle(title)
    return _save(fig, path)
