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

import numpy as np
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


def _asgi_post(server, body: dict, path: str = "/v1/chat/completions"):
    """The replica class's chat route called directly (outside Serve and HTTP): an awaitable Response."""
    from starlette.requests import Request

    raw = json.dumps(body).encode()

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]}
    return server.chat_completions(Request(scope, receive))


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
            "temperature": 0, "stream": True, "dynllava": {"ignore_eos": True}}  # 256 tokens: still decoding
    conn, path = connect(f"{base}/v1/chat/completions")
    conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    events = 0
    while events < 4:  # the role chunk and a few tokens: the request is decoding now
        events += response.readline().startswith(b"data: ")
    conn.close()  # the client goes away mid-stream
    _wait_for(base, timeout_s=20, cancelled=before + 1, running=0, kv_bytes_in_use=0)


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
    "stop string over max_stop_chars": {**HELLO, "stop": "x" * 1_000_000},
    "text over max_prompt_chars": {"messages": [{"role": "user", "content": "a" * 70_000}], "max_tokens": 4},
    "1 x 10000 image (aspect ratio)": _msg(data_url(_png((1, 10_000)))),
    "seed beyond 2**64": {**HELLO, "seed": 2**70},
    "tools": {**HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]},
    "top_logprobs without logprobs": {**HELLO, "top_logprobs": 2},
    "top_logprobs over 20": {**HELLO, "logprobs": True, "top_logprobs": 21},
    "json mode": {**HELLO, "response_format": {"type": "json_object"}},
    "a tool message": {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"},
                                    {"role": "user", "content": "hi"}]},
    "logit_bias token outside the vocabulary": {**HELLO, "logit_bias": {"99999999": 5}},
    "min_tokens over max_tokens": {**HELLO, "min_tokens": 5},
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


def test_fields_openai_clients_send_are_accepted(serve_urls, client):
    """What the official client and load generators send: penalties at 0 and not, logit_bias, user, vLLM's
    ignore_eos and min_tokens, response_format text, tool_choice none, an assistant turn with content null, and
    the text part before the image part (OpenAI's own docs' order; an answer of zero tokens used to be a 500)."""
    url = f"{serve_urls['open']}/v1/chat/completions"
    png = data_url(_png((24, 24)))
    body = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None},
                         {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                                      {"type": "image_url", "image_url": {"url": png}}]}],
            "max_tokens": 6, "frequency_penalty": 0, "presence_penalty": 0.5, "logit_bias": {"13": 2.0},
            "user": "u1", "ignore_eos": True, "min_tokens": 2, "response_format": {"type": "text"},
            "tool_choice": "none", "seed": 3, "temperature": 1e-300}
    reply = _post(url, body)
    assert reply.status == 200, reply.body
    assert reply.json()["usage"]["completion_tokens"] == 6, "ignore_eos runs to max_tokens"
    first_text = {"messages": [{"role": "user", "content": [{"type": "text", "text": "describe"},
                                                            {"type": "image_url", "image_url": {"url": png}}]}],
                  "max_tokens": 4}
    assert _post(url, first_text).status == 200
    chunks = client.chat.completions.create(model="tiny", messages=HELLO["messages"], max_tokens=3, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(chunks)
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens >= 1


def test_logprobs_plain_and_streamed_agree_and_follow_the_tokens(client):
    """logprobs / top_logprobs: one entry per answer token with its k best alternatives (greedy picks the
    first); streamed chunks carry the same entries as the plain answer."""
    ask = dict(model="tiny", messages=HELLO["messages"], max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
               extra_body={"ignore_eos": True})
    plain = client.chat.completions.create(**ask)
    entries = plain.choices[0].logprobs.content
    assert len(entries) == plain.usage.completion_tokens == 5
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].token == e.token and e.logprob <= 0
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob and e.bytes == list(e.token.encode())
    streamed = [entry for chunk in client.chat.completions.create(**ask, stream=True)
                for choice in chunk.choices if choice.logprobs for entry in choice.logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in entries]
    assert "".join(e.token for e in entries).strip() == plain.choices[0].message.content.strip()


