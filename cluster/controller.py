"""The cluster controller: observe -> decide -> apply, as a named, detached Ray actor.

Engine actors push their TelemetrySnapshot to it (`report`) every second or so, a replica whose requests queue
at once (and that report is decided on at once), and the reply carries what the controller wants from them: a
keep setting, and for Serve replicas the replica count the custom autoscaling policy should ask for
(cluster/autoscaling.py reads it from the replicas' autoscaling stats). The controller never calls into an
engine, so a dead engine costs it nothing: its snapshots stop and it is dropped after `stale_s`. After a
controller restart, its state is rebuilt from the actors' next reports (the policy maps each
reported sparsity back onto the SLA's ladder).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from dataclasses import asdict
from typing import Any, Callable

from cluster.policy import Decision, OfflineProgress, PolicyContext, PolicyState, decide
from cluster.sla import SLA
from dynllava.telemetry import TelemetrySnapshot

log = logging.getLogger(__name__)
CONTROLLER_NAME = "dynllava-controller"
NAMESPACE = "dynllava"


class ControllerCore:
    """The controller's logic without Ray (the actor below wraps it; tests drive it directly)."""

    def __init__(self, sla: SLA, stale_s: float = 5.0, clock: Callable[[], float] = time.time,
                 request_nodes: Callable[[int], None] | None = None, min_step_gap_s: float = 0.05):
        self.sla, self.stale_s, self.clock = sla, stale_s, clock
        self.request_nodes = request_nodes
        self.snapshots: dict[str, TelemetrySnapshot] = {}
        self.seen_at: dict[str, float] = {}
        self.assigned: dict[str, dict] = {}  # actor id -> keep setting it should run at
        self.desired: dict[str, int] = {}  # kind -> actor count wanted
        self.state = PolicyState()
        self.job: tuple[int | None, float] | None = None  # the running offline job: (rows to do, start time)
        self.job_rows: dict[str, int] = {}  # offline actor id -> rows it finished for the job (dead ones too)
        self.history: collections.deque[dict] = collections.deque(maxlen=500)
        self.lock = threading.Lock()
        self.stepped_at = -math.inf  # when the last step ran (this clock)
        self.min_step_gap_s = min_step_gap_s

    def report(self, snapshot: dict | TelemetrySnapshot) -> dict[str, Any]:
        """An engine's snapshot in; its orders out: {"keep": {vision_keep, text_keep} | None, "replicas": int |
        None}. A Serve replica with requests waiting is decided on at once (at most every min_step_gap_s), and
        the reply carries the result: a periodic step could leave a burst queued for a whole period."""
        snap = snapshot if isinstance(snapshot, TelemetrySnapshot) else TelemetrySnapshot(**snapshot)
        with self.lock:
            now = self.clock()
            self.snapshots[snap.actor_id] = snap
            self.seen_at[snap.actor_id] = now
            if snap.kind == "data" and self.job is not None:
                self.job_rows[snap.actor_id] = snap.finished
            urgent = snap.kind == "serve" and snap.queue_depth > 0 and now - self.stepped_at >= self.min_step_gap_s
        if urgent:
            self.step()
        with self.lock:
            return {"keep": self.assigned.get(snap.actor_id), "replicas": self.desired.get(snap.kind)}

    def start_offline_job(self, rows_total: int | None, started_at: float) -> None:
        """An offline job begins: its rows to do (None: unknown, then a deadline target cannot be judged) and
        its start on this controller's clock. Progress is the sum of the rows its engine actors report."""
        with self.lock:
            self.job, self.job_rows = (rows_total, started_at), {}

    def end_offline_job(self) -> dict[str, Any]:
        """The job is done: stop judging its deadline, withdraw its resource request; returns its progress."""
        with self.lock:
            progress = self._offline_progress()
            self.job, self.job_rows = None, {}
            self.desired.pop("data", None)
        if self.request_nodes is not None:
            self.request_nodes(0)
        return {"rows_done": progress.rows_done if progress else 0}

    def _offline_progress(self) -> OfflineProgress | None:
        if self.job is None or self.job[0] is None:
            return None
        return OfflineProgress(sum(self.job_rows.values()), self.job[0], self.job[1])

    def step(self) -> list[Decision]:
        """Observe the fresh snapshots, decide, and record the orders the next reports will carry."""
        with self.lock:
            now = self.stepped_at = self.clock()
            for actor in [a for a, t in self.seen_at.items() if now - t > self.stale_s]:
                log.info("actor %s stopped reporting; dropped", actor)
                for table in (self.snapshots, self.seen_at, self.assigned):
                    table.pop(actor, None)
            snaps = tuple(self.snapshots.values())
            counts = {kind: sum(s.kind == kind for s in snaps) for kind in ("serve", "data")}
            decisions, self.state = decide(PolicyContext(now, self.sla, snaps, counts, self._offline_progress()),
                                           self.state)
            data_wanted = None  # a new count of offline actors: ask the autoscaler for their room
            for d in decisions:
                if d.action == "set_sparsity":
                    self.assigned[d.target] = asdict(d.value)
                elif self.desired.get(d.target) == d.value:
                    continue  # the same wish again while the new actor starts: nothing new to record
                else:
                    self.desired[d.target] = d.value
                    data_wanted = d.value if d.target == "data" else data_wanted
                self.history.append({"at": now, "action": d.action, "target": d.target,
                                     "value": asdict(d.value) if d.action == "set_sparsity" else d.value,
                                     "reason": d.reason})
                log.info("%s %s -> %s (%s)", d.action, d.target, d.value, d.reason)
        if data_wanted is not None and self.request_nodes is not None:
            self.request_nodes(data_wanted)
        return decisions

    def status(self) -> dict[str, Any]:
        """Every live actor's latest snapshot and order, the desired counts, and the recent decisions."""
        with self.lock:
            return {"actors": {a: {"snapshot": s.to_dict(), "assigned": self.assigned.get(a),
                                   "level": self.state.actors.get(a).level if a in self.state.actors else None}
                               for a, s in self.snapshots.items()},
                    "desired": dict(self.desired), "decisions": list(self.history)[-50:],
                    "offline": asdict(p) if (p := self._offline_progress()) else None, "sla": asdict(self.sla)}


