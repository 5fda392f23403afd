"""The sparse path against an independent reference (tests/dynllava/reference.py: transformers' own layers, rotary,
eager attention and DynamicCache, one row at a time).

For every scorer, in both modes, on a ragged batch of 4: the engine keeps exactly the prompt tokens and admits
exactly the generated tokens that the hand computation of its scorer picks (fastv's attention row at K-1, h2o's
self-attention, the learned predictors' logits, stride's layout, the seeded random order, the rate rule), and
its prefill and decoding logits equal the reference's within 1e-4 (fp32). The training forward (masked
attention), given the same decisions, gives the same logits at every answer position.

Mutations tried (`python tests/mutations.py` makes each in the source, runs the tests named there, reverts), the
first test that caught it, and whether the suite before this module did:
- fastv reads layer K-2 instead of K-1 (model.run_context): [fastv-0.25-h2o-0.5-kv_cache] (before: only by
  accident, cache vs recompute disagreed through h2o).
- fastv reads the second-to-last prompt token's query: [fastv-0.25-h2o-0.5-kv_cache] (before: same accident).
- h2o takes head 0 instead of the mean over heads (ops.attention_from_query): [fastv-0.25-h2o-0.5-kv_cache]
  and test_ops.test_attention_from_query_equals_a_plain_softmax (before: missed).
- kept tokens renumbered 0..T'-1 after the cut instead of keeping their RoPE positions:
  [learned-0.25-learned-0.5-kv_cache] (before: caught by cache vs recompute).
- decode position off by one: [learned-0.25-learned-0.5-kv_cache] (before: caught by the dense tests).
- an unadmitted token does not attend to itself (decode_step mask): [learned-0.25-learned-0.5-kv_cache]
  (before: caught).
- every generated token admitted to layers >= K (commit `active`, not the decisions):
  [learned-0.25-learned-0.5-kv_cache] (before: caught by cache vs recompute).
- stride slot centres at m instead of m + 0.5: [stride-0.3-recent-0.5-kv_cache] (before: caught by test_scorers'
  stride layout test).
- learned vision margin sign flipped: [learned-0.25-learned-0.5-kv_cache] (before: missed).
- RATE_SLACK_TOKENS 2 -> 4: [learned-0.25-learned-0.5-kv_cache] (the hand rule keeps 2) and
  test_scorers.test_admitted_count_stays_within_two_at_every_step (before: missed).
- masked training attention lets others see dropped tokens: test_masked_training_forward_equals_reference
  (before: missed).
"""

from __future__ import annotations

import math

import pytest
import torch

from dynllava.config import SparsityConfig
from dynllava.engine import StaticBatch, new_row
from dynllava.predictors import KEEP
from tests.dynllava.reference import HandAdmission, Reference, Trace, smallest_gap_at_cut, top_k_positions, \
    vision_scores

NEW = 8
CASES = [  # (vision scorer, vision keep, text scorer, text keep)
    ("learned", 0.25, "learned", 0.5),
    ("learned", 0.25, "learned", None),
    ("fastv", 0.25, "h2o", 0.5),
    ("stride", 0.3, "recent", 0.5),
    ("random", 0.25, "keep_all", 1.0),
]


def _id(case) -> str:
    return "-".join(str(x) for x in case)


@pytest.fixture()
def decisive(tiny_model, monkeypatch):
    """The test model with a text predictor whose own keep/drop (text_keep None) admits about half the tokens
    (the random init keeps everything): the last layer's weights x30, the keep logit's bias +1."""
    import copy

    predictors = copy.deepcopy(tiny_model.predictors)
    with torch.no_grad():
        last = predictors.text.net[-1][-1]
        last.weight.mul_(30.0)
        last.bias[KEEP] += 1.0
    monkeypatch.setattr(tiny_model, "predictors", predictors)
    return tiny_model


