"""Turning user inputs (images, prompts) into padded token tensors, with clear errors for bad input."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Any  # PIL.Image.Image | str | Path | bytes | None


def load_image(image: ImageInput, field: str) -> Image.Image:
    """Open an image given as PIL image, path or encoded bytes; ValueError naming `field` if unreadable."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(image)))
        elif isinstance(image, (str, Path)):
            img = Image.open(Path(image).expanduser())
        else:
            raise ValueError(f"{field}: expected a PIL image, a path or bytes, got {type(image).__name__}")
        img.load()  # decode now: truncated files fail here, not later
        return img.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{field}: unreadable image ({e})") from None


@dataclass
class PreparedBatch:
    """Right-padded model inputs for B rows.

    input_ids: [B, T] long (padding = pad id); valid: [B, T] bool; pixel_values: [N_img, 3, H, W] or None,
    images in row order; lengths: prompt tokens per row; n_images: images per row.
    """

    input_ids: torch.Tensor
    valid: torch.Tensor
    pixel_values: torch.Tensor | None
    lengths: list[int]
    n_images: list[int]


def _as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def prepare_batch(processor, images: Sequence[Any], prompts: Sequence[str], max_context: int,
                  max_new_tokens: int) -> PreparedBatch:
    """Validate and tokenize each row (expanding `<image>` into the image tokens), then right-pad.

    images[i] is None, one image, or a list of images for prompts[i]; the prompt must hold one image
    placeholder per image.
    """
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must have the same length, got {len(images)} and {len(prompts)}")
    if not prompts:
        raise ValueError("prompts: empty batch")
    token = processor.image_token
    ids, pixels, n_images = [], [], []
    for i, (row_images, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{i}]: must be a non-empty string")
        opened = [load_image(img, f"images[{i}]") for img in _as_image_list(row_images)]
        n_placeholders = prompt.count(token)
        if n_placeholders != len(opened):
            what = "has no image placeholder" if n_placeholders == 0 else f"has {n_placeholders} placeholders"
            raise ValueError(f"prompts[{i}]: {what} ({token!r}) but {len(opened)} image(s) were given")
        out = processor(images=opened or None, text=prompt, return_tensors="pt")
        row = out["input_ids"][0]
        if len(row) + max_new_tokens > max_context:
            raise ValueError(f"prompts[{i}]: {len(row)} prompt tokens + max_new_tokens {max_new_tokens} exceed "
                             f"the model's context of {max_context} tokens")
        ids.append(row)
        n_images.append(len(opened))
        if opened:
            pixels.append(out["pixel_values"])
    lengths = [len(r) for r in ids]
    pad_id = processor.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    input_ids = torch.full((len(ids), max(lengths)), pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
    valid = torch.arange(input_ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    pixel_values = torch.cat(pixels) if pixels else None
    return PreparedBatch(input_ids, valid, pixel_values, lengths, n_images)
