"""Evaluation plumbing: teacher-forced likelihood through the engine, achieved keep ratios, written reports."""

from __future__ import annotations

import json
import math

import torch

from dynllava.config import SparsityConfig
from dynllava.engine import teacher_forced_nll
import pytest

from dynllava.eval import evaluate, split_rows, sweep_configs, target_checks, write_results


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


def test_evaluate_grades_the_answers_and_counts_the_ratios(tmp_path, monkeypatch):
    """On the shipped tiny (it answers some questions right and some wrong), each figure equals what grading
    each row's own answer and summing its own counts gives: VQA accuracy, caption F1, keep ratios, savings."""
    import dynllava.eval as ev
    from dynllava.data.grading import F1Counts, attribute_counts, vqa_correct
    from dynllava.model import DynamicLlava

    model = DynamicLlava.from_pretrained("tiny", device="cpu", dtype=torch.float32)
    monkeypatch.setattr(ev, "MAX_NEW_TOKENS", {"caption": 20, "describe": 24, "vqa": 4})
    rows = split_rows(40)
    rows = [r for r in rows if r.task == "describe"][:2] + [r for r in rows if r.task != "describe"][:18]
    mixed = []
    for sparsity in (SparsityConfig(), SparsityConfig(0.25, 0.5, vision_scorer="stride", text_scorer="recent")):
        result = evaluate(model, rows, sparsity, perplexity_rows=0, batch_size=5)
        right, f1, image, kept, decided, admitted, flops, kv = [], F1Counts(), 0, 0, 0, 0, [0.0, 0.0], [0, 0]
        for row in rows:
            kind = "vqa" if row.task.startswith("vqa") else row.task
            out = model.generate([row.image], [model.format_prompt(row.prompt)], sparsity=sparsity,
                                 max_new_tokens=ev.MAX_NEW_TOKENS[kind])[0]
            if kind == "vqa":
                right.append(vqa_correct(out.text, row.reference))
            else:
                f1.add(attribute_counts(out.text, row.reference))
            image, kept = image + out.stats.n_image_tokens, kept + out.stats.n_image_kept
            decided += out.stats.n_text_generated - (out.finish_reason == "length")
            admitted += out.stats.n_text_admitted
            flops = [flops[0] + out.stats.flops_dense, flops[1] + out.stats.flops_sparse]
            kv = [kv[0] + out.stats.kv_bytes_dense_equivalent, kv[1] + out.stats.kv_bytes_peak]
        mixed.append(0 < sum(right) < len(right))
        assert result.vqa_accuracy == sum(right) / len(right)
        assert result.caption_attribute_f1 == f1.f1 and result.n_rows == 20
        assert result.image_keep == kept / image and result.text_keep == admitted / decided
        assert result.flops_saved == pytest.approx(1 - flops[1] / flops[0])
        assert result.kv_bytes_saved == pytest.approx(1 - kv[1] / kv[0])
        assert math.isnan(result.perplexity)  # no perplexity rows asked for; NLL is tested above
    assert any(mixed), "the check needs right and wrong answers"
    assert result.image_keep == 0.25 and result.label == "vision stride 0.25, text recent 0.5"


def test_write_results_writes_the_table_json_and_a_chart(tmp_path):
    from PIL import Image

    from dynllava.eval import EvalResult

    def result(label, f1, vqa):
        return EvalResult(label, SparsityConfig().to_dict(), 10, f1, vqa, 1.5, 1.0, 1.0, 0.0, 0.0, {})

    results = [result("dense", 0.9, 0.7), result("vision stride 0.25, text recent 0.5", 0.8, 0.6)]
    paths = write_results(results, tmp_path, "test-tiny")
    data = json.loads(paths["json"].read_text())
    assert [r["label"] for r in data["results"]] == ["dense", "vision stride 0.25, text recent 0.5"]
    assert data["results"][1]["caption_attribute_f1"] == 0.8
    assert "| dense | 0.900 | 0.700 |" in paths["markdown"].read_text()
    chart = Image.open(paths["png"])
    assert chart.width > 200 and chart.height > 100 and len(chart.convert("L").getcolors(4096) or ()) > 2, "blank chart"
    assert any("dense VQA" in name for name, _, _ in target_checks(results))


def test_sweep_covers_the_grid():
    with_learned = sweep_configs(learned=True)
    assert len(with_learned) == 2 + 4 * 5 + 3 * 2
    assert len(sweep_configs(learned=False)) == 1 + 3 * 5 + 2 * 2
