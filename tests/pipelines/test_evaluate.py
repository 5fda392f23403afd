"""`dynllava eval --data` on small Parquet and JSONL inputs whose answers are known: the references are the
model's own dense answers (so dense must score exactly 1), and each sparse answer is checked against
DynamicLlava.generate under that setting, graded independently. Rows without a reference, an image or a prompt
get their own error and are counted; none is lost. On Ray Data the same input gives the same grades."""

from __future__ import annotations

import base64
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dynllava.answer_metrics import vqa_accuracy
from dynllava.config import SparsityConfig
from dynllava.row_grading import grade, reference_of
from pipelines.evaluate import NO_REFERENCE, EvalData, evaluate_in_process
from tests.pipelines.conftest import png_bytes

SPARSE = SparsityConfig(vision_keep=0.5, text_keep=0.5, vision_scorer="stride", text_scorer="recent")
TASKS = ("vqa", "describe")


def _answer(model, image: bytes, prompt: str, sparsity: SparsityConfig, n: int) -> str:
    return model.generate([image], [model.format_prompt(prompt)], sparsity=sparsity, max_new_tokens=n)[0].text.strip()


def _rows(model, n_tokens: int) -> tuple[list[dict], list[dict]]:
    """Eight good rows (references = the dense answers; alternating short and long tasks) and four bad ones."""
    good = []
    for i in range(16):
        image, prompt = png_bytes(i), f"What is in picture {i}?"
        answer = _answer(model, image, prompt, SparsityConfig(), n_tokens)
        if reference_of(answer, None) is not None and len(good) < 8:
            good.append({"id": f"r{i}", "image": image, "prompt": prompt, "reference": answer,
                         "task": TASKS[len(good) % 2]})
    assert len(good) == 8
    bad = [{"id": "no-reference", "image": png_bytes(1), "prompt": "Q?", "reference": None, "task": "vqa"},
           {"id": "empty-prompt", "image": png_bytes(1), "prompt": "  ", "reference": "x", "task": "vqa"},
           {"id": "no-image", "image": None, "prompt": "Q?", "reference": "x", "task": "vqa"},
           {"id": "not-an-image", "image": b"hello", "prompt": "Q?", "reference": "x", "task": "describe"}]
    return good, bad


@pytest.fixture(scope="module")
def known(tiny_model, job_config_module):
    return _rows(tiny_model, job_config_module.max_new_tokens)


@pytest.fixture(scope="module")
def job_config_module(tiny_yaml):
    from pipelines.config import CaptionJobConfig

    return CaptionJobConfig(model=tiny_yaml, max_new_tokens=6, batch_size=4)


def _check(results, rows, good, bad, model, config, multi: bool) -> None:
    dense, sparse = results
    assert (dense.label, sparse.label) == ("dense", "vision stride 0.5, text recent 0.5")
    for r in results:
        assert r.n_rows == 12 and r.n_graded == 8 and r.errors == {"input": 4}, r
    assert dense.score == 1.0 and dense.vqa_accuracy == dense.exact_match == 1.0 and dense.token_f1 == 1.0
    assert dense.image_keep == 1.0 and dense.flops_saved == 0.0 and dense.kv_bytes_saved == 0.0
    assert sparse.image_keep == 0.5 and sparse.flops_saved > 0 and sparse.kv_bytes_saved > 0
    by = {(r["id"], r["setting"]): r for r in rows}
    assert len(by) == len(rows) == 2 * 12, "one record per row and setting"
    scores = []
    for row in good:
        answer = _answer(model, row["image"], row["prompt"], SPARSE, config.max_new_tokens)
        record = by[(row["id"], sparse.label)]
        assert record["answer"] == answer and record["error"] is None
        ref = reference_of([row["reference"]] * 4 if multi else row["reference"], row["task"])
        expected = grade(answer, ref)
        assert record["score"] == pytest.approx(expected.score) and record["f1"] == pytest.approx(expected.f1)
        if row["task"] == "vqa":
            assert record["vqa"] == pytest.approx(vqa_accuracy(answer, ref.references))
        scores.append(expected.score)
    assert sparse.score == pytest.approx(sum(scores) / len(scores))
    errors = {row["id"]: by[(row["id"], "dense")]["error"] for row in bad}
    assert errors["no-reference"] == NO_REFERENCE and errors["empty-prompt"] == "empty prompt"
    assert "no image" in errors["no-image"] and "unreadable image" in errors["not-an-image"]
    assert all(by[(row["id"], "dense")]["error_kind"] == "input" for row in bad)


def test_parquet_dense_scores_one_and_sparse_answers_are_the_engines(tmp_path, tiny_model, known, job_config_module):
    good, bad = known
    pq.write_table(pa.Table.from_pylist(good + bad), tmp_path / "in.parquet")
    results, rows = evaluate_in_process(EvalData(str(tmp_path / "in.parquet")), [SparsityConfig(), SPARSE],
                                        job_config_module, tiny_model, perplexity_rows=3, progress=lambda _: None)
    _check(results, rows, good, bad, tiny_model, job_config_module, multi=False)
    assert results[0].perplexity is not None and results[1].perplexity is not None  # the long rows' references
    assert results[1].perplexity >= 1.0 and results[0].perplexity >= 1.0


