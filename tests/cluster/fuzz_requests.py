"""Seeded random and adversarial HTTP requests for the chat endpoint (tests/cluster/test_fuzz.py).

Each request starts from a valid chat completion and breaks it: fields set to values at, beyond and outside
their limits (huge and negative numbers, NaN and infinities, wrong types, deep nesting, lone surrogates), broken
messages and content parts, images that are corrupt, huge, tiny or absurdly shaped, bodies that are not JSON or
not an object, other methods and paths. Pure: `fuzz_request(rng)` gives the same request for the same seed.
"""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass
from functools import lru_cache

from PIL import Image

FIELDS = ("model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
          "stream", "stream_options", "n", "user", "frequency_penalty", "presence_penalty", "logit_bias",
          "logprobs", "top_logprobs", "response_format", "tools", "tool_choice", "ignore_eos", "min_tokens",
          "dynllava", "frobnicate")
NUMBERS = (0, 1, -1, 2, 7, 20, 21, 255, 256, 257, 2**31, 2**63, 2**64, 2**70, -(2**70), 0.5, 1e-300, -1e-300,
           1e308, float("nan"), float("inf"), float("-inf"), 3.999)


@dataclass
class FuzzRequest:
    """One HTTP exchange to attempt."""

    method: str  # GET, POST, ...
    path: str  # under the app's base URL
    body: bytes | None
    content_type: str  # the Content-Type header sent
    what: str  # a short description of the attack (for failure messages)
    streams: bool = False  # the body asks for a stream


@lru_cache(maxsize=32)
def png(width: int, height: int, noise: bool = False) -> bytes:
    image = Image.effect_noise((width, height), 80).convert("RGB") if noise else Image.new("RGB", (width, height))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def data_url(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{base64.b64encode(data).decode()}"


SMALL_PNG = png(24, 24, noise=True)


def valid_chat(rng: random.Random) -> dict:
    """A request the server must answer 200 (greedy or sampled, 1-16 tokens, with or without an image)."""
    content: list[dict] = [{"type": "text", "text": rng.choice(["What shape is this?", "Describe it.", "hi"])}]
    if rng.random() < 0.7:
        content.insert(rng.randrange(2), {"type": "image_url", "image_url": {"url": data_url(SMALL_PNG)}})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": rng.randint(1, 16),
            "temperature": rng.choice([0, 0.7, 1.0])}


def nasty_value(rng: random.Random, depth: int = 0):
    """A JSON value of a random type and size, including extremes."""
    kind = rng.randrange(10 if depth < 2 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind in (2, 3):
        return rng.choice(NUMBERS)
    if kind == 4:
        return rng.choice(["", "tiny", "\ud800", "\x00", "é" * 50, "x" * rng.choice([300, 70_000]), "<|im_end|>",
                           "</s>", "NaN", "-1", "{}", "data:image/png;base64,"])
    if kind == 5:
        return rng.randint(-5, 5) * 10 ** rng.randint(0, 30)
    if kind == 6:
        return [nasty_value(rng, depth + 1) for _ in range(rng.choice([0, 1, 3, 5, 1000]))]
    if kind == 7:
        return {rng.choice(["0", "13", "-1", "99999999", "type", "url", "text", "x", "1e3"]):
                nasty_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if kind == 8:
        return json.loads("[" * 50 + "]" * 50)
    return {"type": rng.choice(["text", "image_url", "json_object", "function"]), "text": nasty_value(rng, 2)}


def nasty_image_url(rng: random.Random) -> str:
    """image_url.url values: corrupt, empty, tiny, huge, absurd shapes, wrong media, other schemes."""
    choice = rng.randrange(12)
    if choice == 0:
        return data_url(SMALL_PNG[: rng.randrange(1, len(SMALL_PNG))])  # truncated
    if choice == 1:
        return data_url(bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 64, 4096]))))
    if choice == 2:
        return data_url(png(1, rng.choice([2, 19, 21, 10_000])))  # a line: aspect ratio
    if choice == 3:
        return data_url(png(rng.choice([1, 2, 3]), rng.choice([1, 2, 3])))  # a dot
    if choice == 4:
        return data_url(png(rng.choice([500, 900]), rng.choice([500, 900]), noise=True))  # over the byte limit
    if choice == 5:
        return data_url(png(4000, 4000))  # compresses small, decodes to 16 M pixels
    if choice == 6:
        return data_url(SMALL_PNG, rng.choice(["image/gif", "text/plain", "", "image/svg+xml", "image/png;x=y"]))
    if choice == 7:
        return "data:image/png;base64," + rng.choice(["@@@@", "====", "a", "", "ZZZ" * 1000])
    if choice == 8:
        return rng.choice(["http://127.0.0.1:1/x.png", "file:///etc/passwd", "javascript:alert(1)", "",
                           "ftp://x/y.png", "data:", "data:,", "http://[::1"])
    if choice == 9:
        return "x" * rng.choice([10, 100_000])
    if choice == 10:  # a valid PNG header claiming a gigapixel image
        head = png(8, 8)
        return data_url(head[:16] + (60_000).to_bytes(4, "big") + (60_000).to_bytes(4, "big") + head[24:])
    return data_url(SMALL_PNG)


