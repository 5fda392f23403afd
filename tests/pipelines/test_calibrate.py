"""`dynllava calibrate`: the interval and the rows it needs, the choice of the ladder (pure, on hand-made points),
the SLA it writes (loaded by cluster.sla, its floor measured within the tolerance) and a controller that never
orders a setting below that floor; then calibrate end to end on the embedded `tiny` and on a model without
predictors (training-free scorers chosen per axis)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from cluster.policy import PolicyContext, PolicyState, decide
from cluster.sla import SLA, KeepSetting, load_sla
from dynllava.telemetry import TelemetrySnapshot
from dynllava.config import SparsityConfig, setting_label
from pipelines.calibrate import Point, calibrated_sla, choose_ladder, measure, paired_loss
from pipelines.evaluate import SettingResult


def test_paired_loss_interval_and_rows_needed():
    dense = {str(i): 1.0 for i in range(100)}
    sparse = {**dense, **{str(i): 0.0 for i in range(5)}}  # 5 of 100 rows lost: 5 points
    n, loss, low, high, needed = paired_loss(dense, sparse, tolerance=10.0, confidence=0.95)
    sd = math.sqrt((5 * (100 - 5) ** 2 + 95 * 5 ** 2) / 99)  # of the differences, in points
    half = 1.959964 * sd / 10
    assert (n, loss) == (100, pytest.approx(5.0)) and (low, high) == (pytest.approx(5 - half, abs=1e-4),
                                                                      pytest.approx(5 + half, abs=1e-4))
    assert needed == math.ceil((1.959964 * sd / 5) ** 2)
    assert paired_loss(dense, sparse, tolerance=5.0, confidence=0.95)[4] is None, "the loss is the tolerance"
    assert paired_loss(dense, dense, 1.0, 0.95) == (100, 0.0, 0.0, 0.0, 100)
    assert paired_loss(dense, {"x": 1.0}, 1.0, 0.95)[0] == 0, "no row in common"


def test_a_setting_passes_on_its_interval_not_its_mean():
    """Two settings with the same mean loss (2 points) at a 3-point tolerance: one loses 2 points on every row
    (a tight interval: passes), the other loses everything on 2% of rows (a wide interval: not resolved)."""
    settings = [SparsityConfig(), SparsityConfig(0.5, 1.0, vision_scorer="stride"),
                SparsityConfig(0.2, 1.0, vision_scorer="stride")]
    scores = [lambda i: 1.0, lambda i: 0.98, lambda i: 0.0 if i < 2 else 1.0]
    rows = [{"id": str(i), "setting": setting_label(s), "score": f(i)} for s, f in zip(settings, scores)
            for i in range(100)]
    results = [SettingResult(setting_label(s), s.to_dict(), 100, 100, {}, 0.0, None, None, None, None, None, 1.0,
                             1.0, saved, 0.0) for s, saved in zip(settings, (0.0, 0.2, 0.4))]
    dense, tight, wide = measure(results, rows, tolerance=3.0, confidence=0.95)
    assert dense.passes and (tight.loss, wide.loss) == (pytest.approx(2.0), pytest.approx(2.0))
    assert tight.passes and tight.loss_high == pytest.approx(2.0)
    assert not wide.passes and wide.loss_high > 3.0 and wide.rows_needed > 100
    assert (tight.flops_fraction, wide.flops_fraction) == (pytest.approx(0.8), pytest.approx(0.6))


def point(label: str, v: float, t: float, flops: float, kv_saved: float, passes: bool) -> Point:
    return Point(label, v, t, 50, 0.0, -1.0, 1.0 if passes else 9.0, 50, flops, kv_saved, passes)


POINTS = [point("dense", 1, 1, 1.0, 0.0, True), point("t.5", 1, 0.5, 1.0, 0.1, True),
          point("v.5", 0.5, 1, 0.8, 0.2, True), point("v.5t.5", 0.5, 0.5, 0.8, 0.3, True),
          point("v.2", 0.2, 1, 0.6, 0.4, True), point("v.2t.5", 0.2, 0.5, 0.6, 0.5, False),
          point("v.1", 0.1, 1, 0.5, 0.5, False), point("v.2t.3", 0.2, 0.3, 0.62, 0.55, True)]


def test_the_ladder_runs_from_dense_to_the_cheapest_passing_setting_in_monotone_steps():
    ladder = choose_ladder(POINTS)
    assert ladder[0].label == "dense" and ladder[-1].label == "v.2t.3"  # cost 0.535: the cheapest that passes
    assert [p.label for p in ladder] == ["dense", "t.5", "v.5t.5", "v.2t.3"]  # a longest monotone chain
    for a, b in zip(ladder, ladder[1:]):
        assert b.vision_keep <= a.vision_keep and b.text_keep <= a.text_keep and b.cost < a.cost
    assert all(p.passes for p in ladder)
    assert [p.label for p in choose_ladder([POINTS[0], POINTS[6]])] == ["dense"], "nothing passes: stay dense"


def snap(level_keep: KeepSetting, ttft: float) -> TelemetrySnapshot:
    return TelemetrySnapshot("r0", "serve", 0.0, 30.0, 5.0, 150, ttft, ttft, None, None, None, 3, 1, 0, 0, 10, 100,
                             {"vision_keep": level_keep.vision_keep, "text_keep": level_keep.text_keep}, 0, 1.0, 0)


def test_the_written_sla_loads_and_the_controller_never_orders_below_its_floor(tmp_path):
    ladder = choose_ladder(POINTS)
    base = yaml.safe_load(open("configs/sla.yaml"))
    path = tmp_path / "sla.yaml"
    path.write_text(yaml.safe_dump(calibrated_sla(base, ladder)))
    sla = load_sla(path)
    assert sla.floor == KeepSetting(0.2, 0.3) and sla.preferred == KeepSetting(1.0, 1.0)
    assert [sla.keep_at(level) for level in range(sla.pacing.levels + 1)] == [
        KeepSetting(p.vision_keep, p.text_keep) for p in ladder]
    assert sla.online == SLA.from_dict(base).online, "the rest of the base SLA is kept"
    # far over the TTFT target for a long time: the policy walks down the ladder and stays at its floor
    state, keep, ordered = PolicyState(), sla.preferred, []
    for now in range(0, 120, 2):
        decisions, state = decide(PolicyContext(float(now), sla, (snap(keep, ttft=10.0),), {"serve": 1}), state)
        for d in decisions:
            if d.action == "set_sparsity":
                ordered.append(d.value)
                keep = d.value
    assert ordered and ordered[-1] == sla.floor
    allowed = {KeepSetting(p.vision_keep, p.text_keep) for p in ladder}
    assert set(ordered) <= allowed, "only measured settings are ordered"
    with pytest.raises(ValueError, match="at least as sparse"):
        SLA.from_dict({"ladder": [{"vision_keep": 0.5, "text_keep": 1}, {"vision_keep": 1, "text_keep": 1}]})
    with pytest.raises(ValueError, match="unknown keys"):
        SLA.from_dict({"ladder": [{"vision_keep": 1, "text_keep": 1}, {"vision": 0.5}]})


def _shape_rows(tmp_path, n: int) -> str:
    from dynllava.data.shapes import SPLIT_SEEDS, write_parquet

    path = tmp_path / "sample.parquet"
    write_parquet(str(path), n, SPLIT_SEEDS["validation"], progress=False)
    return str(path)


def _calibrate(tmp_path, model: str, n_rows: int, tolerance: float, *extra: str) -> dict:
    from dynllava.cli import main

    out = tmp_path / "cal"
    assert main(["calibrate", "--data", _shape_rows(tmp_path, n_rows), "--model", model, "--output", str(out),
                 "--tolerance", str(tolerance), "--max-new-tokens", "24", "--perplexity-rows", "0", *extra]) == 0
    report = json.loads((out / "calibration.json").read_text())
    sla = load_sla(out / "sla.yaml")
    points = {p["label"]: p for p in report["points"]}
    floor = points[report["ladder"][-1]]
    assert (sla.floor.vision_keep, sla.floor.text_keep) == (floor["vision_keep"], floor["text_keep"])
    assert floor["loss_high"] <= tolerance, "the floor's measured loss is within the tolerance"
    assert all(points[label]["passes"] for label in report["ladder"])
    assert (out / "calibration.md").read_text().count("\n| ") == len(points) + 2  # header, rule, rows
    assert (out / "calibration.png").stat().st_size > 10_000
    return report


@pytest.mark.slow
def test_calibrate_on_tiny_writes_a_measured_ladder(tmp_path):
    report = _calibrate(tmp_path, "tiny", 24, 10.0, "--vision-grid", "0.5,0.2", "--text-grid", "0.5")
    assert report["scorers"] == ["learned", "learned"]
    assert len(report["points"]) == 6 and len(report["ladder"]) >= 2, report["ladder"]


def test_calibrate_without_predictors_picks_training_free_scorers(tmp_path, tiny_yaml):
    report = _calibrate(tmp_path, tiny_yaml, 6, 100.0, "--vision-grid", "0.5", "--text-grid", "0.5")
    assert report["scorers"][0] in ("fastv", "stride") and report["scorers"][1] in ("recent", "h2o")
    assert report["ladder"][-1] != "dense", "everything passes a 100-point tolerance: the floor is sparse"
