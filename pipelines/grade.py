"""Grade a caption job's output against references in its input (the shape scenes carry `reference` and
`task` columns): caption attribute F1 and VQA accuracy with the scorer of dynllava.data.grading."""

from __future__ import annotations

from pathlib import Path

from dynllava.data.grading import Scores


def grade_output(input_path: str, output: str | Path, id_column: str = "id") -> tuple[dict[str, float], int]:
    """Join output rows to input rows on the id; returns (Scores.summary(), rows graded). Rows with an error
    count as empty answers; input rows without output are not graded (the job has not reached them)."""
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    inputs = pads.dataset(input_path, format="parquet").to_table(columns=[id_column, "reference", "task"])
    outputs = pq.read_table(str(output), columns=["id", "caption"])
    captions = dict(zip(outputs.column("id").to_pylist(), outputs.column("caption").to_pylist()))
    scores, n = Scores(), 0
    for row_id, reference, task in zip(*(inputs.column(c).to_pylist() for c in (id_column, "reference", "task"))):
        if row_id in captions:
            scores.add(task, captions[row_id] or "", reference)
            n += 1
    summary = scores.summary()
    if not scores.vqa_total:
        summary.pop("vqa_accuracy")
    if not scores.caption.reference:
        summary.pop("caption_attribute_f1")
    return summary, n
