"""Shared fixtures: a tiny random LLaVA built from a config (CPU, fp32), random images, prompts."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_SPEC = {
    "name": "test-tiny",
    "random_weights": True,
    "seed": 0,
    "image_token_id": 300,
    "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "image_size": 32, "patch_size": 8},  # 16 image tokens
    "text": {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320,
             "max_position_embeddings": 256},
}


def sharpen(model, std: float = 0.15, seed: int = 1) -> None:
    """Re-draw the linear/embedding weights larger than HF's 0.02 init, so a random model's greedy tokens
    depend on its input (at 0.02 every prompt decodes the same few tokens and equality tests prove little)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.hf_model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(torch.randn(module.weight.shape, generator=g) * std)


@pytest.fixture(scope="session")
def tiny_yaml(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "test-tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_SPEC))
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tiny_yaml):
    from dynllava.model import DynamicLlava
    from dynllava.predictors import Predictors

    model = DynamicLlava.from_pretrained(tiny_yaml, device="cpu", dtype=torch.float32)
    sharpen(model)
    torch.manual_seed(2)
    model.predictors = Predictors(model.config.text_config.hidden_size).eval()  # random but real weights
    return model


def random_image(seed: int, size: tuple[int, int] = (40, 52)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


@pytest.fixture(scope="session")
def batch4(tiny_model):
    """A ragged batch: 4 images of different sizes, prompts of different lengths."""
    texts = ["hi", "describe this picture in great detail please", "what colour?", "count the shapes now"]
    images = [random_image(i, (30 + 9 * i, 52 - 5 * i)) for i in range(4)]
    prompts = [tiny_model.format_prompt(t) for t in texts]
    return images, prompts


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray with logical CPUs to spare (decode tasks + actors), a capped object store, no dashboard."""
    import ray

    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])  # workers
    os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")  # metrics reach /metrics in ~1 s, not ~10 s
    # address="local": always a new local cluster, never one a crashed process left in /tmp/ray
    ray.init(address="local", num_cpus=6, include_dashboard=False, object_store_memory=400 * 2**20,
             log_to_driver=False)
    yield ray
    if ray.is_initialized():
        from ray import serve

        serve.shutdown()  # stops the driver's handle metrics pushers too: they would re-init Ray after shutdown
    ray.shutdown()
