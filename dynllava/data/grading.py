"""Grading answers against the shape scenes' references: captions and descriptions are parsed back into
objects (attribute F1), VQA answers are compared after normalisation (exact match)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from dynllava.data.shapes import COLOURS, NUMBER_WORDS, POSITIONS, SHAPES, SIZES

_OBJECT = re.compile(
    r"\ba (?:(?P<size>" + "|".join(SIZES) + r") )?(?P<colour>" + "|".join(COLOURS) + r") (?P<shape>"
    + "|".join(SHAPES) + r")(?: is at the (?P<position>" + "|".join(sorted(POSITIONS, key=len, reverse=True))
    + r"))?\b",
    re.IGNORECASE,
)
ATTRIBUTES = ("shape", "colour", "size", "position")


def parse_objects(text: str) -> list[dict[str, str]]:
    """Objects introduced with "a ..." in a caption or description, as {attribute: value} for the attributes
    the text states. ("the red circle" in a relation refers back to an object and is not counted.)"""
    return [{k: v.lower() for k, v in m.groupdict().items() if v} for m in _OBJECT.finditer(text)]


@dataclass
class F1Counts:
    """Micro-averaged attribute F1 over a set of answers."""

    true_positive: int = 0
    predicted: int = 0
    reference: int = 0

    def add(self, other: "F1Counts") -> None:
        self.true_positive += other.true_positive
        self.predicted += other.predicted
        self.reference += other.reference

    @property
    def precision(self) -> float:
        return self.true_positive / self.predicted if self.predicted else 0.0

    @property
    def recall(self) -> float:
        return self.true_positive / self.reference if self.reference else 0.0

    @property
    def f1(self) -> float:
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0


def attribute_counts(prediction: str, reference: str) -> F1Counts:
    """Attribute facts shared by predicted and reference objects, each predicted object matched to the unmatched
    reference object it agrees with most. Only attribute kinds the reference states are counted."""
    refs = parse_objects(reference)
    preds = parse_objects(prediction)
    kinds = {k for obj in refs for k in obj}
    counts = F1Counts(reference=sum(len(o) for o in refs))
    unmatched = list(range(len(refs)))
    for pred in preds:
        facts = {k: v for k, v in pred.items() if k in kinds}
        counts.predicted += len(facts)
        if not unmatched:
            continue
        agree = [sum(refs[j].get(k) == v for k, v in facts.items()) for j in unmatched]
        best = max(range(len(unmatched)), key=lambda i: agree[i])
        counts.true_positive += agree[best]
        unmatched.pop(best)
    return counts


def normalise_answer(text: str) -> str:
    """Lower-case, first line, no punctuation, number words as digits: "Four." -> "4"."""
    text = text.strip().splitlines()[0] if text.strip() else ""
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w for w in words)


def vqa_correct(prediction: str, reference: str) -> bool:
    return normalise_answer(prediction) == normalise_answer(reference)


@dataclass
class Scores:
    """Aggregated grades of one evaluation run."""

    caption: F1Counts = field(default_factory=F1Counts)  # caption and describe tasks together
    vqa_right: int = 0
    vqa_total: int = 0
    per_task: dict[str, list[int]] = field(default_factory=dict)  # task -> [right or F1 x1000 sum, n]

    def add(self, task: str, prediction: str, reference: str) -> None:
        if task.startswith("vqa"):
            ok = vqa_correct(prediction, reference)
            self.vqa_right += ok
            self.vqa_total += 1
            value = int(ok) * 1000
        else:
            counts = attribute_counts(prediction, reference)
            self.caption.add(counts)
            value = round(counts.f1 * 1000)
        bucket = self.per_task.setdefault(task, [0, 0])
        bucket[0] += value
        bucket[1] += 1

    @property
    def vqa_accuracy(self) -> float:
        return self.vqa_right / self.vqa_total if self.vqa_total else 0.0

    def summary(self) -> dict[str, float]:
        out = {"caption_attribute_f1": self.caption.f1, "vqa_accuracy": self.vqa_accuracy}
        out.update({f"{task}_score": total / 1000 / n for task, (total, n) in sorted(self.per_task.items())})
        return out
