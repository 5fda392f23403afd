"""Continuous batching: rows that join and leave mid-flight decode exactly as they would alone; the KV budget
bounds the allocation; cancellation frees a slot; requests wait their turn across scorer changes."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from dynllava.batching import QUEUE_TIMEOUT, ContinuousEngine, EngineRequest, QueueFull, reserved_slots
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


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "padded"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_rows_joining_and_leaving_decode_as_alone(tiny_model, temperature, paged):
    """10 requests (dense and sparse mixed) arrive in three waves while others run; each row's tokens, text,
    streamed text and stats equal a batch-1 generate of the same request (paged), with the running batch's K/V
    in the block pool or in the padded cache. Drained, the pool holds no block."""
    engine = ContinuousEngine(tiny_model, max_batch=6, max_prefill_batch=3, paged=paged)
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
    assert (engine._pool is not None) == paged
    if paged:
        assert engine._pool.bytes_held() == 0 and all(g.blocks.used_blocks == 0 for g in engine._pool.groups)


def test_refill_at_refills_in_groups_and_rows_decode_as_alone(tiny_model):
    """refill_at 3 of 4 places: while rows run, waiting rows join only once 3 places are free (the offline
    job's fuller prefills), never one by one; every row still decodes as it would alone."""
    engine = ContinuousEngine(tiny_model, max_batch=4, max_prefill_batch=4, refill_at=3)
    made = [_request(tiny_model, i, SPARSE if i % 3 else DENSE, max_new=2 + (i * 3) % 7) for i in range(9)]
    for req, _ in made:
        engine.submit(req)
    joins = []
    while True:
        running, waiting = len(engine._running), len(engine._waiting) + len(engine._inbox)
        more = engine.step()
        admitted = waiting - len(engine._waiting)
        if admitted:
            joins.append((running, admitted))
        if not more:
            break
    assert joins[0] == (0, 4), "an empty batch fills at once"
    assert all(4 - running >= 3 for running, _ in joins[1:]), joins
    assert sum(n for _, n in joins) == 9
    for req, (image, prompt, events) in made:
        assert _final(events).output.token_ids == _alone(tiny_model, image, prompt, req).token_ids


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "padded"])
def test_kv_budget_bounds_allocation_and_sparsity_buys_concurrency(tiny_model, paged):
    """Under the same byte budget, sparse requests run more at once than dense ones, and the cache never
    allocates more than the budget. Padded: admission counts every row's worst case, so exactly 5 dense rows run
    and none is preempted. Paged: admission counts the blocks held now, rows are preempted when the pool is full
    and resume exactly, even past their admission deadline."""
    probe, _ = _request(tiny_model, 0, DENSE, max_new=150)
    budget = ContinuousEngine(tiny_model, paged=paged)._allocation([reserved_slots(tiny_model, probe)] * 5,
                                                                   DENSE.layer)
    concurrency = {}
    for name, sparsity in (("dense", DENSE), ("sparse", SPARSE)):
        engine = ContinuousEngine(tiny_model, max_batch=16, max_prefill_batch=16, kv_budget_bytes=budget,
                                  paged=paged)
        made = [_request(tiny_model, 0, sparsity, max_new=150) for _ in range(12)]  # equal worst cases
        for req, _ in made:
            engine.submit(req)
        running = []
        while engine.step():
            if not running:  # admitted rows are past their deadline: preempted ones must still come back
                for live in engine._running:
                    live.request.admit_by = 0.0
            running.append(engine.counters.running)
            assert engine.counters.kv_bytes_allocated <= budget
            if paged:
                assert engine._pool.bytes_allocated() <= budget  # the pool's tensors, free blocks included
            else:
                assert engine.counters.kv_bytes_reserved <= budget
        outputs = [_final(events).output for _, (_, _, events) in made]
        assert all(out is not None for out in outputs) and engine.counters.failed == engine.counters.timed_out == 0
        assert all(out.token_ids == outputs[0].token_ids for out in outputs), "identical requests, same answers"
        concurrency[name] = sum(running) / len(running)
        if not paged:
            assert max(running) == {"dense": 5, "sparse": max(running)}[name] and engine.counters.preempted == 0
        elif name == "dense":
            assert engine.counters.preempted > 0, "12 dense rows outgrow a budget of 5: some were preempted"
    assert concurrency["sparse"] > 1.25 * concurrency["dense"]


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


