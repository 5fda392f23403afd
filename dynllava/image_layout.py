"""Where each image's tokens lie in a prompt, for every LLaVA family: LLaVA-1.5 (one fixed-size view per image),
LLaVA-NeXT and LLaVA-OneVision (any resolution: a base view, then a grid of tiles with a learned newline token
closing each grid row).

An image is one contiguous run of `<image>` slots, images in prompt order. Its run holds `base` tokens of the
base view (raster order), then the grid's rows, each `grid_width - 1` tokens and one newline. The layout of an
any-resolution image comes from transformers' own `pack_image_features`, run on index "features" of width 1
(no vision tower): its unpadding, OneVision's `anyres_max_N` shrink and the newline placement are transformers'
code, never copied here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from dynllava.ops import keep_count

FAMILIES = {"llava": "LLaVA-1.5", "llava_next": "LLaVA-NeXT", "llava_onevision": "LLaVA-OneVision"}
ANYRES_FAMILIES = ("llava_next", "llava_onevision")


@dataclass(frozen=True)
class ImageLayout:
    """One image's run of `<image>` slots.

    length: slots (= feature rows: base view + grid + newlines); n_tiles: vision-tower passes of
    [3, S, S] (1 for LLaVA-1.5 and for a OneVision image in a multi-image row; 1 + grid tiles for any-res);
    base: tokens of the base view, first in the run; grid_width: tokens per grid row, its closing newline
    included (0: no grid).
    """

    length: int
    n_tiles: int
    base: int
    grid_width: int = 0

    def __post_init__(self) -> None:
        grid = self.length - self.base
        if self.base < 0 or grid < 0 or (self.grid_width == 0 and grid) or (self.grid_width and grid % self.grid_width):
            raise ValueError(f"inconsistent image layout {self}")

    @property
    def n_newlines(self) -> int:
        return (self.length - self.base) // self.grid_width if self.grid_width else 0


def single_view(n_tokens: int) -> ImageLayout:
    """LLaVA-1.5: one view of n_tokens, no grid."""
    return ImageLayout(n_tokens, 1, n_tokens)


def anyres_layouts(hf_model, image_sizes: torch.Tensor, n_images: Sequence[int]) -> list[ImageLayout]:
    """Layouts of any-resolution images (LLaVA-NeXT or OneVision), from transformers' own functions.

    image_sizes: [N_img, 2] (original height, width), images in row order; n_images: images per row (a
    OneVision row with several images runs each as one view: its multi-image mode).
    """
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    config, inner = hf_model.config, hf_model.model
    side = config.vision_config.image_size
    per_view = (side // config.vision_config.patch_size) ** 2
    onevision = config.model_type == "llava_onevision"
    tiled = [not (onevision and n > 1) for n in n_images for _ in range(n)]
    sizes = [tuple(int(x) for x in s) for s in image_sizes.tolist()]
    if len(sizes) != len(tiled):
        raise ValueError(f"{len(sizes)} image sizes for {len(tiled)} images")
    n_tiles = [image_size_to_num_patches(s, config.image_grid_pinpoints, side) if t else 1
               for s, t in zip(sizes, tiled)]
    probe = [torch.arange(n * per_view, dtype=torch.float64).view(n, per_view, 1) for n in n_tiles]
    newline = torch.tensor([-1.0], dtype=torch.float64)
    if onevision:
        packed, _ = inner.pack_image_features(probe, image_sizes, image_newline=newline,
                                              vision_aspect_ratio=config.vision_aspect_ratio)
    else:
        packed, _ = inner.pack_image_features(probe, image_sizes, config.vision_feature_select_strategy,
                                              image_newline=newline)
    layouts = []
    for features, tiles in zip(packed, n_tiles):
        is_newline = features[:, 0] == -1.0
        where = torch.nonzero(is_newline)[:, 0].tolist()
        width = where[0] - per_view + 1 if where else 0
        layout = ImageLayout(features.shape[0], tiles, per_view, width)
        expected = [per_view + (r + 1) * width - 1 for r in range(layout.n_newlines)]
        if where != expected:  # transformers changed its packing: refuse rather than mis-place tokens
            raise ValueError(f"unexpected image packing: newlines at {where[:4]}..., expected {expected[:4]}...")
        layouts.append(layout)
    return layouts


def image_groups(image_mask: torch.Tensor, layouts: Sequence[Sequence[ImageLayout]]) -> torch.Tensor:
    """Which image each slot belongs to: [B, T] long, the image's index within its row, -1 for text.

    image_mask: [B, T] bool (the `<image>` slots); layouts[b]: row b's images in order (their lengths must add
    up to the row's slots).
    """
    b, t = image_mask.shape
    width = max((len(row) for row in layouts), default=0)
    ends = torch.full((b, max(width, 1)), torch.iinfo(torch.long).max, dtype=torch.long)
    for i, row in enumerate(layouts):
        if row:
            ends[i, : len(row)] = torch.tensor([x.length for x in row]).cumsum(0)
    ends = ends.to(image_mask.device)
    order = image_mask.long().cumsum(1) - 1  # each slot's index among its row's image slots
    group = torch.searchsorted(ends, order.clamp_min(0), right=True)
    return torch.where(image_mask, group, torch.full_like(group, -1))


def newline_mask(groups: torch.Tensor, layouts: Sequence[Sequence[ImageLayout]]) -> torch.Tensor:
    """[B, T] bool: the slots holding a grid row's newline token. groups: image_groups' output."""
    b, _ = groups.shape
    width = max((len(row) for row in layouts), default=0) or 1
    table = torch.zeros(b, width, 3, dtype=torch.long)  # per image: first slot index among images, base, grid_width
    for i, row in enumerate(layouts):
        start = 0
        for m, x in enumerate(row):
            table[i, m] = torch.tensor([start, x.base, x.grid_width])
            start += x.length
    table = table.to(groups.device)
    image = groups >= 0
    info = torch.gather(table, 1, groups.clamp_min(0)[..., None].expand(-1, -1, 3))  # [B, T, 3]
    offset = (image.long().cumsum(1) - 1) - info[..., 0]  # position within its image
    grid_pos = offset - info[..., 1]
    width_t = info[..., 2].clamp_min(1)
    return image & (info[..., 2] > 0) & (grid_pos >= 0) & (grid_pos % width_t == width_t - 1)


def image_keep_counts(layouts: Sequence[Sequence[ImageLayout]], keeps: Sequence[float],
                      roundings: Sequence[str]) -> list[list[int]]:
    """Image tokens kept per image: keep_count(image length, the row's keep, its rounding); layouts[b] holds
    row b's images."""
    return [[keep_count(x.length, keep, rounding) for x in row]
            for row, keep, rounding in zip(layouts, keeps, roundings)]
