"""The one controller client every engine uses (Serve replicas and offline engine actors alike).

An engine reports its TelemetrySnapshot and gets typed `Orders` back; `ControllerClient` does that every
period on a daemon thread, within `min_gap_s` when nudged (a request had to queue: the controller decides
on such a report at once, so a burst is answered in a fraction of a second instead of two or three periods),
and every `waiting_period_s` while requests wait at a Serve replica (the head's wait grows: the controller
sees it near the target as it gets there, not up to a period later). It finds the controller again after
it restarts, and never lets a missing or slow controller stop the engine.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from dynllava.config import SparsityConfig
from dynllava.telemetry import TelemetrySnapshot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Orders:
    """The controller's reply to one report."""

    vision_keep: float | None = None  # keep ratios for new requests that follow the engine (None: no order)
    text_keep: float | None = None
    replicas: int = 0  # replicas the controller wants for this engine's kind (0: no opinion)

    @classmethod
    def from_reply(cls, reply: dict[str, Any] | None) -> "Orders":
        """From ControllerCore.report's plain reply ({"keep": {...} | None, "replicas": int | None})."""
        reply = reply or {}
        keep = reply.get("keep") or {}
        return cls(keep.get("vision_keep"), keep.get("text_keep"), int(reply.get("replicas") or 0))

    def applied_to(self, current: SparsityConfig) -> SparsityConfig | None:
        """The setting an engine at `current` switches to, or None if the orders change nothing."""
        if self.vision_keep is None or (self.vision_keep, self.text_keep) == (current.vision_keep,
                                                                            current.text_keep):
            return None
        return current.replace(vision_keep=self.vision_keep, text_keep=self.text_keep)


def ray_reporter() -> Callable[[dict], dict]:
    """The controller actor's `report` as a blocking call. The controller is looked up at the first call and
    again after any failure (it may start later than the engine, or restart); no controller is an error."""
    import ray

    from cluster.controller import find_controller

    state: dict[str, Any] = {"handle": None}

    def report(snapshot: dict) -> dict:
        handle = state["handle"] = state["handle"] or find_controller()
        if handle is None:
            raise RuntimeError("no controller")
        try:
            return ray.get(handle.report.remote(snapshot), timeout=10)
        except Exception:
            state["handle"] = None
            raise

    return report


class ControllerClient:
    """Reports `snapshot()` through `report` (plain dicts, e.g. the controller actor's method) and hands each
    reply to `on_orders`. `start()` reports every period_s on a daemon thread (every waiting_period_s while the
    last snapshot was a replica's with requests queued), and `nudge()` makes it report now, at most once per
    min_gap_s; `report_once()` reports on the calling thread."""

    def __init__(self, snapshot: Callable[[], TelemetrySnapshot], on_orders: Callable[[Orders], None],
                 report: Callable[[dict], dict], period_s: float = 1.0, min_gap_s: float = 0.1,
                 waiting_period_s: float = 0.25):
        self.snapshot, self.on_orders, self.report, self.period_s = snapshot, on_orders, report, period_s
        self.min_gap_s, self.waiting_period_s = min_gap_s, min(waiting_period_s, period_s)
        self._queued = False  # the last snapshot reported was a replica's with requests waiting
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one report at a time, so orders are applied in the order they came
        self._thread: threading.Thread | None = None

    def report_once(self) -> Orders | None:
        """Report now and apply the reply; None (logged) if the controller could not be reached."""
        with self._lock:
            try:
                snapshot = self.snapshot()
                self._queued = snapshot.kind == "serve" and snapshot.queue_depth > 0
                orders = Orders.from_reply(self.report(snapshot.to_dict()))
            except Exception as e:  # the controller may be restarting: the engine goes on
                log.debug("report to the controller failed: %s", e)
                return None
            self.on_orders(orders)
            return orders

    def nudge(self) -> None:
        """Report soon (something started to wait): any thread, cheap, coalesced."""
        self._wake.set()

    def start(self) -> "ControllerClient":
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="dynllava-report", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait(self.waiting_period_s if self._queued else self.period_s)
            if self._stop.is_set():
                return
            self._wake.clear()
            started = time.monotonic()
            self.report_once()
            self._stop.wait(max(0.0, self.min_gap_s - (time.monotonic() - started)))