def test_a_request_not_admitted_by_its_deadline_leaves_and_the_rest_run_as_alone(tiny_model):
    """One slot, a running row: a queued request past its admit_by leaves at the next step with QUEUE_TIMEOUT,
    one whose deadline is far off waits its turn; both others give their tokens alone."""
    engine = ContinuousEngine(tiny_model, max_batch=1)
    made = [_request(tiny_model, 0, SPARSE, max_new=12), _request(tiny_model, 1, SPARSE, max_new=6),
            _request(tiny_model, 2, SPARSE, max_new=6)]
    engine.submit(made[0][0])
    engine.step()
    made[1][0].admit_by = time.perf_counter() + 3600
    made[2][0].admit_by = time.perf_counter()  # late by the next step
    engine.submit(made[1][0])
    engine.submit(made[2][0])
    engine.step()
    shed = _final(made[2][1][2])
    assert shed.code == QUEUE_TIMEOUT and "not admitted in time" in shed.error
    assert (engine.counters.running, engine.counters.waiting, engine.counters.timed_out) == (1, 1, 1)
    engine.run_until_idle()
    for req, (image, prompt, events) in made[:2]:
        assert _final(events).output.token_ids == _alone(tiny_model, image, prompt, req).token_ids
    assert engine.counters.finished == 2


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
    pending = engine.snapshot("e0", "serve", SPARSE)  # no step has taken them from the inbox yet: they count
    assert (pending.queue_depth, pending.running) == (5, 0) and pending.oldest_wait_s >= 0
    engine.step()
    live = engine.snapshot("e0", "serve", SPARSE)
    assert (live.running, live.queue_depth, live.requests_per_s) == (4, 1, 0.0) and live.kv_bytes_in_use > 0
    assert live.oldest_wait_s > 0  # the fifth request waits for a slot
    assert 0 < live.busy_fraction <= 1  # the step's own time, over the window's 1 s minimum span
    assert live.admitted_per_s == 4.0  # four admitted in the first step, over the window's 1 s minimum span
    engine.run_until_idle()
    now[0] = 1004.0  # 4 s after the engine started: a new engine rates over its age, not the 60 s window
    done = engine.snapshot("e0", "serve", SPARSE)
    assert (done.requests_per_s, done.output_tokens_per_s) == (5 / 4, 30 / 4)
    assert done.finished == 5 and done.oldest_wait_s is None and done.busy_fraction > live.busy_fraction / 4
    assert 0 < done.ttft_p50_s <= done.ttft_p95_s <= done.latency_p95_s
    assert done.token_latency_p50_s > 0 and done.running == 0 and done.kv_bytes_in_use == 0
    assert done.sparsity["vision_keep"] == 0.25  # device memory: test_telemetry


def test_a_snapshot_during_a_step_counts_who_still_waits(tiny_model):
    """A step takes the inbox into its queue, then prefills for a long time (1.2 s, dense, in the autoscale
    bench): a snapshot in between must count the requests it did not admit. It counted none, and the controller
    saw an empty queue for a whole prefill while a burst waited."""
    engine = ContinuousEngine(tiny_model, max_batch=4, max_prefill_batch=1)
    for req, _ in [_request(tiny_model, i, SPARSE, max_new=2) for i in range(3)]:
        engine.submit(req)
    seen = []
    prefill = engine._prefill
    engine._prefill = lambda group: (seen.append(engine.snapshot("e0", "serve", SPARSE)), prefill(group))
    engine.step()
    assert seen[0].queue_depth == 2 and seen[0].oldest_wait_s > 0
    assert seen[0].prefilling == 1, "the queue also waits for the request being prefilled"
    # the admission it is prefilling counts with the step's time, when the step ends: cost = busy / admitted
    assert (seen[0].admitted_per_s, seen[0].busy_fraction) == (0.0, 0.0)
    done = engine.snapshot("e0", "serve", SPARSE)
    assert done.admitted_per_s == 1.0 and done.busy_fraction > 0 and done.prefilling == 0


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