def test_limit_errors_name_the_field_and_the_limit(serve_urls):
    url = f"{serve_urls['open']}/v1/chat/completions"
    stop = _post(url, BAD_REQUESTS["stop string over max_stop_chars"]).json()["error"]
    assert stop["param"] == "stop" and "max_stop_chars" in stop["message"]
    aspect = _post(url, BAD_REQUESTS["1 x 10000 image (aspect ratio)"]).json()["error"]
    assert "max_image_aspect_ratio" in aspect["message"] and aspect["param"].endswith("image_url")
    assert _post(url, BAD_REQUESTS["text over max_prompt_chars"]).json()["error"]["param"] == "messages"


def test_every_route_answers_in_openai_shape(serve_urls):
    """Unknown routes and methods, and GET /v1/models/{id} (client.models.retrieve), answer like OpenAI's API."""
    base = serve_urls["open"]
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405),
                                 ("GET", "/v1/models/gpt-9", 404)):
        response = request(method, base + path, None)
        assert response.status == status and response.json()["error"]["message"], (method, path, response.body)
    name = request("GET", base + "/v1/models", None).json()["data"][0]["id"]
    card = request("GET", f"{base}/v1/models/{name}", None)
    assert card.status == 200 and card.json()["id"] == name and card.json()["object"] == "model"


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
    """The secure app runs one request and queues one. A streamed request that ignores EOS for 256 tokens holds
    the slot and a second waits in the queue, so a third is turned away with 429; the first two complete."""
    url = f"{serve_urls['secure']}/v1/chat/completions"
    _, png, _ = scene(9, "describe")
    long = {"messages": [user(png, "Describe the image in detail.")], "max_tokens": 256, "temperature": 0,
            "dynllava": {"ignore_eos": True}}
    conn, path = connect(url)
    conn.request("POST", path, body=json.dumps({**long, "stream": True}).encode(),
                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {API_KEY}"})
    held = conn.getresponse()
    try:
        assert held.status == 200 and held.readline().startswith(b"data: ")
        _wait_for(serve_urls["secure"], running=1, waiting=0)
        with ThreadPoolExecutor(1) as pool:
            queued = pool.submit(_post, url, long, API_KEY)
            _wait_for(serve_urls["secure"], running=1, waiting=1)
            busy = _post(url, long, key=API_KEY)
            assert busy.status == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["type"] == "rate_limit_error"
            rest = held.read().decode()
            assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason": "length"' in rest
            second = queued.result()
            assert second.status == 200 and second.json()["usage"]["completion_tokens"] == 256
    finally:
        conn.close()


def _wait_for(base: str, timeout_s: float = 30, **state) -> None:
    """Poll /health until its counters show `state` (e.g. running=1, waiting=1)."""
    deadline = time.monotonic() + timeout_s
    while True:
        health = _health(base)
        if all(health[k] == v for k, v in state.items()):
            return
        assert time.monotonic() < deadline, f"health never showed {state}: {health}"
        time.sleep(0.01)


def test_caption_job_through_the_serve_app(serve_urls, tiny, tmp_path):
    """A job's rows go through a running app's replica (`--serve-app`). The secure app runs one row and queues
    one, and the job hands it 6 rows at a time, so most rows find the queue full: they wait, none fails, and
    each caption is what generate gives."""
    import pyarrow.parquet as pq

    from pipelines.caption import run_caption_job
    from pipelines.config import CaptionJobConfig

    source = tmp_path / "rows.parquet"
    shapes.write_parquet(str(source), 12, shapes.SPLIT_SEEDS["test"], task="caption", progress=False)
    rows = [shapes.make_row(shapes.SPLIT_SEEDS["test"], i, "caption") for i in range(12)]
    finished_before = _health(serve_urls["secure"])["finished"]
    config = CaptionJobConfig(model="tiny", serve_app="secure", max_new_tokens=24, batch_size=6,
                              decode_batch_size=6, decode_tasks=1, rows_per_file=100)
    summary = run_caption_job(str(source), tmp_path / "out", config)
    assert (summary.rows, summary.errors) == (12, 0)
    table = pq.read_table(tmp_path / "out").to_pydict()
    captions = dict(zip(table["id"], table["caption"]))
    expected = tiny.generate([Image.open(io.BytesIO(r.image)) for r in rows],
                             [tiny.format_prompt(r.prompt) for r in rows], sparsity=config.sparsity,
                             max_new_tokens=24)
    assert [captions[r.id] for r in rows] == [e.text.strip() for e in expected]
    assert set(table["model"]) == {"tiny"}
    assert _health(serve_urls["secure"])["finished"] - finished_before == 12, "rows ran on the app's replica"
    with pytest.raises(ValueError, match="no such `dynllava serve` app"):
        run_caption_job(str(source), tmp_path / "out2", CaptionJobConfig(serve_app="nope"))


def _scrape() -> dict[tuple[str, frozenset], float]:
    """Every sample on this node's Ray metrics port: (name, labels) -> value."""
    import re

    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    samples = {}
    for line in request("GET", f"http://127.0.0.1:{port}/metrics").body.decode().splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def _total(samples: dict, name: str, **labels: str) -> float:
    """Sum of a metric over its label sets that carry `labels` (e.g. the open app's replica)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


METRICS = ("ray_dynllava_requests_total", "ray_dynllava_output_tokens_total", "ray_dynllava_ttft_seconds_count",
           "ray_dynllava_ttft_seconds_sum", "ray_dynllava_token_latency_seconds_count",
           "ray_dynllava_vision_keep_ratio_count", "ray_dynllava_vision_keep_ratio_sum",
           "ray_dynllava_text_keep_ratio_sum", "ray_dynllava_request_kv_bytes_sum",
           "ray_dynllava_running_requests", "ray_dynllava_waiting_requests", "ray_dynllava_kv_bytes_in_use",
           "ray_dynllava_kv_bytes_allocated")


def test_prometheus_metrics_count_what_was_served(serve_urls, client):
    """Ray's metrics export (the node's metrics port, names prefixed `ray_`) carries every metric the README
    lists, and three known requests (and one bad one) move each by exactly what they report: outcomes, tokens,
    and every bucket of TTFT, per-token latency, keep ratios and KV bytes; an idle replica's gauges fall to 0."""
    base = serve_urls["open"]

    def settled() -> dict:
        """Metrics once the replica's TTFT count has caught up with its engine's finished count, and one more
        export later (a request's outcome is counted just after its TTFT is observed)."""
        deadline = time.monotonic() + 60
        while True:
            samples, finished = _scrape(), _health(base)["finished"]
            if finished == 0 or any(k[0] == "ray_dynllava_ttft_seconds_count" and v == finished
                                    for k, v in samples.items()):
                time.sleep(1.5)  # RAY_metrics_report_interval_ms is 1000 in the tests
                return _scrape()
            assert time.monotonic() < deadline, f"metrics never caught up with {finished} finished requests"
            time.sleep(0.5)

    before = settled()
    assert _post(f"{base}/v1/chat/completions", {**HELLO, "n": 3}).status == 400  # one rejected request
    replies = []
    for i in range(3):
        _, png, text = scene(40 + i, "describe")
        replies.append(client.chat.completions.create(model="tiny", messages=[user(png, text)], temperature=0,
                                                      max_tokens=12 + 4 * i).model_dump())
    after = settled()
    finished = _health(base)["finished"]
    ((_, labels),) = [k for k, v in after.items() if k[0] == "ray_dynllava_ttft_seconds_count" and v == finished]
    worker = dict(kv for kv in labels if kv[0] == "WorkerId")  # the open app's replica
    assert all(any(n == name for n, _ in after) for name in METRICS), sorted({n for n, _ in after})

    def delta(name: str, **labels) -> float:
        return _total(after, name, **worker, **labels) - _total(before, name, **worker, **labels)

    stats = [r["dynllava"]["stats"] for r in replies]
    assert delta("ray_dynllava_requests_total", status="ok") == 3
    assert delta("ray_dynllava_requests_total", status="rejected") == 1
    assert delta("ray_dynllava_output_tokens_total") == sum(r["usage"]["completion_tokens"] for r in replies)
    # histograms by their buckets (Ray exports a histogram's _sum from bucket midpoints, so sums are not exact)
    observed = {"ttft_seconds": [s["ttft_s"] for s in stats],
                "token_latency_seconds": [s["decode_s"] / (s["n_text_generated"] - 1) for s in stats],
                "vision_keep_ratio": [s["n_image_kept"] / s["n_image_tokens"] for s in stats],
                "text_keep_ratio": [s["n_text_admitted"] / (s["n_text_generated"] - 1) for s in stats],
                "request_kv_bytes": [s["kv_bytes_peak"] for s in stats]}
    for name, values in observed.items():
        buckets = {dict(ls)["le"] for n, ls in after if n == f"ray_dynllava_{name}_bucket"}
        assert len(buckets) > 5, name
        for le in buckets:
            got = delta(f"ray_dynllava_{name}_bucket", le=le)
            assert got == sum(v <= float(le) for v in values), (name, le, got, values)
    deadline = time.monotonic() + 30  # gauges are sampled each second: idle now, they fall to 0
    while any(_total(_scrape(), f"ray_dynllava_{g}", **worker) for g in GAUGES):
        assert time.monotonic() < deadline, {g: _total(_scrape(), f"ray_dynllava_{g}", **worker) for g in GAUGES}
        time.sleep(0.5)


