"""Invariant 3: kept counts are exact, text is never dropped, reported KV bytes are the cache's bytes."""

from __future__ import annotations

import math

import pytest
import torch

from dynllava import costs, engine
from dynllava.config import SparsityConfig
from dynllava.engine import StaticBatch

from tests.conftest import TINY_SPEC, random_image

# K and V of one token in one layer of the test model: 2 x 2 key/value heads x head size 16 x 4 bytes (fp32)
KV_BYTES_PER_TOKEN_LAYER = 2 * TINY_SPEC["text"]["num_key_value_heads"] * 16 * 4


@pytest.mark.parametrize("vision_keep", [1.0, 0.5, 0.3, 0.25, 0.2, 0.05])
@pytest.mark.parametrize("scorer", ["learned", "fastv", "stride", "random"])
def test_image_kept_count_is_ceil_and_text_never_dropped(tiny_model, batch4, scorer, vision_keep):
    images, prompts = batch4
    cfg = SparsityConfig(vision_keep=vision_keep, text_keep=1.0, vision_scorer=scorer)
    prepared = tiny_model.prepare(images, prompts, 4)
    batch = StaticBatch(tiny_model, prepared, [cfg] * 4, 4)
    with torch.inference_mode():
        batch.prefill()
    kept_images = (batch.prompt_keep & batch.image_mask).sum(1).tolist()
    assert kept_images == [math.ceil(round(vision_keep * 16, 6))] * 4
    text = batch.valid & ~batch.image_mask
    assert bool((batch.prompt_keep[text]).all()), "a text token was dropped"
    assert not bool((batch.prompt_keep & ~batch.valid).any()), "a padding slot was kept"


def test_recent_admits_exactly_ceil_of_rate(tiny_model, batch4):
    images, prompts = batch4
    for rate in (0.5, 0.3, 0.75):
        cfg = SparsityConfig(vision_keep=0.5, text_keep=rate, vision_scorer="stride", text_scorer="recent")
        outs = tiny_model.generate(images, prompts, sparsity=cfg, max_new_tokens=21, ignore_eos=True)
        for o in outs:
            decided = o.stats.n_text_generated - 1  # the last token is never fed back
            assert o.stats.n_text_admitted == math.ceil(round(rate * decided, 6))


