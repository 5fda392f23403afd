"""Both ways to start the endpoint work from the shipped YAML: `dynllava serve --config configs/serve.yaml` and
Ray Serve's own `serve run configs/serve.yaml` (each in its own process with its own local Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from dynllava.config import SparsityConfig
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


def _wait_for_metric(url: str, name: str, timeout_s: float = 60) -> None:
    """Poll a Prometheus endpoint until a sample of `name` appears (Ray exports every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reply = request("GET", url)
        if reply.status == 200 and any(line.startswith(name) for line in reply.body.decode().splitlines()):
            return
        assert time.monotonic() < deadline, f"no {name} at {url}"
        time.sleep(2)


def _stop(process: subprocess.Popen) -> bool:
    """Ctrl-C, as an operator stops it; True when it exited by itself (False: killed after 60 s)."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(60)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


def _default_sigint() -> None:
    """In the child before exec: Ctrl-C's default disposition. An ignored SIGINT is inherited through exec, and a
    Python started with SIGINT ignored never raises KeyboardInterrupt (this pytest process may ignore it after
    earlier tests), so the server would only stop when killed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _static_batches_run_to_completion(base: str) -> None:
    """`batching: static` (max_batch 4): four requests form one batch; a fifth sent while it runs waits even
    when two of the four have finished and their slots are free; every answer is what generate gives."""
    from concurrent.futures import ThreadPoolExecutor

    from dynllava.model import DynamicLlava

    def body(i: int, n: int) -> dict:
        return {"messages": [{"role": "user", "content": f"Say something about the number {i}."}], "max_tokens": n,
                "temperature": 0, "dynllava": {"ignore_eos": True}}

    lengths = [24, 96, 24, 96, 4]  # the short rows run long enough for the poll to see all four
    seen = []
    with ThreadPoolExecutor(5) as pool:
        first = [pool.submit(request, "POST", f"{base}/v1/chat/completions", body(i, lengths[i])) for i in range(4)]
        deadline = time.monotonic() + 60
        while request("GET", f"{base}/health").json()["running"] < 4:
            assert time.monotonic() < deadline, "the four requests never ran as one batch"
            time.sleep(0.01)
        late = pool.submit(request, "POST", f"{base}/v1/chat/completions", body(4, lengths[4]))
        while not late.done():
            health = request("GET", f"{base}/health").json()
            seen.append((health["running"], health["waiting"]))
            time.sleep(0.01)
        replies = [f.result() for f in first] + [late.result()]
    assert (2, 1) in seen, f"a free slot was filled before the batch finished: {sorted(set(seen))}"
    model = DynamicLlava.from_pretrained("tiny")
    for i, reply in enumerate(replies):
        assert reply.status == 200, reply.body
        prompt = model.format_prompt(f"Say something about the number {i}.", n_images=0)
        ref = model.generate([None], [prompt], max_new_tokens=lengths[i], ignore_eos=True,
                             sparsity=SparsityConfig(vision_keep=0.2, text_keep=0.5))[0]
        assert reply.json()["choices"][0]["message"]["content"] == ref.text


@pytest.mark.parametrize("how", ["dynllava serve", "serve run"])
def test_the_yaml_starts_a_working_endpoint(how, tmp_path):
    """The shipped YAML as it is (but the port) with `dynllava serve`; with `serve run`, the same YAML switched
    to `batching: static`, whose batching is checked too."""
    port = free_port()
    config = yaml.safe_load((REPO_ROOT / "configs" / "serve.yaml").read_text())
    config["http_options"]["port"] = port
    if how == "serve run":
        config["applications"][0]["args"].update(batching="static", max_batch=4, batch_wait_s=2.0)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics_port = free_port()
    command = [str(BIN / "dynllava"), "serve", "--config", str(path), "--metrics-port", str(metrics_port)] \
        if how == "dynllava serve" else [str(BIN / "serve"), "run", str(path)]
    ray_tmp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # its own Ray temp dir: nothing left in /tmp/ray
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp,
           "RAY_metrics_report_interval_ms": "1000"}  # metrics reach the exporter in ~1 s, not ~10 s
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   preexec_fn=_default_sigint)
        try:
            body = _answers(f"http://127.0.0.1:{port}", process)
            assert body["model"] == "tiny" and body["dynllava"]["applied"]["vision_keep"] == 0.2, log.read_text()
            if how == "serve run":
                _static_batches_run_to_completion(f"http://127.0.0.1:{port}")
            else:  # the printed metrics port serves the request just answered
                assert f":{metrics_port}/metrics" in log.read_text()
                _wait_for_metric(f"http://127.0.0.1:{metrics_port}/metrics", "ray_dynllava_requests_total")
        finally:
            stopped = _stop(process)
    assert stopped, f"{how} did not stop on Ctrl-C within 60 s: {log.read_text()[-2000:]}"
