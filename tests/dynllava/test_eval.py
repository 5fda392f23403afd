"""Evaluation plumbing: teacher-forced likelihood through the engine, achieved keep ratios, written reports."""

from __future__ import annotations

import json
import math

import torch

from dynllava.config import SparsityConfig
from dynllava.engine import teacher_forced_nll
from dynllava.eval import evaluate, plot, sweep_configs, target_checks, split_rows, write_results


def test_dense_teacher_forced_nll_equals_transformers(tiny_model, batch4):
    images, prompts = batch4
    targets = [[5, 17, 200, 33], [9, 9], [40, 41, 42], [7]]
    ours = teacher_forced_nll(tiny_model, images, prompts, targets)
    for i, (nll, n) in enumerate(ours):
        inputs = tiny_model.processor(images=images[i : i + 1], text=prompts[i : i + 1], return_tensors="pt")
        full = torch.cat([inputs["input_ids"], torch.tensor([targets[i]])], 1)
        with torch.no_grad():
            logits = tiny_model.hf_model(input_ids=full, pixel_values=inputs["pixel_values"]).logits[0].float()
        start = inputs["input_ids"].shape[1] - 1
        logp = logits[start : start + len(targets[i])].log_softmax(-1)
        ref = -logp[torch.arange(len(targets[i])), torch.tensor(targets[i])].sum()
        assert n == len(targets[i]) and abs(nll - float(ref)) < 1e-3


def test_evaluate_reports_achieved_ratios_and_writes_reports(tiny_model, tmp_path, monkeypatch):
    # byte-level test tokenizer: keep answers short so every row fits the test model's 256-token context
    import dynllava.eval as ev

    monkeypatch.setattr(ev, "MAX_NEW_TOKENS", {"caption": 6, "describe": 6, "vqa": 3})
    rows = split_rows(8)
    dense = evaluate(tiny_model, rows, SparsityConfig(), perplexity_rows=0)
    sparse = evaluate(tiny_model, rows, SparsityConfig(0.25, 0.5, vision_scorer="stride", text_scorer="recent"),
                      perplexity_rows=0)
    assert dense.label == "dense" and dense.image_keep == 1.0 and dense.text_keep == 1.0
    assert sparse.image_keep == 0.25 and 0.4 <= sparse.text_keep <= 0.6
    assert sparse.kv_bytes_saved > 0 and dense.kv_bytes_saved == 0
    assert 0 <= dense.vqa_accuracy <= 1 and math.isnan(dense.perplexity)  # NLL is tested above
    paths = write_results([dense, sparse], tmp_path, "test-tiny")
    data = json.loads(paths["json"].read_text())
    assert [r["label"] for r in data["results"]] == ["dense", "vision stride 0.25, text recent 0.5"]
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert any("dense VQA" in name for name, _, _ in target_checks([dense, sparse]))


def test_sweep_covers_the_grid():
    with_learned = sweep_configs(learned=True)
    assert len(with_learned) == 2 + 4 * 5 + 3 * 2
    assert len(sweep_configs(learned=False)) == 1 + 3 * 5 + 2 * 2
    assert plot  # the PNG writer is exercised above
