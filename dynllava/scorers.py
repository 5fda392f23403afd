"""Registries of token scorers. Each scorer is one small dataclass that writes only `score()`; the generic
top-k (vision) and rate control (text) live once, in `ops.topk_keep_mask` and `admit_at_rate` below.

Vision scorers rank image tokens at prefill (higher = keep). Text scorers score each generated token when it
enters layer K during decoding; the admission rule turns scores into keep/drop at the requested rate.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

import torch

from dynllava.predictors import KEEP, Predictors


class ScorerUnavailable(ValueError):
    """A scorer cannot run on this model (e.g. learned scorers without predictor weights)."""


@dataclass
class VisionInputs:
    """What a vision scorer may read at the boundary of layer K (prefill).

    hidden: [B, T, C] hidden states entering layer K; image_mask: [B, T] bool (image tokens);
    n_keep: [B, M] long, tokens to keep of each row's image m (the top-k is taken per image); last_attention:
    [B, T] attention the last prompt token pays at layer K-1 (heads averaged), present only when the scorer sets
    needs_attention; predictors: learned weights; groups: [B, T] long, each image token's image within its row
    (-1: text); newline: [B, T] bool, the any-res grid rows' newline tokens (image tokens too).
    """

    hidden: torch.Tensor
    image_mask: torch.Tensor
    n_keep: torch.Tensor
    last_attention: torch.Tensor | None = None
    predictors: Predictors | None = None
    groups: torch.Tensor | None = None
    newline: torch.Tensor | None = None


@dataclass
class TextInputs:
    """What a text scorer may read for the current generated token of each row (decoding).

    hidden: [B, C] its hidden state entering layer K; self_attention: [B] the attention its own query pays to
    itself at layer K-1 (heads averaged); predictors: learned weights.
    """

    hidden: torch.Tensor
    self_attention: torch.Tensor
    predictors: Predictors | None = None


def require_predictors(p: Predictors | None, kind: str) -> Predictors:
    """The predictors, or ScorerUnavailable naming the training-free scorers of that kind."""
    if p is None:
        others = sorted(n for n in (VISION_SCORERS if kind == "vision" else TEXT_SCORERS) if n != "learned")
        raise ScorerUnavailable(
            f"the learned {kind} scorer needs predictor weights (predictors.safetensors beside the model), and "
            f"this model has none; use a training-free {kind}_scorer: {', '.join(others)}"
        )
    return p


# ----------------------------------------------------------------------------------------------- vision
@dataclass
class LearnedVision:
    """The paper's image predictor: keep-logit minus drop-logit per image token."""

    needs_attention = False

    def score(self, x: VisionInputs) -> torch.Tensor:
        p = require_predictors(x.predictors, "vision")
        hidden = x.hidden.to(next(p.parameters()).dtype)
        index, valid = _image_rows(x.image_mask)  # gather each row's image tokens: [B, N]
        tokens = torch.gather(hidden, 1, index[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = p.image(tokens, valid).float()  # [B, N, 2]
        margin = logits[..., KEEP] - logits[..., 1 - KEEP]
        scores = torch.zeros(x.image_mask.shape, dtype=torch.float32, device=hidden.device)
        return scores.scatter(1, index, margin.masked_fill(~valid, 0.0))


@dataclass
class FastV:
    """FastV (training-free): attention the last prompt token pays to each image token at layer K-1."""

    needs_attention = True

    def score(self, x: VisionInputs) -> torch.Tensor:
        assert x.last_attention is not None
        return x.last_attention.float()


@dataclass
class Stride:
    """Uniform spatial subsampling: keeps n_keep tokens evenly spaced over each image's tokens in raster order
    (an any-res image: its base view, then its grid), newline tokens left out while there are enough others."""

    needs_attention = False

    def score(self, x: VisionInputs) -> torch.Tensor:
        groups = x.groups if x.groups is not None else torch.where(x.image_mask, 0, -1)
        candidates = x.image_mask & ~x.newline if x.newline is not None else x.image_mask
        slot = groups.clamp_min(0)
        n_img = torch.zeros(x.n_keep.shape, dtype=torch.long, device=groups.device).scatter_add_(
            1, slot, candidates.long())  # [B, M] candidates per image
        start = n_img.cumsum(1) - n_img  # candidates before each image
        order = candidates.long().cumsum(1) - 1 - torch.gather(start, 1, slot)  # index within its image
        n = torch.gather(n_img, 1, slot).clamp_min(1)
        k = torch.gather(torch.minimum(x.n_keep, n_img), 1, slot).clamp_min(1)
        # token j (spanning [j, j + 1)) is picked when it holds a slot centre (m + 0.5) * n / k, m < k
        slot_of_next = torch.ceil((order + 1) * k / n - 0.5)
        slot_of_this = torch.ceil(order * k / n - 0.5)
        return ((slot_of_next > slot_of_this) & candidates).float()


@dataclass
class RandomVision:
    """Random image tokens, seeded: the same row gets the same choice alone or in any batch."""

    seed: int = 0
    needs_attention = False

    def score(self, x: VisionInputs) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        noise = torch.rand(x.image_mask.shape[1], generator=g)
        order = (x.image_mask.long().cumsum(1) - 1).clamp_min(0).cpu()  # noise indexed by image-token order
        return noise[order].to(x.hidden.device)


def _image_rows(image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each row's image tokens, left-aligned: (index [B, N], valid [B, N])."""
    from dynllava.ops import compact

    return compact(image_mask)


VISION_SCORERS = {"learned": LearnedVision, "fastv": FastV, "stride": Stride, "random": RandomVision}


# ------------------------------------------------------------------------------------------------- text
@dataclass
class AdmissionState:
    """Per-request admission history (lives with the request, never on the model)."""

    n_seen: int = 0  # generated tokens decided so far
    n_admitted: int = 0  # of those, admitted to layers >= K
    sorted_scores: list[float] = field(default_factory=list)  # scores seen, ascending (quantile threshold)


RATE_SLACK_TOKENS = 2.0  # how far the admitted count may drift from rate * seen before it is forced back


def admit_at_rate(score: float, rate: float, state: AdmissionState) -> bool:
    """Admit when the score is in the top `rate` of this request's scores so far (a self-calibrating
    threshold), while keeping the admitted count within RATE_SLACK_TOKENS of rate * seen."""
    bisect.insort(state.sorted_scores, score)
    n = len(state.sorted_scores)
    threshold = state.sorted_scores[min(n - 1, max(0, math.ceil((1.0 - rate) * n) - 1))] if rate < 1 else -math.inf
    target = rate * (state.n_seen + 1)
    if state.n_admitted + 1 - target > RATE_SLACK_TOKENS:
        return False
    if target - state.n_admitted >= RATE_SLACK_TOKENS:
        return True
    return score >= threshold


@dataclass
class LearnedText:
    """The paper's output-text predictor: its keep logit minus its drop logit for the current token. With
    text_keep=None the token is admitted when the keep logit is the larger (the official rule, `logit[0] >
    logit[1]`); with a number, the rate rule ranks the differences (the same order as the keep probability)."""

    needs_attention = False
    own_decision = True

    def score(self, x: TextInputs) -> torch.Tensor:
        p = require_predictors(x.predictors, "text")
        logits = p.text(x.hidden.to(next(p.parameters()).dtype)).float()  # [B, 2]; exact from bf16 / fp16
        return logits[:, KEEP] - logits[:, 1 - KEEP]  # > 0 exactly when keep > drop, as compared in their dtype

    def decide(self, score: float, rate: float, state: AdmissionState) -> bool:
        return admit_at_rate(score, rate, state)


@dataclass
class KeepAll:
    """Admits every generated token (the dense decoding baseline)."""

    needs_attention = False
    own_decision = False

    def score(self, x: TextInputs) -> torch.Tensor:
        return torch.ones(x.hidden.shape[0], device=x.hidden.device)

    def decide(self, score: float, rate: float, state: AdmissionState) -> bool:
        return True


@dataclass
class Recent:
    """Ratio-exact recency budget: a token is admitted as soon as the budget ceil(text_keep * seen) allows, so
    admitted tokens are spread evenly over the answer. (A literal sliding window would evict old K/V; the
    append-only cache never evicts.)"""

    needs_attention = False
    own_decision = False

    def score(self, x: TextInputs) -> torch.Tensor:
        return torch.zeros(x.hidden.shape[0], device=x.hidden.device)

    def decide(self, score: float, rate: float, state: AdmissionState) -> bool:
        return state.n_admitted < math.ceil(round(rate * (state.n_seen + 1), 6))


@dataclass
class H2O:
    """Heavy-hitter score (H2O): the attention a token has accumulated. When a token is produced, the only
    attention it has received is its own query's (layer K-1, heads averaged); with an append-only cache the
    decision cannot wait for later queries, so that is its score, thresholded by the rate rule."""

    needs_attention = True
    own_decision = False

    def score(self, x: TextInputs) -> torch.Tensor:
        return x.self_attention.float()

    def decide(self, score: float, rate: float, state: AdmissionState) -> bool:
        return admit_at_rate(score, rate, state)


TEXT_SCORERS = {"learned": LearnedText, "keep_all": KeepAll, "recent": Recent, "h2o": H2O}


def decide_admission(scorer, scores: list[float], rates: list[float | None],
                     states: list[AdmissionState]) -> list[bool]:
    """Turn per-row scores into admit decisions and update each row's state. rate None = the scorer's own
    decision (learned only: keep logit above the drop logit); rate 1.0 admits everything."""
    decisions = []
    for score, rate, state in zip(scores, rates, states):
        if rate is None:
            admit = score > 0.0
        elif rate >= 1.0:
            admit = True
        else:
            admit = scorer.decide(score, rate, state)
        state.n_seen += 1
        state.n_admitted += int(admit)
        decisions.append(admit)
    return decisions