GAUGES = ("running_requests", "waiting_requests", "kv_bytes_in_use", "kv_bytes_allocated")


def test_sampling_and_length_parameters_equal_generate(client, tiny):
    """seed, temperature and top_p sample what generate samples with the same seed; max_completion_tokens caps
    the answer; a stop string ends it just before the string."""
    image, png, text = scene(5, "describe")
    prompt = tiny.format_prompt(text)

    def ask(**kw):
        return client.chat.completions.create(model="tiny", messages=[user(png, text)], **kw).choices[0]

    sampled = ask(temperature=0.9, top_p=0.8, seed=1234, max_tokens=30)
    again = ask(temperature=0.9, top_p=0.8, seed=1234, max_tokens=30)
    ref = tiny.generate([image], [prompt], sparsity=DEFAULT, max_new_tokens=30, temperature=0.9, top_p=0.8,
                        seed=1234)[0]
    assert sampled.message.content == again.message.content == ref.text
    assert ref.text != expected(tiny, image, text, 30), "sampling changed the answer"
    capped = ask(temperature=0, max_completion_tokens=7, extra_body={"dynllava": {"ignore_eos": True}})
    assert capped.finish_reason == "length"
    assert capped.message.content == tiny.generate([image], [prompt], sparsity=DEFAULT, max_new_tokens=7,
                                                   ignore_eos=True)[0].text
    free = expected(tiny, image, text, 40)
    stop = free[12:16]
    stopped = ask(temperature=0, max_tokens=40, stop=[stop, "never appears"])
    assert stopped.finish_reason == "stop" and stopped.message.content == free[: free.index(stop)]


