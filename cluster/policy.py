"""The control policy as a pure function: `decide(ctx, state) -> (decisions, state)`, with the clock injected
through `ctx.now`, so it is tested as a simulated loop without Ray.

Per actor, sparsity moves on the SLA's ladder (level 0 = preferred, `levels` = the floor): tighten when a
target is at risk or memory is near its ceiling, relax one level after a stretch of slack, with a cooldown
between moves. Online, a relax must also leave headroom: the policy remembers each level's measured cost per
request, and relaxes only while the current load at the denser level's cost would keep the engine busy at
most `slack` of the time, so a burst finds room while the next order is on its way. Per kind (online replicas,
offline actors), ask for one more when an actor sits at the floor and still misses, and one fewer when every
actor is back at the preferred setting and idle for a while.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from cluster.sla import SLA, KeepSetting
from dynllava.telemetry import TelemetrySnapshot


@dataclass(frozen=True)
class OfflineProgress:
    """A batch job's progress, for a deadline target: rows done of rows total, job start (same clock as now)."""

    rows_done: int
    rows_total: int
    started_at: float


@dataclass(frozen=True)
class PolicyContext:
    """What the controller observed: the time, the SLA, every live actor's latest snapshot, the current actor
    count per kind ("serve", "data"), and the offline job's progress when there is one."""

    now: float
    sla: SLA
    snapshots: tuple[TelemetrySnapshot, ...]
    counts: dict[str, int] = field(default_factory=dict)
    offline: OfflineProgress | None = None


@dataclass(frozen=True)
class ActorState:
    """One actor's place on the ladder. `unsafe` = (level, requests/s) where it last missed: the policy does not
    relax back to that level (or a denser one) until the actor's load falls below `relax_load` of that rate.
    That is the hysteresis: without it, slack at a sparse level invites a relax that misses again."""

    level: int = 0
    changed_at: float = -math.inf
    slack_since: float | None = None
    unsafe: tuple[int, float] | None = None
    costs: dict[int, float] = field(default_factory=dict)  # level -> busy seconds per admitted request, measured
    #                                                         over a window spent wholly at that level


@dataclass(frozen=True)
class PolicyState:
    """What the policy remembers between calls (rebuilt from the actors' reported sparsity after a restart)."""

    actors: dict[str, ActorState] = field(default_factory=dict)
    scaled_at: dict[str, float] = field(default_factory=dict)
    idle_since: dict[str, float] = field(default_factory=dict)
    peak_rate: dict[str, float] = field(default_factory=dict)  # highest per-actor requests/s seen, per kind


@dataclass(frozen=True)
class Decision:
    """set_sparsity: target = actor id, value = KeepSetting. scale: target = "serve" | "data", value = count."""

    action: Literal["set_sparsity", "scale"]
    target: str
    value: Any
    reason: str


def level_of(sla: SLA, sparsity: dict) -> int:
    """The ladder level nearest to a reported sparsity (how state is recovered after a controller restart)."""
    vision, text = sparsity.get("vision_keep", 1.0), sparsity.get("text_keep") or 1.0
    return min(range(sla.pacing.levels + 1), key=lambda lv: abs(math.log(sla.keep_at(lv).vision_keep / vision)) +
               abs(math.log(sla.keep_at(lv).text_keep / text)))


def cost_per_request_s(snap: TelemetrySnapshot) -> float | None:
    """The engine's busy seconds per admitted request over the window (busy fraction / admissions per second):
    what one more request in its queue adds to the wait of those behind it. Admissions, not finishes: rows that
    decode together finish in bursts, and a window between bursts would make each request look several times
    dearer. None when not measured."""
    if not snap.busy_fraction or not snap.admitted_per_s:
        return None
    return snap.busy_fraction / snap.admitted_per_s


