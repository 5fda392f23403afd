"""One conformance test over each scorer registry, plus the rules that turn scores into decisions."""

from __future__ import annotations

import pytest
import torch

from dynllava import ops
from dynllava.predictors import Predictors
from dynllava.scorers import (
    TEXT_SCORERS, VISION_SCORERS, AdmissionState, ScorerUnavailable, TextInputs, VisionInputs, decide_admission,
)

C = 64


def vision_inputs(seed: int, rows: int = 3, with_predictors: bool = True) -> VisionInputs:
    """Rows with a different image span each, cut into two images (the second with a newline every 4th token,
    as an any-res grid); n_keep per image."""
    g = torch.Generator().manual_seed(seed)
    t = 24
    image_mask = torch.zeros(rows, t, dtype=torch.bool)
    groups = torch.full((rows, t), -1)
    newline = torch.zeros(rows, t, dtype=torch.bool)
    for b in range(rows):
        start, n = 2 + b, 12 + 2 * b
        image_mask[b, start : start + n] = True
        groups[b, start : start + n // 2], groups[b, start + n // 2 : start + n] = 0, 1
        newline[b, start + n // 2 + 3 : start + n : 4] = True
    attention = torch.rand(rows, t, generator=g).softmax(-1)
    torch.manual_seed(0)
    predictors = Predictors(C).eval() if with_predictors else None
    return VisionInputs(torch.randn(rows, t, C, generator=g), image_mask, torch.tensor([[3, 2], [5, 4], [1, 1]]),
                        attention, predictors, groups, newline)


@pytest.mark.parametrize("name", sorted(VISION_SCORERS))
def test_vision_scorer_conformance(name):
    scorer = VISION_SCORERS[name]()
    x = vision_inputs(0)
    with torch.inference_mode():
        scores = scorer.score(x)
        again = scorer.score(x)
    assert scores.shape == x.image_mask.shape and torch.isfinite(scores).all()
    assert torch.equal(scores, again), "scores must be deterministic"
    keep = ops.topk_keep_mask_grouped(scores, x.groups, x.n_keep)
    per_image = [[int((keep[b] & (x.groups[b] == m)).sum()) for m in range(2)] for b in range(3)]
    assert per_image == x.n_keep.tolist() and not (keep & ~x.image_mask).any()
    # a row scores the same alone as in a batch
    alone = VisionInputs(x.hidden[1:2], x.image_mask[1:2], x.n_keep[1:2], x.last_attention[1:2], x.predictors,
                         x.groups[1:2], x.newline[1:2])
    with torch.inference_mode():
        row = scorer.score(alone)[0]
    m = x.image_mask[1]
    torch.testing.assert_close(row[m], scores[1][m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(TEXT_SCORERS))
def test_text_scorer_conformance(name):
    scorer = TEXT_SCORERS[name]()
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = TextInputs(torch.randn(5, C, generator=g), torch.rand(5, generator=g), Predictors(C).eval())
    with torch.inference_mode():
        scores = scorer.score(x)
        row = scorer.score(TextInputs(x.hidden[2:3], x.self_attention[2:3], x.predictors))
    assert scores.shape == (5,) and torch.isfinite(scores).all()
    torch.testing.assert_close(row[0], scores[2])
    # over a long answer, every scorer admits close to the requested rate
    rate = 0.0 if name == "keep_all" else 0.4
    state = AdmissionState()
    stream = torch.rand(400, generator=g).tolist()
    for s in stream:
        decide_admission(scorer, [s], [rate if rate else 1.0], [state])
    expected = 400 if name == "keep_all" else 0.4 * 400
    assert abs(state.n_admitted - expected) <= 2


@pytest.mark.parametrize("name", ["learned", "h2o"])
@pytest.mark.parametrize("stream", ["rising", "falling", "random", "alternating"])
def test_admitted_count_stays_within_two_at_every_step(name, stream):
    """The README's promise for score-based text scorers: after every decision, the admitted count is within 2
    tokens of text_keep * seen. Rising scores push admission ahead of the rate and falling ones behind it, so
    the bound is what holds them (a slack of 4 fails here)."""
    import random

    rng = random.Random(0)
    for rate in (0.1, 0.3, 0.5, 0.7, 0.9):
        state, kept, dropped = AdmissionState(), [], []
        for i in range(200):
            score = float({"rising": i, "falling": -i, "random": rng.random(), "alternating": i % 2}[stream])
            admit = decide_admission(TEXT_SCORERS[name](), [score], [rate], [state])[0]
            (kept if admit else dropped).append(score)
            assert abs(state.n_admitted - rate * state.n_seen) <= 2.0, (rate, i, state.n_admitted)
        if stream == "random":  # and it ranks: what it admits scores higher than what it drops
            assert sum(kept) / len(kept) > sum(dropped) / len(dropped) + 0.25


def test_stride_spreads_kept_tokens_evenly():
    x = vision_inputs(0)
    x.image_mask[:] = False
    x.image_mask[:, :20] = True
    x.groups, x.newline = torch.where(x.image_mask, 0, -1), torch.zeros_like(x.image_mask)
    x.n_keep = torch.tensor([[4], [5], [10]])
    keep = ops.topk_keep_mask_grouped(VISION_SCORERS["stride"]().score(x), x.groups, x.n_keep)
    assert keep[0].nonzero().flatten().tolist() == [2, 7, 12, 17]
    assert keep[2].nonzero().flatten().tolist() == list(range(1, 20, 2))  # slot centres (m + 0.5) * 20 / 10


def test_stride_spreads_each_images_budget_over_it_and_skips_newlines():
    """Two images in a row: [0, 8) a plain view, [8, 20) a grid of 3 rows of 3 tokens + a newline. Each image
    gets its own count, spread over its own tokens; newlines only when the others run out."""
    x = vision_inputs(0, rows=1)
    x.image_mask[:] = False
    x.image_mask[0, :20] = True
    x.groups = torch.where(x.image_mask, (torch.arange(24) >= 8).long(), -1)
    x.newline = torch.zeros_like(x.image_mask)
    x.newline[0, [11, 15, 19]] = True
    x.n_keep = torch.tensor([[2, 3]])
    keep = ops.topk_keep_mask_grouped(VISION_SCORERS["stride"]().score(x), x.groups, x.n_keep)
    assert keep[0].nonzero().flatten().tolist() == [2, 6, 9, 13, 17]  # 9 grid tokens, centres 1.5, 4.5, 7.5
    x.n_keep = torch.tensor([[2, 11]])  # more than the 9 grid tokens: two of the newlines join
    keep = ops.topk_keep_mask_grouped(VISION_SCORERS["stride"]().score(x), x.groups, x.n_keep)
    assert int(keep[0, 8:20].sum()) == 11 and not keep[0, 8:20][~x.newline[0, 8:20]].logical_not().any()


def test_learned_text_own_decision_is_the_official_logit_comparison():
    """text_keep=None admits a token when its keep logit beats its drop logit (`logit[0] > logit[1]`, a tie
    drops it), compared as the predictor computed them (here in bf16)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    predictors = Predictors(C).eval()
    x = TextInputs(torch.randn(64, C, generator=g), torch.rand(64, generator=g), predictors)
    with torch.inference_mode():  # centre the keep logit so that about half the tokens are kept
        diff = predictors.text(x.hidden)[:, 0] - predictors.text(x.hidden)[:, 1]
        predictors.text.net[1][-1].bias[0] -= diff.median()
        predictors.to(torch.bfloat16)
        logits = predictors.text(x.hidden.to(torch.bfloat16))
    official = (logits[:, 0] > logits[:, 1]).tolist()
    scorer = TEXT_SCORERS["learned"]()
    with torch.inference_mode():
        scores = scorer.score(x).tolist()
    made = decide_admission(scorer, scores, [None] * len(scores), [AdmissionState() for _ in scores])
    assert made == official and 0 < sum(made) < len(made)
    assert decide_admission(scorer, [0.5, 0.0, -0.5], [None] * 3, [AdmissionState() for _ in range(3)]) == \
        [True, False, False]


def test_learned_scorers_without_predictors_name_the_alternatives():
    x = vision_inputs(0, with_predictors=False)
    with pytest.raises(ScorerUnavailable, match="fastv, random, stride"):
        VISION_SCORERS["learned"]().score(x)
    with pytest.raises(ScorerUnavailable, match="h2o, keep_all, recent"):
        TEXT_SCORERS["learned"]().score(TextInputs(torch.zeros(1, C), torch.zeros(1), None))
