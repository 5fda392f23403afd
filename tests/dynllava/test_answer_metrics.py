"""VQAv2's answer normalisation and accuracy, exact match and token F1, and how rows are graded, on cases worked
out by hand from the rules (dynllava/answer_metrics.py)."""

from __future__ import annotations

import pytest

from dynllava.answer_metrics import exact_match, normalise_vqa, token_f1, vqa_accuracy
from dynllava.row_grading import grade, reference_of


@pytest.mark.parametrize("raw,normal", [
    ("Two.", "2"),
    ("  Yes,\n", "yes"),
    ("The dog", "dog"),
    ("an apple", "apple"),
    ("none", "0"),
    ("1,000", "1000"),
    ("3.5", "3.5"),
    ("3.", "3"),
    ("t-shirt", "t shirt"),
    ("dont know", "don't know"),
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("its red", "its red"),  # a word that is also a spelling of a contraction stays as it is
    ("well", "well"),
    ("Can't tell!", "can't tell"),
    ("dog's bowl", "dog's bowl"),
    ("'quoted'", "quoted"),
    ("left/right", "left right"),
    ("Ten", "10"),
    ("eleven", "eleven"),  # only zero to ten become digits
])
def test_normalisation(raw, normal):
    assert normalise_vqa(raw) == normal


def test_vqa_accuracy_counts_human_answers_leave_one_out():
    ten = ["2"] * 3 + ["3"] * 7
    # "2": each of the 3 "2"s left out leaves 2 matches (2/3); each "3" left out leaves 3 (1)
    assert vqa_accuracy("two", ten) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_accuracy("3", ten) == 1.0
    assert vqa_accuracy("4", ten) == 0.0
    assert vqa_accuracy("Two dogs.", ["2 dogs"]) == 1.0  # one reference: exact match after normalisation
    assert vqa_accuracy("one", ["2"] + ["1"] * 1 + ["4"] * 8) == pytest.approx(1 / 3 * 9 / 10)
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])


def test_exact_match_and_token_f1():
    assert exact_match("The red circle.", ["red circle", "blue"]) == 1.0
    assert exact_match("red", ["red circle"]) == 0.0
    # prediction "red circle left" vs "a red circle": 2 common, p = 2/3, r = 2/2
    assert token_f1("red circle left", ["a red circle"]) == pytest.approx(2 * (2 / 3) / (2 / 3 + 1))
    assert token_f1("red circle left", ["blue", "a red circle"]) == pytest.approx(0.8)  # the best reference
    assert token_f1("", ["x"]) == 0.0 and token_f1("", [""]) == 1.0
    assert token_f1("don't know", ["do not know"]) == pytest.approx(2 * (1 / 3) * (1 / 3) / (2 / 3))


def test_rows_are_graded_by_what_their_reference_is():
    short = reference_of(["2", "2", "3"], None)
    assert short and not short.long and short.references == ("2", "2", "3")
    assert grade("two", short).score == pytest.approx(vqa_accuracy("two", ["2", "2", "3"]))
    long = reference_of("A man rides a red bicycle down a quiet street at dusk.", None)
    assert long.long and not long.shapes
    g = grade("a man rides a bicycle", long)
    assert g.vqa is None and g.score == g.f1 == token_f1("a man rides a bicycle", long.references)
    shapes = reference_of("two shapes: a red circle and a blue square.", "caption")
    assert shapes.long and shapes.shapes
    g = grade("two shapes: a red circle and a green square.", shapes)
    assert g.shapes_f1 == (3, 4, 4) and g.score == pytest.approx(0.75)  # colour of the square wrong
    assert reference_of("left", "vqa-position").long is False
    assert reference_of("a quick note", "describe").shapes is False  # not the shapes grammar: token F1
    for empty in (None, "", "  ", [], [None, ""], float("nan")):
        assert reference_of(empty, None) is None