def row_inputs(prepared, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Row i of a prepared batch, unpadded: input_ids [1, T] and its own images' pixel values."""
    start = sum(prepared.n_images[:i])
    pixels = prepared.pixel_values[start : start + prepared.n_images[i]] if prepared.n_images[i] else None
    return prepared.input_ids[i : i + 1, : prepared.lengths[i]], pixels


@torch.inference_mode()
def engine_trace(model, prepared, sparsity: SparsityConfig, n_new: int, kv_pool=None) -> list[Trace]:
    """Greedy generation through the engine's StaticBatch, recording each row's logits and decisions
    (kv_pool: in a paged cache over that PagedKVPool)."""
    b = len(prepared.lengths)
    batch = StaticBatch(model, prepared, [sparsity] * b, n_new, kv_pool=kv_pool)
    rows = [new_row(n, sparsity, model.device, n_new, 0.0, 1.0, None, None, True) for n in prepared.lengths]
    logits = batch.prefill()
    batch.record_prefill(rows)
    traces = [Trace(kept=batch.prompt_keep[i].nonzero().flatten().tolist()) for i in range(b)]
    for step in range(n_new):
        tokens = logits.argmax(-1).tolist()
        for trace, row, token, row_logits in zip(traces, rows, tokens, logits):
            trace.logits.append(row_logits.clone())
            trace.tokens.append(token)
            row.tokens.append(token)
        if step + 1 == n_new:
            break
        before = [row.n_admitted for row in rows]
        logits = batch.step(tokens, rows, [True] * b)
        for trace, row, n in zip(traces, rows, before):
            row.n_fed += 1
            trace.admitted.append(row.n_admitted > n)
    return traces


def hand_kept(model, name: str, keep: float, checks: list, rounding: str = "ceil"):
    """choose_kept for the reference: all text + the top ceil(keep * n) image tokens by the hand score (or
    int(n * keep), the official code's count, with rounding="floor")."""

    def choose(hidden_k, attention_k1, image_mask) -> list[int]:
        image = image_mask.nonzero().flatten().tolist()
        if rounding == "floor":
            n_keep = int(len(image) * keep)
        else:
            n_keep = max(1, min(len(image), math.ceil(round(keep * len(image), 6)))) if image else 0
        text = [p for p in range(len(image_mask)) if not image_mask[p]]
        if n_keep == len(image):
            return list(range(len(image_mask)))
        scores = vision_scores(name, model.predictors, hidden_k, attention_k1, image, n_keep)
        checks.append(smallest_gap_at_cut(scores, n_keep))
        return sorted(text + top_k_positions(scores, n_keep))

    return choose


def reference_of(model, prepared, i: int, case, tokens: list[int], layer_k: int = 2,
                 rounding: str = "ceil") -> tuple[Trace, list]:
    vision, vision_keep, text, text_keep = case
    gaps: list[float] = []
    ids, pixels = row_inputs(prepared, i)
    admission = HandAdmission(text, text_keep, model.predictors)
    ref = Reference(model, layer_k).run(ids, pixels, hand_kept(model, vision, vision_keep, gaps, rounding),
                                        admission, len(tokens), forced_tokens=tokens)
    return ref, gaps


def test_floor_rounding_keeps_the_official_count(decisive, batch4):
    """keep_rounding="floor" keeps int(n * vision_keep) image tokens, as the official code does (one fewer
    than ceil here), and the engine still equals the reference token for token."""
    case = ("learned", 0.3, "learned", 0.5)
    sparsity = SparsityConfig(vision_keep=0.3, text_keep=0.5, keep_rounding="floor")
    images, prompts = batch4
    prepared = decisive.prepare(images, prompts, NEW)
    traces = engine_trace(decisive, prepared, sparsity, NEW)
    for i, ours in enumerate(traces):
        n_image = int((prepared.input_ids[i, : prepared.lengths[i]] == decisive.image_token_id).sum())
        assert int(n_image * 0.3) < math.ceil(n_image * 0.3), "pick a rate where the two roundings differ"
        assert len(ours.kept) == prepared.lengths[i] - n_image + int(n_image * 0.3)
        ref, gaps = reference_of(decisive, prepared, i, case, ours.tokens, rounding="floor")
        assert all(g > 1e-5 for g in gaps)
        assert ours.kept == ref.kept and ours.admitted == ref.admitted
        for a, b in zip(ours.logits, ref.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["kv_cache", "paged", "no_cache"])
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_engine_equals_reference(decisive, batch4, case, mode):
    """kv_cache: the padded cache; paged: the block-paged cache (blocks of 4 slots, so rows span many)."""
    from dynllava.paged_cache import PagedKVPool

    tiny_model = decisive
    vision, vision_keep, text, text_keep = case
    images, prompts = batch4
    sparsity = SparsityConfig(vision_keep=vision_keep, text_keep=text_keep, vision_scorer=vision, text_scorer=text,
                              mode="kv_cache" if mode == "paged" else mode)
    prepared = tiny_model.prepare(images, prompts, NEW)
    m = tiny_model
    pool = PagedKVPool(m.n_layers, sparsity.layer, m.n_kv_heads, m.head_dim, m.dtype, m.device,
                       block_tokens=4) if mode == "paged" else None
    traces = engine_trace(tiny_model, prepared, sparsity, NEW, kv_pool=pool)
    for i, ours in enumerate(traces):
        ref, gaps = reference_of(tiny_model, prepared, i, case, ours.tokens)
        assert all(g > 1e-5 for g in gaps), f"row {i}: a near-tie at the top-k cut ({gaps}): pick other inputs"
        assert ours.kept == ref.kept, f"row {i}: kept prompt positions"
        assert ours.admitted == ref.admitted, f"row {i}: admitted tokens (reference scores {ref.scores})"
        for step, (a, b) in enumerate(zip(ours.logits, ref.logits)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m: f"row {i} step {step}: {m}")
    assert all(len(t.kept) < n for t, n in zip(traces, prepared.lengths)), "the case prunes no image token"
    admitted = [a for t in traces for a in t.admitted]
    assert text_keep == 1.0 or 0 < sum(admitted) < len(admitted), "the case admits all generated tokens or none"


@pytest.mark.parametrize("layer_k", [1, 3])
def test_other_layers_k_equal_reference(tiny_model, batch4, layer_k):
    """K moves both the scorers' inputs (fastv reads layer K-1, h2o too) and where the cut happens."""
    case = ("fastv", 0.25, "h2o", 0.5)
    images, prompts = batch4
    sparsity = SparsityConfig(vision_keep=0.25, text_keep=0.5, vision_scorer="fastv", text_scorer="h2o",
                              layer=layer_k)
    prepared = tiny_model.prepare(images[:2], prompts[:2], NEW)
    for i, ours in enumerate(engine_trace(tiny_model, prepared, sparsity, NEW)):
        ref, _ = reference_of(tiny_model, prepared, i, case, ours.tokens, layer_k)
        assert (ours.kept, ours.admitted) == (ref.kept, ref.admitted)
        for a, b in zip(ours.logits, ref.logits):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


def test_generate_follows_the_reference_greedily(tiny_model, batch4):
    """The public path: generate's tokens are the reference's own greedy tokens under its hand decisions, and
    its reported counts are the reference's."""
    case = ("learned", 0.25, "learned", 0.5)
    images, prompts = batch4
    sparsity = SparsityConfig(vision_keep=0.25, text_keep=0.5)
    outs = tiny_model.generate(images, prompts, sparsity=sparsity, max_new_tokens=NEW, ignore_eos=True)
    prepared = tiny_model.prepare(images, prompts, NEW)
    for i, out in enumerate(outs):
        ids, pixels = row_inputs(prepared, i)
        ref = Reference(tiny_model, 2).run(ids, pixels, hand_kept(tiny_model, "learned", 0.25, []),
                                           HandAdmission("learned", 0.5, tiny_model.predictors), NEW)
        assert out.token_ids == ref.tokens
        n_image = int((ids == tiny_model.image_token_id).sum())
        assert out.stats.n_image_kept == len(ref.kept) - (ids.shape[1] - n_image)
        assert out.stats.n_text_admitted == sum(ref.admitted)


def test_sparse_logits_differ_from_dense(tiny_model, batch4):
    """A guard that the comparisons above are not between two dense runs: pruning moves the logits by far more
    than the tolerance."""
    images, prompts = batch4
    prepared = tiny_model.prepare(images[:1], prompts[:1], 2)
    dense = engine_trace(tiny_model, prepared, SparsityConfig(), 2)[0]
    sparse = engine_trace(tiny_model, prepared, SparsityConfig(vision_keep=0.25, vision_scorer="stride"), 2)[0]
    assert (dense.logits[0] - sparse.logits[0]).abs().max() > 1e-2


def test_masked_training_forward_equals_reference(tiny_model, batch4, monkeypatch):
    """Training's masked attention (dropped tokens hidden from all others, each still seeing itself), given the
    reference's decisions, gives at every answer position the logits the reference gives when it feeds that
    token: training and inference compute the same function."""
    import dynllava.train.masked as masked

    case = ("learned", 0.25, "learned", 0.5)
    images, prompts = batch4
    prepared = tiny_model.prepare(images, prompts, NEW)
    tokens = [t.tokens for t in engine_trace(tiny_model, prepared, SparsityConfig(0.25, 0.5), NEW)]
    refs = [reference_of(tiny_model, prepared, i, case, tokens[i])[0] for i in range(len(tokens))]
    b = len(refs)
    lengths = [n + NEW - 1 for n in prepared.lengths]  # prompt + every fed token
    ids = torch.zeros(b, max(lengths), dtype=torch.long)
    answer = torch.zeros(b, max(lengths), dtype=torch.bool)
    text_keep = torch.zeros(b, max(lengths))
    image_decisions = []
    for i, ref in enumerate(refs):
        n = prepared.lengths[i]
        ids[i, :n] = prepared.input_ids[i, :n]
        ids[i, n : lengths[i]] = torch.tensor(ref.tokens[:-1])
        answer[i, n : lengths[i]] = True
        text_keep[i, n : lengths[i]] = torch.tensor(ref.admitted, dtype=torch.float)
        image = (prepared.input_ids[i, :n] == tiny_model.image_token_id).nonzero().flatten().tolist()
        image_decisions.append([float(p in ref.kept) for p in image])
    width = max(map(len, image_decisions))
    decided = [torch.tensor([d + [0.0] * (width - len(d)) for d in image_decisions]), text_keep]

    def given(logits: torch.Tensor, tau: float) -> torch.Tensor:  # the decisions instead of Gumbel samples
        out = decided.pop(0)
        assert out.shape == logits.shape[:-1]
        return out

    monkeypatch.setattr(masked, "gumbel_keep", given)
    valid = torch.arange(ids.shape[1])[None] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        out = masked.masked_forward(tiny_model, ids, prepared.pixel_values, valid, answer, 2, tau=1.0)
    assert not decided, "both decisions were used"
    for i, ref in enumerate(refs):
        start = prepared.lengths[i] - 1
        for step, expected in enumerate(ref.logits):
            torch.testing.assert_close(out.logits[i, start + step].float(), expected, atol=1e-4, rtol=0)
