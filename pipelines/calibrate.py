"""`dynllava calibrate`: measure what each sparsity setting costs in quality on a sample of the user's own rows,
and write the cheapest settings within a tolerance of dense as the SLA's ladder (preferred -> floor), so the
controller never goes below a measured floor.

A setting passes when the upper end of the confidence interval of its quality loss (paired per-row differences
against dense, in points of the row score x 100) is within the tolerance. The interval's width falls as
1/sqrt(rows): for each setting the report says how many rows would resolve it. The pure parts (statistics,
the choice of the ladder) take no model and are tested on their own.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable

import numpy as np
import yaml

from dynllava.config import SparsityConfig, setting_label
from pipelines.evaluate import SettingResult, say

VISION_GRID = (1.0, 0.5, 0.35, 0.2, 0.1, 0.05)
TEXT_GRID = (1.0, 0.5, 0.3)
FREE_VISION_SCORERS = ("fastv", "stride")  # training-free scorers tried when the model has no predictors
FREE_TEXT_SCORERS = ("recent", "h2o")


@dataclass(frozen=True)
class Point:
    """One setting's measured loss against dense and its cost."""

    label: str  # setting_label of the setting
    vision_keep: float
    text_keep: float
    rows: int  # rows graded under both this setting and dense
    loss: float  # mean per-row score loss vs dense, points (score x 100); negative = better than dense
    loss_low: float  # the confidence interval of the loss, points
    loss_high: float
    rows_needed: int | None  # rows for the interval's upper end to fall within the tolerance (None: the loss
    #                          itself is above it, no sample size resolves it)
    flops_fraction: float  # FLOPs spent as a fraction of dense (measured over the rows)
    kv_bytes_saved: float
    passes: bool  # loss_high <= tolerance

    @property
    def cost(self) -> float:
        """The mean of the FLOPs and the KV bytes spent, as fractions of dense: the controller tightens for
        latency (compute) and for memory (the cache), so a step down the ladder should save one or both."""
        return (self.flops_fraction + 1 - self.kv_bytes_saved) / 2


def paired_loss(dense: dict[str, float], sparse: dict[str, float], tolerance: float, confidence: float,
                ) -> tuple[int, float, float, float, int | None]:
    """Per-row scores (id -> score in [0, 1]) of dense and a setting -> (rows, loss, low, high, rows needed), in
    points. The normal interval of the mean paired difference; rows needed solves mean + z * sd / sqrt(n) =
    tolerance."""
    ids = sorted(set(dense) & set(sparse))
    if not ids:
        return 0, math.nan, math.nan, math.nan, None
    d = np.array([dense[i] - sparse[i] for i in ids]) * 100
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
    half = z * sd / math.sqrt(len(d))
    if mean >= tolerance:
        needed = None
    elif sd == 0:
        needed = len(d)
    else:
        needed = max(2, math.ceil((z * sd / (tolerance - mean)) ** 2))
    return len(d), mean, mean - half, mean + half, needed


def choose_ladder(points: list[Point]) -> list[Point]:
    """The ladder from dense (keep 1.0 / 1.0, always first) to the cheapest passing setting (the floor, by
    `Point.cost`), through as many passing settings as can be ordered so that each keeps no more of either kind
    of token than the one before and costs less (a longest chain: smaller steps for the controller). `points`
    must include dense."""
    passing = [p for p in points if p.passes]
    dense = next(p for p in passing if p.vision_keep >= 1 and p.text_keep >= 1)
    floor = min(passing, key=lambda p: (p.cost, -p.vision_keep, -p.text_keep))
    nodes = sorted((p for p in passing if p.vision_keep >= floor.vision_keep and p.text_keep >= floor.text_keep),
                   key=lambda p: (p is not dense, -p.cost))

    def follows(a: Point, b: Point) -> bool:  # b may come after a on the ladder
        return b.vision_keep <= a.vision_keep and b.text_keep <= a.text_keep and b.cost < a.cost

    best: dict[str, list[Point]] = {}  # label -> longest chain from dense ending there
    for node in nodes:
        if node is dense:
            best[node.label] = [dense]
            continue
        chains = [best[prev.label] for prev in nodes if prev.label in best and follows(prev, node)]
        if chains:
            best[node.label] = max(chains, key=len) + [node]
    return best.get(floor.label, [dense])


