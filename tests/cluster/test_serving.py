"""A live local deployment. The OpenAI-compatible endpoint, driven by the real `openai` client: answers equal
DynamicLlava.generate for the same greedy request; streaming, multi-turn, text-only, sparsity overrides;
32 concurrent streams; a dropped stream frees its slot; every bad input gets its status and error shape.
And the offline caption job sent through the same replicas (`--serve-app`)."""

from __future__ import annotations

import asyncio
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from PIL import Image

from dynllava.config import SparsityConfig
from dynllava.data import shapes
from dynllava.model import DynamicLlava
from tests.cluster.conftest import API_KEY, connect, data_url, request

pytestmark = pytest.mark.ray
openai = pytest.importorskip("openai")
DEFAULT = SparsityConfig(vision_keep=0.2, text_keep=0.5)


@pytest.fixture(scope="module")
def tiny():
    return DynamicLlava.from_pretrained("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def client(serve_urls):
    return openai.OpenAI(base_url=f"{serve_urls['open']}/v1", api_key="unused", max_retries=0, timeout=120)


def scene(i: int, task: str = "vqa") -> tuple[Image.Image, bytes, str]:
    row = shapes.make_row(shapes.SPLIT_SEEDS["test"], i, task)
    return Image.open(io.BytesIO(row.image)), row.image, row.prompt


def user(png: bytes | None, text: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(png)}}] if png else []
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


def expected(tiny, image, prompt_text: str, max_tokens: int, sparsity=DEFAULT) -> str:
    prompt = tiny.format_prompt(prompt_text, n_images=1 if image is not None else 0)
    return tiny.generate([image], [prompt], sparsity=sparsity, max_new_tokens=max_tokens)[0].text


def test_plain_request_equals_generate(client, tiny):
    image, png, text = scene(0)
    resp = client.chat.completions.create(model="tiny", messages=[user(png, text)], temperature=0, max_tokens=24)
    assert resp.choices[0].message.content == expected(tiny, image, text, 24)
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 144
    extension = resp.model_dump()["dynllava"]
    assert extension["applied"]["vision_keep"] == 0.2 and extension["stats"]["n_image_kept"] == 29
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streamed_request_equals_generate(client, tiny):
    image, png, text = scene(1, "describe")
    stream = client.chat.completions.create(model="tiny", messages=[user(png, text)], temperature=0,
                                            max_tokens=120, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == expected(tiny, image, text, 120)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and chunks[-1].usage.completion_tokens > 20


def test_multi_turn_and_text_only(client, tiny):
    image, png, text = scene(2)
    history = [user(png, "Describe the image briefly."), {"role": "assistant", "content": "two shapes."},
               {"role": "user", "content": text}]
    resp = client.chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=16)
    turns = [{"role": "user", "content": f"{tiny.processor.image_token}\nDescribe the image briefly."},
             {"role": "assistant", "content": "two shapes."}, {"role": "user", "content": text}]
    prompt = tiny.processor.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
    assert resp.choices[0].message.content == tiny.generate([image], [prompt], sparsity=DEFAULT,
                                                            max_new_tokens=16)[0].text
    text_only = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                               temperature=0, max_tokens=8)
    assert text_only.choices[0].message.content == expected(tiny, None, "Hello", 8)


def test_sparsity_override_is_applied_and_reported(client, tiny):
    image, png, text = scene(3, "caption")
    asked = {"vision_keep": 0.5, "text_keep": 1.0, "vision_scorer": "fastv"}
    resp = client.chat.completions.create(model="tiny", messages=[user(png, text)], temperature=0, max_tokens=40,
                                          extra_body={"dynllava": asked})
    extension = resp.model_dump()["dynllava"]
    assert {k: extension["applied"][k] for k in asked} == asked
    assert extension["stats"]["n_image_kept"] == 72
    assert resp.choices[0].message.content == expected(tiny, image, text, 40, DEFAULT.replace(**asked))


