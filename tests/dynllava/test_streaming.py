"""TextStream: streamed text equals the final text, never shows a partial character or a stop string's start,
and costs linear time in the answer's length."""

from __future__ import annotations

import random

import pytest

from dynllava.loading import load_processor
from dynllava.streaming import TextStream


@pytest.fixture(scope="module")
def tokenizer():
    return load_processor("tiny").tokenizer


class CountingTokenizer:
    """Wraps a tokenizer and counts the token ids it is asked to decode."""

    def __init__(self, inner):
        self.inner, self.decoded = inner, 0

    def decode(self, ids, **kw):
        self.decoded += len(ids)
        return self.inner.decode(ids, **kw)


def stream_in_pieces(tokenizer, ids: list[int], stop: list[str], rng: random.Random) -> tuple[list[str], str]:
    """Push ids in random-sized pieces; returns the deltas and the final text (cut at the first stop string)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in stop if s in text), default=-1)
    final = text[:cut] if cut >= 0 else text
    stream, deltas, i = TextStream(tokenizer, stop), [], 0
    while i < len(ids):
        step = rng.choice((1, 1, 1, 2, 3))
        deltas.append(stream.push(ids[i : i + step]))
        assert final.startswith("".join(deltas)), "sent text is always a prefix of the final text"
        assert "\ufffd" not in "".join(deltas) or "\ufffd" in final, "no partial character is ever sent"
        i += step
    deltas.append(stream.finish(final))
    return deltas, final


@pytest.mark.parametrize("seed", range(5))
def test_streamed_text_is_the_final_text_in_order(tokenizer, seed):
    rng = random.Random(seed)
    text = "héllo wörld 日本語 — a red circle left of a blue square. " * 3
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    deltas, final = stream_in_pieces(tokenizer, ids, [], rng)
    assert "".join(deltas) == final == tokenizer.decode(ids, skip_special_tokens=True)
    random_ids = [rng.randrange(3, tokenizer.vocab_size) for _ in range(200)]  # any bytes, any order
    deltas, final = stream_in_pieces(tokenizer, random_ids, [], rng)
    assert "".join(deltas) == final


def test_a_stop_string_is_never_streamed_not_even_its_start(tokenizer):
    ids = tokenizer("a red circle. STOP here and more", add_special_tokens=False)["input_ids"]
    for stop in (["STOP"], [". STOP"], ["xyz", "STOP here"], ["circle"]):
        deltas, final = stream_in_pieces(tokenizer, ids, stop, random.Random(0))
        sent = "".join(deltas)
        assert sent == final and not any(s in sent for s in stop)
        for k in range(1, len(deltas)):  # before the end, no prefix of a stop string was sent early
            shown = "".join(deltas[:k])
            assert not any(shown.endswith(s[:j]) and final[len(shown):].startswith(s[j:])
                           for s in stop for j in range(1, len(s)))


def test_cost_is_linear_in_the_answer(tokenizer):
    """Each push decodes a window of a few tokens, not the answer so far: 2000 tokens cost < 10 decodes' worth
    of tokens each (the whole-text way would decode ~2 million)."""
    counting = CountingTokenizer(tokenizer)
    ids = tokenizer("the small green triangle is above the big red circle. " * 60, add_special_tokens=False)[
        "input_ids"][:2000]
    stream = TextStream(counting, stop=["never appears"])
    for t in ids:
        stream.push([t])
    assert counting.decoded < 10 * len(ids)
    assert stream.finish(tokenizer.decode(ids, skip_special_tokens=True)) == ""
