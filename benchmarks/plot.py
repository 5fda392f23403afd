"""Stacked line charts as a PNG with Pillow (a project dependency already), for benchmark timelines."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


@dataclass
class Panel:
    """One chart: a y label, named series of (x, y) points drawn as lines, optional horizontal reference lines
    (label -> y), and the y range (y_max None: the data's maximum; points above y_max are drawn at y_max)."""

    y_label: str
    series: dict[str, list[tuple[float, float]]]
    references: dict[str, float] = field(default_factory=dict)
    y_min: float = 0.0
    y_max: float | None = None
    steps: bool = False  # draw as a step function (counts)


def save_panels(path: str | Path, title: str, panels: list[Panel], x_label: str = "seconds",
                marks: dict[str, float] | None = None, width: int = 1100, panel_height: int = 230) -> None:
    """Draw `panels` one above the other on a shared x axis; `marks` are labelled vertical lines (x)."""
    font = ImageFont.load_default(size=14)
    left, right, top, gap = 80, 170, 70, 55
    height = top + len(panels) * (panel_height + gap) + 10
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 10), title, fill="black", font=font)
    xs = [x for p in panels for s in p.series.values() for x, _ in s] or [0.0, 1.0]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1e-9)
    plot_w = width - left - right
    names = list(dict.fromkeys(name for p in panels for name in p.series))
    colour = {name: COLOURS[i % len(COLOURS)] for i, name in enumerate(names)}
    for i, panel in enumerate(panels):
        y_top = top + i * (panel_height + gap)
        ys = [y for s in panel.series.values() for _, y in s] + list(panel.references.values())
        y_max = panel.y_max if panel.y_max is not None else max(ys + [panel.y_min + 1e-9])
        y_span = max(y_max - panel.y_min, 1e-9)

        def px(x: float, y: float) -> tuple[float, float]:
            y = min(max(y, panel.y_min), y_max)
            return (left + (x - x0) / (x1 - x0) * plot_w,
                    y_top + panel_height - (y - panel.y_min) / y_span * panel_height)

        draw.rectangle([left, y_top, left + plot_w, y_top + panel_height], outline="black")
        for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
            x = x0 + frac * (x1 - x0)
            draw.text((px(x, panel.y_min)[0] - 10, y_top + panel_height + 4), f"{x:.0f}", fill="black", font=font)
        for frac in (0.0, 0.5, 1.0):
            y = panel.y_min + frac * y_span
            draw.text((8, px(x0, y)[1] - 8), f"{y:.3g}", fill="black", font=font)
        draw.text((8, y_top - 22), panel.y_label, fill="black", font=font)
        for label, x in (marks or {}).items():
            draw.line([px(x, panel.y_min), px(x, y_max)], fill="#999999", width=1)
            if i == 0:
                draw.text((px(x, y_max)[0] + 3, y_top + 2), label, fill="#555555", font=font)
        for label, y in panel.references.items():
            draw.line([px(x0, y), px(x1, y)], fill="#777777", width=1)
            draw.text((left + plot_w + 6, px(x1, y)[1] - 8), label, fill="#555555", font=font)
        for name, points in panel.series.items():
            points = sorted(points)
            if panel.steps:
                points = [q for a, b in zip(points, points[1:]) for q in (a, (b[0], a[1]))] + points[-1:]
            if len(points) >= 2:
                draw.line([px(x, y) for x, y in points], fill=colour[name], width=2)
    for j, name in enumerate(names):
        y = top + 20 * j
        draw.line([(width - right + 10, y + 8), (width - right + 30, y + 8)], fill=colour[name], width=3)
        draw.text((width - right + 35, y), name, fill="black", font=font)
    draw.text((left + plot_w // 2 - 20, height - 30), x_label, fill="black", font=font)
    image.save(path)
