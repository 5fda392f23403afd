"""Continuous batching: rows that join and leave mid-flight decode exactly as they would alone; the KV budget
bounds the allocation; cancellation frees a slot; requests wait their turn across scorer changes."""

from __future__ import annotations

import threading
import time

import pytest

from dynllava.batching import ContinuousEngine, EngineRequest, QueueFull, reserved_slots
from dynllava.config import SparsityConfig
from tests.conftest import random_image

DENSE = SparsityConfig(vision_keep=1.0, text_keep=1.0, vision_scorer="learned", text_scorer="learned")
SPARSE = SparsityConfig(vision_keep=0.25, text_keep=0.5, vision_scorer="learned", text_scorer="learned")
TEXTS = ["hi", "describe this picture in great detail please", "what colour?", "count the shapes now",
         "where is it", "is there a star", "tell me more", "and then?", "why", "look closely at the left side"]


def _request(model, i: int, sparsity=DENSE, max_new: int | None = None, **kw) -> tuple[EngineRequest, tuple]:
    image, prompt = random_image(i, (30 + 3 * i, 44 - 2 * i)), model.format_prompt(TEXTS[i % len(TEXTS)])
    max_new = max_new or 3 + (i * 5) % 11
    events = []
    req = EngineRequest(model.prepare([image], [prompt], max_new), sparsity, max_new, ignore_eos=True,
                        on_event=events.append, **kw)
    return req, (image, prompt, events)


def _alone(model, image, prompt, req: EngineRequest):
    return model.generate([image], [prompt], sparsity=req.sparsity, max_new_tokens=req.max_new_tokens,
                          temperature=req.temperature, top_p=req.top_p, seed=req.seed, ignore_eos=True)[0]


def _final(events):
    finals = [e for e in events if e.final]
    assert len(finals) == 1 and events[-1] is finals[0], "exactly one final event, and it comes last"
    return finals[0]


STAT_FIELDS = ("n_image_tokens", "n_image_kept", "n_text_generated", "n_text_admitted", "kv_bytes_peak",
               "kv_bytes_dense_equivalent", "flops_dense", "flops_sparse")


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_rows_joining_and_leaving_decode_as_alone(tiny_model, temperature):
    """10 requests (dense and sparse mixed) arrive in three waves while others run; each row's tokens, text,
    streamed text and stats equal a batch-1 static generate of the same request."""
    engine = ContinuousEngine(tiny_model, max_batch=6, max_prefill_batch=3)
    made = [_request(tiny_model, i, DENSE if i % 2 else SPARSE, temperature=temperature, seed=100 + i)
            for i in range(10)]
    waves = [made[:4], made[4:7], made[7:]]
    peak = 0
    for wave in waves:
        for req, _ in wave:
            engine.submit(req)
        for _ in range(2):
            engine.step()
            peak = max(peak, engine.counters.running)
    engine.run_until_idle()
    assert peak == 6, "rows should have joined a running batch up to max_batch"
    for req, (image, prompt, events) in made:
        final = _final(events).output
        alone = _alone(tiny_model, image, prompt, req)
        assert final.token_ids == alone.token_ids
        assert final.text == alone.text
        assert final.token_ids == [t for e in events for t in e.token_ids], "events carry every token once"
        assert len(events) == len(final.token_ids), "one event per step"
        for name in STAT_FIELDS:
            assert getattr(final.stats, name) == pytest.approx(getattr(alone.stats, name)), name
    c = engine.counters
    assert (c.submitted, c.finished, c.running, c.waiting, c.kv_bytes_allocated) == (10, 10, 0, 0, 0)


def test_kv_budget_bounds_allocation_and_sparsity_buys_concurrency(tiny_model):
    """Under the same byte budget, sparse requests run more at once than dense ones, and the cache never
    allocates more than the budget."""
    probe, _ = _request(tiny_model, 0, DENSE, max_new=150)
    engine = ContinuousEngine(tiny_model, max_batch=16, max_prefill_batch=16)
    budget = engine._allocation([reserved_slots(tiny_model, probe)] * 5, DENSE.layer)
    concurrency = {}
    for name, sparsity in (("dense", DENSE), ("sparse", SPARSE)):
        engine = ContinuousEngine(tiny_model, max_batch=16, max_prefill_batch=16, kv_budget_bytes=budget)
        made = [_request(tiny_model, 0, sparsity, max_new=150) for _ in range(12)]  # equal worst cases
        for req, _ in made:
            engine.submit(req)
        peak = 0
        while engine.step():
            peak = max(peak, engine.counters.running)
            assert engine.counters.kv_bytes_allocated <= budget
            assert engine.counters.kv_bytes_reserved <= budget
        assert all(_final(events).output is not None for _, (_, _, events) in made)
        concurrency[name] = peak
    assert concurrency["dense"] == 5
    assert concurrency["sparse"] > concurrency["dense"]


def test_cancel_frees_the_slot_and_others_finish_unchanged(tiny_model):
    engine = ContinuousEngine(tiny_model, max_batch=3)
    made = [_request(tiny_model, i, SPARSE, max_new=30) for i in range(4)]
    tickets = [engine.submit(req) for req, _ in made]
    for _ in range(5):
        engine.step()
    assert (engine.counters.running, engine.counters.waiting) == (3, 1)
    in_use = engine.counters.kv_bytes_in_use
    engine.cancel(tickets[1])
    engine.step()  # the cancelled row leaves, the waiting one joins
    assert engine.counters.running == 3 and engine.counters.cancelled == 1
    assert _final(made[1][1][2]).error == "cancelled"
    engine.run_until_idle()
    for i in (0, 2, 3):
        req, (image, prompt, events) = made[i]
        assert _final(events).output.token_ids == _alone(tiny_model, image, prompt, req).token_ids
    assert in_use > 0 and engine.counters.kv_bytes_in_use == 0


