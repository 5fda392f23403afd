"""Preemption on the paged cache: under a KV budget the running rows outgrow, the youngest row is preempted
(its blocks freed) and recomputed later, and its answer is the one it would have produced, streamed once. A
fuzz of random arrivals, cancellations and lengths holds the block accounting against the rows' tables."""

from __future__ import annotations

import random

import pytest

from dynllava.batching import ContinuousEngine, reserved_slots
from tests.dynllava.test_batching import DENSE, SPARSE, STAT_FIELDS, _alone, _final, _request


def test_preempted_rows_resume_with_the_tokens_they_would_have_produced(tiny_model):
    """A budget that fits the flood's prompts but not its answers: the youngest rows are preempted, freed and
    recomputed later. Every answer (sampled with seeds, logprobs asked) equals its batch-1 run token for token,
    with the same logprobs and stats, and each token was streamed once, in order."""
    probe, _ = _request(tiny_model, 0, DENSE, max_new=40)
    budget = ContinuousEngine(tiny_model)._allocation([reserved_slots(tiny_model, probe)] * 2, DENSE.layer)
    engine = ContinuousEngine(tiny_model, max_batch=8, max_prefill_batch=8, kv_budget_bytes=budget)
    made = [_request(tiny_model, i, DENSE if i % 2 else SPARSE, max_new=40, temperature=0.9, seed=7 + i,
                     logprobs=2) for i in range(6)]
    for req, _ in made:
        engine.submit(req)
    while engine.step():
        assert engine._pool.bytes_allocated() <= budget
    assert engine.counters.preempted >= 2 and engine.counters.failed == 0
    for req, (image, prompt, events) in made:
        final = _final(events).output
        alone = tiny_model.generate([image], [prompt], sparsity=req.sparsity, max_new_tokens=40,
                                                  temperature=0.9, seed=req.seed, ignore_eos=True)[0]
        assert final.token_ids == alone.token_ids
        assert final.token_ids == [t for e in events for t in e.token_ids], "each token streamed once, in order"
        assert [lp.token_id for lp in final.logprobs] == final.token_ids
        for name in STAT_FIELDS:
            assert getattr(final.stats, name) == pytest.approx(getattr(alone.stats, name)), name
    assert engine._pool.bytes_held() == 0


def test_a_preempted_row_keeps_its_setting_when_the_engine_setting_moves(tiny_model):
    """Requests that follow the engine's keep setting: a controller's order (set_keep) reaches the ones not
    admitted yet, but a row preempted mid-answer resumes at the setting its answer began with. Every answer
    equals its batch-1 run at the setting it reports."""
    probe, _ = _request(tiny_model, 0, DENSE, max_new=30)
    budget = ContinuousEngine(tiny_model)._allocation([reserved_slots(tiny_model, probe)] * 2, DENSE.layer)
    engine = ContinuousEngine(tiny_model, max_batch=8, max_prefill_batch=8, kv_budget_bytes=budget)
    made = [_request(tiny_model, i, DENSE, max_new=30, follows_engine=True) for i in range(6)]
    for req, _ in made:
        engine.submit(req)
    while engine.counters.preempted == 0 and engine.step():
        pass
    assert engine.counters.preempted > 0
    started = [bool(events) for _, (_, _, events) in made]  # rows that streamed tokens before the order
    engine.set_keep(0.5, 0.8)
    engine.run_until_idle()
    assert any(started) and not all(started)
    for (req, (image, prompt, events)), began in zip(made, started):
        out = _final(events).output
        assert (out.sparsity.vision_keep, out.sparsity.text_keep) == ((1.0, 1.0) if began else (0.5, 0.8))
        alone = tiny_model.generate([image], [prompt], sparsity=out.sparsity, max_new_tokens=30, ignore_eos=True)[0]
        assert out.token_ids == alone.token_ids
        for name in STAT_FIELDS:  # what it kept and held: all at the one setting it reports
            assert getattr(out.stats, name) == pytest.approx(getattr(alone.stats, name)), name


def _check_blocks(engine: ContinuousEngine, budget: int) -> None:
    """The pool's bookkeeping against the running rows' tables: every held block belongs to exactly one row,
    each row holds the blocks its slots need (and at most one more, for the next token), and the pool's tensors
    stay within the budget."""
    pool = engine._pool
    if pool is None:  # nothing has run yet
        assert engine.counters.running == 0
        return
    assert pool.bytes_allocated() <= budget
    cache = getattr(engine._decoding, "cache", None)
    tables = cache.tables if cache is not None else ([], [])
    assert len(tables[0]) == engine.counters.running
    for group, store in enumerate(pool.groups):
        held = [b for t in tables[group] for b in t.blocks]
        assert len(held) == len(set(held)) == store.blocks.used_blocks, "a block held twice, or leaked"
        assert all(0 <= b < store.blocks.n_blocks for b in held)
        for t in tables[group]:
            need = store.blocks.blocks_for(t.length)
            assert need <= len(t.blocks) <= store.blocks.blocks_for(t.length + 1)


@pytest.mark.parametrize("seed", [0, 1])
def test_fuzz_arrivals_cancellations_and_preemptions_keep_the_pool_consistent(tiny_model, seed):
    """Random arrivals (dense and sparse, 1-30 new tokens) and cancellations under a budget of about three
    rows: after every step the block bookkeeping holds (_check_blocks); every request ends once (answered or
    cancelled); answered ones equal their batch-1 runs; drained, no block is held."""
    rng = random.Random(seed)
    probe, _ = _request(tiny_model, 0, DENSE, max_new=30)
    budget = ContinuousEngine(tiny_model)._allocation([reserved_slots(tiny_model, probe)] * 3, DENSE.layer)
    engine = ContinuousEngine(tiny_model, max_batch=8, max_prefill_batch=3, kv_budget_bytes=budget)
    made, tickets = [], []
    for step in range(400):
        if len(made) < 24 and rng.random() < 0.4:
            i = len(made)
            made.append(_request(tiny_model, i % 10, rng.choice([DENSE, SPARSE]), max_new=rng.randint(1, 30)))
            tickets.append(engine.submit(made[-1][0]))
        if made and rng.random() < 0.05:
            engine.cancel(rng.choice(tickets))
        busy = engine.step()
        _check_blocks(engine, budget)
        if not busy and len(made) == 24:
            break
    engine.run_until_idle()
    assert engine.counters.preempted > 0, "the budget was meant to force preemptions"
    for req, (image, prompt, events) in made:
        final = _final(events)
        if final.error is not None:
            assert final.error == "cancelled"
            continue
        assert final.output.token_ids == _alone(tiny_model, image, prompt, req).token_ids
        assert final.output.token_ids == [t for e in events for t in e.token_ids]
    assert engine._pool.bytes_held() == 0