def test_a_stopped_engine_answers_503_and_health_says_so(ray_local):
    """The replica class itself (outside Serve), its engine thread stopped: /health and chat completions answer
    503 in OpenAI's error shape, with Retry-After."""
    from cluster.server import LlavaServer
    from cluster.serve_config import ServeConfig

    replica_class = LlavaServer.func_or_class.__mro__[1]  # the class under Serve's ASGI wrapper
    server = replica_class(ServeConfig(model="tiny", threads=1).to_dict())
    try:
        server.engine.stop()
        health = asyncio.run(server.health())
        assert health.status_code == 503 and json.loads(health.body)["status"] == "engine stopped"
        reply = asyncio.run(_asgi_post(server, HELLO))
        assert reply.status_code == 503 and reply.headers["retry-after"] == "5"
        assert json.loads(reply.body)["error"]["type"] == "server_error"
    finally:
        server._stop_sampling.set()


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


@pytest.mark.parametrize("engine_process", [True, False], ids=["engine-process", "engine-thread"])
def test_a_replica_serves_an_any_resolution_model(ray_local, tmp_path, engine_process):
    """The replica class itself (outside Serve) with a LLaVA-NeXT model (tiny, random weights): a chat request
    with a wide image and the `--serve-app` rows path (the job's uint8 tiles and image sizes) each answer what
    the model generates in-process, no special case; with the engine in its own process or on a thread."""
    import yaml

    from cluster.serve_config import ServeConfig
    from cluster.server import LlavaServer
    from dynllava.inputs import load_image, resize_image
    from tests.dynllava.test_anyres import SPECS

    path = tmp_path / "next.yaml"
    path.write_text(yaml.safe_dump(dict(SPECS["llava_next"], name="next", image_token_id=260)))
    model = DynamicLlava.from_pretrained(path, device="cpu", dtype=torch.float32)
    buf = io.BytesIO()
    Image.new("RGB", (90, 40), (200, 30, 30)).save(buf, "PNG")
    image = load_image(buf.getvalue(), "image")
    replica_class = LlavaServer.func_or_class.__mro__[1]  # the class under Serve's ASGI wrapper
    sparsity = SparsityConfig(vision_keep=0.3, vision_scorer="stride", text_keep=0.5, text_scorer="recent")
    server = replica_class(ServeConfig(model=str(path), threads=1, sparsity=sparsity,
                                       engine_process=engine_process).to_dict())
    try:
        body = {"messages": [user(buf.getvalue(), "What is it?")], "max_tokens": 5, "temperature": 0}
        tiles, size = resize_image(model.processor, image)
        pixels = np.empty(1, dtype=object)
        pixels[0] = tiles

        async def both():  # one event loop, as in a replica
            reply = json.loads((await _asgi_post(server, body)).body)
            rows = await server.generate_rows(pixels, ["What is it?"], 5, sparsity.to_dict(), np.array([size]))
            return reply, rows

        reply, rows = asyncio.run(both())
        alone = model.generate([image], [model.format_prompt("What is it?")], sparsity=sparsity, max_new_tokens=5)[0]
        assert SparsityConfig.from_dict(reply["dynllava"]["applied"]) == sparsity
        assert reply["choices"][0]["message"]["content"] == alone.text
        assert reply["dynllava"]["stats"]["n_image_tokens"] == alone.stats.n_image_tokens > 16
        assert rows[0].token_ids == alone.token_ids
    finally:
        server._stop_sampling.set()
        server.engine.stop()


