"""Grade a caption job's output against references in its input (the shape scenes carry `reference` and
`task` columns): caption attribute F1 and VQA accuracy with the scorer of dynllava.data.grading."""

from __future__ import annotations

import logging
from pathlib import Path

from dynllava.data.grading import Scores
from pipelines.output import existing_output

log = logging.getLogger(__name__)


def grade_output(input_path: str, output: str | Path, id_column: str = "id") -> tuple[dict[str, float], int]:
    """Join output rows to input rows on the id; returns (Scores.summary(), rows graded). Rows with an error
    count as empty answers; input rows without output are not graded (the job has not reached them)."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    import pyarrow.parquet as pq

    inputs = pads.dataset(input_path, format="parquet").to_table(columns=[id_column, "reference", "task"])
    out = existing_output(output)
    captions, unreadable = {}, []
    for name in sorted(out.parquet_files()):
        try:
            table = pq.read_table(out.join(name), columns=["id", "caption"], filesystem=out.fs)
        except (OSError, pa.ArrowInvalid):  # a file an interrupted run left half-written (not committed)
            unreadable.append(name)
            continue
        captions.update(zip(table.column("id").to_pylist(), table.column("caption").to_pylist()))
    if unreadable:
        log.warning("skipped %d unreadable output file(s), left by an interrupted run and not committed (a rerun "
                    "of the job removes them): %s", len(unreadable), ", ".join(unreadable[:5]))
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