def projected_wait_s(snap: TelemetrySnapshot) -> float | None:
    """When the newest queued request will have its first token, at the engine's measured cost per request:
    (queue depth + requests in the prefill running now) x cost, as it waits for every request ahead of it that
    has no first token yet. It leads the head's wait: a burst that will miss shows as soon as it has queued,
    while the head has waited only a little. None with nothing queued or nothing measured."""
    cost = cost_per_request_s(snap)
    return (snap.queue_depth + snap.prefilling) * cost if snap.queue_depth and cost is not None else None


def _ratios(pairs: list[tuple[float | None, float | None]]) -> float | None:
    ratios = [m / t for m, t in pairs if m is not None and t is not None]
    return max(ratios) if ratios else None


def live_pressure(snap: TelemetrySnapshot, sla: SLA) -> float | None:
    """Pressure from what waits now (the head's wait plus its own cost, the queue's projected wait) and
    per-token latency, without the window's TTFT and latency p95, which still hold requests that queued before
    the last change. What decides whether tightening was not enough and a replica must be added."""
    head = None if snap.oldest_wait_s is None else snap.oldest_wait_s + (cost_per_request_s(snap) or 0.0)
    waits = [w for w in (head, projected_wait_s(snap)) if w is not None]
    wait = max(waits) if waits else None
    return _ratios([(wait, sla.online.ttft_p95_s), (wait, sla.online.latency_p95_s),
                    (snap.token_latency_p95_s, sla.online.token_latency_p95_s)])


def pressure(snap: TelemetrySnapshot, sla: SLA, ctx: PolicyContext) -> float | None:
    """How close the actor is to missing its target: max over targets of measured / target (offline: the
    needed rate / the achieved rate of all offline actors). Online, what waits counts too (live_pressure): a
    request's TTFT and latency are already at least its wait, so an overload shows before the slow requests
    finish and reach the window's p95. None when nothing was measured in the window and nothing waits."""
    if snap.kind == "serve":
        return _ratios([(snap.ttft_p95_s, sla.online.ttft_p95_s), (snap.latency_p95_s, sla.online.latency_p95_s),
                        (live_pressure(snap, sla), 1.0)])
    achieved = sum(s.requests_per_s for s in ctx.snapshots if s.kind == "data")
    needed = sla.offline.rows_per_s
    if sla.offline.deadline_s is not None and ctx.offline is not None:
        left = ctx.offline.started_at + sla.offline.deadline_s - ctx.now
        remaining = ctx.offline.rows_total - ctx.offline.rows_done
        needed = max(needed or 0.0, remaining / max(left, 1e-3)) if remaining > 0 else needed
    if needed is None:
        return None
    return needed / achieved if achieved > 0 else (math.inf if snap.running or snap.queue_depth else None)


def memory_use(snap: TelemetrySnapshot, sla: SLA) -> float:
    """Memory used as a fraction of the SLA's ceiling (1.0 = at the ceiling): the larger of the device's memory
    and, when the engine has a KV budget, the K/V its running rows hold against that budget. A full KV budget
    is what limits how many rows run, and sparser rows hold fewer blocks: tightening turns it into concurrency."""
    device = snap.device_memory_used / (snap.device_memory_total * sla.memory_ceiling) if snap.device_memory_total \
        else 0.0
    kv = snap.kv_bytes_allocated / (snap.kv_bytes_budget * sla.memory_ceiling) if snap.kv_bytes_budget else 0.0
    return max(device, kv)


def relax_headroom(snap: TelemetrySnapshot, st: ActorState) -> float | None:
    """The share of time the engine would be busy one level denser, at the current admission rate and that
    level's measured cost per request (None: that level not measured yet). Relaxing waits while it is over
    `slack`: slack in the latency figures at a sparse level says nothing of a denser one, and a relax to a
    level that the load nearly fills leaves no room for a burst while the next tightening is on its way."""
    cost = st.costs.get(st.level - 1)
    return None if cost is None or snap.admitted_per_s is None else snap.admitted_per_s * cost


