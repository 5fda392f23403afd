"""`dynllava grade`: a job's output joined to its input's references on the id, graded as `eval --data` grades."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from dynllava.cli import main
from pipelines.stages import OUTPUT_COLUMNS


def _output_rows(ids: list[str], captions: list[str | None]) -> pa.Table:
    """Output rows as the caption job writes them: an answer, or an input error (None)."""
    n = len(ids)
    cols = {c: [0] * n for c in OUTPUT_COLUMNS}
    cols.update(id=ids, caption=captions, generated_at=[""] * n,
                error=[None if c is not None else "unreadable image" for c in captions],
                error_kind=[None if c is not None else "input" for c in captions],
                finish_reason=["stop" if c is not None else None for c in captions],
                n_image_tokens=[144] * n, n_image_kept=[29] * n, n_text_admitted=[5] * n, n_text_generated=[10] * n,
                flops_dense=[100.0] * n, flops_sparse=[75.0] * n, kv_bytes_peak=[40.0] * n, kv_bytes_dense=[100.0] * n)
    return pa.table(cols)


def test_grade_joins_on_the_id_and_scores_each_answer(tmp_path, capsys):
    """Two VQA rows (one right, one wrong), two captions (one exact, one half right), a row that failed (an
    error, not graded) and an input row the job has not reached yet (pending)."""
    ref = "two shapes: a red circle and a blue star."
    pq.write_table(pa.table({
        "id": ["q1", "q2", "c1", "c2", "c3", "later"], "image_path": ["scene.png"] * 6,
        "reference": ["3", "top left", ref, ref, ref, "4"],
        "task": ["vqa-count", "vqa-position", "caption", "caption", "caption", "vqa-count"]}), tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    pq.write_table(_output_rows(["c2", "q1", "q2", "c1", "c3"],  # output order is not input order
                                ["two shapes: a red circle and a green square.", "Three.", "bottom", ref, None]),
                   tmp_path / "out" / "part-0.parquet")
    (tmp_path / "out" / "part-9.parquet").write_bytes(b"PAR1")  # a file a killed run left half-written
    assert main(["grade", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    # captions: 4 + 2 attribute facts right of 4 + 4 predicted and 4 + 4 in the references
    precision, recall = 6 / 8, 6 / 8
    f1 = 2 * precision * recall / (precision + recall)
    assert "graded 4 of 6 rows (1 not answered yet; errors: 1 input)" in printed
    assert f"caption_attribute_f1     {f1:.3f}" in printed and "vqa_accuracy             0.500" in printed
    assert "image_keep               0.201" in printed and "flops_saved              +25.0%" in printed
    assert "kv_bytes_saved           +60.0%" in printed


def test_grade_of_a_missing_output_is_one_line(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["a"], "image_path": ["a.png"], "reference": ["3"], "task": ["vqa-count"]}), tmp_path / "in.parquet")
    assert main(["grade", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err and not (tmp_path / "nope").exists()


def test_grade_joins_by_image_path_when_the_input_has_no_id(tmp_path, capsys):
    """The caption job keys an input without an id column by its image path; grade joins the same way."""
    pq.write_table(pa.table({"image_path": ["a.png", "b.png"], "reference": ["3", "4"], "task": ["vqa-count"] * 2}),
                   tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    pq.write_table(_output_rows(["b.png", "a.png"], ["4", "2"]), tmp_path / "out" / "part-0.parquet")
    assert main(["grade", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "graded 2 of 2 rows (0 not answered yet; errors: none)" in printed
    assert "vqa_accuracy             0.500" in printed


def test_grade_refuses_an_input_without_a_row_id(tmp_path, capsys):
    pq.write_table(pa.table({"image": [b"png"], "reference": ["3"]}), tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    assert main(["grade", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]) == 2
    assert "no 'id' column and no 'image_path' column" in capsys.readouterr().err