@pytest.mark.parametrize("mode_text", [("learned", None), ("learned", 0.5), ("h2o", 0.5), ("recent", 0.4)])
def test_reported_kv_bytes_equal_cache_tensors(tiny_model, batch4, monkeypatch, mode_text):
    """Per row: kv_bytes_peak equals its valid slots priced from the pool's tensors themselves; with one-slot
    blocks and one row, the blocks it holds equal it, plus the one slot a final unadmitted token occupied."""
    from dynllava import paged_cache

    text_scorer, text_keep = mode_text
    images, prompts = batch4
    cfg = SparsityConfig(vision_keep=0.25, text_keep=text_keep, vision_scorer="stride", text_scorer=text_scorer)
    captured = {}
    original_prefill = StaticBatch.prefill

    def spy(self):
        captured["batch"] = self
        return original_prefill(self)

    monkeypatch.setattr(StaticBatch, "prefill", spy)
    seen: dict[int, tuple[list[int], list[int]]] = {}
    original_select = paged_cache.PagedKVCache.select

    def remember(self, rows):  # the tables' lengths just before rows leave
        if self is captured["batch"].cache:
            for g in (0, 1):
                for i, n in enumerate(self.lengths(g)):
                    seen.setdefault(i, ([], []))[g].append(n)
        original_select(self, rows)

    monkeypatch.setattr(paged_cache.PagedKVCache, "select", remember)
    outs = tiny_model.generate(images, prompts, sparsity=cfg, max_new_tokens=12, ignore_eos=True)
    pool = captured["batch"].cache.pool
    lengths = captured["batch"].prepared.lengths
    for i, o in enumerate(outs):
        # from the counts alone: layers < K hold the prompt and every fed token (all but the last generated),
        # layers >= K the kept prompt (text + kept image tokens) and the admitted tokens
        s = o.stats
        dense_group, sparse_group = lengths[i] + s.n_text_generated - 1, \
            lengths[i] - s.n_image_tokens + s.n_image_kept + s.n_text_admitted
        assert o.stats.kv_bytes_peak == KV_BYTES_PER_TOKEN_LAYER * (2 * dense_group + 2 * sparse_group)
        assert o.stats.kv_bytes_dense_equivalent == KV_BYTES_PER_TOKEN_LAYER * 4 * dense_group
        counted = 0
        for group_index, group in enumerate(pool.groups):
            n_valid = max(seen[i][group_index])  # the row's valid slots when it left
            for layer_k in group.k:  # every valid slot of every layer, K and V, priced from the block tensors
                counted += 2 * n_valid * layer_k[0, :, 0].numel() * layer_k.element_size()
        assert o.stats.kv_bytes_peak == counted
        assert o.stats.kv_bytes_peak < o.stats.kv_bytes_dense_equivalent

    monkeypatch.setattr(paged_cache, "PAGED_BLOCK_TOKENS", 1)
    held = {}
    original_release = paged_cache.BlockTable.release

    def count(self, pool_):
        held.setdefault("blocks", []).append(len(self.blocks))
        held.setdefault("length", []).append(self.length)
        original_release(self, pool_)

    monkeypatch.setattr(paged_cache.BlockTable, "release", count)
    out = tiny_model.generate(images[:1], prompts[:1], sparsity=cfg, max_new_tokens=12, ignore_eos=True)[0]
    (dense_blocks, sparse_blocks), (dense_len, sparse_len) = held["blocks"], held["length"]
    assert dense_blocks == dense_len  # every token enters layers < K
    assert sparse_blocks - sparse_len in (0, 1)  # at most the slot of a last token that was not admitted
    per_slot = [g.block_bytes for g in captured["batch"].cache.pool.groups]  # one-slot blocks
    assert dense_len * per_slot[0] + sparse_len * per_slot[1] == out.stats.kv_bytes_peak


def test_dense_kv_bytes_equal_dense_equivalent(tiny_model, batch4):
    images, prompts = batch4
    out = tiny_model.generate(images[:1], prompts[:1], sparsity=SparsityConfig(), max_new_tokens=8,
                              ignore_eos=True)[0]
    assert out.stats.kv_bytes_peak == out.stats.kv_bytes_dense_equivalent
    assert out.stats.flops_sparse == out.stats.flops_dense


def test_sparse_stats_are_consistent(tiny_model, batch4):
    images, prompts = batch4
    cfg = SparsityConfig(vision_keep=0.25, text_keep=0.5, vision_scorer="stride", text_scorer="recent")
    out = tiny_model.generate(images[:1], prompts[:1], sparsity=cfg, max_new_tokens=9, ignore_eos=True)[0]
    s = out.stats
    assert (s.n_image_tokens, s.n_image_kept, s.n_text_generated, s.n_text_admitted) == (16, 4, 9, 4)
    # FLOPs exactly as costs prices the run: the prefill at its kept count, then 8 fed tokens, the s-th of which
    # attends to the prompt + s tokens in layers < K, and to the kept prompt + ceil(0.5 * (s - 1)) admitted
    # tokens + itself in layers >= K (recent admits as soon as its budget allows)
    d = engine.model_dims(tiny_model)
    n = tiny_model.prepare(images[:1], prompts[:1], 9).lengths[0]
    kept = n - 16 + 4
    steps = range(1, 9)
    assert s.flops_dense == costs.prefill_flops(d, n, n, 2, 1) + sum(
        costs.decode_step_flops(d, n + k, n + k, 2) for k in steps)
    assert s.flops_sparse == costs.prefill_flops(d, n, kept, 2, 1, 16) + sum(
        costs.decode_step_flops(d, n + k, kept + math.ceil(0.5 * (k - 1)) + 1, 2) for k in steps)
    assert s.ttft_s > 0 and s.decode_s > 0 and s.prefill_s > 0


