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
    """Classifies, from every patch on its own, the contents of the 3x3 grid cell the patch lies in:
    [N, P, C] -> colour, shape, size logits [N, P, classes]. Per patch (not pooled per cell), so that every
    image token carries its cell's objects: a pruned image that keeps any token of a cell still knows it.
    With `cell_index`, a fourth head names the patch's own cell [N, P, 9], so every token also states where it
    is (the LM then reads "where is X" off the token that holds X)."""

    def __init__(self, width: int, cell_index: bool = False):
        super().__init__()
        self.colour = nn.Linear(width, 1 + len(shapes.COLOURS))
        self.shape = nn.Linear(width, 1 + len(shapes.SHAPES))
        self.size = nn.Linear(width, 1 + len(shapes.SIZES))
        self.cell = nn.Linear(width, 9) if cell_index else None

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.colour(patches), self.shape(patches), self.size(patches)


def patch_cells(n_patches: int) -> torch.Tensor:
    """The 3x3 cell (reading order) of each patch of a square patch grid: [P] long."""
    side = int(n_patches**0.5)
    rows = torch.arange(side).repeat_interleave(side) * 3 // side
    cols = torch.arange(side).repeat(side) * 3 // side
    return rows * 3 + cols


def scene_batch(rng: random.Random, processor, split_seed: int, start: int, n: int, variety: float = 0.0):
    """n rendered scenes with their cell labels: (pixel_values [n, 3, H, W], three [n, 9] label tensors);
    `variety`: the share drawn on varied canvases (the grid stays in the centre crop the processor keeps)."""
    images, labels = [], []
    for i in range(start, start + n):
        row_rng = random.Random(f"vision/{split_seed}/{i}")
        scene = shapes.sample_scene(row_rng)
        images.append(shapes.scene_image(scene, row_rng, f"vision-canvas/{split_seed}/{i}", variety))
        labels.append(shapes.cell_labels(scene))
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    return pixels, [torch.tensor([lab[k] for lab in labels]) for k in range(3)]


def cell_loss(vision_tower, heads: CellHeads, pixels: torch.Tensor, targets: list[torch.Tensor]):
    """Mean cross-entropy over patches and heads (each patch predicts its cell's labels, targets [N, 9], and its
    cell index when the heads have one); also returns the fraction of patches with all three attributes right."""
    patches = vision_tower(pixels).last_hidden_state[:, 1:]  # [N, P, C], CLS dropped
    cells = patch_cells(patches.shape[1]).to(patches.device)
    per_patch = [t[:, cells] for t in targets]  # [N, P] each
    logits = heads(patches)
    losses = [F.cross_entropy(lg.flatten(0, 1).float(), t.flatten()) for lg, t in zip(logits, per_patch)]
    if heads.cell is not None:
        losses.append(F.cross_entropy(heads.cell(patches).flatten(0, 1).float(), cells.repeat(patches.shape[0])))
    right = torch.stack([lg.argmax(-1) == t for lg, t in zip(logits, per_patch)]).all(0).float().mean()
    return sum(losses) / len(losses), float(right)
