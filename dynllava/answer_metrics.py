"""Grading free-form answers against references: VQAv2's answer normalisation and accuracy (min(#humans who gave
the answer / 3, 1), averaged over the leave-one-out subsets of the references), and SQuAD-style exact match
and token F1 for short answers. Pure functions: no model, no data set.

The normalisation follows the rules of the VQAv2 evaluation (Antol et al. 2015; Goyal et al. 2017): newlines and
tabs become spaces; punctuation is removed (joined words are split, "yes," -> "yes"), except a period inside a
number and an apostrophe inside a word; a comma between digits is dropped ("1,000" -> "1000"); number words
up to ten become digits; the articles a / an / the are removed; a contraction written without its apostrophe
gets it back ("dont" -> "don't", "couldnt've" -> "couldn't've").
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Sequence

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"))}
NUMBER_WORDS["none"] = "0"  # VQAv2 counts "none" as the answer 0
ARTICLES = frozenset({"a", "an", "the"})
# English contractions in their written form; every spelling that drops some of their apostrophes maps back.
_CONTRACTIONS = (
    "ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't haven't he'd "
    "he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll it's let's ma'am mightn't "
    "mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've she's "
    "should've shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've "
    "someone'll someone's something'd something'd've something'll that's there'd there'd've there're there's "
    "they'd they'd've they'll they're they've 'twas wasn't we'd've we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'd've who'll who're who's who've why'll why're why's won't "
    "would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've"
).split()


def _spellings(word: str) -> list[str]:
    """Every spelling of `word` with a non-empty subset of its apostrophes dropped (the word itself excluded)."""
    cuts = [i for i, ch in enumerate(word) if ch == "'"]
    out = []
    for n in range(1, len(cuts) + 1):
        for drop in itertools.combinations(cuts, n):
            out.append("".join(ch for i, ch in enumerate(word) if i not in drop))
    return out


# Spellings that are also plain words are not rewritten ("well" is not "we'll", "its" is not "it's").
_AMBIGUOUS = frozenset({"its", "hell", "ill", "id", "shell", "well", "were", "wed", "whos", "lets", "cant", "wont"})
CONTRACTIONS = {s: w for w in _CONTRACTIONS for s in _spellings(w) if s not in _AMBIGUOUS}
CONTRACTIONS.update({"cant": "can't", "wont": "won't"})  # no English word is spelled so in an answer
_PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-/:;<=>?@\[\\\]^_`{|}~]")
_DIGIT_COMMA = re.compile(r"(?<=\d),(?=\d)")
_PERIOD = re.compile(r"(?<!\d)\.|\.(?!\d)")  # a period that is not a decimal point
_STRAY_APOSTROPHE = re.compile(r"(?<![a-z])'|'(?![a-z])")


def normalise_vqa(answer: str) -> str:
    """An answer in VQAv2's normal form: "Two dogs." -> "2 dogs", "The 1,000-year-old tree" ->
    "1000 year old tree", "dont know" -> "don't know"."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    text = _DIGIT_COMMA.sub("", text)
    text = _PUNCTUATION.sub(" ", text)
    text = _PERIOD.sub("", text)
    words = []
    for word in text.split():
        word = CONTRACTIONS.get(word, word)
        word = word if word in CONTRACTIONS.values() else _STRAY_APOSTROPHE.sub("", word)
        word = NUMBER_WORDS.get(word, word)
        if word and word not in ARTICLES:
            words.append(word)
    return " ".join(words)


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQAv2 accuracy of one answer: for each reference left out in turn, min(1, matches among the others / 3),
    averaged. With 10 human answers this is the official metric; with one reference it is exact match."""
    if not references:
        raise ValueError("vqa_accuracy needs at least one reference")
    answer = normalise_vqa(prediction)
    refs = [normalise_vqa(r) for r in references]
    if len(refs) == 1:
        return float(answer == refs[0])
    matches = sum(r == answer for r in refs)
    return sum(min(1.0, (matches - (r == answer)) / 3) for r in refs) / len(refs)


def _tokens(text: str) -> list[str]:
    return normalise_vqa(text).replace("'", " ").split()


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised answer equals any normalised reference."""
    answer = normalise_vqa(prediction)
    return float(any(answer == normalise_vqa(r) for r in references))


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD-style F1 over normalised word tokens, the best over the references (0 when either side is empty but
    not both)."""
    best = 0.0
    pred = _tokens(prediction)
    for reference in references:
        ref = _tokens(reference)
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        common = sum((Counter(pred) & Counter(ref)).values())
        if common:
            p, r = common / len(pred), common / len(ref)
            best = max(best, 2 * p * r / (p + r))
    return best