def grid(scorers: tuple[str, str], vision: tuple[float, ...] = VISION_GRID, text: tuple[float, ...] = TEXT_GRID,
         ) -> list[SparsityConfig]:
    """Dense and every (vision_keep, text_keep) of the grid with the given (vision, text) scorers."""
    keeps = [(v, t) for v in sorted({1.0, *vision}, reverse=True) for t in sorted({1.0, *text}, reverse=True)]
    return [SparsityConfig(v, t, vision_scorer=scorers[0], text_scorer=scorers[1]) for v, t in keeps]


def axis_sweep(vision: tuple[float, ...] = VISION_GRID, text: tuple[float, ...] = TEXT_GRID) -> list[SparsityConfig]:
    """For a model without predictors: dense, and each training-free scorer alone on its axis (to pick one per
    axis)."""
    out = [SparsityConfig()]
    out += [SparsityConfig(v, 1.0, vision_scorer=s) for s in FREE_VISION_SCORERS for v in vision if v < 1]
    return out + [SparsityConfig(1.0, t, text_scorer=s) for s in FREE_TEXT_SCORERS for t in text if t < 1]


def best_scorers(results: list[SettingResult]) -> tuple[str, str]:
    """The training-free vision and text scorers with the highest mean score over an axis sweep."""
    def mean_score(axis: str, scorer: str) -> float:
        other = "text_keep" if axis == "vision" else "vision_keep"
        scores = [r.score for r in results if r.label != "dense" and r.sparsity[f"{axis}_scorer"] == scorer
                  and r.sparsity[other] == 1.0]
        return float(np.mean(scores)) if scores else -1.0

    return (max(FREE_VISION_SCORERS, key=lambda s: mean_score("vision", s)),
            max(FREE_TEXT_SCORERS, key=lambda s: mean_score("text", s)))


