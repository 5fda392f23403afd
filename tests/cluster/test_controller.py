"""The controller: its core without Ray (orders ride on report replies, dead actors drop out, state comes back
after a restart), then live: replicas report, tighten to the floor under a target they cannot meet, and the
custom Serve autoscaling policy adds a replica; the controller survives being killed."""

from __future__ import annotations

import json
import threading
import time

import pytest

from cluster.cli import status_table
from cluster.controller import ControllerCore
from cluster.serve_handle import DEPLOYMENT_NAME
from cluster.sla import SLA, Bounds, KeepSetting, OfflineTargets, OnlineTargets, Pacing
from tests.cluster.conftest import free_port
from tests.cluster.test_policy import snap

STRICT = SLA(online=OnlineTargets(ttft_p95_s=1e-4), floor=KeepSetting(0.2, 0.5), replicas=Bounds(1, 2),
             pacing=Pacing(levels=2, max_step=2, cooldown_s=0.5, scale_cooldown_s=2.0))


def test_core_orders_ride_on_reports_and_dead_actors_drop_out():
    now = [0.0]
    core = ControllerCore(SLA(pacing=Pacing(cooldown_s=0)), stale_s=5, clock=lambda: now[0])
    assert core.report(snap("a", ttft=2.0)) == {"keep": None, "replicas": None}
    core.report(snap("b", ttft=0.1))
    decisions = core.step()
    assert [(d.action, d.target) for d in decisions] == [("set_sparsity", "a")]
    orders = core.report(snap("a", ttft=2.0))
    assert orders["keep"] == {"vision_keep": core.sla.keep_at(2).vision_keep,
                              "text_keep": core.sla.keep_at(2).text_keep}
    now[0] = 4.0
    core.report(snap("b", ttft=0.1))
    now[0] = 8.0  # a last reported at 0: stale
    core.step()
    assert set(core.status()["actors"]) == {"b"} and core.status()["decisions"][0]["target"] == "a"
    table = status_table(core.status())
    assert "b  " in table and "set_sparsity a" in table and "tighten to level 2" in table


def test_a_replica_with_requests_waiting_is_decided_on_in_its_own_report():
    """A queue that will miss is answered in the reply to the report that shows it, not a period later; a report
    with nothing waiting (or from an offline actor) waits for the periodic step."""
    now = [0.0]
    core = ControllerCore(SLA(pacing=Pacing(cooldown_s=0)), clock=lambda: now[0])
    assert core.report(snap("r", ttft=0.1)) == {"keep": None, "replicas": None}  # nothing waits: no step
    assert core.report(snap("d", kind="data", ttft=0.1, queue=5))["keep"] is None
    orders = core.report(snap("r", ttft=0.1, oldest_wait=5.0, busy=0.9))  # the head has waited 5 s already
    assert orders["keep"] is not None and orders["keep"]["vision_keep"] < 1.0
    assert core.status()["decisions"][-1]["target"] == "r"
    now[0] += 0.01  # steps on reports are at most every min_step_gap_s
    core.report(snap("r", ttft=0.1, oldest_wait=9.0, busy=0.9))
    assert len(core.status()["decisions"]) == 1


def test_a_restarted_core_rebuilds_levels_from_reports():
    sla = SLA()
    core = ControllerCore(sla)
    core.report(snap("a", ttft=0.7, keep=sla.keep_at(3)))  # between slack and risk: hold
    assert core.step() == [] and core.status()["actors"]["a"]["level"] == 3