def _measured_costs(snap: TelemetrySnapshot, st: ActorState, now: float) -> dict[int, float]:
    """st.costs with the current level's cost per request, once the telemetry window holds only that level."""
    cost = cost_per_request_s(snap)
    if snap.kind != "serve" or cost is None or now - st.changed_at < snap.window_s:
        return st.costs
    return {**st.costs, st.level: cost}


def _step_actor(snap: TelemetrySnapshot, st: ActorState, load: float | None, memory: float, sla: SLA,
                now: float) -> tuple[ActorState, Decision | None]:
    p = sla.pacing
    st = replace(st, costs=_measured_costs(snap, st, now))
    at_risk = (load is not None and load >= p.risk) or memory >= 1.0
    # What waits and memory show a move's effect at once; an online p95 only once the window has renewed, so
    # a tightening on the p95 alone waits a window after the last move (one slow request must not walk the
    # whole ladder down while it stays in the window).
    live = live_pressure(snap, sla) if snap.kind == "serve" else load
    lagging = snap.kind == "serve" and (live is None or live < p.risk) and memory < 1.0
    ready = now - st.changed_at >= (max(p.cooldown_s, snap.window_s) if at_risk and lagging else p.cooldown_s)
    if at_risk:  # remember the sparsest level that missed and the highest load it missed at
        unsafe = (max(st.level, st.unsafe[0]) if st.unsafe else st.level,
                  max(snap.requests_per_s, st.unsafe[1] if st.unsafe else 0.0))
        if st.level < p.levels and ready:
            worst = max(load or 0.0, memory)
            level = min(p.levels, st.level + (p.max_step if worst >= 1.0 else 1))  # missing: max_step
            why = f"pressure {load:.2f}" if load is not None and load >= p.risk else f"memory {memory:.2f} of ceiling"
            return ActorState(level, now, None, unsafe, st.costs), Decision(
                "set_sparsity", snap.actor_id, sla.keep_at(level), f"tighten to level {level}: {why}")
        return replace(st, slack_since=None, unsafe=unsafe), None
    unsafe = st.unsafe
    if unsafe is not None and snap.requests_per_s < p.relax_load * unsafe[1]:
        unsafe = None  # the load that made that level miss has gone
    slack = (load is None or load <= p.slack) and memory <= p.slack
    blocked = unsafe is not None and st.level - 1 <= unsafe[0]
    busy_denser = relax_headroom(snap, st) if snap.kind == "serve" and st.level > 0 else None
    if busy_denser is not None and busy_denser > p.slack:
        slack = False  # no room one level denser at this load
    if not slack or st.level == 0 or blocked:
        return replace(st, slack_since=(st.slack_since or now) if slack else None, unsafe=unsafe), None
    since = st.slack_since if st.slack_since is not None else now
    if now - since >= p.relax_after_s and ready:
        level = st.level - 1
        return ActorState(level, now, now, unsafe, st.costs), Decision(
            "set_sparsity", snap.actor_id, sla.keep_at(level), f"relax to level {level}: slack for {now - since:.0f}s")
    return replace(st, slack_since=since, unsafe=unsafe), None


def _first_report(snap: TelemetrySnapshot, state: PolicyState, ctx: PolicyContext) -> tuple[ActorState,
                                                                                          Decision | None]:
    """An actor the policy has not seen. With no known peer of its kind (e.g. after a controller restart) it
    stays at the level its reported sparsity maps to. Joining known peers (a replica added under load) it
    starts at the sparsest peer's level: it was added because they needed that level, and starting at the
    preferred setting would send its share of the load back to a setting that missed."""
    reported = level_of(ctx.sla, snap.sparsity)
    peers = [state.actors[s.actor_id].level for s in ctx.snapshots
             if s.kind == snap.kind and s.actor_id in state.actors]
    level = max([reported, *peers])
    if level == reported:
        return ActorState(level=reported), None
    return ActorState(level, ctx.now), Decision("set_sparsity", snap.actor_id, ctx.sla.keep_at(level),
                                                f"join at the peers' level {level}")