def _request_engine_bundles(bundle: dict[str, float]) -> Callable[[int], None]:
    """Ask Ray's autoscaler for room for `n` offline engine actors (one bundle each)."""

    def request(n: int) -> None:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[dict(bundle)] * n)

    return request


def controller_actor_class():
    """The Ray actor class (built lazily so importing this module does not need Ray initialised)."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
    class Controller:
        """Named, detached: `ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)`."""

        def __init__(self, sla: dict, period_s: float = 1.0, stale_s: float = 5.0,
                     engine_bundle: dict | None = None):
            bundle = engine_bundle or {"CPU": 2}
            self.core = ControllerCore(SLA.from_dict(sla), stale_s, request_nodes=_request_engine_bundles(bundle))
            self.period_s = period_s
            threading.Thread(target=self._loop, name="dynllava-controller", daemon=True).start()

        def _loop(self) -> None:
            while True:
                time.sleep(self.period_s)
                try:
                    self.core.step()
                except Exception:  # keep controlling; a bad step is logged
                    log.exception("controller step failed")

        def report(self, snapshot: dict) -> dict:
            return self.core.report(snapshot)

        def start_offline_job(self, rows_total: int | None, started_at: float) -> None:
            self.core.start_offline_job(rows_total, started_at)

        def end_offline_job(self) -> dict:
            return self.core.end_offline_job()

        def status(self) -> dict:
            return self.core.status()

    return Controller


def start_controller(sla: SLA, period_s: float = 1.0, stale_s: float = 5.0, engine_bundle: dict | None = None):
    """Get the running controller, or start it (named, detached: it outlives the process that started it)."""
    return controller_actor_class().options(name=CONTROLLER_NAME, namespace=NAMESPACE, lifetime="detached",
                                            get_if_exists=True).remote(asdict(sla), period_s, stale_s,
                                                                       engine_bundle)


def find_controller():
    """The running controller's handle, or None."""
    import ray

    try:
        return ray.get_actor(CONTROLLER_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