def test_core_judges_an_offline_deadline_from_reported_rows_and_withdraws_its_request():
    """The job registers its rows and start; actors report the rows they finished; a deadline the achieved rate
    cannot meet tightens, then (at the floor) asks for another actor's bundle; the job's end withdraws it."""
    now, asked = [0.0], []
    sla = SLA(offline=OfflineTargets(deadline_s=100.0), replicas=Bounds(1, 3),
              pacing=Pacing(levels=2, cooldown_s=0, scale_cooldown_s=0))
    core = ControllerCore(sla, clock=lambda: now[0], request_nodes=asked.append)
    core.start_offline_job(rows_total=1000, started_at=0.0)
    now[0] = 50.0  # 800 rows left in 50 s: 16 rows/s needed, 5 achieved
    core.report(snap("data:a", kind="data", ttft=None, rate=5.0, finished=150))
    core.report(snap("data:old", kind="data", ttft=None, rate=0.0, finished=50))  # dies below; its rows count
    assert [(d.action, d.value) for d in core.step()] == [("set_sparsity", sla.keep_at(2))] * 2
    assert core.status()["offline"] == {"rows_done": 200, "rows_total": 1000, "started_at": 0.0}
    now[0] = 56.0
    core.report(snap("data:a", kind="data", ttft=None, rate=5.0, finished=180, keep=sla.keep_at(2)))
    decisions = core.step()  # data:old is stale and dropped; data:a at the floor still misses
    assert [(d.action, d.target, d.value) for d in decisions] == [("scale", "data", 2)] and asked == [2]
    assert core.status()["offline"]["rows_done"] == 230
    now[0] = 57.0  # the new actor has not reported yet: the same wish, not a new entry or request
    core.report(snap("data:a", kind="data", ttft=None, rate=5.0, finished=185, keep=sla.keep_at(2)))
    core.step()
    assert [d["value"] for d in core.status()["decisions"] if d["action"] == "scale"] == [2] and asked == [2]
    assert core.end_offline_job() == {"rows_done": 235} and asked == [2, 0]
    assert core.status()["offline"] is None and "data" not in core.status()["desired"]


@pytest.mark.ray
def test_the_controller_asks_ray_autoscaler_for_engine_bundles_and_withdraws(ray_local):
    """The real path, not a callback: the controller actor, with the offline job's engine bundle, asks
    `ray.autoscaler.sdk.request_resources` for two bundles once its one data actor sits at the floor and still
    misses the deadline, and the job's end withdraws the request. Read back where Ray's (v1) autoscaler reads
    it: the GCS key-value store."""
    import ray
    from ray.autoscaler._private.constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.autoscaler.v2.utils import is_autoscaler_v2
    from ray.experimental.internal_kv import _internal_kv_get

    from cluster.controller import start_controller

    assert not is_autoscaler_v2(), "this check reads the v1 autoscaler's request channel"

    def requested():
        raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
        return None if raw is None else json.loads(raw)

    sla = SLA(offline=OfflineTargets(deadline_s=100.0), replicas=Bounds(1, 3),
              pacing=Pacing(levels=2, cooldown_s=0, scale_cooldown_s=0, floor_settle_s=0))
    controller = start_controller(sla, period_s=0.2, engine_bundle={"CPU": 1, "engine": 1})
    try:
        ray.get(controller.start_offline_job.remote(1000, time.time()))
        deadline = time.monotonic() + 30
        while requested() != [{"CPU": 1, "engine": 1}] * 2:  # 990 rows in 100 s at 0.1 rows/s: far behind
            assert time.monotonic() < deadline, (requested(), ray.get(controller.status.remote())["decisions"])
            ray.get(controller.report.remote(snap("data:a", kind="data", ttft=None, rate=0.1, finished=10,
                                                  keep=sla.keep_at(2)).to_dict()))
            time.sleep(0.2)
        ray.get(controller.end_offline_job.remote())
        assert requested() == []
    finally:
        ray.kill(controller)


