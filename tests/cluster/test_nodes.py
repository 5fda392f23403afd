"""Nodes follow the load: on `ray.cluster_utils.AutoscalingCluster` (the fake multi-node provider: each node is
another raylet on this machine, launched and terminated by Ray's real autoscaler), a Serve replica at the quality
floor that still misses its target makes the controller ask for a second replica. That replica needs the
`engine` resource the head has only one of, so the autoscaler adds a worker node and Serve places it there.
When the load ends, the replicas relax, the controller releases one, Serve stops the one on the worker, and the
autoscaler removes the idle node."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from cluster.serve_handle import DEPLOYMENT_NAME
from cluster.sla import SLA, Bounds, KeepSetting, OnlineTargets, Pacing
from dynllava.row_errors import RowError
from tests.cluster.conftest import free_port
from tests.conftest import REPO_ROOT

APP = "nodes"
# 0.1 ms TTFT cannot be met: the replica tightens to the floor, still misses, and the controller asks for one
# more. Short pacing so that, once the load stops, relaxing (2 levels) and the release take a few seconds.
STRICT = SLA(online=OnlineTargets(ttft_p95_s=1e-4), floor=KeepSetting(0.2, 0.5), replicas=Bounds(1, 2),
             pacing=Pacing(levels=2, max_step=2, cooldown_s=0.5, relax_after_s=1.0, scale_cooldown_s=2.0,
                           release_after_s=3.0))
# The head can host one replica (one `engine`); a second needs a worker node of this type.
HEAD = {"CPU": 6, "engine": 1, "object_store_memory": 300 * 2**20}  # logical CPUs to spare for Serve's actors
WORKER_TYPES = {"engine.worker": {"resources": {"CPU": 2, "engine": 1, "object_store_memory": 200 * 2**20},
                                  "node_config": {}, "min_workers": 0, "max_workers": 1}}
IDLE_TIMEOUT_MINUTES = 0.1  # the autoscaler removes a worker idle for 6 s
PHASE_S = 120  # deadline per phase: generous, the machine may be busy with other work

# Ray 2.60's wheel lacks ray/autoscaler/_private/fake_multi_node/example.yaml, which AutoscalingCluster reads as
# its base config (FileNotFoundError on construction). These are that file's keys from Ray's repository, minus
# its example node types: the autoscaler validates the config against ray-schema.json and reads most of them.
FAKE_MULTINODE_BASE = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                 "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",
    "auth": {},
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 0.1,
    "docker": {},
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
}
MARKER_ENV = "DYNLLAVA_TEST_CLUSTER"  # set on the head's processes (and inherited by all they start)


def _autoscaling_cluster_class():
    """AutoscalingCluster with its config built from FAKE_MULTINODE_BASE (not the missing example.yaml), and a
    start/shutdown that are safe on a shared machine: the shipped ones run `ray stop --force`, which kills every
    Ray process of this user (other tests, benchmarks), and start the head on fixed ports (6379, 10001, the
    dashboard's). Here the head gets free ports and its own temp dir, and shutdown ends only the processes this
    cluster started: those with a marker in their environment, and their children. (A function, so that
    collecting the tests does not import Ray.)"""
    import ray
    from ray.cluster_utils import AutoscalingCluster

    class LocalAutoscalingCluster(AutoscalingCluster):
        def __init__(self, root: Path, head_resources: dict, worker_node_types: dict, **config_kwargs):
            self.root, self.port, self.token = root, free_port(), uuid.uuid4().hex
            self.address = f"{ray.util.get_node_ip_address()}:{self.port}"  # the GCS: ray.init(address=...)
            super().__init__(dict(head_resources), worker_node_types, **config_kwargs)

        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
            assert not autoscaler_v2, "v2 would also read the missing example.yaml (prepare_config)"
            config = copy.deepcopy(FAKE_MULTINODE_BASE)
            config["provider"]["gcs_address"] = self.address  # the provider assumes port 6379 otherwise
            config["available_node_types"] = {**copy.deepcopy(worker_node_types), "ray.head.default": {
                "resources": dict(head_resources), "node_config": {}, "max_workers": 0}}
            config.update(config_kwargs)
            return config

        def start(self) -> None:
            config_path = self.root / "autoscaling.json"
            config_path.write_text(json.dumps(self._config))
            head = dict(self._head_resources)
            cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={self.port}",
                   f"--autoscaling-config={config_path}", f"--temp-dir={self.root / 'ray'}",
                   "--include-dashboard=false", "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
                   f"--dashboard-agent-listen-port={free_port()}", f"--num-cpus={head.pop('CPU')}",
                   f"--object-store-memory={head.pop('object_store_memory')}", f"--resources={json.dumps(head)}"]
            # RAY_AUTH_MODE: `ray start` turns token auth on when ~/.ray/auth_token exists; ray.init(address=)
            # in this process does not, and then cannot connect
            env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                   "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"),
                   MARKER_ENV: self.token,
                   "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"ray start failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"

        def shutdown(self) -> None:
            import psutil  # vendored by Ray (ray/thirdparty_files, which `import ray` puts on sys.path)

            def ours() -> list:  # marked, or started by a marked one (Ray's agents overwrite their environ)
                found = {}
                for proc in psutil.process_iter():
                    try:
                        if proc.environ().get(MARKER_ENV) == self.token:
                            found.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        pass
                return list(found.values())

            for _ in range(3):  # the autoscaler may launch a node between a scan and the kills
                procs = ours()
                if not procs:
                    break
                for proc in procs:
                    try:
                        proc.terminate()
                    except psutil.NoSuchProcess:
                        pass
                _, alive = psutil.wait_procs(procs, timeout=10)
                for proc in alive:
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        pass
            shutil.rmtree(self.root, ignore_errors=True)

    return LocalAutoscalingCluster


@pytest.fixture(scope="module")
def fake_nodes_app():
    """(handle, controller) of a controlled app on a fake-node cluster with no worker node yet."""
    import ray
    from ray import serve

    from cluster.app import build
    from cluster.controller import start_controller
    from cluster.serve_config import ServeConfig
    from dynllava.config import SparsityConfig

    # a short root: Ray's unix socket paths under it must stay under 108 bytes
    root = Path(tempfile.mkdtemp(prefix="dynray-"))
    cluster = _autoscaling_cluster_class()(root, HEAD, WORKER_TYPES, max_workers=1,
                                           idle_timeout_minutes=IDLE_TIMEOUT_MINUTES)
    controller = None
    try:
        cluster.start()
        ray.init(address=cluster.address, log_to_driver=False)
        controller = start_controller(STRICT, period_s=0.5, stale_s=5.0)
        # no HTTP proxy (the test talks through the handle): one actor less to start on a busy machine, and none
        # on the worker node to outlive the replica there
        serve.start(proxy_location="Disabled")
        options = {"ray_actor_options": {"num_cpus": 1, "resources": {"engine": 1}},
                   "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                                          "upscale_delay_s": 0, "downscale_delay_s": 0, "metrics_interval_s": 0.5,
                                          "look_back_period_s": 2,  # the controller's wish, not a 30 s mean
                                          "policy": {"policy_function": "cluster.autoscaling:controller_policy"}}}
        # a 5 s telemetry window: finished requests stop counting 5 s after the load ends (30 s by default)
        config = ServeConfig(model="tiny", controller=True, report_period_s=0.5, threads=1, telemetry_window_s=5.0,
                             sparsity=SparsityConfig(vision_keep=1.0, text_keep=1.0))  # starts at the preferred
        handle = serve.run(build(config, options), name=APP, route_prefix=None)
        yield handle, controller
    finally:
        try:
            if ray.is_initialized():
                if controller is not None:
                    ray.kill(controller)  # detached: it would outlive the driver
                serve.shutdown()
            ray.shutdown()
        finally:
            cluster.shutdown()


def _worker_nodes() -> list[str]:
    """Ids of the alive nodes other than the head."""
    import ray

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" not in n["Resources"]]


def _replica_nodes() -> dict[str, str]:
    """Replica id -> node id of the app's alive replicas, from the GCS actor table. (`ray.util.state` would need
    the dashboard, and neither `serve.status()` nor the replicas expose a node id.)"""
    from ray._private.state import actors

    prefix = f"SERVE_REPLICA::{APP}#{DEPLOYMENT_NAME}#"
    return {info["Name"].removeprefix(prefix): info["Address"]["NodeID"] for info in actors().values()
            if info["Name"].startswith(prefix) and info["State"] == "ALIVE"}


def _running_replicas() -> int:
    from ray import serve

    return serve.status().applications[APP].deployments[DEPLOYMENT_NAME].replica_states.get("RUNNING", 0)


def _wait(what: str, done, seen, timeout_s: float = PHASE_S) -> None:
    """Poll `done()` until true; on timeout fail with `seen()`, the state last observed."""
    deadline = time.monotonic() + timeout_s
    while not done():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f}s; saw {seen()}"
        time.sleep(0.5)


def _scale_decisions(controller) -> list[tuple[float, int, str]]:
    """(time, replicas asked for, reason) of the controller's recent scale decisions."""
    import ray

    return [(d["at"], d["value"], d["reason"]) for d in ray.get(controller.status.remote(), timeout=30)["decisions"]
            if d["action"] == "scale"]


