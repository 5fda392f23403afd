"""The caption job's config: the YAML mirrors the object, validation, precedence (defaults <- YAML <- flags)."""

from __future__ import annotations

import pytest

from pipelines.config import ActorPool, CaptionJobConfig
from pipelines.sources import detect_kind

from tests.conftest import REPO_ROOT


def test_yaml_mirrors_the_defaults_and_round_trips():
    from_yaml = CaptionJobConfig.from_yaml(REPO_ROOT / "configs" / "caption.yaml")
    assert from_yaml == CaptionJobConfig()
    assert CaptionJobConfig.from_dict(from_yaml.to_dict()) == from_yaml


def test_bad_values_and_unknown_keys_are_rejected():
    with pytest.raises(ValueError, match="unknown top-level keys"):
        CaptionJobConfig.from_dict({"batchsize": 3})
    with pytest.raises(ValueError, match="unknown actors keys"):
        CaptionJobConfig.from_dict({"actors": {"gpus": 1}})
    with pytest.raises(ValueError, match="batch_size"):
        CaptionJobConfig(batch_size=0)
    with pytest.raises(ValueError, match="min_size"):
        ActorPool(min_size=3, max_size=2)
    with pytest.raises(ValueError, match="vision_keep"):
        CaptionJobConfig.from_dict({"sparsity": {"vision_keep": 0}})
    with pytest.raises(ValueError, match="refill_at"):
        CaptionJobConfig(refill_at=0)


def test_refill_at_is_capped_by_the_batch():
    assert CaptionJobConfig(max_batch=4, refill_at=8).engine_limits()["refill_at"] == 4
    assert CaptionJobConfig().engine_limits()["refill_at"] == CaptionJobConfig().refill_at


def test_flags_override_the_yaml():
    base = CaptionJobConfig()
    cfg = base.with_overrides(vision_keep=0.35, text_scorer="recent", batch_size=4, model=None)
    assert (cfg.sparsity.vision_keep, cfg.sparsity.text_scorer, cfg.batch_size, cfg.model) == (0.35, "recent", 4,
                                                                                               base.model)


def test_input_kinds_are_detected(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"")
    (tmp_path / "a" / "y.JPG").write_bytes(b"")
    (tmp_path / "b.jsonl").write_text("{}\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "part-0.parquet").write_bytes(b"")
    assert [detect_kind(str(tmp_path / p))[0] for p in ("a", "b.jsonl", "c")] == ["images", "jsonl", "parquet"]
    monkeypatch.chdir(tmp_path)
    assert detect_kind("b.jsonl") == ("jsonl", str(tmp_path / "b.jsonl"))  # relative -> absolute for the workers
    (tmp_path / "c" / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes"):
        detect_kind(str(tmp_path / "c"))
    with pytest.raises(ValueError, match="no such file"):
        detect_kind(str(tmp_path / "nope"))
