"""The paper's two learned predictors (Dynamic-LLaVA, ICLR 2025), with their own save/load.

Both read the hidden states entering decoder layer K and output 2 logits per token; channel 0 = keep
(the official weights' convention).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

PREDICTORS_FILE = "predictors.safetensors"
KEEP = 0  # logit channel meaning "keep"


def _mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(w_in, w_out))
        if i < len(widths) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


class ImagePredictor(nn.Module):
    """Scores image tokens: LayerNorm -> Linear(d->W) -> GELU -> 2 pre-norm transformer blocks (W, W/64 heads,
    MLP 4W) -> W/2 per-token channels + W/2 channels mean-pooled over the sample's image tokens -> MLP
    W->256->128->2. The paper's W is 512; a model much narrower than 4096 can use a smaller W so that the
    predictor costs less than the layers it saves.

    forward(hidden [B, N, d], mask [B, N] bool: real image tokens) -> logits [B, N, 2].
    """

    def __init__(self, d_model: int, width: int = 512, blocks: int = 2):
        super().__init__()
        if width < 64 or width % 64:
            raise ValueError(f"image predictor width must be a multiple of 64, got {width}")
        self.d_model = d_model
        self.width = width
        heads, mlp = width // 64, 4 * width
        self.stem = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, width), nn.GELU())
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
            for _ in range(blocks)
        )
        self.half = width // 2
        self.head = _mlp([width, 256, 128, 2])

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.stem(hidden)  # [B, N, W]
        for block in self.blocks:
            x = block(x, src_key_padding_mask=~mask)
        local, pooled = x[..., : self.half], x[..., self.half :]
        weights = mask.to(x.dtype)[..., None]  # [B, N, 1]
        pooled = (pooled * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1.0)
        return self.head(torch.cat([local, pooled.expand_as(local)], dim=-1))


class TextPredictor(nn.Module):
    """Decides per generated token whether its K/V is admitted: LayerNorm -> MLP d->512->256->128->2.

    forward(hidden [..., d]) -> logits [..., 2].
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.d_model = d_model
        self.net = nn.Sequential(nn.LayerNorm(d_model), _mlp([d_model, 512, 256, 128, 2]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden)


class Predictors(nn.Module):
    """The pair, saved together as `predictors.safetensors` beside the model (metadata: d_model, layer,
    image_width)."""

    def __init__(self, d_model: int, layer: int = 2, image_width: int = 512):
        super().__init__()
        self.layer = layer
        self.image = ImagePredictor(d_model, image_width)
        self.text = TextPredictor(d_model)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PREDICTORS_FILE
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(path), metadata={"d_model": str(self.image.d_model), "layer": str(self.layer),
                                                  "image_width": str(self.image.width)})
        return path

    @classmethod
    def load(cls, directory: str | Path, device: torch.device | str = "cpu",
             dtype: torch.dtype = torch.float32) -> "Predictors | None":
        """Load from `directory/predictors.safetensors`; None when the file is absent."""
        path = Path(directory) / PREDICTORS_FILE
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "d_model" not in meta:
            raise ValueError(f"{path}: missing d_model metadata: {json.dumps(meta)}")
        predictors = cls(int(meta["d_model"]), int(meta.get("layer", 2)), int(meta.get("image_width", 512)))
        predictors.load_state_dict(load_file(str(path)))
        return predictors.to(device=device, dtype=dtype).eval()