def test_request_with_another_text_scorer_waits_for_the_batch_to_drain(tiny_model):
    engine = ContinuousEngine(tiny_model, max_batch=8)
    recent = SparsityConfig(vision_keep=0.5, text_keep=0.5, vision_scorer="fastv", text_scorer="recent")
    first, _ = _request(tiny_model, 0, SPARSE, max_new=6)
    other, (image, prompt, other_events) = _request(tiny_model, 1, recent, max_new=5)
    behind, (_, _, behind_events) = _request(tiny_model, 2, SPARSE, max_new=4)
    for req in (first, other, behind):
        engine.submit(req)
    engine.step()
    assert (engine.counters.running, engine.counters.waiting) == (1, 2), "nothing overtakes the waiting request"
    engine.run_until_idle()
    assert _final(other_events).output.token_ids == _alone(tiny_model, image, prompt, other).token_ids
    assert _final(behind_events).output is not None


def test_submit_rejects_what_can_never_run(tiny_model):
    req, _ = _request(tiny_model, 0, DENSE, max_new=20)
    small = ContinuousEngine(tiny_model, kv_budget_bytes=1024)
    with pytest.raises(ValueError, match="over the engine's budget"):
        small.submit(req)
    with pytest.raises(ValueError, match="layer K=9"):
        ContinuousEngine(tiny_model).submit(_request(tiny_model, 0, DENSE.replace(layer=9))[0])
    full = ContinuousEngine(tiny_model, max_waiting=2)
    full.submit(req)
    full.submit(req)
    with pytest.raises(QueueFull):
        full.submit(req)


def test_threaded_loop_serves_concurrent_submitters(tiny_model):
    engine = ContinuousEngine(tiny_model, max_batch=4)
    engine.start()
    made = [_request(tiny_model, i, SPARSE if i % 3 else DENSE) for i in range(8)]
    try:
        threads = [threading.Thread(target=lambda chunk: [engine.submit(req) for req, _ in chunk],
                                    args=(made[k::2],)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        deadline = time.monotonic() + 60
        while engine.counters.finished < 8 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        engine.stop()
    for req, (image, prompt, events) in made:
        assert _final(events).output.token_ids == _alone(tiny_model, image, prompt, req).token_ids


def test_static_mode_starts_a_batch_only_when_the_last_one_finished(tiny_model):
    engine = ContinuousEngine(tiny_model, max_batch=2, max_prefill_batch=2, join_running=False)
    made = [_request(tiny_model, i, SPARSE, max_new=4 + 4 * i) for i in range(3)]
    engine.submit_many([req for req, _ in made])
    running = []
    while engine.step():
        running.append((engine.counters.running, engine.counters.waiting))
    assert running[0] == (2, 1)
    assert (1, 1) in running, "the shorter row left and nobody joined its slot"
    for req, (image, prompt, events) in made:
        assert _final(events).output.token_ids == _alone(tiny_model, image, prompt, req).token_ids


def test_snapshot_reports_the_window_and_current_state(tiny_model):
    now = [1000.0]  # the window's clock: rates are exact, however long the steps take
    engine = ContinuousEngine(tiny_model, max_batch=4, telemetry_window_s=60, clock=lambda: now[0])
    made = [_request(tiny_model, i, SPARSE, max_new=6) for i in range(5)]
    for req, _ in made:
        engine.submit(req)
    engine.step()
    live = engine.snapshot("e0", "serve", SPARSE)
    assert (live.running, live.queue_depth, live.requests_per_s) == (4, 1, 0.0) and live.kv_bytes_in_use > 0
    assert live.oldest_wait_s > 0  # the fifth request waits for a slot
    engine.run_until_idle()
    now[0] = 1004.0  # 4 s after the engine started: a new engine rates over its age, not the 60 s window
    done = engine.snapshot("e0", "serve", SPARSE)
    assert (done.requests_per_s, done.output_tokens_per_s) == (5 / 4, 30 / 4)
    assert done.finished == 5 and done.oldest_wait_s is None
    assert 0 < done.ttft_p50_s <= done.ttft_p95_s <= done.latency_p95_s
    assert done.token_latency_p50_s > 0 and done.running == 0 and done.kv_bytes_in_use == 0
    assert done.sparsity["vision_keep"] == 0.25  # device memory: test_telemetry


def test_queued_requests_that_follow_the_engine_take_its_new_keep_setting(tiny_model):
    """A keep order (set_keep) reaches requests already queued that did not choose their ratios; a request
    that chose them keeps its own. Each runs exactly as it would alone at the setting it ran at."""
    engine = ContinuousEngine(tiny_model, max_batch=1)
    first, _ = _request(tiny_model, 0, DENSE, max_new=4, follows_engine=True)
    following, (image, prompt, events) = _request(tiny_model, 1, DENSE, max_new=4, follows_engine=True)
    chosen, (_, _, chosen_events) = _request(tiny_model, 2, DENSE, max_new=4)
    for req in (first, following, chosen):
        engine.submit(req)
    engine.step()  # the first is admitted dense; the others wait for the slot
    engine.set_keep(SPARSE.vision_keep, SPARSE.text_keep)
    engine.run_until_idle()
    ran = _final(events).output
    assert (ran.sparsity.vision_keep, ran.sparsity.text_keep) == (0.25, 0.5)
    assert _final(chosen_events).output.sparsity.vision_keep == 1.0
    alone = _alone(tiny_model, image, prompt, EngineRequest(following.prepared, ran.sparsity, 4))
    assert ran.token_ids == alone.token_ids and ran.stats.n_image_kept == alone.stats.n_image_kept < 16