def _state() -> dict:
    return {"worker_nodes": _worker_nodes(), "running_replicas": _running_replicas(), "replicas": _replica_nodes()}


@pytest.mark.ray
def test_a_node_joins_for_the_second_replica_and_leaves_with_it(fake_nodes_app):
    import numpy as np
    import ray

    handle, controller = fake_nodes_app
    assert _worker_nodes() == [] and _running_replicas() == 1, f"start: {_state()}"
    head_node = next(iter(_replica_nodes().values()))
    assert head_node not in _worker_nodes() and len(ray.nodes()) == 1, f"the replica is on the head: {_state()}"

    def ask() -> list:
        return handle.generate_rows.remote(np.zeros((1, 3, 192, 192), dtype=np.uint8),
                                           ["Describe the image briefly."], 4,
                                           {"vision_keep": 1.0, "text_keep": 1.0}).result()

    first = ask()
    assert len(first) == 1 and not isinstance(first[0], RowError), f"the app serves: {first}"
    stop, served, errors = threading.Event(), [], []

    def load() -> None:  # steady traffic: every request misses the 0.1 ms TTFT target
        try:
            while not stop.is_set():
                rows = ask()
                served.extend(rows)
                errors.extend(row for row in rows if isinstance(row, RowError))
                time.sleep(0.1)
        except Exception as e:  # a dead sender would stall the test until the deadline: say why
            errors.append(repr(e))

    sender = threading.Thread(target=load, daemon=True)
    sender.start()
    try:
        _wait("a worker node and a second replica on it",
              lambda: len(_worker_nodes()) == 1 and _running_replicas() == 2
              and sorted(_replica_nodes().values()) == sorted([head_node, *_worker_nodes()]),
              lambda: {**_state(), "rows_served": len(served), "errors": errors[:3]})
    finally:
        stop.set()
        sender.join(timeout=60)
    assert served and not errors, f"{len(served)} rows served under load, errors: {errors[:3]}"
    stopped_at = time.time()  # the controller stamps its decisions with this machine's clock
    # the wish repeats (every scale_cooldown_s) until the new replica's reports show the count it asked for
    scales = _scale_decisions(controller)
    assert scales and {v for _, v, _ in scales} == {2}, f"scale decisions under load: {scales}"

    # no load: the telemetry window empties, both replicas relax to level 0, the controller releases one
    _wait("back to one replica on the head and no worker node",
          lambda: _worker_nodes() == [] and _running_replicas() == 1
          and list(_replica_nodes().values()) == [head_node], _state)
    released = [(v, why) for at, v, why in _scale_decisions(controller) if at > stopped_at]
    assert released and all(v == 1 and "relaxed and idle" in why for v, why in released), \
        f"scale decisions after the load: {released}"