def test_an_overloaded_replica_sheds_what_it_cannot_admit_in_time(ray_local):
    """The replica class itself (outside Serve), one slot, max_queue_wait_s 0.3: while a long request runs, a
    streamed and a plain request that wait past 0.3 s are answered 503 (code queue_timeout, Retry-After) before
    any stream starts, /health counts them, and the long request finishes untouched."""
    from cluster.serve_config import ServeConfig
    from cluster.server import LlavaServer

    replica_class = LlavaServer.func_or_class.__mro__[1]  # the class under Serve's ASGI wrapper
    server = replica_class(ServeConfig(model="tiny", threads=1, max_batch=1, max_prefill_batch=1,
                                       max_queue_wait_s=0.3).to_dict())
    long = {**HELLO, "max_tokens": 400, "dynllava": {"ignore_eos": True}}

    async def scenario():
        held = asyncio.create_task(_asgi_post(server, long))
        while server.engine.counters.running < 1:
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        shed = await asyncio.gather(_asgi_post(server, {**HELLO, "stream": True}), _asgi_post(server, HELLO))
        waited = time.perf_counter() - started
        still_running = server.engine.counters.running == 1
        return await held, shed, waited, still_running

    try:
        held, shed, waited, still_running = asyncio.run(scenario())
        assert still_running, "the long request finished before the queue timed out: the test proves nothing"
        for reply in shed:
            assert reply.status_code == 503 and reply.headers["retry-after"] == "1", reply.body
            assert json.loads(reply.body)["error"]["code"] == "queue_timeout"
        assert 0.3 <= waited < 5
        assert held.status_code == 200 and json.loads(held.body)["usage"]["completion_tokens"] == 400
        health = json.loads(asyncio.run(server.health()).body)
        assert health["timed_out"] == 2 and health["finished"] == 1
    finally:
        server._stop_sampling.set()
        server.engine.stop()