def test_32_concurrent_streams_complete_uncrossed(serve_urls, tiny):
    scenes = [scene(100 + i, "caption" if i % 2 else "vqa") for i in range(32)]
    client = openai.AsyncOpenAI(base_url=f"{serve_urls['open']}/v1", api_key="unused", max_retries=0, timeout=300)

    async def one(png, text):
        stream = await client.chat.completions.create(model="tiny", messages=[user(png, text)], temperature=0,
                                                      max_tokens=32, stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def all_of_them():
        return await asyncio.gather(*(one(png, text) for _, png, text in scenes))

    answers = asyncio.run(all_of_them())
    prompts = [tiny.format_prompt(text) for _, _, text in scenes]
    batch = tiny.generate([img for img, _, _ in scenes], prompts, sparsity=DEFAULT, max_new_tokens=32)
    assert answers == [o.text for o in batch]


def _health(base: str) -> dict:
    return request("GET", f"{base}/health").json()


def test_dropped_stream_frees_its_slot(serve_urls):
    base = serve_urls["open"]
    before = _health(base)["cancelled"]
    _, png, _ = scene(7, "describe")
    body = {"model": "tiny", "messages": [user(png, "Describe the image in detail.")], "max_tokens": 256,
            "temperature": 0, "stream": True}
    conn, path = connect(f"{base}/v1/chat/completions")
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    events = 0
    while events < 4:  # the role chunk and a few tokens: the request is decoding now
        events += response.readline().startswith(b"data: ")
    conn.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        health = _health(base)
        if health["cancelled"] > before and health["running"] == 0:
            break
        time.sleep(0.1)
    assert health["cancelled"] == before + 1 and health["running"] == 0 and health["kv_bytes_in_use"] == 0


def _post(url: str, body, key: str | None = None, raw: bytes | None = None):
    return request("POST", url, body, raw=raw, key=key)


def _png(size: tuple[int, int], noise: bool = False) -> bytes:
    img = Image.effect_noise(size, 80).convert("RGB") if noise else Image.new("RGB", size, (200, 10, 10))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def _msg(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "hi"}]}]}


HELLO = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_REQUESTS = {
    "unknown field": {**HELLO, "frobnicate": 1},
    "wrong type": {**HELLO, "max_tokens": "many"},
    "no messages": {"messages": []},
    "n=2": {**HELLO, "n": 2},
    "max_tokens over the limit": {**HELLO, "max_tokens": 10_000},
    "vision_keep below the floor": {**HELLO, "dynllava": {"vision_keep": 0.01}},
    "unknown scorer": {**HELLO, "dynllava": {"vision_scorer": "magic"}},
    "bad base64": _msg("data:image/png;base64,@@@@"),
    "not an image": _msg(data_url(b"\x89PNG\r\n\x1a\nthis is not a png")),
    "truncated png": _msg(data_url(_png((64, 64), noise=True)[:300])),
    "gif": _msg(data_url(_gif(), "image/gif")),
    "remote url disabled": _msg("https://example.com/cat.png"),
    "image too large": _msg(data_url(_png((400, 400), noise=True))),
    "too many images": {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(_png((16, 16)))}}] * 3 + [{"type": "text", "text": "?"}]}]},
    "image in an assistant turn": {"messages": [
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": data_url(_png((16, 16)))}}]},
        {"role": "user", "content": "hi"}]},
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_get_400_in_openai_shape(serve_urls, case):
    response = _post(f"{serve_urls['open']}/v1/chat/completions", BAD_REQUESTS[case])
    assert response.status == 400, response.body
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]


def test_other_statuses_and_the_replica_survives(serve_urls):
    url = f"{serve_urls['open']}/v1/chat/completions"
    assert _post(url, None, raw=b'{"messages": [').status == 400
    assert _post(url, None, raw=b"x" * (3 * 2**20)).status == 413
    unknown_model = _post(url, {**HELLO, "model": "gpt-9"})
    assert unknown_model.status == 404 and unknown_model.json()["error"]["code"] == "model_not_found"
    secure = f"{serve_urls['secure']}/v1/chat/completions"
    assert _post(secure, HELLO).status == 401
    assert _post(secure, HELLO, key="wrong").json()["error"]["type"] == "authentication_error"
    assert _post(secure, HELLO, key=API_KEY).status == 200
    assert _health(serve_urls["open"])["status"] == "ok"


