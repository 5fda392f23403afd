"""OpenAI chat messages -> the model's prompt text and images, with the server's limits enforced.

Images come as `image_url` parts: data URLs (base64 PNG, JPEG or WebP) always, http(s) URLs only when the
operator allows them. Each image becomes one `<image>` placeholder where its part stood, so multi-turn
conversations with images in several user turns keep their order. Every failure is an ApiError(400).
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
from typing import Any

from PIL import Image

from cluster.openai_protocol import ApiError, Message
from cluster.serve_config import Limits
from dynllava.inputs import IMAGE_PART, chat_prompt, load_image

DATA_URL_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG", "image/jpg": "JPEG", "image/webp": "WEBP"}


def decode_data_url(url: str, field: str, limits: Limits) -> bytes:
    """The bytes of a `data:image/...;base64,` URL (size checked before decoding)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:") or not header.endswith(";base64"):
        raise ApiError(400, f"{field}: expected a data URL 'data:image/png|jpeg|webp;base64,...'", param=field)
    media = header[len("data:"): -len(";base64")].lower()
    if media not in DATA_URL_TYPES:
        raise ApiError(400, f"{field}: unsupported image type {media!r} (png, jpeg, webp)", param=field)
    if len(payload) * 3 // 4 > limits.max_image_bytes:
        raise ApiError(400, f"{field}: image is over the {limits.max_image_bytes}-byte limit", param=field)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{field}: invalid base64 data", param=field) from None


def fetch_url(url: str, field: str, limits: Limits) -> bytes:
    """Download an http(s) image, at most max_image_bytes, within the timeout."""
    try:
        with urllib.request.urlopen(url, timeout=limits.remote_image_timeout_s) as response:  # noqa: S310
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ApiError(400, f"{field}: could not fetch the image ({e})", param=field) from None
    if len(data) > limits.max_image_bytes:
        raise ApiError(400, f"{field}: image is over the {limits.max_image_bytes}-byte limit", param=field)
    return data


def open_image(url: str, field: str, limits: Limits, allow_remote: bool) -> Image.Image:
    """An image_url part's image, decoded and checked (format, pixel count, integrity)."""
    if url.startswith("data:"):
        data = decode_data_url(url, field, limits)
    elif url.startswith(("http://", "https://")):
        if not allow_remote:
            raise ApiError(400, f"{field}: remote image URLs are disabled on this server; send a data URL",
                           param=field)
        data = fetch_url(url, field, limits)
    else:
        raise ApiError(400, f"{field}: image_url must be a data: URL or http(s) URL", param=field)
    try:
        fmt = Image.open(io.BytesIO(data)).format
    except Exception:  # PIL raises several types for garbage
        fmt = None
    if fmt not in ("PNG", "JPEG", "WEBP"):
        raise ApiError(400, f"{field}: not a PNG, JPEG or WebP image", param=field)
    try:
        return load_image(data, field, limits.max_image_pixels, limits.max_image_aspect_ratio)
    except ValueError as e:
        raise ApiError(400, str(e), param=field) from None


def to_prompt(processor, messages: list[Message], limits: Limits, allow_remote: bool) -> tuple[str, list[Any]]:
    """(prompt text in the model's chat template, images in placeholder order)."""
    token = processor.image_token
    chars = sum(len(p) if isinstance(p, str) else len(getattr(p, "text", "") or "") for m in messages
                for p in ([m.content] if isinstance(m.content, str) else m.content or []))
    if chars > limits.max_prompt_chars:
        raise ApiError(400, f"messages: {chars} characters of text, over this server's limit of "
                            f"{limits.max_prompt_chars} (max_prompt_chars)", param="messages")
    turns, images = [], []
    for m_index, message in enumerate(messages):
        parts = [message.content] if isinstance(message.content, str) else message.content or []
        pieces = []
        for p_index, part in enumerate(parts):
            field = f"messages.{m_index}.content" + ("" if isinstance(message.content, str) else f".{p_index}")
            text = part if isinstance(part, str) else getattr(part, "text", None)
            if text is not None:
                if token in text:
                    raise ApiError(400, f"{field}: text may not contain the image placeholder {token!r}",
                                   param=field)
                pieces.append(text)
                continue
            if message.role != "user":
                raise ApiError(400, f"{field}: images are only allowed in user messages", param=field)
            if len(images) >= limits.max_images:
                raise ApiError(400, f"too many images: at most {limits.max_images} per request", param=field)
            images.append(open_image(part.image_url.url, f"{field}.image_url", limits, allow_remote))
            pieces.append(IMAGE_PART)
        turns.append(("system" if message.role == "developer" else message.role, pieces))
    if turns[-1][0] != "user":
        raise ApiError(400, "messages: the last message must be from the user", param="messages")
    return chat_prompt(processor, turns), images
