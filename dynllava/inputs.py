"""Turning user inputs (images, prompts) into padded token tensors, with clear errors for bad input."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, UnidentifiedImageError

ImageInput = Any  # PIL.Image.Image | str | Path | bytes | PixelValues | None


@dataclass
class PixelValues:
    """An image the model's image processor has already resized and normalised, e.g. on a CPU worker so the
    accelerator's actor only runs the model. values: [3, H, W] float (H, W = the processor's crop size)."""

    values: torch.Tensor


@dataclass(frozen=True)
class PromptRule:
    """How an original-format LLaVA model's prompts become token ids (set by `dynllava convert`, read from the
    model directory's dynllava.json onto its processor as `processor.dynllava_prompt_rule`).

    legacy: the original tokenizer's `legacy` flag (see dynllava.llama_tokenizer).
    """

    legacy: bool


PROMPT_RULE_ATTR = "dynllava_prompt_rule"


def tokenize_llava(tokenizer, prompt: str, image_token: str, n_image_tokens: int, legacy: bool) -> list[int]:
    """LLaVA's `tokenizer_image_token`: the text between image placeholders is tokenized piece by piece, each
    piece as its own string (BOS only on the first), so the text after an image starts with SentencePiece's
    prefix "▁" as in the original, unlike tokenizing the whole prompt. Each placeholder becomes n_image_tokens
    image ids. With legacy=False the slow tokenizer puts one "▁" before each piece's text (a space here, which
    Metaspace turns into "▁") and drops it again when a special token follows at once."""
    image_id = tokenizer.convert_tokens_to_ids(image_token)
    underline = tokenizer.convert_tokens_to_ids("▁")
    special = set(tokenizer.all_special_ids)
    ids: list[int] = []
    for i, piece in enumerate(prompt.split(image_token)):
        if i:
            ids += [image_id] * n_image_tokens
        if not legacy and piece:
            piece_ids = tokenizer(" " + piece)["input_ids"]
            if len(piece_ids) > 2 and piece_ids[1] == underline and piece_ids[2] in special:
                piece_ids = piece_ids[:1] + piece_ids[2:]
        else:
            piece_ids = tokenizer(piece)["input_ids"]
        ids += piece_ids if i == 0 else piece_ids[1:]  # the BOS of every piece but the first is dropped
    return ids


def preprocess_pixels(processor, images: Sequence[Any], row: int) -> torch.Tensor:
    """[n, 3, H, W] pixel values of one row's images (ValueError naming the row if one is unreadable)."""
    opened = [load_image(img, f"images[{row}]") for img in images]
    return processor.image_processor(opened, return_tensors="pt")["pixel_values"]


def preprocess_images(processor, images: Sequence[Any]) -> list[PixelValues]:
    """Open and preprocess images exactly as `prepare_batch` would (ValueError naming the bad index)."""
    opened = [load_image(img, f"images[{i}]") for i, img in enumerate(images)]
    pixels = processor.image_processor(opened, return_tensors="pt")["pixel_values"]
    return [PixelValues(p) for p in pixels]


def normalise_pixels(processor, pixels) -> list[PixelValues]:
    """The rest of the processor's work on resized, cropped uint8 pixels [N, 3, H, W] (numpy): rescale and
    normalise, bit-identical to running the whole processor on the original image. Returns PixelValues per row.
    (The offline job resizes on CPU workers and ships uint8, a quarter of the float bytes; the engine does this.)"""
    values = processor.image_processor(list(pixels), do_resize=False, do_center_crop=False,
                                       input_data_format="channels_first", return_tensors="pt")["pixel_values"]
    return [PixelValues(v) for v in values]