def test_full_queue_answers_429_with_retry_after(serve_urls):
    """The secure app runs one request and queues one: of 6 at once, some are turned away, none is lost."""
    url = f"{serve_urls['secure']}/v1/chat/completions"
    _, png, _ = scene(9, "describe")
    body = {"messages": [user(png, "Describe the image in detail.")], "max_tokens": 200, "temperature": 0}

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: _post(url, body, key=API_KEY), range(6)))
    codes = sorted(r.status for r in responses)
    assert codes.count(200) >= 2 and set(codes) <= {200, 429}, codes
    busy = [r for r in responses if r.status == 429]
    assert busy and all(r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
                        for r in busy)


def test_caption_job_through_the_serve_app(serve_urls, tiny, tmp_path):
    import pyarrow.parquet as pq

    from pipelines.caption import run_caption_job
    from pipelines.config import CaptionJobConfig

    source = tmp_path / "rows.parquet"
    shapes.write_parquet(str(source), 12, shapes.SPLIT_SEEDS["test"], task="caption", progress=False)
    rows = [shapes.make_row(shapes.SPLIT_SEEDS["test"], i, "caption") for i in range(12)]
    finished_before = _health(serve_urls["open"])["finished"]
    config = CaptionJobConfig(model="tiny", serve_app="open", max_new_tokens=24, batch_size=4, decode_batch_size=4,
                              decode_tasks=1, rows_per_file=100)
    summary = run_caption_job(str(source), tmp_path / "out", config)
    assert (summary.rows, summary.errors) == (12, 0)
    table = pq.read_table(tmp_path / "out").to_pydict()
    captions = dict(zip(table["id"], table["caption"]))
    expected = tiny.generate([Image.open(io.BytesIO(r.image)) for r in rows],
                             [tiny.format_prompt(r.prompt) for r in rows], sparsity=config.sparsity,
                             max_new_tokens=24)
    assert [captions[r.id] for r in rows] == [e.text.strip() for e in expected]
    assert set(table["model"]) == {"tiny"}
    assert _health(serve_urls["open"])["finished"] - finished_before == 12, "rows ran on the app's replica"
    with pytest.raises(ValueError, match="no such `dynllava serve` app"):
        run_caption_job(str(source), tmp_path / "out2", CaptionJobConfig(serve_app="nope"))


def test_prometheus_metrics_are_exported_through_ray(serve_urls):
    """Ray's metrics export (the node's metrics port) carries the replica's metrics, prefixed `ray_`."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    wanted = ("ray_dynllava_requests_total", "ray_dynllava_ttft_seconds_bucket", "ray_dynllava_kv_bytes_in_use",
              "ray_dynllava_vision_keep_ratio_bucket")
    deadline, seen = time.monotonic() + 60, set()
    while time.monotonic() < deadline and len(seen) < len(wanted):
        text = request("GET", f"http://127.0.0.1:{port}/metrics").body.decode()
        seen = {name for name in wanted if any(line.startswith(name + "{") for line in text.splitlines())}
        time.sleep(2)
    assert seen == set(wanted)
    assert 'status="ok"' in text and 'model="tiny"' in text


def test_remote_image_urls_when_the_operator_allows_them(serve_urls, tiny, tmp_path):
    """The secure app fetches http(s) image URLs (here from a local file server); a missing one is a 400."""
    import functools
    import http.server
    import threading

    image, png, text = scene(11)
    (tmp_path / "scene.png").write_bytes(png)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    url = f"{serve_urls['secure']}/v1/chat/completions"
    try:
        def ask(image_url: str):
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                                              {"type": "text", "text": text}]}],
                    "max_tokens": 8, "temperature": 0}
            return _post(url, body, key=API_KEY)

        fetched = ask(f"{base}/scene.png")
        assert fetched.status == 200, fetched.body
        assert fetched.json()["choices"][0]["message"]["content"] == expected(tiny, image, text, 8)
        missing = ask(f"{base}/nothing.png")
        assert missing.status == 400 and "could not fetch" in missing.json()["error"]["message"]
    finally:
        server.shutdown()
