"""Both ways to start the endpoint work from the shipped YAML: `dynllava serve --config configs/serve.yaml` and
Ray Serve's own `serve run configs/serve.yaml` (each in its own process with its own local Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.cluster.conftest import free_port, request, wait_healthy
from tests.conftest import REPO_ROOT

pytestmark = [pytest.mark.ray, pytest.mark.slow]
BIN = Path(sys.executable).parent
HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}


def _answers(base: str, process: subprocess.Popen, timeout_s: float = 240) -> dict:
    wait_healthy(base, timeout_s, alive=lambda: process.poll() is None)
    reply = request("POST", f"{base}/v1/chat/completions", HELLO)
    assert reply.status == 200, reply.body
    return reply.json()


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.mark.parametrize("how", ["dynllava serve", "serve run"])
def test_the_yaml_starts_a_working_endpoint(how, tmp_path):
    port = free_port()
    config = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = port
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [str(BIN / "dynllava"), "serve", "--config", str(path)] if how == "dynllava serve" else \
        [str(BIN / "serve"), "run", str(path)]
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # its own Ray temp dir: nothing left in /tmp/ray
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            body = _answers(f"http://127.0.0.1:{port}", process)
            assert body["model"] == "tiny" and body["dynllava"]["applied"]["vision_keep"] == 0.2, log.read_text()
        finally:
            _stop(process)