@pytest.fixture(scope="module")
def controlled_app(ray_local):
    from ray import serve

    from cluster.app import build
    from cluster.controller import start_controller
    from cluster.serve_config import ServeConfig
    from dynllava.config import SparsityConfig

    controller = start_controller(STRICT, period_s=0.5, stale_s=5.0)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    options = {"ray_actor_options": {"num_cpus": 2},
               "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                                      "upscale_delay_s": 0, "metrics_interval_s": 0.5,
                                      "policy": {"policy_function": "cluster.autoscaling:controller_policy"}}}
    # a 5 s telemetry window: one request at a time never queues, so the floor's misses count for a replica once
    # the window holds only requests served at the floor (floor_settle_s + the window)
    config = ServeConfig(model="tiny", controller=True, report_period_s=0.5, threads=1, telemetry_window_s=5.0,
                         sparsity=SparsityConfig(vision_keep=1.0, text_keep=1.0))  # starts at the preferred
    handle = serve.run(build(config, options), name="controlled", route_prefix=None)
    yield handle, controller
    import ray

    ray.kill(controller)


def _running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["controlled"].deployments[DEPLOYMENT_NAME]
    return deployment.replica_states.get("RUNNING", 0)


@pytest.mark.ray
def test_floor_then_a_second_replica_and_a_controller_restart(controlled_app):
    import numpy as np

    handle, controller = controlled_app
    pixels = np.zeros((1, 3, 192, 192), dtype=np.uint8)
    stop = threading.Event()

    def load() -> None:  # steady traffic for the whole test: every request misses the 0.1 ms TTFT target
        while not stop.is_set():
            handle.generate_rows.remote(pixels, ["Describe the image briefly."], 4,
                                        {"vision_keep": 1.0, "text_keep": 1.0}).result()
            time.sleep(0.1)

    threading.Thread(target=load, daemon=True).start()
    try:
        _check_floor_scale_and_restart(controller)
    finally:
        stop.set()


def _check_floor_scale_and_restart(controller) -> None:
    import ray

    deadline = time.monotonic() + 150
    while time.monotonic() < deadline and _running_replicas() < 2:
        time.sleep(0.5)
    assert _running_replicas() == 2, "the custom autoscaling policy should have added the replica"
    status = ray.get(controller.status.remote())
    actions = [(d["action"], d["target"]) for d in status["decisions"]]
    assert ("scale", "serve") in actions and status["desired"]["serve"] == 2
    tightened = [i for i, d in enumerate(status["decisions"]) if d["action"] == "set_sparsity"]
    scaled = actions.index(("scale", "serve"))
    assert tightened and tightened[0] < scaled, "sparsity moves before replicas"
    assert status["decisions"][tightened[0]]["value"] == {"vision_keep": 0.2, "text_keep": 0.5}

    def levels() -> dict:
        try:
            return {a: v["level"] for a, v in ray.get(controller.status.remote(), timeout=10)["actors"].items()}
        except Exception:  # restarting
            return {}

    def running_floor() -> bool:  # both replicas at level 2 and already running it (their reports say so)
        try:
            actors = ray.get(controller.status.remote(), timeout=10)["actors"].values()
        except Exception:
            return False
        return len(actors) == 2 and all(a["level"] == 2 and a["snapshot"]["sparsity"]["vision_keep"] == 0.2
                                        for a in actors)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not running_floor():
        time.sleep(0.5)  # the new replica joins at its peer's level; its next report shows it applied
    before = levels()
    assert list(before.values()) == [2, 2]
    ray.kill(controller, no_restart=False)  # it restarts (max_restarts=-1) and hears from the replicas again
    deadline = time.monotonic() + 60
    after = {}
    while time.monotonic() < deadline and (len(after) < 2 or None in after.values()):
        time.sleep(1)
        after = levels()
    assert after == before, "levels rebuilt from the replicas' reports, not reset"
    # a controller that had forgotten the levels would also reach level 2 under this SLA, but only by ordering
    # it: the restarted one (its decision history starts empty) must have ordered nothing
    restarted = ray.get(controller.status.remote(), timeout=10)["decisions"]
    assert not [d for d in restarted if d["action"] == "set_sparsity"], restarted
