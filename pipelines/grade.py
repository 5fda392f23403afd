"""`dynllava grade`: a caption job's output graded against the references in its input, joined by id, with the
graders of `dynllava eval --data` (dynllava.row_grading: VQAv2 accuracy, exact match and token F1 for short
answers, token F1 for long ones, the shapes grader's attribute F1 for shape-scene captions) and the keep ratios
and savings the job's rows recorded."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from dynllava.config import SparsityConfig
from pipelines.evaluate import (EvalData, SettingResult, Tally, grade_job_output, job_references, references,
                                setting_result)


@dataclass(frozen=True)
class JobGrade:
    """A job's output as graded so far."""

    result: SettingResult  # quality, keep ratios and savings over the answered rows; errors by kind
    pending: int  # input rows with no answer in the output yet (the job has not reached them)


def grade_output(input_path: str, output: str | Path, data: EvalData | None = None) -> JobGrade:
    """Join the output rows to the input's references by id and grade them. Rows whose answer is an error are
    counted by kind, not graded; input rows without output are counted as pending."""
    data = data or EvalData(input_path)
    table, spec = job_references(data)
    refs = references(table, data, spec.id_column)
    tally = Tally()
    answered = grade_job_output(output, refs, "job", tally, [])
    result = setting_result(tally, SparsityConfig(), len(refs))
    return JobGrade(dataclasses.replace(result, label=str(output), sparsity={}), len(refs) - len(answered))


def grade_lines(graded: JobGrade) -> list[str]:
    """The summary `dynllava grade` prints: one line of counts, then one metric per line (those that apply)."""
    r = graded.result
    errors = ", ".join(f"{n} {kind}" for kind, n in sorted(r.errors.items())) or "none"
    lines = [f"graded {r.n_graded} of {r.n_rows} rows ({graded.pending} not answered yet; errors: {errors})"]
    metrics = [("score", r.score if r.n_graded else None), ("vqa_accuracy", r.vqa_accuracy),
               ("exact_match", r.exact_match), ("token_f1", r.token_f1), ("caption_attribute_f1", r.shapes_caption_f1),
               ("image_keep", r.image_keep), ("text_keep", r.text_keep)]
    lines += [f"  {name:<24} {value:.3f}" for name, value in metrics if value is not None]
    lines += [f"  {name:<24} {value:+.1%}" for name, value in (("flops_saved", r.flops_saved),
                                                                ("kv_bytes_saved", r.kv_bytes_saved))]
    return lines
