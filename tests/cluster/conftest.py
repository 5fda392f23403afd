"""A live local Serve deployment of the shipped `tiny` model, shared by the module's tests: an open app at `/`
and a locked-down one at `/secure` (API key, one slot, a one-request queue, remote image URLs allowed) for auth,
back-pressure and image fetching."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import time
import urllib.parse
from dataclasses import dataclass

import pytest

from cluster.serve_config import Limits, ServeConfig

API_KEY_ENV, API_KEY = "DYNLLAVA_TEST_API_KEY", "sk-test-123"
LIMITS = Limits(max_body_bytes=2 * 2**20, max_images=2, max_image_bytes=300_000, max_tokens=256)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


def connect(url: str, timeout: float = 120) -> tuple[http.client.HTTPConnection, str]:
    parts = urllib.parse.urlsplit(url)
    return http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout), parts.path


def request(method: str, url: str, body=None, raw: bytes | None = None, key: str | None = None) -> Reply:
    """One HTTP exchange with the standard library (the server's raw behaviour, no client library in between)."""
    conn, path = connect(url)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    payload = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


def wait_healthy(base: str, timeout_s: float = 120, alive=lambda: True) -> None:
    """Poll GET base/health until it answers 200; `alive()` is asserted on every try (a server process)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert alive(), "the server exited"
        try:
            if request("GET", f"{base}/health").status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_url(png: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(png).decode()}"


@pytest.fixture(scope="module")
def serve_urls(ray_local):
    """{"open": base URL, "secure": base URL} of two running apps."""
    from ray import serve

    from cluster.app import build

    os.environ[API_KEY_ENV] = API_KEY  # the driver validates the config; the replica gets it via runtime_env
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    actor = {"num_cpus": 2, "runtime_env": {"env_vars": {API_KEY_ENV: API_KEY}}}
    open_cfg = ServeConfig(model="tiny", max_batch=16, max_waiting=48, limits=LIMITS, threads=2)
    secure_cfg = ServeConfig(model="tiny", max_batch=1, max_prefill_batch=1, max_waiting=1, limits=LIMITS,
                             api_key_env=API_KEY_ENV, allow_remote_images=True, threads=1)
    serve.run(build(open_cfg, {"ray_actor_options": actor}), name="open", route_prefix="/")
    serve.run(build(secure_cfg, {"ray_actor_options": {**actor, "num_cpus": 1}}), name="secure",
              route_prefix="/secure")
    base = f"http://127.0.0.1:{port}"
    wait_healthy(base)
    yield {"open": base, "secure": f"{base}/secure"}
    serve.shutdown()