@pytest.mark.parametrize("phase", ["prefill", "sampling", "stop_check"])
def test_a_row_that_fails_fails_alone_and_its_batch_mates_are_untouched(tiny_model, monkeypatch, phase):
    """One request of a prefill group fails on purpose in one phase (its prefill raises; its sampler raises; its
    stop check raises). It gets an error event; the 4 requests prefilled and decoded with it finish with exactly
    the tokens they give alone, and the engine keeps serving."""
    import dynllava.batching as batching
    import dynllava.engine as engine_module

    made = [_request(tiny_model, i, SPARSE if i % 2 else DENSE, max_new=6, temperature=0.9, seed=7 + i,
                     stop=("zzz-poison",) if i == 2 else ()) for i in range(5)]
    poison = made[2][0]
    if phase == "prefill":  # any pass whose batch holds the poisoned prompt raises
        real_prefill = engine_module.StaticBatch.prefill

        def prefill(self):
            rows = self.prepared.input_ids
            if any(torch.equal(r[: len(p)], p) for r in rows for p in poison.prepared.input_ids):
                raise RuntimeError("poisoned prompt")
            return real_prefill(self)
        monkeypatch.setattr(engine_module.StaticBatch, "prefill", prefill)
    elif phase == "sampling":
        real_sample = engine_module._sample_row

        def sample_row(logits, row):
            if row.stop == ["zzz-poison"] and len(row.tokens) == 2:  # in a shared decoding step, not the prefill
                raise RuntimeError("poisoned sampler")
            return real_sample(logits, row)
        monkeypatch.setattr(engine_module, "_sample_row", sample_row)
    else:
        real_check = batching.check_stop

        def check_stop(model, row):
            if row.stop == ["zzz-poison"] and len(row.tokens) == 3:
                raise RuntimeError("poisoned stop check")
            return real_check(model, row)
        monkeypatch.setattr(batching, "check_stop", check_stop)
    engine = ContinuousEngine(tiny_model, max_batch=8, max_prefill_batch=5)
    for req, _ in made:
        engine.submit(req)
    engine.run_until_idle()
    monkeypatch.undo()
    for i, (req, (image, prompt, events)) in enumerate(made):
        final = _final(events)
        if i == 2:
            assert final.error is not None and "poisoned" in final.error
            continue
        assert final.error is None, final.error
        assert final.output.token_ids == _alone(tiny_model, image, prompt, req).token_ids
    assert engine.counters.failed == 1
    again, (image, prompt, events) = _request(tiny_model, 0, max_new=3)
    engine.submit(again)
    engine.run_until_idle()
    assert _final(events).output.token_ids == _alone(tiny_model, image, prompt, again).token_ids


def _run(model, requests) -> list:
    engine = ContinuousEngine(model, max_batch=8, max_prefill_batch=8)
    for req, _ in requests:
        engine.submit(req)
    engine.run_until_idle()
    return [_final(events).output for _, (_, _, events) in requests]


def test_logit_rules_act_and_a_row_chooses_the_same_tokens_alone_and_batched(tiny_model):
    """Penalties, logit_bias and min_tokens change what a row chooses (greedy and sampled), and depend only on
    the row's own answer: each row gives the same tokens alone as in a batch with rows under other rules."""
    from dynllava.engine import LogitRules

    eos = sorted(tiny_model.eos_token_ids)[0]
    rules = [LogitRules(), LogitRules(frequency_penalty=2.0), LogitRules(presence_penalty=-2.0),
             LogitRules(logit_bias=((7, 100.0),)), LogitRules(logit_bias=((eos, 100.0),), min_tokens=3)]

    def made(i, temperature):
        req, extra = _request(tiny_model, i, max_new=6, temperature=temperature, seed=5 + i, rules=rules[i])
        req.ignore_eos = i != 4  # the EOS-biased row must be free to stop
        return req, extra

    for temperature in (0.0, 0.8):
        batched = _run(tiny_model, [made(i, temperature) for i in range(5)])
        alone = [_run(tiny_model, [made(i, temperature)])[0] for i in range(5)]
        assert [o.token_ids for o in batched] == [o.token_ids for o in alone]
        assert batched[3].token_ids == [7] * 6, "a +100 bias decides"
        assert len(batched[4].token_ids) == 3 and batched[4].finish_reason == "stop", "EOS held back to min_tokens"
        repeats = lambda ids: len(ids) - len(set(ids))  # noqa: E731
        for i, sign in ((1, -1), (2, 1)):  # the frequency penalty repeats less, a negative presence penalty more
            unruled, extra = made(i, temperature)
            unruled.rules = LogitRules()
            plain = _run(tiny_model, [(unruled, extra)])[0].token_ids
            assert sign * (repeats(batched[i].token_ids) - repeats(plain)) >= 0, (i, batched[i].token_ids, plain)