def scores_by_setting(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per-row records (evaluate's) -> setting label -> id -> score (graded rows only)."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["score"] is not None:
            out.setdefault(r["setting"], {})[r["id"]] = r["score"]
    return out


def measure(results: list[SettingResult], rows: list[dict[str, Any]], tolerance: float,
            confidence: float) -> list[Point]:
    """A Point per setting from an evaluation (results and per-row records including dense)."""
    scores = scores_by_setting(rows)
    dense = next(r for r in results if r.label == "dense")
    points = []
    for r in results:
        n, loss, low, high, needed = paired_loss(scores.get("dense", {}), scores.get(r.label, {}), tolerance,
                                                 confidence)
        points.append(Point(r.label, r.sparsity["vision_keep"], r.sparsity["text_keep"] or 1.0, n, loss, low, high,
                            needed, 1 - r.flops_saved, r.kv_bytes_saved,
                            r is dense or (n > 0 and high <= tolerance)))
    return points


def calibrated_sla(base: dict[str, Any], ladder: list[Point]) -> dict[str, Any]:
    """The base SLA (as YAML data) with the measured ladder and its ends as preferred and floor."""
    steps = [{"vision_keep": p.vision_keep, "text_keep": p.text_keep} for p in ladder]
    out = dict(base)
    out.update(preferred=dict(steps[0]), floor=dict(steps[-1]), ladder=steps if len(steps) > 1 else None)
    if len(steps) > 1:
        out["pacing"] = {**(base.get("pacing") or {}), "levels": len(steps) - 1}
    return out


def report(points: list[Point], ladder: list[Point], tolerance: float, confidence: float, scorers: tuple[str, str],
           title: str) -> str:
    """calibration.md: what was measured, which settings pass, the ladder, and how many rows each needs."""
    on = {p.label for p in ladder}
    lines = [f"# {title}", "",
             f"Loss = mean per-row score loss vs dense in points (score x 100), with its {confidence:.0%} "
             f"interval. A setting passes when the interval's upper end is within the tolerance, {tolerance:g} "
             f"point{'' if tolerance == 1 else 's'}. "
             f"Scorers: vision {scorers[0]}, text {scorers[1]}.", "",
             "| setting | rows | loss | interval | rows needed | FLOPs spent | KV saved | cost | passes | ladder |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in sorted(points, key=lambda p: -p.cost):
        needed = "-" if p.label == "dense" else ("never (loss above tolerance)" if p.rows_needed is None
                                                   else str(p.rows_needed))
        lines.append(f"| {p.label} | {p.rows} | {p.loss:+.2f} | [{p.loss_low:+.2f}, {p.loss_high:+.2f}] | {needed} "
                     f"| {p.flops_fraction:.3f} | {p.kv_bytes_saved:+.1%} | {p.cost:.3f} | "
                     f"{'yes' if p.passes else 'no'} | "
                     f"{'yes' if p.label in on else ''} |")
    floor = ladder[-1]
    lines += ["", f"Ladder ({len(ladder)} steps, preferred -> floor): " + " -> ".join(
        f"{p.vision_keep:g}/{p.text_keep:g}" for p in ladder) + f". Floor: {floor.label} "
        f"({floor.flops_fraction:.3f} of dense FLOPs, KV saved {floor.kv_bytes_saved:.1%}, loss {floor.loss:+.2f} "
        f"points). Cost = the mean of the FLOPs and KV bytes spent, as fractions of dense."]
    if len(ladder) == 1:
        unresolved = [p for p in points if p.rows_needed is not None and p.label != "dense"]
        hint = (f" The closest setting ({min(unresolved, key=lambda p: p.rows_needed).label}) needs about "
                f"{min(p.rows_needed for p in unresolved)} rows." if unresolved else "")
        lines.append("No sparse setting is resolved within the tolerance on this sample: the controller stays "
                     "dense. More rows narrow the intervals; a larger tolerance admits more." + hint)
    return "\n".join(lines) + "\n"


def calibrate(evaluate: Callable[[list[SparsityConfig]], tuple[list[SettingResult], list[dict[str, Any]]]],
              learned: bool, tolerance: float, confidence: float, base_sla: dict[str, Any], output: str | Path,
              title: str, vision: tuple[float, ...] = VISION_GRID, text: tuple[float, ...] = TEXT_GRID,
              progress: Callable[[str], None] = say) -> dict[str, Path]:
    """Run the sweep (the `vision` x `text` keep grid) through `evaluate(settings) -> (results, rows)`, choose
    the ladder, and write sla.yaml, calibration.md, calibration.json and calibration.png (with the `plot` extra)
    into `output`."""
    from cluster.sla import SLA
    from dynllava.plots import plot_calibration

    scorers = ("learned", "learned")
    if not learned:
        progress("no predictors: choosing the training-free scorers on an axis sweep")
        results, _ = evaluate(axis_sweep(vision, text))
        scorers = best_scorers(results)
    results, rows = evaluate(grid(scorers, vision, text))
    points = measure(results, rows, tolerance, confidence)
    ladder = choose_ladder(points)
    sla = calibrated_sla(base_sla, ladder)
    SLA.from_dict(sla)  # what is written loads
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"sla": out / "sla.yaml", "markdown": out / "calibration.md", "json": out / "calibration.json"}
    header = (f"# Written by `dynllava calibrate` ({title}). Measured with vision_scorer {scorers[0]} and text_scorer "
              f"{scorers[1]}:\n# run the actors with those scorers. Keys as in configs/sla.yaml.\n")
    paths["sla"].write_text(header + yaml.safe_dump(sla, sort_keys=False))
    paths["markdown"].write_text(report(points, ladder, tolerance, confidence, scorers, title))
    paths["json"].write_text(json.dumps({"title": title, "tolerance": tolerance, "confidence": confidence,
                                         "scorers": scorers, "points": [{**asdict(p), "cost": p.cost} for p in points],
                                         "ladder": [p.label for p in ladder],
                                         "results": [asdict(r) for r in results]}, indent=1))
    on = {p.label for p in ladder}
    png = plot_calibration([{**asdict(p), "cost": p.cost, "on_ladder": p.label in on,
                             "short": f"{p.vision_keep:g}/{p.text_keep:g}"} for p in points if p.rows],
                           out / "calibration.png", tolerance, title)
    if png:
        paths["png"] = png
    return paths