def test_jsonl_with_base64_images_lists_of_answers_and_no_id(tmp_path, tiny_model, known, job_config_module):
    """Rows numbered by position when there is no id; four identical human answers make VQAv2 accuracy 1."""
    good, bad = known
    lines = []
    for row in good + bad:
        image = base64.b64encode(row["image"]).decode() if row["image"] is not None else None
        refs = [row["reference"]] * 4 if row["reference"] is not None else None
        lines.append(json.dumps({"image": image, "prompt": row["prompt"], "answers": refs, "task": row["task"]}))
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    data = EvalData(str(tmp_path / "in.jsonl"), reference_column="answers")
    results, rows = evaluate_in_process(data, [SparsityConfig(), SPARSE], job_config_module, tiny_model,
                                        perplexity_rows=0, progress=lambda _: None)
    position = {row["id"]: str(i) for i, row in enumerate(good + bad)}
    renamed = [{**r, "id": next(k for k, v in position.items() if v == r["id"])} for r in rows]
    _check(results, renamed, good, bad, tiny_model, job_config_module, multi=True)
    assert results[0].perplexity is None  # perplexity_rows=0


def test_inputs_eval_cannot_grade_fail_with_one_message(tmp_path, tiny_model, job_config_module):
    pq.write_table(pa.table({"id": ["a", "a"], "image": [png_bytes(0)] * 2, "reference": ["x", "y"]}),
                   tmp_path / "dup.parquet")
    pq.write_table(pa.table({"id": ["a"], "image": [png_bytes(0)]}), tmp_path / "noref.parquet")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "a.png").write_bytes(png_bytes(0))
    for name, message in (("dup.parquet", "repeats"), ("noref.parquet", "no 'reference' column"),
                          ("folder", "no prompts or references")):
        with pytest.raises(ValueError, match=message):
            evaluate_in_process(EvalData(str(tmp_path / name)), [SparsityConfig()], job_config_module, tiny_model)


@pytest.mark.ray
@pytest.mark.slow
def test_on_ray_data_the_grades_are_the_same(ray_local, tmp_path, tiny_yaml, job_config):
    """The Ray runner (a caption job per setting, joined by id) grades like the in-process one (checked on its
    own above), errors and perplexity included."""
    from dynllava.model import DynamicLlava
    from pipelines.evaluate import evaluate_on_ray

    model = DynamicLlava.from_pretrained(tiny_yaml)
    good, bad = _rows(model, job_config.max_new_tokens)
    pq.write_table(pa.Table.from_pylist(good + bad), tmp_path / "in.parquet")
    data = EvalData(str(tmp_path / "in.parquet"))
    on_ray, ray_rows = evaluate_on_ray(data, [SPARSE], job_config, model, tmp_path / "out", perplexity_rows=2,
                                       progress=lambda _: None)
    local, local_rows = evaluate_in_process(data, [SPARSE], job_config, model, perplexity_rows=2,
                                            progress=lambda _: None)
    a, b = on_ray[0], local[0]
    assert (a.label, a.n_rows, a.n_graded, a.errors) == (b.label, 12, 8, {"input": 4})
    for name in ("score", "token_f1", "perplexity", "image_keep", "text_keep", "flops_saved", "kv_bytes_saved"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-9), name  # sums in another order
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(ray_rows, key=key) == sorted(local_rows, key=key)
    assert a.perplexity is not None and a.score > 0
    # without an id column the Ray runner (a resumable caption job per setting) refuses, saying why and what
    # to do, before any work; in process the rows are numbered (test_jsonl_with_base64_images_..._and_no_id)
    pq.write_table(pa.Table.from_pylist([{k: v for k, v in r.items() if k != "id"} for r in good]),
                   tmp_path / "no_id.parquet")
    with pytest.raises(ValueError, match="no 'id' column.*stable id per row"):
        evaluate_on_ray(EvalData(str(tmp_path / "no_id.parquet")), [SPARSE], job_config, model,
                        tmp_path / "out_no_id", perplexity_rows=2, progress=lambda _: None)
    assert not list((tmp_path / "out_no_id").rglob("*.parquet"))


def test_rows_are_counted_without_reading_the_data(tmp_path):
    """How `--runner auto` decides: Parquet footers; JSONL lines (a last line without its newline counts)."""
    from pipelines.sources import count_rows

    pq.write_table(pa.table({"id": [str(i) for i in range(7)]}), tmp_path / "a.parquet")
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n{"id": 2}\n{"id": 3}')
    (tmp_path / "b.jsonl").write_text('{"id": 1}\n{"id": 2}\n')
    assert count_rows(str(tmp_path / "a.parquet")) == 7
    assert count_rows(str(tmp_path / "a.jsonl")) == 3 and count_rows(str(tmp_path / "b.jsonl")) == 2
    assert count_rows(str(tmp_path / "a.jsonl"), stop_after=1) > 1


def test_the_eval_command_writes_its_report(tmp_path, tiny_yaml, capsys):
    """`dynllava eval --data` end to end: dense beside the flags' setting, eval.md / eval.json / rows.parquet /
    eval.png, and one record per row and setting."""
    from dynllava.cli import main

    rows = [{"id": f"q{i}", "image": png_bytes(i), "prompt": "How many?", "reference": "2", "task": "vqa"}
            for i in range(3)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    assert main(["eval", "--data", str(tmp_path / "in.parquet"), "--model", tiny_yaml, "--vision-keep", "0.5",
                 "--vision-scorer", "stride", "--max-new-tokens", "3", "--output", str(tmp_path / "out")]) == 0
    shown = capsys.readouterr().out
    assert "| dense |" in shown and "| vision stride 0.5 |" in shown
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["label"] for r in report["results"]] == ["dense", "vision stride 0.5"]
    assert pq.read_table(tmp_path / "out" / "rows.parquet").num_rows == 6
    assert (tmp_path / "out" / "eval.png").stat().st_size > 10_000 and (tmp_path / "out" / "eval.md").exists()