def test_text_only_row_in_a_batch_matches_alone(tiny_model, batch4):
    images, prompts = batch4
    text_prompt = tiny_model.format_prompt("no picture here", n_images=0)
    cfg = SparsityConfig(vision_keep=0.25, text_keep=0.5, vision_scorer="fastv", text_scorer="recent")
    together = tiny_model.generate([images[0], None], [prompts[0], text_prompt], sparsity=cfg, max_new_tokens=8,
                                   ignore_eos=True)
    alone = tiny_model.generate([None], [text_prompt], sparsity=cfg, max_new_tokens=8, ignore_eos=True)[0]
    assert together[1].token_ids == alone.token_ids
    assert together[1].stats.n_image_tokens == 0


def test_multiple_images_in_one_prompt(tiny_model):
    prompt = tiny_model.format_prompt("compare <image> and <image>".replace("<image>", tiny_model.processor.image_token))
    cfg = SparsityConfig(vision_keep=0.25, text_keep=1.0, vision_scorer="stride")
    out = tiny_model.generate([[random_image(1), random_image(2)]], [prompt], sparsity=cfg, max_new_tokens=4)[0]
    assert (out.stats.n_image_tokens, out.stats.n_image_kept) == (32, 8)


def test_eos_stop_counts_every_fed_token(tiny_model, batch4, monkeypatch):
    """A row ending at EOS fed every token it returns (EOS itself is never fed nor returned)."""
    images, prompts = batch4
    free = tiny_model.generate(images[:1], prompts[:1], max_new_tokens=12, ignore_eos=True)[0]
    eos = free.token_ids[4]
    first = free.token_ids.index(eos)
    monkeypatch.setattr(tiny_model, "eos_token_ids", {eos})
    out = tiny_model.generate(images[:1], prompts[:1], max_new_tokens=12)[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first]
    assert out.stats.n_text_admitted == len(out.token_ids)
    assert out.stats.kv_bytes_peak == out.stats.kv_bytes_dense_equivalent


def test_padded_and_paged_caches_count_the_same_bytes_from_their_tensors(tiny_model, batch4):
    """The same rows decoded into the padded cache and into the block pool: per row, both report the bytes of its
    valid slots priced from their own tensors, and the two agree."""
    from dynllava.engine import new_row
    from dynllava.paged_cache import PagedKVPool

    images, prompts = batch4
    cfg = SparsityConfig(vision_keep=0.25, text_keep=0.5, vision_scorer="stride", text_scorer="recent")
    prepared = tiny_model.prepare(images, prompts, 6)
    m = tiny_model
    counted = {}
    for layout, pool in (("padded", None), ("paged", PagedKVPool(m.n_layers, cfg.layer, m.n_kv_heads, m.head_dim,
                                                                  m.dtype, m.device, block_tokens=4))):
        batch = StaticBatch(m, prepared, [cfg] * 4, 6, kv_pool=pool)
        rows = [new_row(n, cfg, m.device, 6, 0.0, 1.0, None, None, True) for n in prepared.lengths]
        with torch.inference_mode():
            logits = batch.prefill()
            batch.record_prefill(rows)
            for _ in range(5):
                tokens = logits.argmax(-1).tolist()
                for row, token in zip(rows, tokens):
                    row.tokens.append(token)
                logits = batch.step(tokens, rows, [True] * 4)
                for row in rows:
                    row.n_fed += 1
        cache = batch.cache
        for i in range(4):
            from_tensors = sum(cache.lengths(g)[i] * 2 * k[0, :, 0].numel() * k.element_size()
                               for g in (0, 1) for k in (cache.buffers(layer)[0] for layer in range(m.n_layers)
                                                         if cache.group_of(layer) == g))
            assert cache.bytes_in_use(i) == from_tensors, (layout, i)
        counted[layout] = [cache.bytes_in_use(i) for i in range(4)]
    assert counted["padded"] == counted["paged"]
