"""The controller client engines share: typed orders from the reply, periodic reports, failures tolerated."""

from __future__ import annotations

import threading

from cluster.controller import ControllerCore
from cluster.controller_client import ControllerClient, Orders
from cluster.sla import SLA, OfflineTargets, Pacing
from dynllava.config import SparsityConfig
from dynllava.telemetry import TelemetrySnapshot

BASE = SparsityConfig(vision_keep=1.0, text_keep=1.0)


def test_orders_from_the_reply_and_what_they_change():
    assert Orders.from_reply(None) == Orders() and Orders.from_reply({"keep": None, "replicas": None}) == Orders()
    orders = Orders.from_reply({"keep": {"vision_keep": 0.2, "text_keep": 0.5}, "replicas": 3})
    assert orders == Orders(0.2, 0.5, 3)
    assert orders.applied_to(BASE) == BASE.replace(vision_keep=0.2, text_keep=0.5)
    assert orders.applied_to(BASE.replace(vision_keep=0.2, text_keep=0.5)) is None
    assert Orders().applied_to(BASE) is None


def snapshot(queue: int = 0, kind: str = "data") -> TelemetrySnapshot:
    import time

    return TelemetrySnapshot(f"{kind}:x", kind, time.time(), 30.0, 0.1, 1.0, None, None, None, None, None, queue, 1,
                             0, 0, 1, 2, BASE.to_dict(), finished=1)


def test_client_reports_periodically_and_survives_a_failing_controller():
    core = ControllerCore(SLA(offline=OfflineTargets(rows_per_s=1e6), pacing=Pacing(cooldown_s=0)))
    got, calls = [], []
    failing = threading.Event()

    def report(snap: dict) -> dict:
        calls.append(snap["actor_id"])
        if failing.is_set():
            raise ConnectionError("controller restarting")
        return core.report(snap)

    client = ControllerClient(snapshot, got.append, report, period_s=0.02)
    assert client.report_once() == Orders() and got == [Orders()]
    core.step()  # the rows/s target is far off: the controller tightens this actor
    assert client.report_once().vision_keep < 1.0
    failing.set()
    assert client.report_once() is None and len(got) == 2, "a failed report applies nothing"
    failing.clear()
    client.start()
    deadline = threading.Event()
    while len(calls) < 6 and not deadline.wait(0.02):
        pass
    client.stop()
    assert len(calls) >= 6 and len(got) >= 4


def test_a_nudge_reports_within_the_gap_and_nudges_coalesce():
    """A period far longer than the test: only nudges make it report; a burst of nudges is one or two reports."""
    import time

    sent = []
    client = ControllerClient(snapshot, lambda orders: None, lambda snap: sent.append(time.monotonic()) or {},
                              period_s=60.0, min_gap_s=0.2).start()
    time.sleep(0.05)
    assert sent == []
    started = time.monotonic()
    for _ in range(50):
        client.nudge()
    time.sleep(0.1)
    assert len(sent) == 1 and sent[0] - started < 0.05
    time.sleep(0.3)  # the nudges that came during the first report's gap: at most one more
    client.stop()
    assert len(sent) <= 2


def test_while_requests_wait_it_reports_every_waiting_period():
    """The head of a replica's queue waits longer with every moment: reports come every waiting_period_s while
    the last snapshot had a queue, and go back to the period once it has drained. An offline actor always has
    work queued: it keeps the period."""
    import time

    queue, kind, sent = [3], ["serve"], []
    client = ControllerClient(lambda: snapshot(queue[0], kind[0]), lambda orders: None,
                              lambda snap: sent.append(time.monotonic()) or {}, period_s=60.0, min_gap_s=0.01,
                              waiting_period_s=0.05)
    client.report_once()
    client.start()
    time.sleep(0.5)
    assert 5 <= len(sent) <= 12, len(sent)
    queue[0] = 0
    time.sleep(0.15)
    drained = len(sent)
    queue[0], kind[0] = 3, "data"
    client.nudge()
    time.sleep(0.5)
    client.stop()
    assert len(sent) == drained + 1, "no queue, or an offline actor's: back to the 60 s period"
