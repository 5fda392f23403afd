"""The scheduler on plain records, no model: arrival order, budgets, no starvation, static batching, solo."""

from __future__ import annotations

import random

import pytest

from dynllava.scheduler import KVLayout, PagedLayout, Scheduled, SchedulerLimits, StepPlan, schedule

LAYOUT = KVLayout(n_layers=4, slot_bytes_per_layer=10, block_tokens=8)
SIG = (2, "kv_cache", "learned")


def req(ticket: int, tokens: int = 10, new: int = 6, signature: tuple = SIG, solo: bool = False) -> Scheduled:
    return Scheduled(ticket, tokens, (tokens + new + 1, tokens // 2 + new + 1), signature, solo)


def limits(**kw) -> SchedulerLimits:
    base = dict(max_batch=4, max_prefill_batch=4, max_prefill_tokens=None, kv_budget_bytes=None)
    return SchedulerLimits(**(base | kw))


def test_allocation_pads_rows_to_the_longest_and_rounds_to_blocks():
    # dense group: 2 layers, 2 rows padded to 17 -> 24 slots; sparse group: 2 layers, max 9 -> 16 slots
    assert LAYOUT.allocation_bytes([(17, 9), (3, 2)], layer_k=2) == 2 * 24 * 2 * 10 + 2 * 16 * 2 * 10
    assert LAYOUT.allocation_bytes([], layer_k=2) == 0


def test_paged_allocation_rounds_each_row_to_its_own_blocks():
    paged = PagedLayout(n_layers=4, slot_bytes_per_layer=10, block_tokens=8)
    # dense group: 3 + 1 blocks of 8 slots, 2 layers; sparse group: 2 + 1 blocks, 2 layers
    assert paged.allocation_bytes([(17, 9), (3, 2)], layer_k=2) == 4 * 8 * 2 * 10 + 3 * 8 * 2 * 10
    assert paged.allocation_bytes([(17, 9), (3, 2)], layer_k=2) < LAYOUT.allocation_bytes([(17, 9), (3, 2)], 2)
    assert paged.allocation_bytes([], layer_k=2) == 0


def test_the_watermark_keeps_room_for_running_rows_to_grow():
    paged = PagedLayout(n_layers=4, slot_bytes_per_layer=10, block_tokens=8)
    running = [Scheduled(10, 10, (24, 24), SIG)]
    budget = paged.allocation_bytes([(24, 24), (8, 8)], 2)  # exactly the running row and one more block each
    assert schedule([Scheduled(0, 7, (8, 8), SIG)], running, limits(kv_budget_bytes=budget), paged).admit == (0,)
    plan = schedule([Scheduled(0, 7, (8, 8), SIG)], running, limits(kv_budget_bytes=budget, kv_watermark=0.1), paged)
    assert plan.admit == () and plan.waiting_on == "kv_budget"


def test_admits_the_head_of_the_queue_within_the_batch():
    plan = schedule([req(i) for i in range(6)], [req(10), req(11)], limits(), LAYOUT)
    assert plan == StepPlan((0, 1), 20, True, "batch")
    assert schedule([], [], limits(), LAYOUT) == StepPlan((), 0, False, None)
    assert schedule([req(0)], [], limits(), LAYOUT) == StepPlan((0,), 10, True, None)


def test_prefill_budgets_bound_one_step_but_a_long_prompt_still_runs():
    waiting = [req(0, tokens=30), req(1, tokens=30), req(2, tokens=30)]
    assert schedule(waiting, [], limits(max_prefill_tokens=64), LAYOUT).admit == (0, 1)
    assert schedule(waiting, [], limits(max_prefill_tokens=64), LAYOUT).waiting_on == "prefill_tokens"
    assert schedule([req(0, tokens=500)], [], limits(max_prefill_tokens=64), LAYOUT).admit == (0,)
    assert schedule(waiting, [], limits(max_prefill_batch=1), LAYOUT) == StepPlan((0,), 30, True, "prefill_batch")


def test_nothing_overtakes_a_head_that_must_wait():
    other = (1, "kv_cache", "learned")
    waiting = [req(0, signature=other), req(1), req(2)]
    plan = schedule(waiting, [req(10)], limits(), LAYOUT)
    assert plan == StepPlan((), 0, True, "signature")
    big = req(0, tokens=200)
    budget = LAYOUT.allocation_bytes([req(10).reserve, req(1).reserve], 2)  # the small one would fit, not the head
    plan = schedule([big, req(1)], [req(10)], limits(kv_budget_bytes=budget), LAYOUT)
    assert plan.admit == () and plan.waiting_on == "kv_budget"
    # the head's group may not change signature mid-way either: 1 joins 0's group, 2 waits
    plan = schedule([req(0, signature=other), req(1, signature=other), req(2)], [], limits(), LAYOUT)
    assert plan.admit == (0, 1) and plan.waiting_on == "signature"


def test_static_batching_waits_for_the_running_batch_to_finish():
    assert schedule([req(0)], [req(10)], limits(join_running=False), LAYOUT).waiting_on == "static"
    assert schedule([req(0), req(1)], [], limits(join_running=False), LAYOUT).admit == (0, 1)


def test_a_solo_request_is_prefilled_alone():
    assert schedule([req(0, solo=True), req(1)], [], limits(), LAYOUT).admit == (0,)
    plan = schedule([req(0), req(1, solo=True), req(2)], [], limits(), LAYOUT)
    assert plan.admit == (0,) and plan.waiting_on == "solo"


def test_refill_at_waits_until_enough_places_are_free():
    """Offline refilling: with 2 of 4 places free, refill_at 3 admits nothing; with 3 free, it admits up to
    the batch; with nothing running it admits at once (the head never waits on an empty batch)."""
    plan = schedule([req(0), req(1), req(2)], [req(10), req(11)], limits(refill_at=3), LAYOUT)
    assert plan == StepPlan((), 0, True, "refill")
    plan = schedule([req(0), req(1), req(2), req(3)], [req(10)], limits(refill_at=3), LAYOUT)
    assert plan.admit == (0, 1, 2) and plan.waiting_on == "batch"
    assert schedule([req(0)], [], limits(refill_at=4), LAYOUT).admit == (0,)
    assert schedule([req(0)], [req(10), req(11)], limits(refill_at=1), LAYOUT).admit == (0,)


@pytest.mark.parametrize("refill_at", [1, 3])
@pytest.mark.parametrize("seed", range(20))
def test_simulated_traffic_keeps_every_budget_and_order(seed, refill_at):
    """A random arrival stream on a fake clock (one tick per step): each step the plan is executed, rows finish
    after their own number of tokens. Every step respects the batch, prefill and KV budgets; requests are
    admitted exactly in arrival order; every request is admitted (no starvation), and a queue head waits only
    while the batch is full, the KV budget is spent or the running rows have another signature."""
    rng = random.Random(seed)
    signatures = [SIG, (1, "kv_cache", "learned"), (2, "no_cache", "learned")]
    arrivals = sorted((rng.randrange(200), i) for i in range(60))
    requests = {i: req(i, tokens=rng.randrange(5, 80), new=rng.randrange(1, 30),
                       signature=rng.choice(signatures) if rng.random() < 0.2 else SIG) for _, i in arrivals}
    lim = limits(max_batch=6, max_prefill_batch=3, max_prefill_tokens=120,
                 kv_budget_bytes=LAYOUT.allocation_bytes([(112, 112)] * 4, 2), refill_at=refill_at)
    remaining = {i: rng.randrange(1, 30) for i in requests}  # decoding steps until each finishes
    waiting: list[Scheduled] = []
    running: list[Scheduled] = []
    admitted: list[int] = []
    for clock in range(2000):
        waiting += [requests[i] for t, i in arrivals if t == clock]
        plan = schedule(waiting, running, lim, LAYOUT)
        joined = [r for r in waiting if r.ticket in plan.admit]
        assert not (joined and running) or lim.max_batch - len(running) >= refill_at
        assert [r.ticket for r in joined] == [r.ticket for r in waiting[: len(joined)]]
        assert plan.prefill_tokens == sum(r.prompt_tokens for r in joined)
        assert len(joined) <= lim.max_prefill_batch
        assert len(joined) <= 1 or plan.prefill_tokens <= lim.max_prefill_tokens
        waiting = waiting[len(joined):]
        running += joined
        admitted += [r.ticket for r in joined]
        assert len(running) <= lim.max_batch and len({r.signature for r in running}) <= 1
        assert LAYOUT.allocation_bytes([r.reserve for r in running], 2) <= lim.kv_budget_bytes
        if waiting and not joined:
            assert plan.waiting_on in ("batch", "kv_budget", "signature") + (("refill",) if refill_at > 1 else ())
            assert running
        for r in running:
            remaining[r.ticket] -= 1
        running = [r for r in running if remaining[r.ticket] > 0]
        if not waiting and not running and clock > 200:
            break
    assert admitted == [i for _, i in arrivals], "every request admitted, in arrival order"


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_batch"):
        SchedulerLimits(0, 1, None, None)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        SchedulerLimits(1, 1, 0, None)
    with pytest.raises(ValueError, match="kv_watermark"):
        SchedulerLimits(1, 1, None, 100, kv_watermark=1.0)
    with pytest.raises(ValueError, match="refill_at"):
        SchedulerLimits(4, 1, None, None, refill_at=5)
    with pytest.raises(ValueError, match="refill_at"):
        SchedulerLimits(4, 1, None, None, refill_at=0)