def _missing_at_floor(snap: TelemetrySnapshot, st: ActorState, load: float | None, sla: SLA, now: float) -> bool:
    """At the floor for floor_settle_s (the queue the denser levels left has had time to drain) and still
    missing. Online, until the floor has also outlasted the telemetry window, the window's p95s still hold
    requests that queued before the floor: judge on what waits now (live_pressure) until then."""
    held = now - st.changed_at
    if st.level < sla.pacing.levels or held < sla.pacing.floor_settle_s:
        return False
    if snap.kind == "serve" and held < sla.pacing.floor_settle_s + snap.window_s:
        load = live_pressure(snap, sla)
    return load is not None and load >= 1.0


def decide(ctx: PolicyContext, state: PolicyState) -> tuple[list[Decision], PolicyState]:
    """One control step (see the module docstring). Actors missing from ctx.snapshots are forgotten."""
    sla, now, p = ctx.sla, ctx.now, ctx.sla.pacing
    decisions: list[Decision] = []
    actors: dict[str, ActorState] = {}
    loads: dict[str, float | None] = {}
    before: dict[str, ActorState] = {}  # each actor's state coming into this step
    for snap in ctx.snapshots:
        load = loads[snap.actor_id] = pressure(snap, sla, ctx)
        st = state.actors.get(snap.actor_id)
        if st is None:
            st, decision = _first_report(snap, state, ctx)
            if decision:  # a new actor moved to its peers' level: judge it from its next reports
                before[snap.actor_id] = actors[snap.actor_id] = st
                decisions.append(decision)
                continue
        before[snap.actor_id] = st
        actors[snap.actor_id], decision = _step_actor(snap, st, load, memory_use(snap, sla), sla, now)
        if decision:
            decisions.append(decision)
    scaled_at, idle_since, peak = dict(state.scaled_at), dict(state.idle_since), dict(state.peak_rate)
    for kind in ("serve", "data"):
        snaps = [s for s in ctx.snapshots if s.kind == kind]
        if not snaps:
            idle_since.pop(kind, None)
            continue
        count = ctx.counts.get(kind, len(snaps))
        peak[kind] = max([peak.get(kind, 0.0)] + [s.requests_per_s for s in snaps])
        ready = now - scaled_at.get(kind, -math.inf) >= p.scale_cooldown_s
        missing_at_floor = [s for s in snaps if _missing_at_floor(s, before[s.actor_id], loads[s.actor_id], sla, now)]
        relaxed_idle = all(actors[s.actor_id].level == 0 and (loads[s.actor_id] or 0.0) <= p.slack
                           and s.requests_per_s <= p.idle_fraction * peak[kind] for s in snaps)
        if missing_at_floor:
            idle_since.pop(kind, None)
            if ready and count < sla.replicas.max:
                decisions.append(Decision("scale", kind, count + 1,
                                          f"{len(missing_at_floor)} {kind} actor(s) at the floor still miss"))
                scaled_at[kind] = now
        elif relaxed_idle and count > sla.replicas.min:
            since = idle_since.setdefault(kind, now)
            if now - since >= p.release_after_s and ready:
                decisions.append(Decision("scale", kind, count - 1, f"all {kind} actors relaxed and idle for "
                                                                    f"{now - since:.0f}s"))
                scaled_at[kind] = now
                idle_since[kind] = now
        else:
            idle_since.pop(kind, None)
    return decisions, PolicyState(actors, scaled_at, idle_since, peak)


__all__ = ["PolicyContext", "PolicyState", "ActorState", "Decision", "OfflineProgress", "KeepSetting", "decide",
           "level_of", "pressure", "live_pressure", "projected_wait_s", "cost_per_request_s", "memory_use",
           "relax_headroom"]
