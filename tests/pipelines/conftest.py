"""Fixtures for the Ray Data jobs: small inputs of every kind, a job config on the tiny random test model (no
predictors, so heuristic scorers)."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipelines.config import ActorPool, CaptionJobConfig
from dynllava.config import SparsityConfig

def png_bytes(seed: int, size: tuple[int, int] = (40, 48), fmt: str = "PNG") -> bytes:
    img = Image.new("RGB", size, ((seed * 53) % 256, (seed * 97) % 256, (seed * 31) % 256))
    img.putpixel((seed % size[0], 0), (255, 255, 255))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture()
def job_config(tiny_yaml) -> CaptionJobConfig:
    return CaptionJobConfig(
        model=tiny_yaml, prompt="Describe the image briefly.", max_new_tokens=6, batch_size=4, decode_batch_size=8,
        sparsity=SparsityConfig(vision_keep=0.5, text_keep=0.5, vision_scorer="stride", text_scorer="recent"),
        actors=ActorPool(min_size=1, max_size=1, num_cpus=1), rows_per_file=5)