def test_logit_rules_are_checked_before_queueing():
    from dynllava.engine import LogitRules

    with pytest.raises(ValueError, match="frequency_penalty"):
        LogitRules(frequency_penalty=3.0).check(100, 8)
    with pytest.raises(ValueError, match="vocabulary"):
        LogitRules(logit_bias=((100, 1.0),)).check(100, 8)
    with pytest.raises(ValueError, match="min_tokens"):
        LogitRules(min_tokens=9).check(100, 8)


def test_logprobs_follow_the_tokens_and_are_the_same_alone_and_batched(tiny_model):
    """A row that asks for logprobs gets one entry per answer token (the EOS's dropped with it): the chosen
    token's log-probability under the raw model distribution, and its k best alternatives, most likely first.
    Greedy picks the top alternative; the figures are the same alone and in a batch (to float tolerance)."""
    import math

    def made(i, logprobs):
        return _request(tiny_model, i, max_new=5, logprobs=logprobs)

    batched = _run(tiny_model, [made(i, 3 if i % 2 else None) for i in range(4)])
    for i, out in enumerate(batched):
        if i % 2 == 0:
            assert out.logprobs is None
            continue
        alone = _run(tiny_model, [made(i, 3)])[0]
        assert out.token_ids == alone.token_ids and len(out.logprobs) == len(out.token_ids)
        for entry, single, token in zip(out.logprobs, alone.logprobs, out.token_ids):
            assert entry.token_id == token and len(entry.top) == 3 and entry.top[0][0] == token
            assert entry.logprob <= 0 and [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top),
                                                                                 reverse=True)
            assert math.isclose(entry.logprob, single.logprob, abs_tol=1e-4)
    from dynllava.engine import LogitRules

    eos = sorted(tiny_model.eos_token_ids)[0]
    stopping, extra = _request(tiny_model, 1, max_new=8, logprobs=0,
                               rules=LogitRules(logit_bias=((eos, 100.0),), min_tokens=3))
    stopping.ignore_eos = False
    out = _run(tiny_model, [(stopping, extra)])[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 3, "the EOS came 4th and was dropped"
    assert len(out.logprobs) == 3 and all(e.top == () for e in out.logprobs)


def test_under_a_tight_budget_rows_of_every_length_join_and_leave_and_none_fails(tiny_model):
    """Rows of mixed lengths and settings finish at different steps and leave holes in the block pool while
    others grow into new blocks; under a budget that fits only a few rows the pool never exceeds it, no step
    runs out of blocks, and every row decodes as alone."""
    probe, _ = _request(tiny_model, 0, DENSE, max_new=26)
    budget = ContinuousEngine(tiny_model)._allocation([reserved_slots(tiny_model, probe)] * 3, DENSE.layer)
    engine = ContinuousEngine(tiny_model, max_batch=8, max_prefill_batch=2, kv_budget_bytes=budget)
    made = [_request(tiny_model, i, DENSE if i % 3 else SPARSE, max_new=4 + (i * 7) % 23) for i in range(9)]
    for req, _ in made:
        engine.submit(req)
    while engine.step():
        assert engine._pool.bytes_allocated() <= budget
        for group in engine._pool.groups:  # leavers' holes were filled: a step reads only held blocks
            assert group.blocks.highest_used() + 1 == group.blocks.used_blocks
    for req, (image, prompt, events) in made:
        assert _final(events).output.token_ids == _alone(tiny_model, image, prompt, req).token_ids
    assert engine.counters.failed == 0 and engine._pool.bytes_held() == 0
