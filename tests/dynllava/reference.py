"""A plain reference of Dynamic-LLaVA inference, written for the tests and independent of DynamicLlava's forward.

Everything here is transformers' own code or a few lines of arithmetic: the LLaVA embedding path
(`get_image_features`, `get_placeholder_mask`), the decoder layers called as modules with an explicit additive
mask, the rotary module called on original position ids, eager attention (whose probabilities the scorers read,
captured with a forward hook), and a `DynamicCache`. None of `dynllava.model`, `ops`, `cache`, `engine` or the
scorers' `score()` is used. One row at a time, no padding.

The method, as the paper states it:
- prefill: layers < K over every prompt token; at K keep all text and the chosen image tokens, in order;
  layers >= K over the kept tokens only, each at its original position;
- decoding with a cache: each new token runs layers < K over everything cached (and is cached there); its
  K/V enters layers >= K only if admitted; it always attends to itself. An unadmitted token's K/V is appended
  like any other and then cropped away again (the plainest way to "attend to itself, then forget").

The hand scorers below compute what each scorer ranks by from the reference's own hidden states and
attention probabilities, and the top-k and admission rules in plain Python.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import DynamicCache

from dynllava.predictors import KEEP


@dataclass
class Trace:
    """One row through the reference (or the engine, see test_reference.engine_trace).

    tokens: generated ids; logits: [V] float32 per generated token (prefill's first); kept: prompt positions that
    ran through layers >= K; admitted: per fed generated token, whether its K/V entered layers >= K;
    scores: the text score of each fed token (None where the scorer has none)."""

    tokens: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)
    admitted: list[bool] = field(default_factory=list)
    scores: list[float | None] = field(default_factory=list)


@contextlib.contextmanager
def eager_attention(hf_model):
    """Run the model with transformers' eager attention (it returns the probabilities), then restore."""
    config = hf_model.config.text_config
    before = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def causal_mask(n_query: int, n_key: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, n_query, n_key]: query i (the last n_query of n_key tokens) sees keys <= its own."""
    offset = n_key - n_query
    allowed = torch.arange(n_key)[None, :] <= torch.arange(n_query)[:, None] + offset
    return torch.zeros(n_query, n_key, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[None, None]


class Reference:
    """Sparse inference for one row over `model.hf_model` (a transformers LlavaForConditionalGeneration).

    The model object is used only for its HF modules, processor, predictors and image token id."""

    def __init__(self, model, layer_k: int):
        self.hf = model.hf_model
        self.lm = self.hf.model.language_model
        self.layers = self.lm.layers
        self.k = layer_k
        self.predictors = model.predictors
        self.image_token_id = self.hf.config.image_token_id
        self._attention: torch.Tensor | None = None

    # ---------------------------------------------------------------- pieces, all transformers' own
    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None) -> torch.Tensor:
        """input_ids [1, T] -> [1, T, C], image features scattered into the placeholders (as LlavaModel does)."""
        llava = self.hf.model
        embeds = llava.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        out = llava.get_image_features(pixel_values=pixel_values,
                                       vision_feature_layer=self.hf.config.vision_feature_layer,
                                       vision_feature_select_strategy=self.hf.config.vision_feature_select_strategy)
        features = torch.cat(out.pooler_output, dim=0).to(embeds.dtype)
        mask = llava.get_placeholder_mask(input_ids, inputs_embeds=embeds, image_features=features)
        return embeds.masked_scatter(mask, features)

    def _run(self, h: torch.Tensor, positions: list[int], layers: range, cache: DynamicCache,
             mask: torch.Tensor | None) -> torch.Tensor:
        cos, sin = self.lm.rotary_emb(h, torch.tensor([positions]))
        for i in layers:
            h = self.layers[i](h, attention_mask=mask, position_embeddings=(cos, sin), cache=cache)
        return h

    def _capture(self, module, args, output) -> None:
        self._attention = output[1].float().mean(1)[0]  # [q, keys]: probabilities, heads averaged

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.hf.lm_head(self.lm.norm(h[0, -1])).float()

    # ---------------------------------------------------------------- the method
    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None,
            choose_kept: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], list[int]],
            decide_admit: Callable[[int, torch.Tensor, float], tuple[bool, float | None]],
            n_new: int, forced_tokens: list[int] | None = None) -> Trace:
        """Prefill, then n_new - 1 decoding steps (greedy, or feeding `forced_tokens`).

        choose_kept(hidden_k [T, C], attention_k1 [T, T], image_mask [T]) -> kept prompt positions, ascending.
        decide_admit(step, hidden_k [C], self_attention) -> (admit, score) for the token fed at that step."""
        trace = Trace()
        dtype = self.lm.embed_tokens.weight.dtype
        hook = self.layers[self.k - 1].self_attn.register_forward_hook(self._capture)
        try:
            with eager_attention(self.hf):
                cache = DynamicCache(config=self.lm.config)
                t = input_ids.shape[1]
                h = self._run(self.embed(input_ids, pixel_values), list(range(t)), range(self.k), cache,
                              causal_mask(t, t, dtype))
                image_mask = input_ids[0] == self.image_token_id
                trace.kept = list(choose_kept(h[0], self._attention, image_mask))
                h = self._run(h[:, trace.kept], trace.kept, range(self.k, len(self.layers)), cache,
                              causal_mask(len(trace.kept), len(trace.kept), dtype))
                trace.logits.append(self._logits(h))
                for step in range(n_new):
                    token = forced_tokens[step] if forced_tokens else int(trace.logits[-1].argmax())
                    trace.tokens.append(token)
                    if step + 1 == n_new:
                        break
                    position = t + step
                    h = self._run(self.lm.embed_tokens(torch.tensor([[token]])), [position], range(self.k), cache,
                                  None)  # one query over everything cached: nothing to mask
                    admit, score = decide_admit(step, h[0, 0], float(self._attention[0, -1]))
                    trace.admitted.append(admit)
                    trace.scores.append(score)
                    h = self._run(h, [position], range(self.k, len(self.layers)), cache, None)
                    if not admit:  # it attended to itself; now forget it in layers >= K
                        for i in range(self.k, len(self.layers)):
                            cache.layers[i].crop(-1)
                    trace.logits.append(self._logits(h))
        finally:
            hook.remove()
        return trace


# -------------------------------------------------------------------------------------------- hand scorers
def top_k_positions(scores: dict[int, float], k: int) -> list[int]:
    """The k positions with the highest scores (ties: the earlier position), returned ascending."""
    return sorted(sorted(scores, key=lambda p: (-scores[p], p))[:k])


def smallest_gap_at_cut(scores: dict[int, float], k: int) -> float:
    """How far the k-th best score is from the (k+1)-th: a decision closer than float noise proves nothing."""
    ordered = sorted(scores.values(), reverse=True)
    return math.inf if k >= len(ordered) else ordered[k - 1] - ordered[k]


def vision_scores(name: str, predictors, hidden_k: torch.Tensor, attention_k1: torch.Tensor,
                  image_positions: list[int], n_keep: int) -> dict[int, float]:
    """What each vision scorer ranks by, per image position.

    learned: the image predictor's keep logit minus its drop logit, over this row's image tokens;
    fastv: the attention the last prompt token pays at layer K-1 (heads averaged);
    stride: 1 on the token holding each slot centre floor((m + 0.5) * n / k), m < k, else 0;
    random: torch.rand(n_image) from seed 0, indexed by the token's order among the image tokens."""
    n = len(image_positions)
    if name == "learned":
        tokens = hidden_k[image_positions][None].to(next(predictors.parameters()).dtype)
        logits = predictors.image(tokens, torch.ones(1, n, dtype=torch.bool))[0].float()
        values = (logits[:, KEEP] - logits[:, 1 - KEEP]).tolist()
    elif name == "fastv":
        values = attention_k1[-1, image_positions].tolist()
    elif name == "stride":
        centres = {math.floor((m + 0.5) * n / n_keep) for m in range(n_keep)}
        values = [float(j in centres) for j in range(n)]
    elif name == "random":
        values = torch.rand(n, generator=torch.Generator().manual_seed(0)).tolist()
    else:
        raise KeyError(name)
    return dict(zip(image_positions, values))


@dataclass
class HandAdmission:
    """The text side by hand, for one row: score each fed token, then admit it.

    Rates: None = the learned predictor's own argmax; 1.0 = everything; `recent` = as soon as
    ceil(rate * seen) allows; score-based = in the top `rate` fraction of this row's scores so far (the
    ceil((1 - rate) * n)-th smallest is the bar), but never more than `slack` tokens from rate * seen."""

    scorer: str
    rate: float | None
    predictors: object = None
    slack: float = 2.0
    seen: list[float] = field(default_factory=list)
    n_admitted: int = 0

    def score(self, hidden_k: torch.Tensor, self_attention: float) -> float | None:
        if self.scorer == "learned":
            logits = self.predictors.text(hidden_k[None].to(next(self.predictors.parameters()).dtype))[0].float()
            return float(logits[KEEP] - logits[1 - KEEP])  # the official rule compares the two logits
        if self.scorer == "h2o":
            return self_attention
        return None

    def __call__(self, step: int, hidden_k: torch.Tensor, self_attention: float) -> tuple[bool, float | None]:
        score = self.score(hidden_k, self_attention)
        n_seen = step + 1
        if self.rate is None:
            admit = score > 0.0
        elif self.rate >= 1.0 or self.scorer == "keep_all":
            admit = True
        elif self.scorer == "recent":
            admit = self.n_admitted < math.ceil(round(self.rate * n_seen, 6))
        else:
            self.seen.append(score)
            ordered = sorted(self.seen)
            bar = ordered[max(0, math.ceil((1 - self.rate) * len(ordered)) - 1)]
            target = self.rate * n_seen
            if self.n_admitted + 1 - target > self.slack:
                admit = False
            elif target - self.n_admitted >= self.slack:
                admit = True
            else:
                admit = score >= bar
        self.n_admitted += admit
        return admit, score