def nasty_message(rng: random.Random) -> dict:
    """A message with a random role, content of a random shape and random parts."""
    role = rng.choice(["user", "user", "system", "assistant", "developer", "tool", "bot", "", None, 3])
    shape = rng.randrange(6)
    if shape == 0:
        content = nasty_value(rng)
    elif shape == 1:
        content = rng.choice(["", "hi", "\ud800\udfff", "a" * rng.choice([10, 65_536, 65_537]), "<image>" * 20])
    else:
        parts = []
        for _ in range(rng.choice([0, 1, 2, 3, 5])):
            if rng.random() < 0.5:
                parts.append({"type": "image_url", "image_url": {"url": nasty_image_url(rng)}})
            elif rng.random() < 0.7:
                parts.append({"type": "text", "text": rng.choice(["?", "", "<image>", "\x00", "x" * 5000])})
            else:
                parts.append(nasty_value(rng, 1))
        content = parts
    message = {"role": role, "content": content}
    if rng.random() < 0.1:
        message[rng.choice(["name", "tool_calls", "tool_call_id", "refusal", "extra"])] = nasty_value(rng, 1)
    return message


def fuzz_request(rng: random.Random) -> FuzzRequest:
    """One random attack on the chat endpoint (most) or on another route or method (a few)."""
    kind = rng.randrange(20)
    if kind == 0:  # not JSON, or JSON that is not an object, or broken off
        raw = rng.choice([bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 100, 10_000]))),
                          b"[]", b"null", b"3", b'"x"', b"{", b'{"messages": [', b"[" * 100_000,
                          json.dumps(valid_chat(rng)).encode()[: rng.randrange(1, 40)], b"\xef\xbb\xbf{}"])
        return FuzzRequest("POST", "/v1/chat/completions", raw, "application/json", f"raw body {raw[:20]!r}")
    if kind == 1:  # another route or method
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "POST"])
        path = rng.choice(["/v1/chat/completions", "/v1/models", "/v1/models/tiny", "/v1/models/%00", "/v1/",
                           "/v1/completions", "/v1/embeddings", "/metrics", "/health", "/" + "a" * 2000])
        body = None if method == "GET" else json.dumps(valid_chat(rng)).encode()
        return FuzzRequest(method, path, body, "application/json", f"{method} {path[:40]}")
    body = valid_chat(rng)
    attacks = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        target = rng.randrange(4)
        if target == 0:
            name = rng.choice(FIELDS)
            body[name] = nasty_value(rng)
            attacks.append(f"{name}={repr(body[name])[:40]}")
        elif target == 1:
            body["messages"] = [nasty_message(rng) for _ in range(rng.choice([1, 1, 2, 4]))]
            attacks.append("messages")
        elif target == 2:
            url = nasty_image_url(rng)
            body["messages"] = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                             {"type": "text", "text": "?"}]}]
            attacks.append(f"image {url[:40]}")
        else:  # plausible values at the edges of what is valid
            name, value = rng.choice([
                ("stop", ["x" * 256] * 4), ("stop", [""]), ("stop", "a"), ("seed", 2**64 - 1), ("seed", -(2**63)),
                ("temperature", 2.0), ("temperature", 1e-6), ("top_p", 1e-9), ("logit_bias", {str(i): 100 for i in
                                                                                             range(300)}),
                ("logit_bias", {"0": -100, "1": 100}), ("frequency_penalty", 2.0), ("presence_penalty", -2.0),
                ("logprobs", True), ("top_logprobs", 20), ("min_tokens", 16), ("ignore_eos", True),
                ("max_tokens", 256), ("max_completion_tokens", 1),
                ("dynllava", {"vision_keep": 0.05, "text_keep": 0.3, "vision_scorer": "random"}),
                ("dynllava", {"vision_keep": 1.0, "text_scorer": "h2o"}),
                ("stream_options", {"include_usage": True})])
            body[name] = value
            if name == "top_logprobs":
                body["logprobs"] = True
            attacks.append(f"{name}={repr(value)[:40]}")
    if rng.random() < 0.3:
        body["stream"] = True
    content_type = "application/json" if rng.random() < 0.95 else rng.choice(["text/plain", "", "x/y"])
    return FuzzRequest("POST", "/v1/chat/completions", json.dumps(body).encode(), content_type, "; ".join(attacks),
                       streams=body.get("stream") is True)