def image_token_count(processor, height: int, width: int) -> int:
    """How many `<image>` tokens an image of pixel size [height, width] becomes (LlavaProcessor's rule)."""
    n = (height // processor.patch_size) * (width // processor.patch_size) + processor.num_additional_image_tokens
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def load_image(image: ImageInput, field: str, max_pixels: int | None = None,
               max_aspect_ratio: float | None = None) -> Image.Image:
    """Open an image given as PIL image, path or encoded bytes; ValueError naming `field` if unreadable, or if
    it has more than `max_pixels` pixels or a long side over `max_aspect_ratio` times its short side (both
    checked from the header, before the pixels are decoded)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(image)))
        elif isinstance(image, (str, Path)):
            img = Image.open(Path(image).expanduser())
        else:
            raise ValueError(f"{field}: expected a PIL image, a path or bytes, got {type(image).__name__}")
        if max_pixels is not None and img.width * img.height > max_pixels:
            raise ValueError(f"{field} is {img.width}x{img.height} = {img.width * img.height} pixels, over the "
                             f"limit of {max_pixels} (max_image_pixels)")
        if max_aspect_ratio is not None and max(img.size) > max_aspect_ratio * max(1, min(img.size)):
            raise ValueError(f"{field} is {img.width}x{img.height}, over the aspect-ratio limit of "
                             f"{max_aspect_ratio:g}:1 (max_image_aspect_ratio)")
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
        row_list = _as_image_list(row_images)
        n_placeholders = prompt.count(token)
        if n_placeholders != len(row_list):
            what = "has no image placeholder" if n_placeholders == 0 else f"has {n_placeholders} placeholders"
            raise ValueError(f"prompts[{i}]: {what} ({token!r}) but {len(row_list)} image(s) were given")
        rule = getattr(processor, PROMPT_RULE_ATTR, None)
        if row_list and (rule is not None or all(isinstance(img, PixelValues) for img in row_list)):
            row_pixels = (torch.stack([img.values for img in row_list]) if isinstance(row_list[0], PixelValues)
                          else preprocess_pixels(processor, row_list, i))  # [n, 3, H, W]
            n_tokens = image_token_count(processor, *row_pixels.shape[-2:])
            if rule is not None:
                row = torch.tensor(tokenize_llava(processor.tokenizer, prompt, token, n_tokens, rule.legacy))
            else:
                row = processor.tokenizer(prompt.replace(token, token * n_tokens), return_tensors="pt")["input_ids"][0]
        elif rule is not None:
            row, row_pixels = torch.tensor(tokenize_llava(processor.tokenizer, prompt, token, 0, rule.legacy)), None
        else:
            opened = [load_image(img, f"images[{i}]") for img in row_list]
            out = processor(images=opened or None, text=prompt, return_tensors="pt")
            row, row_pixels = out["input_ids"][0], out.get("pixel_values")
        if len(row) + max_new_tokens > max_context:
            raise ValueError(f"prompts[{i}]: {len(row)} prompt tokens + max_new_tokens {max_new_tokens} exceed "
                             f"the model's context of {max_context} tokens")
        ids.append(row)
        n_images.append(len(row_list))
        if row_list:
            pixels.append(row_pixels)
    lengths = [len(r) for r in ids]
    pad_id = processor.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    input_ids = torch.full((len(ids), max(lengths)), pad_id, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = row
    valid = torch.arange(input_ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    pixel_values = torch.cat(pixels) if pixels else None
    return PreparedBatch(input_ids, valid, pixel_values, lengths, n_images)


def concat_prepared(batches: Sequence[PreparedBatch], pad_id: int = 0) -> PreparedBatch:
    """Stack prepared batches (e.g. single requests prepared on their own threads) into one, re-padded on the
    right to the longest row. Padding ids are never read (the `valid` mask hides them)."""
    lengths = [n for b in batches for n in b.lengths]
    input_ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    row = 0
    for b in batches:
        for i, n in enumerate(b.lengths):
            input_ids[row, :n] = b.input_ids[i, :n]
            row += 1
    valid = torch.arange(input_ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    pixels = [b.pixel_values for b in batches if b.pixel_values is not None]
    return PreparedBatch(input_ids, valid, torch.cat(pixels) if pixels else None, lengths,
                         [k for b in batches for k in b.n_images])


def split_prepared(batch: PreparedBatch) -> list[PreparedBatch]:
    """One single-row PreparedBatch per row of `batch` (each cut to its own length), e.g. to submit a batch's
    rows to the engine as separate requests. The inverse of `concat_prepared`."""
    out, first_image = [], 0
    for i, (n, k) in enumerate(zip(batch.lengths, batch.n_images)):
        pixels = batch.pixel_values[first_image : first_image + k] if k else None
        first_image += k
        out.append(PreparedBatch(batch.input_ids[i : i + 1, :n], batch.valid[i : i + 1, :n], pixels, [n], [k]))
    return out
