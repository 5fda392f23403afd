"""Stage 1 of the tiny model: pretrain the CLIP-style vision tower on the scenes' structured labels (per 3x3
grid cell: colour, shape and size, or empty), so the LLaVA stage starts from features that see shapes and
places. The cell heads are discarded afterwards; only the tower is kept."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F
from torch import nn

from dynllava.data import shapes


class CellHeads(nn.Module):
    """Pools the patch grid into 3x3 cells and classifies each: [N, P, C] -> colour, shape, size logits."""

    def __init__(self, width: int):
        super().__init__()
        self.colour = nn.Linear(width, 1 + len(shapes.COLOURS))
        self.shape = nn.Linear(width, 1 + len(shapes.SHAPES))
        self.size = nn.Linear(width, 1 + len(shapes.SIZES))

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n, p, c = patches.shape
        side = int(p**0.5)
        grid = patches.transpose(1, 2).reshape(n, c, side, side)
        cells = F.adaptive_avg_pool2d(grid, 3).flatten(2).transpose(1, 2)  # [N, 9, C]
        return self.colour(cells), self.shape(cells), self.size(cells)


def scene_batch(rng: random.Random, processor, split_seed: int, start: int, n: int):
    """n rendered scenes with their cell labels: (pixel_values [n, 3, H, W], three [n, 9] label tensors)."""
    images, labels = [], []
    for i in range(start, start + n):
        row_rng = random.Random(f"vision/{split_seed}/{i}")
        scene = shapes.sample_scene(row_rng)
        images.append(shapes.render(scene, row_rng))
        labels.append(shapes.cell_labels(scene))
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, [torch.tensor([lab[k] for lab in labels]) for k in range(3)]


def cell_loss(vision_tower, heads: CellHeads, pixels: torch.Tensor, targets: list[torch.Tensor]):
    """Mean cross-entropy over cells and attributes; also returns the fraction of cells fully right."""
    patches = vision_tower(pixels).last_hidden_state[:, 1:]  # drop CLS
    logits = heads(patches)
    loss = sum(F.cross_entropy(lg.flatten(0, 1).float(), t.flatten()) for lg, t in zip(logits, targets)) / 3
    right = torch.stack([lg.argmax(-1) == t for lg, t in zip(logits, targets)]).all(0).float().mean()
    return loss, float(right)
