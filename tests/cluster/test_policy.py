"""The control policy, pure: the ladder, recovery after a restart, single decisions, and a simulated loop (a
fluid-queue model of replicas under a 1x -> 4x -> 1x load step) in which the policy keeps TTFT within target,
scales out only when sparsity is exhausted, and gives both back when the load drops."""

from __future__ import annotations

import pytest

from cluster.policy import (ActorState, OfflineProgress, PolicyContext, PolicyState, decide, level_of,
                            projected_wait_s)
from cluster.sla import SLA, KeepSetting, OfflineTargets, OnlineTargets, Pacing
from dynllava.telemetry import TelemetrySnapshot

SLA_ = SLA(online=OnlineTargets(ttft_p95_s=1.0), floor=KeepSetting(0.1, 0.3),
           pacing=Pacing(levels=6, cooldown_s=2, relax_after_s=10, scale_cooldown_s=15, release_after_s=30))


def snap(actor: str = "r0", kind: str = "serve", ttft: float | None = 0.2, rate: float = 5.0,
         keep: KeepSetting = KeepSetting(), used: int = 10, total: int = 100, finished: int = 0,
         oldest_wait: float | None = None, kv_held: int = 0, kv_budget: int = 0, queue: int | None = None,
         busy: float | None = None, prefilling: int = 0) -> TelemetrySnapshot:
    queue = (0 if oldest_wait is None else 3) if queue is None else queue
    return TelemetrySnapshot(actor, kind, 0.0, 30.0, rate, rate * 30, ttft, ttft, None, None, None,
                             queue, 1, 0, kv_held, used, total,
                             {"vision_keep": keep.vision_keep, "text_keep": keep.text_keep}, finished, oldest_wait,
                             kv_budget, busy_fraction=busy, admitted_per_s=rate, prefilling=prefilling)


def test_ladder_runs_from_preferred_to_floor_and_state_recovers_from_reports():
    assert SLA_.keep_at(0) == KeepSetting(1.0, 1.0) and SLA_.keep_at(6) == KeepSetting(0.1, 0.3)
    visions = [SLA_.keep_at(lv).vision_keep for lv in range(7)]
    assert visions == sorted(visions, reverse=True)
    for level in range(7):
        assert level_of(SLA_, {"vision_keep": SLA_.keep_at(level).vision_keep,
                               "text_keep": SLA_.keep_at(level).text_keep}) == level


def test_single_decisions():
    ctx = lambda now, *snaps, counts=None: PolicyContext(now, SLA_, snaps, counts or {"serve": 1})  # noqa: E731
    decisions, state = decide(ctx(0, snap(ttft=0.95)), PolicyState())
    assert [(d.action, d.value) for d in decisions] == [("set_sparsity", SLA_.keep_at(1))]
    decisions, state = decide(ctx(1, snap(ttft=3.0, keep=SLA_.keep_at(1))), state)
    assert decisions == [], "within the cooldown nothing moves"
    decisions, state = decide(ctx(2, snap(ttft=3.0, keep=SLA_.keep_at(1), oldest_wait=3.0)), state)
    assert decisions[0].value == SLA_.keep_at(3), "far over target: max_step levels at once"
    decisions, _ = decide(ctx(0, snap(ttft=1.1)), PolicyState())
    assert decisions[0].value == SLA_.keep_at(2), "already missing, if only just: max_step levels"
    decisions, _ = decide(ctx(3, snap(ttft=0.1, used=95)), PolicyState())
    assert decisions and "memory" in decisions[0].reason
    decisions, _ = decide(ctx(3, snap(ttft=0.1, kv_held=95, kv_budget=100)), PolicyState())
    assert decisions and "memory 1.06 of ceiling" in decisions[0].reason, "a full KV budget tightens"
    decisions, _ = decide(ctx(3, snap(ttft=0.1, kv_held=80, kv_budget=100)), PolicyState())
    assert decisions == [], "room in the KV budget: nothing to do"
    _, state = decide(ctx(4, snap("a"), snap("b")), PolicyState())
    _, state = decide(ctx(5, snap("b")), state)
    assert set(state.actors) == {"b"}, "a dead actor is dropped"


