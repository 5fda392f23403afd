"""Invariants 1 and 2 (DESIGN.md): dense equals transformers' own LLaVA; a batch equals each row alone."""

from __future__ import annotations

import pytest
import torch

from dynllava.config import SparsityConfig
from dynllava.engine import StaticBatch

DENSE = SparsityConfig(vision_keep=1.0, text_keep=1.0)
NEW = 10

PAIRS = [("learned", "learned"), ("fastv", "h2o"), ("stride", "recent"), ("random", "keep_all")]


def sparse(vision: str, text: str, mode: str) -> SparsityConfig:
    return SparsityConfig(vision_keep=0.25, text_keep=1.0 if text == "keep_all" else 0.5, vision_scorer=vision,
                          text_scorer=text, mode=mode)


def hf_generate(model, images, prompts, new_tokens):
    """transformers' own greedy generate on the processor's (left-padded) inputs -> list of new token ids."""
    inputs = model.processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    out = model.hf_model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
    return [row.tolist() for row in out[:, inputs["input_ids"].shape[1]:]]


def test_dense_tokens_equal_hf_generate_batch1(tiny_model, batch4):
    images, prompts = batch4
    for i in range(4):
        ours = tiny_model.generate([images[i]], [prompts[i]], sparsity=DENSE, max_new_tokens=NEW, ignore_eos=True)
        assert ours[0].token_ids == hf_generate(tiny_model, [images[i]], [prompts[i]], NEW)[0]


def test_dense_tokens_equal_hf_generate_ragged_batch4(tiny_model, batch4):
    images, prompts = batch4
    ours = tiny_model.generate(images, prompts, sparsity=DENSE, max_new_tokens=NEW, ignore_eos=True)
    theirs = hf_generate(tiny_model, images, prompts, NEW)
    assert [o.token_ids for o in ours] == theirs


@torch.inference_mode()
def test_dense_logits_match_hf_forward_within_1e4(tiny_model, batch4):
    """Prefill and every decoding step, teacher-forced on HF's tokens, against HF's full forward."""
    images, prompts = batch4
    theirs = hf_generate(tiny_model, images, prompts, NEW)
    for mode in ("kv_cache", "no_cache"):
        prepared = tiny_model.prepare(images, prompts, NEW)
        batch = StaticBatch(tiny_model, prepared, [DENSE.replace(mode=mode)] * 4, NEW)
        from dynllava.engine import DecodingRow

        rows = [DecodingRow(n, DENSE, None) for n in prepared.lengths]
        step_logits = [batch.prefill()]
        for t in range(NEW - 1):
            tokens = [seq[t] for seq in theirs]
            for row, tok in zip(rows, tokens):
                row.tokens.append(tok)
            step_logits.append(batch.step(tokens, rows, [True] * 4))
            for row in rows:
                row.n_fed += 1
        for i in range(4):
            full = torch.tensor([prepared.input_ids[i, : prepared.lengths[i]].tolist() + theirs[i]])
            pixels = prepared.pixel_values[i : i + 1]
            ref = tiny_model.hf_model(input_ids=full, pixel_values=pixels).logits[0].float()
            for t in range(NEW):
                torch.testing.assert_close(step_logits[t][i], ref[prepared.lengths[i] - 1 + t], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", ["kv_cache", "no_cache"])
@pytest.mark.parametrize("vision,text", PAIRS)
def test_batch_equals_each_row_alone(tiny_model, batch4, vision, text, mode):
    images, prompts = batch4
    cfg = sparse(vision, text, mode)
    together = tiny_model.generate(images, prompts, sparsity=cfg, max_new_tokens=NEW, ignore_eos=True)
    for i in range(4):
        alone = tiny_model.generate([images[i]], [prompts[i]], sparsity=cfg, max_new_tokens=NEW, ignore_eos=True)[0]
        assert together[i].token_ids == alone.token_ids
        assert together[i].stats.n_image_kept == alone.stats.n_image_kept
        assert together[i].stats.n_text_admitted == alone.stats.n_text_admitted
        assert together[i].stats.kv_bytes_peak == alone.stats.kv_bytes_peak


@pytest.mark.parametrize("vision,text", PAIRS)
def test_cache_and_recompute_modes_agree(tiny_model, batch4, vision, text):
    """Decoding with the sparse cache and recomputing the kept context are the same computation."""
    images, prompts = batch4
    cached = tiny_model.generate(images, prompts, sparsity=sparse(vision, text, "kv_cache"), max_new_tokens=NEW,
                                 ignore_eos=True)
    recomputed = tiny_model.generate(images, prompts, sparsity=sparse(vision, text, "no_cache"),
                                     max_new_tokens=NEW, ignore_eos=True)
    assert [o.token_ids for o in cached] == [o.token_ids for o in recomputed]
    assert [o.stats.n_text_admitted for o in cached] == [o.stats.n_text_admitted for o in recomputed]


def test_sparsity_changes_the_computation(tiny_model, batch4):
    """A guard that the tests above compare something: dropping 75% of image tokens changes some answer."""
    images, prompts = batch4
    dense = tiny_model.generate(images, prompts, sparsity=DENSE, max_new_tokens=NEW, ignore_eos=True)
    pruned = tiny_model.generate(images, prompts, sparsity=sparse("stride", "recent", "kv_cache"),
                                 max_new_tokens=NEW, ignore_eos=True)
    assert [o.token_ids for o in dense] != [o.token_ids for o in pruned]


def test_seeded_sampling_is_reproducible_and_batch_invariant(tiny_model, batch4):
    images, prompts = batch4
    cfg = sparse("stride", "recent", "kv_cache")
    kw = dict(sparsity=cfg, max_new_tokens=NEW, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True)
    a = tiny_model.generate(images, prompts, **kw)
    b = tiny_model.generate(images, prompts, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    alone = tiny_model.generate([images[2]], [prompts[2]], **kw)[0]
    assert alone.token_ids == a[2].token_ids
    greedy = tiny_model.generate(images, prompts, sparsity=cfg, max_new_tokens=NEW, ignore_eos=True)
    assert [o.token_ids for o in a] != [o.token_ids for o in greedy]
