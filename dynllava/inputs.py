"""Turning user inputs (images, prompts) into padded token tensors, with clear errors for bad input."""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from dynllava.image_layout import ImageLayout, single_view

ImageInput = Any  # PIL.Image.Image | str | Path | bytes | PixelValues | None


@dataclass
class PixelValues:
    """An image the model's image processor has already resized and normalised, e.g. on a CPU worker so the
    accelerator's actor only runs the model. values: [3, H, W] float (H, W = the processor's crop size), or for
    the any-resolution families [n_tiles, 3, S, S] (the image's base view and tiles, unpadded) with image_size,
    the original (height, width)."""

    values: torch.Tensor
    image_size: tuple[int, int] | None = None


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


IMAGE_PART = None  # an image's place among a chat turn's parts (chat_prompt)


def chat_prompt(processor, turns: Sequence[tuple[str, Sequence[str | None]]]) -> str:
    """A conversation in the processor's chat template, ending with the generation prompt.

    turns: (role, parts) with each part a text or IMAGE_PART, in order. Templates differ in what a message's
    content is: LLaVA-1.5's take a string (images as `<image>` lines), llava-hf's LLaVA-NeXT and OneVision
    templates a list of parts ({"type": "image"}, {"type": "text", "text": ...}) and place the images
    themselves. Which kind a template is, is found once per template (`_takes_parts`)."""
    token = processor.image_token
    render = functools.partial(processor.apply_chat_template, add_generation_prompt=True, tokenize=False)
    if _takes_parts(processor, render):
        return render([{"role": role, "content": [{"type": "image"} if p is IMAGE_PART else
                                                  {"type": "text", "text": p} for p in parts]}
                       for role, parts in turns])
    return render([{"role": role, "content": "\n".join(token if p is IMAGE_PART else p for p in parts)}
                   for role, parts in turns])


_TAKES_PARTS: dict[tuple[str, str], bool] = {}  # (template, image token) -> whether it reads a list of parts


def _takes_parts(processor, render: Callable) -> bool:
    """Whether the chat template reads a message's content as parts: a probe message of one image and one text
    comes out with both (one placeholder, the text) and no part written out as a Python dict."""
    key = (str(processor.chat_template), processor.image_token)
    if key not in _TAKES_PARTS:
        probe = "dynllava template probe"
        try:
            out = render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": probe}]}])
        except Exception:  # a template that cannot take parts at all (jinja raises its own error types)
            out = ""
        _TAKES_PARTS[key] = out.count(processor.image_token) == 1 and probe in out and "{'type'" not in out
    return _TAKES_PARTS[key]


def is_anyres(processor) -> bool:
    """Whether the processor tiles images at any resolution (LLaVA-NeXT, LLaVA-OneVision)."""
    return getattr(processor.image_processor, "image_grid_pinpoints", None) is not None


def resize_image(processor, image: Image.Image) -> tuple[np.ndarray, tuple[int, int]]:
    """The processor's geometric work on one image, without rescaling or normalising: uint8 pixels [3, H, W]
    (LLaVA-1.5: resized and cropped) or [n_tiles, 3, S, S] (any-res: its base view and tiles), and the image's
    original (height, width). `normalise_pixels` finishes the job."""
    if is_anyres(processor):  # one image as its own group: what prepare_batch does for a row of one image
        out = processor.image_processor([[image]], do_rescale=False, do_normalize=False, return_tensors="np")
        return out["pixel_values"][0].astype(np.uint8), tuple(int(x) for x in out["image_sizes"][0])
    values = processor.image_processor(image, do_rescale=False, do_normalize=False,
                                       return_tensors="np")["pixel_values"][0]
    return values.astype(np.uint8), (image.height, image.width)


