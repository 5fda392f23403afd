"""Fixtures for the Ray Data jobs: one local Ray per test module, small inputs of every kind, a job config on
the tiny random test model (no predictors, so heuristic scorers)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from pipelines.config import ActorPool, CaptionJobConfig
from dynllava.config import SparsityConfig

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with logical CPUs to spare (decode tasks + actors), a capped object store, no dashboard."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])  # workers
    ray.init(num_cpus=6, include_dashboard=False, object_store_memory=400 * 2**20, log_to_driver=False)
    yield ray
    ray.shutdown()


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
