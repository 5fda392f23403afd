"""The charts: every panel labelled, every series drawn in its own colour, and no chart without matplotlib
(tables only, with a hint)."""

from __future__ import annotations

import builtins

import pytest
from PIL import Image

from dynllava import plots
from dynllava.config import SparsityConfig


def _colours(path) -> set[tuple[int, int, int]]:
    image = Image.open(path).convert("RGB")
    return {c for _, c in image.getcolors(1 << 20)}


def _hex(colour: str) -> tuple[int, int, int]:
    return tuple(int(colour[i : i + 2], 16) for i in (1, 3, 5))


def test_eval_sweep_draws_a_line_per_scorer_on_each_axis(tmp_path, monkeypatch):
    def result(label, s: SparsityConfig, score):
        return {"label": label, "sparsity": s.to_dict(), "score": score}

    results = [result("dense", SparsityConfig(), 0.9),
               result("v stride .5", SparsityConfig(0.5, 1.0, vision_scorer="stride"), 0.8),
               result("v fastv .5", SparsityConfig(0.5, 1.0, vision_scorer="fastv"), 0.7),
               result("t recent .5", SparsityConfig(1.0, 0.5, text_scorer="recent"), 0.85)]
    labels = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (labels.extend(
        (ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes), real_save(fig, path))[1])
    path = plots.plot_eval_sweep(results, tmp_path / "eval.png", {"score": "score (0-1)"}, "test")
    assert path.exists()
    assert len(labels) == 2 and all(x and y == "score (0-1)" for x, y in labels)
    assert "log scale" in labels[0][0] and labels[0][0].startswith("vision_keep")
    colours = _colours(path)
    assert _hex(plots.COLOURS[0]) in colours and _hex(plots.COLOURS[1]) in colours  # stride and fastv lines


def test_timeline_panels_and_no_chart_without_matplotlib(tmp_path, monkeypatch, caplog):
    panels = [plots.Panel("TTFT p95 (s)", {"a": [(0, 1.0), (10, 2.0)], "b": [(0, 0.5), (10, 0.7)]},
                          {"target": 1.5}),
              plots.Panel("replicas", {"a": [(0, 1.0), (5, 2.0)]}, steps=True, y_max=3)]
    path = plots.save_panels(tmp_path / "t.png", "timeline", panels, marks={"step": 5.0})
    assert path.exists() and _hex(plots.COLOURS[1]) in _colours(path)
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert plots.save_panels(tmp_path / "none.png", "x", panels) is None
    assert not (tmp_path / "none.png").exists() and "dynllava[plot]" in caplog.text


@pytest.mark.parametrize("on_ladder", [True, False])
def test_calibration_chart(tmp_path, on_ladder):
    points = [{"label": "dense", "cost": 1.0, "loss": 0.0, "loss_low": 0.0, "loss_high": 0.0, "on_ladder": True},
              {"label": "v.5", "cost": 0.8, "loss": 0.5, "loss_low": -0.5, "loss_high": 1.5, "on_ladder": on_ladder}]
    path = plots.plot_calibration(points, tmp_path / "c.png", 1.0, "calibration")
    assert path.exists() and _hex(plots.COLOURS[1]) in _colours(path)  # the tolerance line