def test_a_p95_alone_tightens_once_per_window_what_waits_once_per_cooldown():
    """One slow request stays in the window's p95 for the whole window; tightening again on it every cooldown
    would walk the ladder down on a single sample. What waits shows a move's effect at once."""
    ctx = lambda now, s: PolicyContext(now, SLA_, (s,), {"serve": 1})  # noqa: E731
    decisions, state = decide(ctx(0, snap(ttft=0.95)), PolicyState())
    assert [d.value for d in decisions] == [SLA_.keep_at(1)]
    for now in (2, 10, 29):  # the snapshot's window is 30 s
        decisions, state = decide(ctx(now, snap(ttft=0.95, keep=SLA_.keep_at(1))), state)
        assert decisions == [], f"the same p95 at {now} s"
    decisions, state = decide(ctx(30, snap(ttft=0.95, keep=SLA_.keep_at(1))), state)
    assert [d.value for d in decisions] == [SLA_.keep_at(2)], "a window later it is the new level's own p95"
    decisions, _ = decide(ctx(32, snap(ttft=0.95, keep=SLA_.keep_at(2), oldest_wait=0.95)), state)
    assert [d.value for d in decisions] == [SLA_.keep_at(3)], "the queue's head waits: a cooldown is enough"


def test_a_relax_keeps_headroom_at_the_denser_levels_measured_cost():
    """Slack at a sparse level says nothing of a denser one. The policy records a level's cost per request once
    the window holds only that level, and relaxes only while the load at the denser level's cost keeps the
    engine busy at most `slack` (0.6) of the time."""
    ctx = lambda now, s: PolicyContext(now, SLA_, (s,), {"serve": 1})  # noqa: E731
    _, state = decide(ctx(0, snap(rate=1.0, busy=0.5)), PolicyState())
    assert state.actors["r0"].costs == {0: 0.5}, "busy 0.5 at 1 admission/s: 0.5 s per request"
    decisions, state = decide(ctx(1, snap(rate=1.0, busy=0.5, oldest_wait=2.0)), state)
    assert [d.value for d in decisions] == [SLA_.keep_at(2)]
    _, state = decide(ctx(20, snap(rate=2.0, busy=0.5, keep=SLA_.keep_at(2))), state)
    assert state.actors["r0"].costs == {0: 0.5}, "the window still holds requests from level 0"
    _, state = decide(ctx(31, snap(rate=2.0, busy=0.5, keep=SLA_.keep_at(2))), state)
    assert state.actors["r0"].costs == {0: 0.5, 2: 0.25}
    for level, rate, relaxes in ((1, 2.0, False), (1, 1.2, True), (2, 2.0, True)):
        st = ActorState(level=level, changed_at=0.0, costs={0: 0.5, 2: 0.25})
        state = PolicyState(actors={"r0": st})
        moved = []
        for now in range(100, 131, 2):
            decisions, state = decide(ctx(now, snap(rate=rate, busy=0.3, keep=SLA_.keep_at(level))), state)
            moved += decisions
        assert bool(moved) == relaxes, (level, rate, moved)
        if relaxes:
            assert moved[0].value == SLA_.keep_at(level - 1)


def test_offline_deadline_pressure_tightens_data_actors():
    sla = SLA(offline=OfflineTargets(deadline_s=100.0), pacing=SLA_.pacing)
    ctx = PolicyContext(50.0, sla, (snap("d0", "data", ttft=None, rate=5.0),), {"data": 1},
                        OfflineProgress(rows_done=100, rows_total=600, started_at=0.0))
    decisions, _ = decide(ctx, PolicyState())  # 500 rows in 50 s needs 10 rows/s, 5 achieved
    assert decisions[0].action == "set_sparsity" and "pressure 2.00" in decisions[0].reason


