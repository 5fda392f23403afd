"""How one answer is graded against its row's references (pure; `dynllava eval --data` and `calibrate`).

A row is graded by what its reference is:
- a short answer (a `vqa*` task, or any reference of at most SHORT_WORDS words without a task): VQAv2 accuracy
  with VQAv2's normalisation (a list of references = the human answers), exact match and token F1;
- a long answer: token F1, and the reference's perplexity through the sparse engine (measured apart);
- a shape-scene caption or description (task caption / describe and a reference the shapes grammar parses):
  the shapes grader's attribute F1 too.
Every graded row gets one `score` in [0, 1] (VQA accuracy when short, attribute F1 for shape captions, token F1
otherwise): the paired per-row quality that calibration compares across settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dynllava.answer_metrics import exact_match, token_f1, vqa_accuracy
from dynllava.data.grading import attribute_counts, parse_objects

SHORT_WORDS = 3  # without a task column, a reference of at most this many words is a short answer
SHAPE_TASKS = ("caption", "describe")


@dataclass(frozen=True)
class Reference:
    """What one input row is graded against."""

    references: tuple[str, ...]  # one or more acceptable answers (VQAv2: the ten human answers)
    task: str | None  # the row's `task` column, when the input has one
    long: bool  # graded as a long answer (token F1 and perplexity) rather than a short one
    shapes: bool  # a shape-scene caption or description: the shapes grader applies


@dataclass(frozen=True)
class Grade:
    """One answer's grades; None where a metric does not apply to the row."""

    score: float  # the row's quality in [0, 1] (see the module docstring)
    vqa: float | None  # VQAv2 accuracy (short answers)
    exact: float | None  # exact match after normalisation (short answers)
    f1: float  # token F1 (every row)
    shapes_f1: tuple[int, int, int] | None  # attribute F1 counts (true positive, predicted, reference)


def as_references(value) -> tuple[str, ...]:
    """A reference cell (a string, a list of strings, or null) as a tuple of non-empty answers."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(str(v).strip() for v in items if v is not None and str(v).strip())


def reference_of(value, task) -> Reference | None:
    """The grading key of a row from its reference and task cells; None when the row has no reference."""
    refs = as_references(value)
    if not refs:
        return None
    task = None if task is None or (isinstance(task, float) and np.isnan(task)) else str(task)
    if task is not None:
        long = not task.startswith("vqa")
    else:
        long = max(len(r.split()) for r in refs) > SHORT_WORDS
    shapes = long and task in SHAPE_TASKS and bool(parse_objects(refs[0]))
    return Reference(refs, task, long, shapes)


def grade(answer: str, ref: Reference) -> Grade:
    """Grade one answer (see the module docstring)."""
    f1 = token_f1(answer, ref.references)
    if not ref.long:
        vqa = vqa_accuracy(answer, ref.references)
        return Grade(vqa, vqa, exact_match(answer, ref.references), f1, None)
    if ref.shapes:
        c = attribute_counts(answer, ref.references[0])
        return Grade(c.f1, None, None, f1, (c.true_positive, c.predicted, c.reference))
    return Grade(f1, None, None, f1, None)
