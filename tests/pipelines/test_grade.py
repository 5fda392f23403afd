"""`dynllava grade`: a job's output joined to its input's references on the id, graded with the shapes grader."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from dynllava.cli import main


def test_grade_joins_on_the_id_and_scores_each_answer(tmp_path, capsys):
    """Two VQA rows (one right, one wrong), two captions (one exact, one half right), a row that failed (graded
    as an empty answer) and an input row the job has not reached yet (not graded)."""
    ref = "two shapes: a red circle and a blue star."
    pq.write_table(pa.table({
        "id": ["q1", "q2", "c1", "c2", "c3", "later"],
        "reference": ["3", "top left", ref, ref, ref, "4"],
        "task": ["vqa-count", "vqa-position", "caption", "caption", "caption", "vqa-count"]}), tmp_path / "in.parquet")
    (tmp_path / "out").mkdir()
    pq.write_table(pa.table({
        "id": ["c2", "q1", "q2", "c1", "c3"],  # output order is not input order
        "caption": ["two shapes: a red circle and a green square.", "Three.", "bottom", ref, None]}),
        tmp_path / "out" / "part-0.parquet")
    (tmp_path / "out" / "part-9.parquet").write_bytes(b"PAR1")  # a file a killed run left half-written
    assert main(["grade", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    # captions: 4 + 2 + 0 attribute facts right of 4 + 4 + 0 predicted and 4 + 4 + 4 in the references
    precision, recall = 6 / 8, 6 / 12
    f1 = 2 * precision * recall / (precision + recall)
    assert "graded 5 rows" in printed
    assert f"caption_attribute_f1     {f1:.3f}" in printed and "vqa_accuracy             0.500" in printed


def test_grade_of_a_missing_output_is_one_line(tmp_path, capsys):
    pq.write_table(pa.table({"id": ["a"], "reference": ["3"], "task": ["vqa-count"]}), tmp_path / "in.parquet")
    assert main(["grade", "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err and not (tmp_path / "nope").exists()