class FluidCluster:
    """Replicas as fluid queues. A replica serves `base_rate / cost(keep)` requests/s, cost = 0.25 + 0.75 *
    vision_keep; TTFT = service time + backlog / capacity; the backlog is the queue, its head has waited
    backlog / capacity, and the replica is busy arrivals / capacity of the time. A new replica starts after
    `start_s`."""

    def __init__(self, base_rate: float = 10.0, start_s: float = 5.0):
        self.base_rate, self.start_s = base_rate, start_s
        self.replicas = {"r0": (KeepSetting(), 0.0)}  # id -> (keep, ready at)
        self.backlog: dict[str, float] = {"r0": 0.0}
        self.next_id = 1

    def capacity(self, rid: str) -> float:
        keep = self.replicas[rid][0]
        return self.base_rate / (0.25 + 0.75 * keep.vision_keep)

    def tick(self, now: float, arrivals_per_s: float, dt: float) -> list[TelemetrySnapshot]:
        ready = [r for r, (_, at) in self.replicas.items() if at <= now]
        out = []
        for rid in ready:
            cap = self.capacity(rid)
            self.backlog[rid] = max(0.0, self.backlog[rid] + (arrivals_per_s / len(ready) - cap) * dt)
            ttft = 1 / cap + self.backlog[rid] / cap
            keep, rate = self.replicas[rid][0], min(arrivals_per_s / len(ready), cap)
            queue = int(self.backlog[rid])
            out.append(snap(rid, ttft=ttft, rate=rate, keep=keep, queue=queue, busy=rate / cap,
                            oldest_wait=self.backlog[rid] / cap if queue else None))
        return out

    def apply(self, decisions, now: float) -> None:
        for d in decisions:
            if d.action == "set_sparsity":
                self.replicas[d.target] = (d.value, self.replicas[d.target][1])
            elif d.value > len(self.replicas):
                rid = f"r{self.next_id}"
                self.next_id += 1
                self.replicas[rid], self.backlog[rid] = (SLA_.keep_at(0), now + self.start_s), 0.0
            else:
                rid = max(self.replicas)  # release the newest
                del self.replicas[rid], self.backlog[rid]


def test_simulated_load_step_meets_the_slo_then_gives_back():
    cluster, state, dt = FluidCluster(), PolicyState(), 1.0
    phases = [(0, 60, 8.0), (60, 180, 32.0), (180, 420, 8.0)]  # 1x -> 4x -> 1x
    log = []
    for t in range(420):
        rate = next(r for a, b, r in phases if a <= t < b)
        snaps = cluster.tick(t, rate, dt)
        decisions, state = decide(PolicyContext(float(t), SLA_, tuple(snaps), {"serve": len(cluster.replicas)}),
                                  state)
        cluster.apply(decisions, t)
        log.append((t, max(s.ttft_p95_s for s in snaps), len(cluster.replicas),
                    min(s.sparsity["vision_keep"] for s in snaps), decisions))
        for s in snaps:
            assert SLA_.floor.vision_keep <= s.sparsity["vision_keep"] <= 1.0
    before = [ttft for t, ttft, *_ in log if t < 60]
    during = [ttft for t, ttft, *_ in log if 90 <= t < 180]
    assert max(before) < 1.0 and all(n == 1 for t, _, n, *_ in log if t < 60), "1x needs nothing"
    assert max(n for _, _, n, *_ in log) == 2, "4x exceeds one replica even at the floor: exactly one more"
    assert sum(x <= 1.0 for x in during) / len(during) >= 0.99, "within 30 s of the step the SLO holds"
    first_tighten = next(t for t, *_, d in log if any(x.action == "set_sparsity" for x in d) and t >= 60)
    first_scale = next(t for t, *_, d in log if any(x.action == "scale" for x in d))
    assert first_tighten < first_scale, "sparsity moves first, replicas only when it is exhausted"
    end = log[-1]
    assert end[2] == 1 and end[3] == 1.0, "after the load drops, both the replica and the quality come back"
    for rid in ("r0", "r1"):
        moves = [t for t, *_, d in log for x in d if x.action == "set_sparsity" and x.target == rid]
        assert all(b - a >= SLA_.pacing.cooldown_s for a, b in zip(moves, moves[1:])), "one move per cooldown"


def test_bad_sla_values_are_rejected():
    with pytest.raises(ValueError, match="floor"):
        SLA(floor=KeepSetting(0.5, 0.5), preferred=KeepSetting(0.4, 1.0))
    with pytest.raises(ValueError, match="slack"):
        Pacing(slack=0.95, risk=0.9)
    with pytest.raises(ValueError, match="unknown"):
        SLA.from_dict({"online": {"ttft": 1}})


def test_sla_yaml_mirrors_the_defaults():
    from tests.conftest import REPO_ROOT

    assert SLA.from_yaml(REPO_ROOT / "configs" / "sla.yaml") == SLA()