def normalise_pixels(processor, pixels, image_sizes: Sequence[tuple[int, int]] | None = None) -> list[PixelValues]:
    """The rest of the processor's work on `resize_image`'s uint8 pixels, one entry per row (numpy [N, 3, H, W], or
    any-res: a sequence of [n_tiles, 3, S, S] with image_sizes): rescale and normalise, bit-identical to running
    the whole processor on the original image. Returns PixelValues per row. (The offline job resizes on CPU
    workers and ships uint8, a quarter of the float bytes; the engine does this.)"""
    if is_anyres(processor):
        if image_sizes is None:
            raise ValueError("any-resolution pixels need their images' original sizes")
        ip = processor.image_processor
        return [PixelValues(torch.from_numpy(np.stack([
            ip.normalize(ip.rescale(tile, scale=ip.rescale_factor), mean=ip.image_mean, std=ip.image_std)
            for tile in tiles])), tuple(int(x) for x in size)) for tiles, size in zip(pixels, image_sizes)]
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
    except UnidentifiedImageError:  # its message names an in-memory buffer by address: say what it means
        raise ValueError(f"{field}: unreadable image (not a format Pillow can identify)") from None
    except (OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise ValueError(f"{field}: unreadable image ({e})") from None


@dataclass
class PreparedBatch:
    """Right-padded model inputs for B rows.

    input_ids: [B, T] long (padding = pad id); valid: [B, T] bool; pixel_values: [N_views, 3, H, W] or None,
    the views the vision tower runs (LLaVA-1.5: one per image; any-res: each image's tiles, unpadded), images in
    row order; lengths: prompt tokens per row; n_images: images per row; image_layouts: each image's run of
    `<image>` slots, images in row order; image_sizes: [N_img, 2] original (height, width), any-res only.
    """

    input_ids: torch.Tensor
    valid: torch.Tensor
    pixel_values: torch.Tensor | None
    lengths: list[int]
    n_images: list[int]
    image_layouts: list[ImageLayout] = field(default_factory=list)
    image_sizes: torch.Tensor | None = None

    def layouts_by_row(self) -> list[list[ImageLayout]]:
        """image_layouts cut into rows."""
        out, first = [], 0
        for n in self.n_images:
            out.append(self.image_layouts[first : first + n])
            first += n
        return out


LayoutFn = Callable[[torch.Tensor, list[int]], list[ImageLayout]]  # (image_sizes [N, 2], images per row) -> layouts


def _as_image_list(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    if images is None:
        return []
    if isinstance(images, (list, tuple)):
        return list(images)
    return [images]


def prepare_batch(processor, images: Sequence[Any], prompts: Sequence[str], max_context: int,
                  max_new_tokens: int, layout_fn: LayoutFn | None = None) -> PreparedBatch:
    """Validate and tokenize each row (expanding `<image>` into the image tokens), then right-pad.

    images[i] is None, one image, or a list of images for prompts[i]; the prompt must hold one image
    placeholder per image. layout_fn: the model's image layouts, required by the any-resolution processors
    (those that return `image_sizes`; DynamicLlava.prepare passes its own).
    """
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must have the same length, got {len(images)} and {len(prompts)}")
    if not prompts:
        raise ValueError("prompts: empty batch")
    token = processor.image_token
    image_id = processor.tokenizer.convert_tokens_to_ids(token)
    ids, pixels, n_images, layouts, sizes = [], [], [], [], []
    for i, (row_images, prompt) in enumerate(zip(images, prompts)):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{i}]: must be a non-empty string")
        row_list = _as_image_list(row_images)
        n_placeholders = prompt.count(token)
        if n_placeholders != len(row_list):
            what = "has no image placeholder" if n_placeholders == 0 else f"has {n_placeholders} placeholders"
            raise ValueError(f"prompts[{i}]: {what} ({token!r}) but {len(row_list)} image(s) were given")
        rule = getattr(processor, PROMPT_RULE_ATTR, None)
        row_sizes = None
        given = bool(row_list) and all(isinstance(img, PixelValues) for img in row_list)
        if given and layout_fn is not None:  # any-res tiles preprocessed elsewhere (the offline job's decode)
            row_sizes = torch.tensor([_image_size(img, i) for img in row_list])
            layouts_given = layout_fn(row_sizes, [len(row_list)])
            for j, (img, x) in enumerate(zip(row_list, layouts_given)):
                if img.values.dim() != 4 or img.values.shape[0] != x.n_tiles:
                    raise ValueError(f"images[{i}][{j}]: {tuple(img.values.shape)} pixel values, expected {x.n_tiles} "
                                     "tiles [n, 3, H, W] for this image size")
            pieces = prompt.split(token)
            expanded = pieces[0] + "".join(token * x.length + piece for x, piece in zip(layouts_given, pieces[1:]))
            row = processor.tokenizer(expanded, return_tensors="pt")["input_ids"][0]
            row_pixels = torch.cat([img.values for img in row_list])
        elif row_list and (rule is not None or given):
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
            # a row's images as one group: LLaVA-OneVision's multi-image mode when there are several
            out = processor(images=([opened] if layout_fn else opened) if opened else None, text=prompt,
                            return_tensors="pt")
            row, row_pixels, row_sizes = out["input_ids"][0], out.get("pixel_values"), out.get("image_sizes")
        row_layouts = _row_layouts(row, image_id, len(row_list), row_sizes, layout_fn, i)
        if row_sizes is not None:
            if row_pixels.dim() == 5:  # the processor's [n, max tiles, 3, S, S], padded -> each image's own tiles
                row_pixels = torch.cat([row_pixels[j, : x.n_tiles] for j, x in enumerate(row_layouts)])
            sizes.append(row_sizes)
        if len(row) + max_new_tokens > max_context:
            raise ValueError(f"prompts[{i}]: {len(row)} prompt tokens + max_new_tokens {max_new_tokens} exceed "
                             f"the model's context of {max_context} tokens")
        ids.append(row)
        n_images.append(len(row_list))
        layouts += row_layouts
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
    return PreparedBatch(input_ids, valid, pixel_values, lengths, n_images, layouts,
                         torch.cat(sizes) if sizes else None)


def _image_size(image: PixelValues, row: int) -> tuple[int, int]:
    if image.image_size is None:
        raise ValueError(f"images[{row}]: any-resolution pixel values need the original image_size (height, width)")
    return tuple(int(x) for x in image.image_size)


def _row_layouts(row: torch.Tensor, image_id: int, n_images: int, sizes: torch.Tensor | None,
                 layout_fn: LayoutFn | None, index: int) -> list[ImageLayout]:
    """The layouts of one row's images, checked against the `<image>` slots its tokens hold."""
    slots = int((row == image_id).sum())
    if not n_images:
        return []
    if sizes is None:  # LLaVA-1.5: equal single views
        layouts = [single_view(slots // n_images)] * n_images
    elif layout_fn is None:
        raise ValueError("an any-resolution processor's inputs need the model's image layouts (prepare them with "
                         "DynamicLlava.prepare)")
    else:
        layouts = layout_fn(sizes, [n_images])
    if sum(x.length for x in layouts) != slots:
        raise ValueError(f"prompts[{index}]: {slots} image slots for images of {[x.length for x in layouts]} "
                         "tokens (the processor and the model disagree)")
    return layouts


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
    sizes = [b.image_sizes for b in batches if b.image_sizes is not None]
    return PreparedBatch(input_ids, valid, torch.cat(pixels) if pixels else None, lengths,
                         [k for b in batches for k in b.n_images], [x for b in batches for x in b.image_layouts],
                         torch.cat(sizes) if sizes else None)


def split_prepared(batch: PreparedBatch) -> list[PreparedBatch]:
    """One single-row PreparedBatch per row of `batch` (each cut to its own length), e.g. to submit a batch's
    rows to the engine as separate requests. The inverse of `concat_prepared`."""
    out, first_image, first_view = [], 0, 0
    for i, (n, k, layouts) in enumerate(zip(batch.lengths, batch.n_images, batch.layouts_by_row())):
        views = sum(x.n_tiles for x in layouts)
        pixels = batch.pixel_values[first_view : first_view + views] if k else None
        sizes = batch.image_sizes[first_image : first_image + k] if batch.image_sizes is not None and k else None
        first_image, first_view = first_image + k, first_view + views
        out.append(PreparedBatch(batch.input_ids[i : i + 1, :n], batch.valid[i : i + 1, :n], pixels, [n], [k],
                                 layouts, sizes))
    return out