def test_the_head_of_the_queue_is_a_leading_signal():
    """Finished requests still look fast, but the oldest waiting one has waited past the target: tighten now
    (its TTFT is already over), not after the slow requests reach the window's p95."""
    ctx = PolicyContext(0.0, SLA_, (snap(ttft=0.3, oldest_wait=1.6),), {"serve": 1})
    decisions, _ = decide(ctx, PolicyState())
    assert [(d.action, d.value) for d in decisions] == [("set_sparsity", SLA_.keep_at(2))]
    assert "pressure 1.60" in decisions[0].reason
    assert decide(PolicyContext(0.0, SLA_, (snap(ttft=0.3, oldest_wait=0.2),), {"serve": 1}), PolicyState())[0] == []


def test_the_queue_projected_at_the_measured_cost_per_request_leads_the_heads_wait():
    """Three requests queued behind an engine that is busy all the time and admits 2 per second: the newest
    will wait about 1.5 s, over the 1 s target, while the head has waited 0.2 s and finished requests look
    fast. Tighten now; at a quarter of the load the same queue drains in time."""
    ctx = lambda s: PolicyContext(0.0, SLA_, (s,), {"serve": 1})  # noqa: E731
    decisions, _ = decide(ctx(snap(ttft=0.3, rate=2.0, oldest_wait=0.2, queue=3, busy=1.0)), PolicyState())
    assert [(d.action, d.value) for d in decisions] == [("set_sparsity", SLA_.keep_at(2))]
    assert "pressure 1.50" in decisions[0].reason
    decisions, _ = decide(ctx(snap(ttft=0.3, rate=2.0, oldest_wait=0.2, queue=3, busy=0.25)), PolicyState())
    assert decisions == [], "0.375 s of projected wait: nothing to do"
    assert projected_wait_s(snap(queue=0, busy=1.0)) is None and projected_wait_s(snap(queue=3, busy=None)) is None
    assert projected_wait_s(snap(queue=2, busy=1.0, rate=2.0, prefilling=1)) == 1.5, \
        "the queue also waits for the request being prefilled"
    decisions, _ = decide(ctx(snap(ttft=0.3, rate=2.0, oldest_wait=0.2, queue=2, busy=0.8)), PolicyState())
    assert decisions == [], "two queued at 0.4 s each: 0.8 s"
    decisions, _ = decide(ctx(snap(ttft=0.3, rate=2.0, oldest_wait=0.2, queue=2, busy=0.8, prefilling=1)),
                          PolicyState())
    assert decisions and "pressure 1.20" in decisions[0].reason, "and one in prefill ahead of them: 1.2 s"


def test_a_joining_replica_starts_at_its_peers_level_and_the_floor_settles_before_scaling():
    """A replica added under load starts at the sparsest peer's level, not the preferred setting; a replica
    that just reached the floor gets floor_settle_s for the queue to drain before its misses add a replica."""
    ctx = lambda now, *snaps: PolicyContext(now, SLA_, snaps, {"serve": len(snaps)})  # noqa: E731
    floor = SLA_.keep_at(6)
    _, state = decide(ctx(0, snap("r0", ttft=0.5, keep=SLA_.keep_at(4))), PolicyState())
    decisions, state = decide(ctx(1, snap("r0", ttft=0.5, keep=SLA_.keep_at(4)), snap("r1", ttft=None)), state)
    assert [(d.target, d.value) for d in decisions] == [("r1", SLA_.keep_at(4))] and "join" in decisions[0].reason
    state = PolicyState()
    decisions, state = decide(ctx(10, snap("r0", ttft=2.0, keep=SLA_.keep_at(4))), state)
    assert decisions[0].value == floor  # two levels at once: now at the floor
    decisions, state = decide(ctx(12, snap("r0", ttft=2.0, keep=floor, oldest_wait=1.5)), state)
    assert decisions == [], "the old queue is still draining"
    settled = 10 + SLA_.pacing.floor_settle_s
    decisions, _ = decide(ctx(settled, snap("r0", ttft=2.0, keep=floor)), state)
    assert decisions == [], "the window's p95 still holds requests from before the floor, but nothing waits"
    decisions, _ = decide(ctx(settled, snap("r0", ttft=2.0, keep=floor, oldest_wait=1.2)), state)
    assert [(d.action, d.value) for d in decisions] == [("scale", 2)], "the head waits past the target at the floor"
    decisions, _ = decide(ctx(settled + 30, snap("r0", ttft=2.0, keep=floor)), state)
    assert [(d.action, d.value) for d in decisions] == [("scale", 2)], \
        "a window (30 s) after the floor settled, its p95 is the floor's own: slow with nothing queued still scales"
